"""
model.py — running the network: one masked-diffusion Transformer with Qwen2.5 conventions (RMSNorm,
SwiGLU, grouped-query attention, optional q/k/v bias, rotate-half RoPE, optional tied embeddings),
the relay channel it owns, block-diffusion attention with a KV cache, the token shift and the doubled
training layout. (Weights on disk, training checkpoints and Fast-dLLM v2 directories: checkpoint.py;
flag checks and the run directory's lock: runs.py.)

    python model.py                       # parameter counts of the built-in shapes

One class serves both experiments of Relay (arXiv 2605.22967):
- the Sudoku model trained from scratch: bd_size 0, full bidirectional attention over 81 cells;
- the block-diffusion LLM: bd_size 32, bidirectional inside a block and causal across blocks
  (NOTES.md §5), which a KV cache decodes block by block.

forward(idx, relay=h) -> (logits, h_out): raw logits at every position, and the hidden state the
relay carries to the next denoising step (NOTES.md §1). NOTE: the LLM's logits are its AR parent's
next-token logits; `shift_right` below is the one place that turns them into per-token logits.
"""
import argparse
import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from runs import InputError, argparser
from tokenizer import byte_tokenizer


@dataclass
class ModelConfig:
    vocab_size: int = 10  # Sudoku: 0 = MASK, 1..9 = digits
    n_layer: int = 4  # Transformer blocks
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (< n_head: grouped-query attention)
    n_embd: int = 384  # model width D
    n_ffn: int = 1024  # SwiGLU hidden width (1024: the parameter count of the authors' xtiny ReLU MLP of 1536)
    rope_theta: float = 10000.0  # RoPE base (Qwen2.5: 1e6)
    norm_eps: float = 1e-5  # RMSNorm epsilon (Qwen2.5: 1e-6)
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2.5: True)
    tie_embeddings: bool = False  # share the token embedding with the output head
    n_pos: int = 0  # learned absolute position embeddings added to the tokens (0 = none, RoPE only)
    embed_std: float = 0.02  # init std of token/position embeddings. NOTE: a from-scratch relay model
    # needs 1.0 (PyTorch's default): LayerNorm(h) has norm ~sqrt(D) and would drown 0.02-std tokens
    dropout: float = 0.0  # on attention probabilities and residual branches (none on the embeddings,
    # where the relay is added: the authors' Sudoku model has none there)
    mask_id: int = 0  # token id of [MASK]
    relay: bool = False  # has a relay channel (NOTES.md §1)
    relay_masked_only: bool = False  # inject the relay at MASK positions only (LLM) vs everywhere
    relay_after_norm: bool = False  # relay reads the final-norm output (LLM) vs the pre-norm one
    relay_zero_init: bool = False  # relay LayerNorm weight starts at 0 (fine-tuning) vs 1
    relay_eps: float = 1e-5  # relay LayerNorm epsilon
    bd_size: int = 0  # diffusion block size: 0 = full bidirectional attention (Sudoku); Fast-dLLM v2: 32

    def __post_init__(self):
        # a bad shape fails here, by name, instead of as a reshape error deep inside a forward
        sizes = {k: getattr(self, k) for k in ("vocab_size", "n_head", "n_kv_head", "n_embd", "n_ffn")}
        if bad := {k: v for k, v in sizes.items() if not (isinstance(v, int) and v >= 1)}:
            raise InputError(f"ModelConfig: {bad} must be integers >= 1")
        for k in ("n_layer", "bd_size"):  # n_layer 0: embeddings + head only (a test); bd_size 0: no blocks
            if not (isinstance(getattr(self, k), int) and getattr(self, k) >= 0):
                raise InputError(f"ModelConfig: {k} {getattr(self, k)!r} must be an integer >= 0")
        if problem := shape_problem(self.n_embd, self.n_head, self.n_kv_head):
            raise InputError(f"ModelConfig: {problem}")
        if not -1 <= self.mask_id < self.vocab_size:  # -1: not known yet (from_pretrained reads the tokenizer)
            raise InputError(f"ModelConfig: mask_id {self.mask_id} is outside the vocabulary "
                             f"(vocab_size {self.vocab_size})")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @classmethod
    def from_hf(cls, c, where="config.json"):
        """Our config from a Qwen2 / Fast-dLLM v2 config.json dict (NOTES.md §5). Every value read is
        type-checked (hf_value): "false" is not false, 4.0 is not 4, null is not a default."""
        if not isinstance(c, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(c).__name__}")
        need = ["vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size"]
        if missing := [k for k in need if k not in c]:
            raise InputError(f"{where} lacks {missing}")
        size = {k: hf_value(c, k, int, where, minimum=1) for k in need}
        n_head, n_embd = size["num_attention_heads"], size["hidden_size"]
        if hf_value(c, "head_dim", int, where, n_embd // n_head, minimum=1) * n_head != n_embd:
            raise InputError(f"{where}: head_dim * num_attention_heads != hidden_size is not supported")
        rp = c.get("rope_parameters") or c.get("rope_scaling") or {}  # transformers >= 5 nests rope_theta here
        if not isinstance(rp, dict):
            raise InputError(f"{where}: rope_parameters / rope_scaling must be an object, not {json.dumps(rp)}")
        if rp.get("rope_type", rp.get("type", "default")) != "default" or \
                hf_value(c, "use_sliding_window", bool, where, False):
            raise InputError(f"{where}: rope scaling {rp} / sliding window are not supported")
        theta = hf_value(rp, "rope_theta", float, where, None, minimum=0) or \
            hf_value(c, "rope_theta", float, where, 10000.0, minimum=0)
        eps = hf_value(c, "rms_norm_eps", float, where, 1e-6, minimum=0)
        hf_value(c, "max_position_embeddings", int, where, 0, minimum=1)  # the sampler's length limit
        if (act := c.get("hidden_act", "silu")) != "silu":  # SwiGLU's gate: the only one the MLP has
            raise InputError(f"{where}: hidden_act {act!r} is not supported (silu)")
        if (mask := hf_value(c, "mask_token_id", int, where, -1, minimum=0)) >= size["vocab_size"]:
            raise InputError(f"{where}: mask_token_id {mask} is outside the vocabulary "
                             f"(vocab_size {size['vocab_size']})")
        return cls(**{**QWEN2, "vocab_size": size["vocab_size"], "n_layer": size["num_hidden_layers"],
                      "n_head": n_head, "n_kv_head": hf_value(c, "num_key_value_heads", int, where, n_head, minimum=1),
                      "n_embd": n_embd, "n_ffn": size["intermediate_size"], "rope_theta": theta, "norm_eps": eps,
                      "relay_eps": eps, "qkv_bias": hf_value(c, "attention_bias", bool, where, True),
                      "tie_embeddings": hf_value(c, "tie_word_embeddings", bool, where, False),
                      "mask_id": mask,
                      "relay": hf_value(c, "use_relay", bool, where, False),
                      "bd_size": hf_value(c, "bd_size", int, where, 32, minimum=1)})

    def to_hf(self):
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": self.vocab_size,
                "num_hidden_layers": self.n_layer, "num_attention_heads": self.n_head,
                "num_key_value_heads": self.n_kv_head, "hidden_size": self.n_embd, "head_dim": self.head_dim,
                "intermediate_size": self.n_ffn, "rope_theta": self.rope_theta, "rms_norm_eps": self.norm_eps,
                "hidden_act": "silu", "attention_bias": self.qkv_bias, "tie_word_embeddings": self.tie_embeddings,
                "max_position_embeddings": MAX_POSITIONS, "bd_size": self.bd_size, "use_relay": self.relay,
                "mask_token_id": self.mask_id}


