"""
model.py — the one Transformer of this project: a bidirectional masked-diffusion Transformer written
with Qwen2.5 conventions (RMSNorm, SwiGLU MLP, grouped-query attention, optional q/k/v bias,
rotate-half RoPE with a configurable base, optional tied embeddings), plus the relay input of
PAPER.md §2 (the channel itself lives in relay.py).

    python model.py            # prints the parameter count of the Sudoku presets

The same class serves the Sudoku model trained from scratch (full bidirectional attention over 81
cells) and, with a block mask, the Fast-dLLM v2 block-diffusion LLM (arXiv 2509.26328).

forward(idx, relay=h) returns (logits, h_out): raw logits at every position and the hidden state the
relay reads — the last block's output before the final norm (Sudoku) or after it (the LLM,
`relay_after_norm`), as in the authors' code.
"""
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

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

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


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
    """cos, sin of shape (T, head_dim) for integer positions `pos` (T,), rotate-half layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim)
    freqs = pos.float()[:, None] * inv_freq[None]  # (T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):  # x: (B, H, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hd = cfg.head_dim
        self.n_head, self.n_kv_head, self.hd = cfg.n_head, cfg.n_kv_head, hd
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * hd, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, attn_mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
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
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, attn_mask):
        x = x + self.drop(self.self_attn(self.input_layernorm(x), cos, sin, attn_mask))
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
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
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

    def forward(self, idx, *, relay=None, pos=None, attn_mask=None):
        """idx (B, T) token ids; relay (B, T, D) carried state or None (= inject nothing);
        pos (T,) positions (default 0..T-1); attn_mask: bool (T, S) or (B, 1, T, S), True = attend,
        None = full bidirectional. Returns logits (B, T, V) and h_out (B, T, D)."""
        B, T = idx.shape
        if pos is None:
            pos = torch.arange(T, device=idx.device)
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
            x = layer(x, cos, sin, attn_mask)
        hn = self.norm(x)
        logits = self.lm_head(hn) if self.lm_head is not None else hn @ self.embed_tokens.weight.T
        return logits, (hn if self.cfg.relay_after_norm else x)

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


if __name__ == "__main__":
    for name, cfg in [("xtiny (paper)", ModelConfig()),
                      ("cpu", ModelConfig(n_embd=128, n_head=4, n_kv_head=4, n_ffn=512))]:
        print(f"{name}: {Transformer(cfg).num_params() / 1e6:.2f}M parameters")
