"""
model.py — the one Transformer of this project: a masked-diffusion Transformer written with Qwen2.5
conventions (RMSNorm, SwiGLU MLP, grouped-query attention, optional q/k/v bias, rotate-half RoPE
with a configurable base, optional tied embeddings), the relay input of PAPER.md §2 (the channel
itself lives in relay.py), and the Fast-dLLM v2 (arXiv 2509.26328) checkpoint and tokenizer loader.

    python model.py                       # parameter counts of the built-in shapes
    python model.py --checkpoint DIR      # load a Fast-dLLM v2 directory, print its config

One class serves the Sudoku model trained from scratch (bd_size 0: full bidirectional attention over
81 cells) and the block-diffusion LLM (bd_size 32: bidirectional inside a block, causal across
blocks; PAPER.md §5), which a KV cache can decode block by block.

forward(idx, relay=h) returns (logits, h_out): raw logits at every position and the hidden state the
relay reads — the last block's output before the final norm (Sudoku) or after it (the LLM,
`relay_after_norm`), as in the authors' code. NOTE: the LLM's logits are next-token logits (position
i predicts token i+1, as in an AR model); the shift is applied by the consumers, see
`shift_right` in sampler.py.
"""
import json
import os
import re
import unicodedata
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from relay import RelayChannel


@dataclass
class ModelConfig:
    vocab_size: int = 10  # Sudoku: 0 = MASK, 1..9 = digits
    n_layer: int = 4  # Transformer blocks
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (< n_head: grouped-query attention)
    n_embd: int = 384  # model width D
    n_ffn: int = 1536  # SwiGLU hidden width
    rope_theta: float = 10000.0  # RoPE base (Qwen2.5: 1e6)
    norm_eps: float = 1e-5  # RMSNorm epsilon (Qwen2.5: 1e-6)
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2.5: True)
    tie_embeddings: bool = False  # share the token embedding with the output head
    n_pos: int = 0  # learned absolute position embeddings added to the tokens (0 = none, RoPE only)
    embed_std: float = 0.02  # init std of token/position embeddings. NOTE: a from-scratch relay model
    # needs 1.0 (PyTorch's default): LayerNorm(h) has norm ~sqrt(D) and would drown 0.02-std tokens
    dropout: float = 0.0  # on embeddings, attention probabilities and residual branches
    mask_id: int = 0  # token id of [MASK]
    relay: bool = False  # has a relay channel (PAPER.md §2)
    relay_masked_only: bool = False  # inject the relay at MASK positions only (LLM) vs everywhere
    relay_after_norm: bool = False  # relay reads the final-norm output (LLM) vs the pre-norm one
    relay_zero_init: bool = False  # relay LayerNorm weight starts at 0 (fine-tuning) vs 1
    relay_eps: float = 1e-5  # relay LayerNorm epsilon
    bd_size: int = 0  # diffusion block size: 0 = full bidirectional attention (Sudoku); Fast-dLLM v2: 32

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @classmethod
    def from_hf(cls, c):
        """Our config from a Qwen2 / Fast-dLLM v2 config.json dict (PAPER.md §5)."""
        need = ["vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size"]
        if missing := [k for k in need if k not in c]:
            raise ValueError(f"config.json lacks {missing}")
        if c.get("head_dim", c["hidden_size"] // c["num_attention_heads"]) * c["num_attention_heads"] != c["hidden_size"]:
            raise ValueError("config.json: head_dim * num_attention_heads != hidden_size is not supported")
        eps = c.get("rms_norm_eps", 1e-6)
        rp = c.get("rope_parameters") or c.get("rope_scaling") or {}  # transformers >= 5 nests rope_theta here
        if rp.get("rope_type", rp.get("type", "default")) != "default" or c.get("use_sliding_window"):
            raise ValueError(f"config.json: rope scaling {rp} / sliding window are not supported")
        return cls(vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"], n_head=c["num_attention_heads"],
                   n_kv_head=c.get("num_key_value_heads", c["num_attention_heads"]), n_embd=c["hidden_size"],
                   n_ffn=c["intermediate_size"], rope_theta=rp.get("rope_theta", c.get("rope_theta", 10000.0)), norm_eps=eps,
                   qkv_bias=c.get("attention_bias", True), tie_embeddings=c.get("tie_word_embeddings", False),
                   mask_id=c.get("mask_token_id", -1), relay=bool(c.get("use_relay", False)),
                   relay_masked_only=True, relay_after_norm=True, relay_zero_init=True, relay_eps=eps,
                   bd_size=c.get("bd_size", 32))

    def to_hf(self):
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": self.vocab_size,
                "num_hidden_layers": self.n_layer, "num_attention_heads": self.n_head,
                "num_key_value_heads": self.n_kv_head, "hidden_size": self.n_embd, "head_dim": self.head_dim,
                "intermediate_size": self.n_ffn, "rope_theta": self.rope_theta, "rms_norm_eps": self.norm_eps,
                "hidden_act": "silu", "attention_bias": self.qkv_bias, "tie_word_embeddings": self.tie_embeddings,
                "max_position_embeddings": 32768, "bd_size": self.bd_size, "use_relay": self.relay,
                "mask_token_id": self.mask_id}