# The Qwen2.5 / Fast-dLLM v2 conventions, the one place they are written: every block-diffusion LLM here
# (loaded, random or trained from scratch) is ModelConfig(**QWEN2, **shape, ...). The relay fields are
# the fine-tuning relay of NOTES.md §1: MASK positions only, reads the final-norm output, starts at zero.
QWEN2 = dict(rope_theta=1e6, norm_eps=1e-6, qkv_bias=True, tie_embeddings=True, bd_size=32,
             relay_masked_only=True, relay_after_norm=True, relay_zero_init=True, relay_eps=1e-6)
MAX_POSITIONS = 32768  # Qwen2.5's max_position_embeddings: what a model built here (not loaded) may decode
# Named Qwen2.5 shapes. "tiny" is the shape of train_code.py's from-scratch cpu preset (0.82M parameters with
# the byte vocabulary; 0.88M with the preset's BPE); "1.5b" is Fast-dLLM v2 1.5B, for speed and memory checks.
SHAPES = {
    "tiny": dict(vocab_size=260, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, n_ffn=384),
    "1.5b": dict(vocab_size=151936, n_layer=28, n_head=12, n_kv_head=2, n_embd=1536, n_ffn=8960),
}


def shape_problem(n_embd, n_head, n_kv_head):
    """What is wrong with this attention shape, or None. RoPE rotates halves of each head, so the head
    dimension must be even; grouped-query attention shares each K/V head among n_head / n_kv_head."""
    if n_embd % n_head:
        return f"n_embd {n_embd} is not divisible by n_head {n_head}"
    if (n_embd // n_head) % 2:
        return f"head dimension n_embd / n_head = {n_embd // n_head} is odd (rotate-half RoPE needs it even)"
    if n_head % n_kv_head:
        return f"n_head {n_head} is not a multiple of n_kv_head {n_kv_head}"
    return None


REQUIRED = object()


def hf_value(c, key, typ, where, default=REQUIRED, minimum=None):
    """c[key] if it has JSON type `typ` (bool, int, or float, which accepts integers too) and is
    >= minimum (> 0 for floats); `default` when the key is absent. NOTE: json gives "false" as a
    truthy string and 4.0 as a float: both are errors here, named by field, never coerced."""
    if key not in c:
        if default is REQUIRED:
            raise InputError(f"{where} lacks {key}")
        return default
    v = c[key]
    ok = isinstance(v, bool) if typ is bool else (
        not isinstance(v, bool) and isinstance(v, (int, float) if typ is float else typ))
    if ok and minimum is not None and typ is float:
        ok = math.isfinite(v) and v > minimum
    elif ok and minimum is not None:
        ok = v >= minimum
    if not ok:
        want = {bool: "true or false", int: "an integer", float: "a number"}[typ]
        bound = "" if minimum is None else f" {'>' if typ is float else '>='} {minimum}"
        raise InputError(f"{where}: {key} must be {want}{bound}, not {json.dumps(v)}")
    return float(v) if typ is float else v


def block_mask(L, bd_size, *, doubled=False, q0=0, device=None):
    """Boolean attention mask, True = may attend (NOTES.md §5).
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

    def advance(self, T):
        """The last forward's T positions join the committed prefix."""
        self.len += T

    def keep(self, rows):
        """Drop finished rows: rows (B',) indices of the rows that stay."""
        if self.k is not None:
            self.k, self.v = self.k[:, rows], self.v[:, rows]


class StaticKVCache(KVCache):
    """A KVCache whose forwards all have one shape, so that one block's forward can be captured in a
    CUDA graph (batch-1 decoding is bound by kernel launches, not memory): the write position is a
    device tensor, and attention reads the whole buffer (max_len keys); the caller's mask hides the
    keys past the forward's own positions. The same tokens as KVCache (tests)."""

    def allocate(self, B, n_kv_head, head_dim, dtype, device):
        """The buffers, up front: neither a CUDA graph nor a compiled forward may allocate them."""
        self.k = torch.zeros(self.n_layer, B, n_kv_head, self.max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.offset = torch.zeros((), dtype=torch.long, device=device)

    def update(self, i, k, v):
        B, H, T, hd = k.shape
        if self.k is None:
            self.allocate(B, H, hd, k.dtype, k.device)
        if self.len + T > self.max_len:
            raise ValueError(f"KV cache full: {self.len} + {T} > max_len {self.max_len}")
        slot = self.offset + torch.arange(T, device=k.device)
        self.k[i].index_copy_(2, slot, k)
        self.v[i].index_copy_(2, slot, v)
        return self.k[i], self.v[i]

    def advance(self, T):
        self.len += T
        self.offset += T


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


# NOTE: outside torch.compile. Compiled, the pow, cos and sin were fused into every layer's q/k
# kernel and recomputed for each element of the batch: 19 % of the GPU time of a compiled Sudoku
# step on an H100 (RESULTS.md, "Second H100 session"). Run eagerly, they are a (T, head_dim) table.
@torch.compiler.disable
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


@torch.library.custom_op("relay::keep_mask", mutates_args=())
def keep_mask(x: torch.Tensor, drop: int) -> torch.Tensor:
    """bool (x.shape): True with probability (65536 - drop) / 65536, from 16 random bits per element
    of torch's CPU generator. An op of its own, so torch.compile calls it as it is and fuses what is
    around it: Inductor's own CPU random numbers made a compiled step slower than an eager one."""
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2 ** 63, 2 ** 63 - 1)
    return bits.view(torch.int16)[:x.numel()].view(x.shape) >= drop - 32768


@keep_mask.register_fake
def _(x, drop):
    return torch.empty_like(x, dtype=torch.bool)


def dropout(x, p, training=True):
    """F.dropout, but on the CPU the mask comes from keep_mask: torch's CPU Bernoulli sampler takes
    about 3x as long and was 13-18 % of a bf16 Sudoku training step (RESULTS.md, "CPU training
    throughput"). An element is kept with probability q = 1 - round(p 2^16) / 2^16 (within 2^-17 of
    1 - p) and scaled by 1/q, so the output's mean is x exactly. Seeded by torch's CPU generator like
    F.dropout, though the two draw different masks."""
    if not training or not 0 < p < 1 or x.device.type != "cpu":
        return F.dropout(x, p, training)  # on GPUs torch's own is fused and fast, compiled or not
    drop = round(p * 65536)
    return torch.where(keep_mask(x, drop), x * (65536 / (65536 - drop)), 0)


def attention_math(q, k, v, attn_mask=None, dropout_p=0.0):
    """softmax(q k^T / sqrt(hd) + mask) v with dropout on the probabilities, written out. SDPA runs
    this math anyway on the CPU when dropout is on, but upcasts bf16 inputs to fp32 for both
    matmuls and draws its mask with the slow sampler; here the matmuls stay in the input dtype
    (accumulating in fp32) and only the softmax runs in fp32, as the fused GPU kernels do.
    q: (B, H, T, hd); k, v: (B, H, S, hd); attn_mask: bool, True = may attend."""
    att = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5
    if attn_mask is not None:
        att = att.masked_fill(~attn_mask, float("-inf"))
    return dropout(att.softmax(-1).to(v.dtype), dropout_p) @ v


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
        dropout_p = self.dropout if self.training else 0.0
        g = self.n_head // self.n_kv_head  # query head h reads K/V head h // g
        if dropout_p and q.device.type == "cpu":  # CPU training: attention_math's faster mask, bf16 matmuls
            if g > 1:
                k, v = (t.repeat_interleave(g, 1) for t in (k, v))
            y = attention_math(q, k, v, attn_mask, dropout_p)
        elif attn_mask is None or g == 1:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, enable_gqa=g > 1)
        # NOTE: SDPA given both enable_gqa and a mask runs its math kernel on CUDA, which builds the
        # whole (B, H, T, S) score matrix in fp32. With a mask, one of two exact rewrites keeps a fused kernel:
        elif T * g <= k.shape[2]:  # a short input against a long cache (a decoding block): the g query
            # heads of each K/V head become its query rows, (B, Hkv, g * T, hd); only the mask is copied
            m = attn_mask.repeat(*(1,) * (attn_mask.dim() - 2), g, 1)  # row j * T + t = row t
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv_head, g * T, self.hd), k, v, attn_mask=m,
                                               dropout_p=dropout_p).reshape(B, self.n_head, T, self.hd)  # NOTE:
            # reshape, not view: CUDA's fused kernels return a transposed (B, g * T, Hkv, hd) buffer
        else:  # a long input (training, prefill): K/V copied to every head; expand + flatten, no host sync
            k, v = (t[:, :, None].expand(-1, -1, g, -1, -1).flatten(1, 2) for t in (k, v))  # (B, H, S, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
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
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, attn_mask, kv_cache):
        p = self.dropout
        x = x + dropout(self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, kv_cache), p, self.training)
        return x + dropout(self.mlp(self.post_attention_layernorm(x)), p, self.training)




class RelayChannel(nn.Module):
    """R(h) = LayerNorm(h), a single affine LayerNorm over D (no projection), added to the token
    embeddings of the next denoising step (NOTES.md §1). Sudoku: at every position, weight starts at
    1. Fine-tuning an LLM: at MASK positions only, weight starts at 0, so the model begins exactly
    as the pretrained one. Lives in the model so that checkpoints store it (`relay.norm.*`)."""

    def __init__(self, n_embd, eps, masked_only, zero_init):
        super().__init__()
        self.norm = nn.LayerNorm(n_embd, eps=eps)
        self.masked_only, self.zero_init = masked_only, zero_init
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.constant_(self.norm.weight, 0.0 if self.zero_init else 1.0)
        nn.init.zeros_(self.norm.bias)

    def forward(self, e, h, is_mask):  # e (B, T, D) embeddings, h (B, T, D), is_mask (B, T)
        r = self.norm(h.to(self.norm.weight.dtype)).to(e.dtype)
        if self.masked_only:
            return torch.where(is_mask[..., None], e + r, e)
        return e + r


HEAD_CHUNK = 1024  # rows of full-vocabulary logits alive at a time in the loss (152k x 1024 fp32 = 0.6 GB)


class HeadCE(torch.autograd.Function):
    """Cross-entropy of the LM head's logits z @ W.T against targets, HEAD_CHUNK rows at a time: the
    (N, V) logits are never all alive, neither in the forward nor in the backward, which recomputes
    each chunk's logits (NOTES.md §5). z (N, D), W (V, D), targets (N,) -> per-row CE (N,) fp32, and
    the argmax's probability (N,) (softmax over the whole vocabulary; no gradient), the rollout's
    confidence. Under autocast the matmuls run in its dtype, in the backward too."""

    @staticmethod
    def forward(ctx, z, W, targets, chunk):
        dt = torch.get_autocast_dtype(z.device.type) if torch.is_autocast_enabled(z.device.type) else z.dtype
        ce, conf = z.new_empty(len(z), dtype=torch.float32), z.new_empty(len(z), dtype=torch.float32)
        Wd = W.to(dt)  # once, not per chunk
        for i in range(0, len(z), chunk):
            logits = (z[i:i + chunk].to(dt) @ Wd.T).float()  # (c, V)
            lse = logits.logsumexp(-1)
            ce[i:i + chunk] = lse - logits.gather(1, targets[i:i + chunk, None])[:, 0]
            conf[i:i + chunk] = (logits.max(-1).values - lse).exp()
        ctx.save_for_backward(z, W, targets)
        ctx.chunk, ctx.dt = chunk, dt
        ctx.mark_non_differentiable(conf)  # a loss built on it is an error, not a silently zero gradient
        return ce, conf

    @staticmethod
    def backward(ctx, g_ce, g_conf):  # conf has no gradient (the reveal is not differentiated)
        z, W, targets = ctx.saved_tensors
        dt = ctx.dt
        if g_ce is None:
            return None, None, None, None
        gz, gW = torch.empty_like(z), torch.zeros(W.shape, dtype=torch.float32, device=W.device)
        Wd = W.to(dt)
        for i in range(0, len(z), ctx.chunk):
            zc = z[i:i + ctx.chunk].to(dt)
            g = (zc @ Wd.T).float().softmax(-1)  # dCE/dlogits = softmax - onehot
            g[torch.arange(len(g), device=g.device), targets[i:i + ctx.chunk]] -= 1
            g = (g * g_ce[i:i + ctx.chunk, None]).to(dt)
            gz[i:i + ctx.chunk] = (g @ Wd).to(z.dtype)
            gW += (g.T @ zc).float()
        return gz, gW.to(W.dtype), None, None


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.embed_pos = nn.Embedding(cfg.n_pos, cfg.n_embd) if cfg.n_pos else None
        self.relay = RelayChannel(cfg.n_embd, cfg.relay_eps, cfg.relay_masked_only,
                                  cfg.relay_zero_init) if cfg.relay else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.grad_ckpt = False  # recompute each block in the backward pass (activation memory for time)
        self.apply(self._init)
        for emb in (self.embed_tokens, self.embed_pos):
            if emb is not None:
                nn.init.normal_(emb.weight, std=cfg.embed_std)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, *, relay=None, pos=None, attn_mask=None, kv_cache=None, commit=False, out=None,
                read_at=None, targets=None):
        """idx (B, T) token ids; relay (B, T, D) carried state, or None = inject nothing (the LLM
        sampler's first forward of a block; a Sudoku trajectory's first step passes zeros, which adds
        the channel's bias); pos (T,) or (B, T) positions (default: continue after the cache);
        attn_mask bool (T, S) or (B, 1, T, S), True = may attend; default: block_mask for bd_size > 0,
        else full bidirectional. kv_cache: attend to its committed prefix too; commit=True appends
        this input's K/V to it. out: a slice of positions to return (the noisy half of [x_t ‖ x_0]).
        read_at: (rows, cols) index tensors -> logits (N, V) at those positions only (a loss needs a
        few, and a 152k vocabulary makes full logits the largest tensor). targets (N,) with read_at: instead
        of logits, (per-row CE (N,), the argmax's probability (N,)) from HeadCE, chunk by chunk.
        Returns logits (B, T, V) or (N, V) (or that pair), and h_out (B, T, D)."""
        B, T = idx.shape
        P = kv_cache.len if kv_cache is not None else 0
        bd = self.cfg.bd_size
        if pos is None:
            pos = torch.arange(P, P + T, device=idx.device)
        one_block = T <= bd and P % bd == 0  # the input is one block (or part of one): the mask is all True
        if attn_mask is None and bd and not one_block:
            attn_mask = block_mask(P + T, bd, q0=P, device=idx.device)
        x = self.embed_tokens(idx)  # (B, T, D)
        if self.embed_pos is not None:
            x = x + self.embed_pos(pos)
        if relay is not None:  # the relay: the previous step's state joins this step's input
            if self.relay is None:
                raise ValueError("relay state given to a model built without a relay channel")
            x = self.relay(x, relay, idx == self.cfg.mask_id)
        cos, sin = rope(pos, self.cfg.head_dim, self.cfg.rope_theta)
        for layer in self.layers:
            if self.grad_ckpt and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, attn_mask, kv_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask, kv_cache)
        if kv_cache is not None and commit:
            kv_cache.advance(T)
        if out is not None:
            x = x[:, out]
        hn = self.norm(x)
        h_out = hn if self.cfg.relay_after_norm else x  # what the relay hands to the next step
        z = hn if read_at is None else hn[read_at]
        W = self.lm_head.weight if self.lm_head is not None else self.embed_tokens.weight  # (V, D)
        if targets is not None:  # the loss inside forward: DDP/FSDP/compile wrappers see it, and no (N, V) exists
            return HeadCE.apply(z, W, targets, HEAD_CHUNK), h_out
        return (self.lm_head(z) if self.lm_head is not None else z @ W.T), h_out

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def param_groups(self, weight_decay):
        """AdamW groups: decay matrices and embeddings, not biases or norm weights (NOTES.md §4)."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        other = [p for p in self.parameters() if p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]

    def config_dict(self):
        return asdict(self.cfg)


def unwrap(model):
    """The Transformer inside a DDP or torch.compile wrapper (FSDP's fully_shard wraps in place)."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ---------------------------------------------------------------------------------------------
# the token shift and the doubled training layout of the block-diffusion LLM (NOTES.md §5)

def shift_right(t):
    """THE token shift, the only place it is written. Fast-dLLM v2 keeps its AR parent's head: the
    output at position j-1 is about token j. shift_right turns anything indexed by position into
    something indexed by token: shifted[:, j] = t[:, j-1], and shifted[:, 0] = t[:, 0] as in the
    reference (position 0 of a block is always known, so it is never read). Applied to the logits
    and the relay state in the sampler, and in training to the relay state and to the position
    index (shift_right(arange) = the position each token is read from), so both agree exactly."""
    return torch.cat([t[:, :1], t[:, :-1]], 1)


def forward_doubled(model, xt, x0, masked, relay=None, targets=None):
    """One training forward of the block-diffusion LLM over [x_t ‖ x_0] (NOTES.md §5): length 2L, the
    same positions 0..L-1 in both halves; a noisy block sees itself and the clean blocks before it.
    xt, x0 (B, L) tokens; masked (B, L) bool: the tokens to predict; relay (B, L, D) or None, the
    relay state of x_t (already indexed by token). Calls `model` itself, so DDP/FSDP/compile wrappers
    see the call. Returns logits (N, V) of the masked tokens (row-major, the order of tensor[masked]),
    or with targets (N,) their CE and confidence (N,) each (HeadCE: no (N, V) tensor), and the noisy
    half's relay state indexed by token (B, L, D)."""
    B, L = xt.shape
    pos = torch.arange(L, device=xt.device)
    if relay is not None:
        relay = torch.cat([relay, torch.zeros_like(relay)], 1)  # the clean half gets no relay
    rows, cols = masked.nonzero(as_tuple=True)
    src = shift_right(pos[None])[0]  # (L,): token j is read from position src[j]
    mask = block_mask(L, unwrap(model).cfg.bd_size, doubled=True, device=xt.device)  # (2L, 2L)
    logits, h = model(torch.cat([xt, x0], 1), pos=pos.repeat(2), attn_mask=mask, relay=relay,
                      out=slice(0, L), read_at=(rows, src[cols]), targets=targets)  # (N, V), (B, L, D)
    return logits, shift_right(h)


# ---------------------------------------------------------------------------------------------
# a Sudoku canvas forward in pieces of rows on a CPU

CPU_ROWS = 64  # rows per piece of a CPU training forward (rows_forward; the sampler's pieces are smaller)


def rows_forward(model, x, relay=None, rows=None):
    """model(x, relay=relay) -> (logits, h) of a Sudoku canvas x (B, T), on a CPU in pieces of `rows`
    (default CPU_ROWS) rows, gradients and all. Rows are independent, so only the temporaries change
    size: a batch-512 forward of the paper model makes ones of 40-85 MB, which glibc maps fresh and
    unmaps every time (a page fault per 4 KB touched) and no cache holds. In pieces a CPU trains
    batch 512 1.25-1.4x faster (relay, bf16) and decodes 1.3-2x faster, the same tokens (RESULTS.md)."""
    rows = rows or CPU_ROWS
    if x.device.type != "cpu" or len(x) <= rows:
        return model(x, relay=relay)
    parts = [model(x[i:i + rows], relay=None if relay is None else relay[i:i + rows]) for i in range(0, len(x), rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ---------------------------------------------------------------------------------------------
# devices, and a random LLM for speed and memory checks

def device_flag(name):
    """The type of every --device flag: auto, or a device this machine has (cpu, cuda, cuda:N, mps)."""
    if name == "auto":
        return name
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N, mps)") from None
    have = {"cpu": True, "mps": torch.backends.mps.is_available(),
            "cuda": torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()}
    if not have.get(dev.type):
        raise argparse.ArgumentTypeError(f"{name}: this machine has no such device")
    return name


def pick_device(name="auto"):
    """auto -> cuda, then mps, then cpu; anything else as given."""
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def random_model(shape, device="cpu", dtype=torch.float32, seed=0, n_layer=None):
    """A Qwen2.5-shaped block-diffusion LLM with random weights and a live relay, and the byte
    tokenizer: speed and memory checks without a download. n_layer: fewer blocks of that shape.
    Returns (model in eval mode, tokenizer)."""
    tok = byte_tokenizer()
    cfg = ModelConfig(**{**QWEN2, **SHAPES[shape], "n_layer": n_layer or SHAPES[shape]["n_layer"],
                         "mask_id": tok.mask_id, "relay": True})
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(cfg)
    # weight 1, not a fine-tune's 0 (which injects nothing), so decoding checks cover the carried state
    nn.init.ones_(model.relay.norm.weight)
    model.hf_config = {"max_position_embeddings": MAX_POSITIONS}  # the length limit a saved one has (to_hf)
    return model.to(dtype).eval(), tok


if __name__ == "__main__":
    argparser(__doc__).parse_args()
    shapes = [("sudoku xtiny (paper)", ModelConfig(relay=True)),  # as train_sudoku.py builds the presets
              ("sudoku cpu", ModelConfig(n_embd=128, n_head=4, n_kv_head=4, n_ffn=512, n_pos=81, relay=True))]
    shapes += [(f"qwen2 {name}", ModelConfig(**QWEN2, **s)) for name, s in SHAPES.items()]
    for name, cfg in shapes:
        with torch.device("meta"):
            print(f"{name}: {Transformer(cfg).num_params() / 1e6:.2f}M parameters")