def block_mask(L, bd_size, *, doubled=False, q0=0, device=None):
    """Boolean attention mask, True = may attend (PAPER.md §5).
    Inference (L - q0, L): blocks of bd_size tokens, bidirectional inside a block, causal across
    blocks; rows are the queries at positions q0..L-1 (a KV-cached forward of [q0, L) attends to
    keys 0..L-1). Training, doubled=True (2L, 2L) over [x_t ‖ x_0]: a noisy block b sees itself
    and the clean blocks < b; clean blocks see each other block-causally, never the noisy half."""
    bq = torch.arange(q0, L, device=device) // bd_size
    bk = torch.arange(L, device=device) // bd_size
    causal = bq[:, None] >= bk[None, :]  # (L - q0, L)
    if not doubled:
        return causal
    assert q0 == 0, "the doubled training layout has no cached variant"
    top = torch.cat([bq[:, None] == bk[None, :], bq[:, None] > bk[None, :]], 1)  # noisy rows (L, 2L)
    bottom = torch.cat([torch.zeros_like(causal), causal], 1)  # clean rows (L, 2L)
    return torch.cat([top, bottom], 0)


class KVCache:
    """Pre-allocated keys/values of committed blocks, shared length across the batch (the sampler
    aligns rows on block boundaries). A forward writes its K/V just past the committed prefix and
    attends to prefix + itself; only commit=True advances the prefix, so a denoising forward
    leaves the cache as it was."""

    def __init__(self, n_layer, max_len):
        self.n_layer, self.max_len, self.len = n_layer, max_len, 0
        self.k = self.v = None  # (n_layer, B, n_kv_head, max_len, hd), allocated on first use

    def update(self, i, k, v):  # k, v (B, Hkv, T, hd) of layer i -> keys, values up to the new end
        B, H, T, hd = k.shape
        if self.k is None:
            self.k = k.new_zeros(self.n_layer, B, H, self.max_len, hd)
            self.v = torch.zeros_like(self.k)
        if self.len + T > self.max_len:
            raise ValueError(f"KV cache full: {self.len} + {T} > max_len {self.max_len}")
        self.k[i, :, :, self.len:self.len + T] = k
        self.v[i, :, :, self.len:self.len + T] = v
        return self.k[i, :, :, :self.len + T], self.v[i, :, :, :self.len + T]

    def keep(self, rows):
        """Drop finished rows: rows (B',) indices of the rows that stay."""
        if self.k is not None:
            self.k, self.v = self.k[:, rows], self.v[:, rows]


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in fp32, scale in the input dtype."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope(pos, head_dim, theta):
    """cos, sin of shape (T, head_dim) or (B, 1, T, head_dim) for integer positions (T,) or (B, T),
    rotate-half layout, computed in fp32 as in Qwen2."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim)
    freqs = pos.float()[..., None] * inv_freq  # (..., T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    if emb.dim() == 3:
        emb = emb[:, None]  # per-row positions: broadcast over heads
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):  # x: (B, H, T, hd); in x's dtype, as Qwen2 does
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg, i):
        super().__init__()
        hd, self.i = cfg.head_dim, i
        self.n_head, self.n_kv_head, self.hd = cfg.n_head, cfg.n_kv_head, hd
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * hd, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, attn_mask, kv_cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.i, k, v)  # (B, Hkv, P + T, hd): committed prefix + this input
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.n_ffn, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.n_ffn, bias=False)
        self.down_proj = nn.Linear(cfg.n_ffn, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg, i):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg, i)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, attn_mask, kv_cache):
        x = x + self.drop(self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, kv_cache))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.embed_pos = nn.Embedding(cfg.n_pos, cfg.n_embd) if cfg.n_pos else None
        self.relay = RelayChannel(cfg.n_embd, cfg.relay_eps, cfg.relay_masked_only,
                                  cfg.relay_zero_init) if cfg.relay else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.grad_ckpt = False  # recompute each block in the backward pass (activation memory for time)
        self.apply(self._init)
        for emb in (self.embed_tokens, self.embed_pos):
            if emb is not None:
                nn.init.normal_(emb.weight, std=cfg.embed_std)
        if self.relay is not None:
            self.relay.reset_parameters()  # LayerNorm init (weight 1 or 0), not the Linear init

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, *, relay=None, pos=None, attn_mask=None, kv_cache=None, commit=False, out=None,
                head=True):
        """idx (B, T) token ids; relay (B, T, D) carried state or None (= inject nothing);
        pos (T,) or (B, T) positions (default: continue after the cache); attn_mask bool (T, S) or
        (B, 1, T, S), True = attend; default: block_mask for bd_size > 0, else full bidirectional.
        kv_cache: attend to its committed prefix too; commit=True appends this input's K/V to it.
        out: a slice of positions to return (e.g. the noisy half of [x_t ‖ x_0]; saves the head).
        head=(rows, cols) index tensors: logits (N, V) at those positions only (a loss needs a few,
        and a 152k vocabulary makes full logits big).
        Returns logits (B, T, V) and h_out (B, T, D)."""
        B, T = idx.shape
        P = kv_cache.len if kv_cache is not None else 0
        if pos is None:
            pos = torch.arange(P, P + T, device=idx.device)
        if attn_mask is None and self.cfg.bd_size and not (T <= self.cfg.bd_size and P % self.cfg.bd_size == 0
                                                           and (P + T - 1) // self.cfg.bd_size == P // self.cfg.bd_size):
            attn_mask = block_mask(P + T, self.cfg.bd_size, q0=P, device=idx.device)  # else: one block, all True
        x = self.embed_tokens(idx)  # (B, T, D)
        if self.embed_pos is not None:
            x = x + self.embed_pos(pos)
        if relay is not None:
            if self.relay is None:
                raise ValueError("relay state given to a model built without a relay channel")
            x = self.relay(x, relay, idx == self.cfg.mask_id)
        x = self.drop(x)
        cos, sin = rope(pos, self.cfg.head_dim, self.cfg.rope_theta)
        for layer in self.layers:
            if self.grad_ckpt and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, attn_mask, kv_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask, kv_cache)
        if kv_cache is not None and commit:
            kv_cache.len += T
        if out is not None:
            x = x[:, out]
        hn = self.norm(x)
        h_out = hn if self.cfg.relay_after_norm else x
        z = hn if head is True else hn[head]
        return (self.lm_head(z) if self.lm_head is not None else z @ self.embed_tokens.weight.T), h_out

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def param_groups(self, weight_decay):
        """AdamW groups: decay matrices and embeddings, not biases or norm weights (PAPER.md §4)."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        other = [p for p in self.parameters() if p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]

    def config_dict(self):
        return asdict(self.cfg)


def load_state(model, sd, where):
    """Strict load: missing, unexpected or mis-shaped tensors raise one error that lists them all."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: {tuple(sd[k].shape)} in file vs {tuple(v.shape)} in model"
              for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{where} does not match the model: missing {missing}, unexpected {unexpected}, "
                         f"mis-shaped {shapes}")
    model.load_state_dict(sd)



# ---------------------------------------------------------------------------------------------
# Fast-dLLM v2 / Qwen2 checkpoints (PAPER.md §5)

# our parameter name -> Hugging Face Qwen2 name; {i} = layer index. Relay tensors use the authors'.
HF_NAMES = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "layers.{i}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.self_attn.q_proj.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.self_attn.q_proj.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "layers.{i}.self_attn.k_proj.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.self_attn.k_proj.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "layers.{i}.self_attn.v_proj.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.self_attn.v_proj.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "layers.{i}.self_attn.o_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.post_attention_layernorm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.mlp.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.mlp.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.mlp.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "relay.norm.weight": "model.relay_layer_norm.weight",
    "relay.norm.bias": "model.relay_layer_norm.bias",
}


def hf_name(name):
    key = re.sub(r"^layers\.\d+\.", "layers.{i}.", name)
    if key not in HF_NAMES:
        raise KeyError(f"no Hugging Face name for parameter {name}")
    return HF_NAMES[key].replace("{i}", name.split(".")[1]) if "{i}" in key else HF_NAMES[key]


def from_pretrained(path, *, device="cpu", dtype=torch.bfloat16):
    """A Fast-dLLM v2 (or Qwen2) directory -> Transformer in eval mode. Reads config.json and
    model.safetensors or model.safetensors.index.json + shards; strict: missing, unexpected or
    mis-shaped tensors raise one error naming them. Relay checkpoints: use_relay + relay_layer_norm."""
    from safetensors import safe_open
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json (expected a Fast-dLLM v2 / Qwen2 checkpoint directory)")
    with open(cfg_path) as f:
        hf_cfg = json.load(f)
    cfg = ModelConfig.from_hf(hf_cfg)
    if cfg.mask_id < 0:  # Fast-dLLM v2 keeps the mask token in the tokenizer, not in config.json
        cfg.mask_id = find_token(path, MASK_TOKEN)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
    with torch.device("meta"):
        model = Transformer(cfg)
    want = {hf_name(k): (k, v.shape) for k, v in model.state_dict().items()}
    sd, unexpected, shapes = {}, [], []
    for shard in shards:
        with safe_open(os.path.join(path, shard), framework="pt", device="cpu") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if name == "lm_head.weight" and cfg.tie_embeddings and name not in want:
                    sd["@lm_head"] = t  # some exporters write the tied head too; checked below
                elif name not in want:
                    unexpected.append(f"{shard}:{name}")
                elif t.shape != want[name][1]:
                    shapes.append(f"{name}: {tuple(t.shape)} in {shard} vs {tuple(want[name][1])} in the model")
                else:
                    sd[want[name][0]] = t.to(device=device, dtype=dtype)
    tied_head = sd.pop("@lm_head", None)
    missing = sorted(hf for hf, (ours, _) in want.items() if ours not in sd)
    if tied_head is not None and "embed_tokens.weight" in sd and not torch.equal(
            tied_head.to(device=device, dtype=dtype), sd["embed_tokens.weight"]):
        unexpected.append("lm_head.weight (differs from embed_tokens but tie_word_embeddings is true)")
    if missing or unexpected or shapes:
        raise ValueError(f"{path} does not match its config.json: missing {missing}, unexpected {unexpected}, "
                         f"mis-shaped {shapes}")
    model.load_state_dict(sd, assign=True)
    model.hf_config = hf_cfg
    return model.eval()


def save_pretrained(model, path):
    """Write config.json + model.safetensors under Qwen2 / Fast-dLLM v2 names (relay as the authors
    name it), keeping the other keys of the config the model was loaded from."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    cfg = {**(getattr(model, "hf_config", None) or {}), **model.cfg.to_hf()}
    if not cfg["use_relay"]:
        cfg.pop("use_relay")
    tensors = {hf_name(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = os.path.join(path, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


# ---------------------------------------------------------------------------------------------
# tokenizer: the checkpoint's tokenizer.json as a tiktoken.Encoding (no network, no HF libraries)

MASK_TOKEN = "|<MASK>|"
# Qwen2's pre-tokenizer split (tokenizer.json pre_tokenizer.pretokenizers[0].pattern.Regex)
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_to_unicode():
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest map to 256+n."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + n) for n, b in enumerate(extra)}


def read_added_tokens(path):
    """content -> id of the added/special tokens in tokenizer.json and added_tokens.json."""
    out = {}
    tj = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tj):
        with open(tj, encoding="utf-8") as f:
            for t in json.load(f).get("added_tokens", []):
                if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
                    raise ValueError(f"{tj}: added token {t['content']!r} uses lstrip/rstrip/single_word, "
                                     f"which this tokenizer does not implement")
                out[t["content"]] = t["id"]
    aj = os.path.join(path, "added_tokens.json")
    if os.path.isfile(aj):
        with open(aj, encoding="utf-8") as f:
            out |= json.load(f)
    return out


def find_token(path, content):
    ids = read_added_tokens(path)
    if content not in ids:
        raise ValueError(f"{path}: token {content!r} is in neither config.json (mask_token_id) nor "
                         f"tokenizer.json/added_tokens.json")
    return ids[content]


class Tokenizer:
    """Byte-level BPE through tiktoken, with the Hugging Face tokenizers semantics Qwen2 uses:
    added tokens are matched in the raw text first, the rest is NFC-normalised, split by the
    pre-tokenizer regex and BPE-encoded. `enc` is the tiktoken.Encoding."""

    def __init__(self, enc, added, bpe_ids, nfc=True):
        self.enc, self.added, self.nfc = enc, added, nfc
        self.bpe_ids = frozenset(bpe_ids)
        self.id_to_added = {i: s for s, i in added.items()}
        self.split = re.compile("(" + "|".join(re.escape(s) for s in sorted(added, key=len, reverse=True)) + ")") \
            if added else None
        self.mask_id = added.get(MASK_TOKEN)
        self.stop_ids = [added[s] for s in ("<|im_end|>", "<|endoftext|>") if s in added]
        self.n_vocab = max([enc.max_token_value, *added.values()]) + 1

    def encode(self, text):
        ids = []
        for i, part in enumerate(self.split.split(text) if self.split else [text]):
            if i % 2:  # an added token
                ids.append(self.added[part])
            elif part:
                ids += self.enc.encode_ordinary(unicodedata.normalize("NFC", part) if self.nfc else part)
        return ids

    def decode(self, ids, skip_special=False):
        out, run = [], []
        for i in ids:
            if i not in self.bpe_ids:
                out.append(self.enc.decode(run))
                run = []
                if not skip_special:  # NOTE: ids beyond the vocabulary (random models) print as <|id:N|>
                    out.append(self.id_to_added.get(i, f"<|id:{i}|>"))
            else:
                run.append(i)
        return "".join(out) + self.enc.decode(run)

    @staticmethod
    def chat(prompt, system=None):
        """ChatML, as Qwen2.5 and Fast-dLLM v2 format a single user turn."""
        sys_part = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return f"{sys_part}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def load_tokenizer(path):
    """tokenizer.json (+ added_tokens.json) of a checkpoint directory -> Tokenizer."""
    import tiktoken
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tj):
        raise FileNotFoundError(f"{path}: no tokenizer.json")
    with open(tj, encoding="utf-8") as f:
        spec = json.load(f)
    m = spec.get("model") or {}
    if m.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ValueError(f"{tj}: only byte-level BPE tokenizers are supported (model {m.get('type')})")
    pattern = QWEN2_PATTERN
    for pt in (spec["pre_tokenizer"].get("pretokenizers") or [spec["pre_tokenizer"]]):
        if pt.get("type") == "Split":
            pattern = pt["pattern"].get("Regex") or re.escape(pt["pattern"]["String"])
    norm = json.dumps(spec.get("normalizer"))
    if spec.get("normalizer") and "NFC" not in norm:
        raise ValueError(f"{tj}: unsupported normalizer {norm} (NFC or none)")
    u2b = {u: b for b, u in byte_to_unicode().items()}
    to_bytes = lambda tok: bytes(u2b[ch] for ch in tok)
    added = read_added_tokens(path)
    ranks = {}
    for tok, i in m["vocab"].items():
        if tok in added:
            continue
        try:
            ranks[to_bytes(tok)] = i
        except KeyError:
            raise ValueError(f"{tj}: vocabulary entry {tok!r} (id {i}) is not in the byte-level alphabet") from None
    # tiktoken merges the pair whose result has the lowest rank, HF the earliest merge rule: the two
    # agree when ids grow with merge order, which byte-level BPE training guarantees. Check it.
    last = -1
    for n, mg in enumerate(m.get("merges", [])):
        a, b = mg.split(" ", 1) if isinstance(mg, str) else mg
        i = m["vocab"].get(a + b)
        if i is None or i <= last:
            raise ValueError(f"{tj}: merge {n} ({a!r} + {b!r}) is out of id order; tiktoken cannot reproduce it")
        last = i
    enc = tiktoken.Encoding(name=os.path.basename(os.path.abspath(path)), pat_str=pattern,
                            mergeable_ranks=ranks, special_tokens=added)
    return Tokenizer(enc, added, ranks.values(), nfc=spec.get("normalizer") is not None)


def save_byte_tokenizer(path):
    """Write byte_tokenizer() as a Hugging Face tokenizer.json, so a model trained with it loads like
    any checkpoint (load_tokenizer, the tokenizers library)."""
    tok = byte_tokenizer()
    b2u = byte_to_unicode()
    spec = {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for s, i in tok.added.items()],
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                                "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {b2u[b]: b for b in range(256)}, "merges": []}}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)


def byte_tokenizer():
    """A merge-free byte-level tokenizer with the ChatML and mask tokens, for random-init models."""
    import tiktoken
    added = {s: 256 + n for n, s in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", MASK_TOKEN])}
    enc = tiktoken.Encoding(name="bytes", pat_str=QWEN2_PATTERN,
                            mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens=added)
    return Tokenizer(enc, added, range(256))


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a Fast-dLLM v2 / Qwen2 directory to load and describe")
    args = p.parse_args()
    if args.checkpoint:
        m = from_pretrained(args.checkpoint, dtype=torch.float32)
        print(json.dumps(asdict(m.cfg), indent=1))
        print(f"{m.num_params() / 1e6:.1f}M parameters, relay {m.relay is not None}")
    else:
        for name, cfg in [("xtiny (paper)", ModelConfig()),
                          ("cpu", ModelConfig(n_embd=128, n_head=4, n_kv_head=4, n_ffn=512))]:
            print(f"{name}: {Transformer(cfg).num_params() / 1e6:.2f}M parameters")
