"""
relay.py — Learned Relay Representations (arXiv 2605.22967): the relay channel, the rollout buffer
and the K-step rollout loss trained with truncated backpropagation through time (PAPER.md §2–3).

Read it top to bottom:
  1. RelayChannel   h -> LayerNorm(h) added to the token embeddings of the next denoising step.
  2. mlm_loss       the plain masked-diffusion objective (Table 1, row "MLM").
  3. RolloutBuffer  per-slot trajectories that walk from fully masked to solved across steps.
  4. rollout_loss   K forwards on the buffer, revealing ground truth where the model is confident;
                    objective "rollout" (no relay), "relay_sg" (h detached between the K steps)
                    or "relay" (gradient flows through h across the K steps: truncated BPTT).

No command of its own: train_sudoku.py drives it (`python train_sudoku.py --objective relay`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

OBJECTIVES = ("mlm", "rollout", "relay_sg", "relay")


# ---------------------------------------------------------------------------------------------
# 1. the relay channel (PAPER.md §2)

class RelayChannel(nn.Module):
    """R(h) = LayerNorm(h): a single affine LayerNorm over D, no projection. Sudoku: added at every
    position, weight starts at 1. Fine-tuning an LLM: added at MASK positions only, weight starts at
    0 so the model begins exactly as the pretrained one."""

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


# ---------------------------------------------------------------------------------------------
# 2. MLM: t ~ U[0,1] per example, mask each free position with probability t, CE on masked ones

def mlm_loss(model, x0, fixed, gen):
    """x0 (B, T) clean tokens, fixed (B, T) bool (clues/prompt: never masked, never in the loss).
    Plain token mean over masked positions (no 1/t weight)."""
    B, T = x0.shape
    t = torch.rand(B, 1, generator=gen, device=x0.device)
    masked = (torch.rand(B, T, generator=gen, device=x0.device) < t) & ~fixed
    xt = torch.where(masked, model_mask_id(model), x0)
    logits, _ = model(xt)
    return F.cross_entropy(logits[masked].float(), x0[masked])


def model_mask_id(model):
    return getattr(model, "module", model).cfg.mask_id


# ---------------------------------------------------------------------------------------------
# 3. the rollout buffer

class RolloutBuffer:
    """A persistent set of `capacity` trajectories. Per slot: clean target x0, current canvas x,
    fixed mask (clues/prompt), relay state h (fp32, detached) and implicitly "finished" (no free
    position is masked any more). Every slot walks its whole unmasking trajectory across optimizer
    steps, so training sees early (all masked) and late (almost solved) canvases alike."""

    def __init__(self, capacity, T, D, mask_id, device):
        self.mask_id = mask_id
        self.x0 = torch.zeros(capacity, T, dtype=torch.long, device=device)
        self.x = torch.zeros(capacity, T, dtype=torch.long, device=device)
        self.fixed = torch.ones(capacity, T, dtype=torch.bool, device=device)  # empty = finished
        self.h = torch.zeros(capacity, T, D, device=device)

    def finished(self):
        return ~((self.x == self.mask_id) & ~self.fixed).any(1)  # (capacity,)

    def refill(self, fetch):
        """Replace finished slots by fresh rows from fetch(n) -> (x0, fixed): free positions fully
        masked, h = 0. We fetch exactly as many rows as there are free slots (the authors draw a
        full batch and drop the surplus; same distribution, less waste). Returns the count."""
        idx = self.finished().nonzero().squeeze(1)
        if len(idx):
            x0, fixed = fetch(len(idx))
            self.x0[idx], self.fixed[idx] = x0, fixed
            self.x[idx] = torch.where(fixed, x0, self.mask_id)
            self.h[idx] = 0.0
        return len(idx)

    def state_dict(self):
        return {k: getattr(self, k).cpu() for k in ("x0", "x", "fixed", "h")}

    def load_state_dict(self, sd):
        for k, v in sd.items():
            if v.shape != getattr(self, k).shape:
                raise ValueError(f"rollout buffer {k}: checkpoint has {tuple(v.shape)}, "
                                 f"this run expects {tuple(getattr(self, k).shape)}")
            getattr(self, k).copy_(v)


# ---------------------------------------------------------------------------------------------
# 4. the K-step rollout loss with truncated BPTT (PAPER.md §3)

def rollout_loss(model, buf, K, objective, reveal, forward=None):
    """One micro-step on the buffer. reveal(conf, masked) -> bool (B, T) picks positions by the
    model's own confidence (no gradient); the ground truth is written there (teacher forcing).
    loss = L_1 + ... + L_K, each a token mean of CE over positions masked at that step.
    forward(x, h, masked) -> (logits at the masked positions (N, V), h_out (B, T, D)); default:
    model(x, relay=h). The block-diffusion LLM passes one that runs the [x ‖ x0] layout and applies
    the token shift (train_code.py)."""
    assert objective in ("rollout", "relay_sg", "relay"), objective
    if forward is None:
        def forward(x, h, masked):
            logits, h_out = model(x, relay=h)  # (B, T, V), (B, T, D)
            return logits[masked], h_out
    use_relay = objective != "rollout"
    x, x0, free = buf.x.clone(), buf.x0, ~buf.fixed
    h = buf.h.clone() if use_relay else None  # detached: the truncation of BPTT between steps
    loss = 0.0
    for _ in range(K):
        masked = (x == buf.mask_id) & free
        logits, h_out = forward(x, h, masked)  # (N, V) at the masked positions, (B, T, D)
        if masked.any():
            loss = loss + F.cross_entropy(logits.float(), x0[masked])
        with torch.no_grad():
            conf = torch.zeros(x.shape, device=x.device)
            conf[masked] = logits.detach().float().softmax(-1).max(-1).values
            x = torch.where(reveal(conf, masked), x0, x)  # model's order, true tokens
        if use_relay:
            h = h_out if objective == "relay" else h_out.detach()  # relay: BPTT through h
    buf.x.copy_(x)
    if use_relay:
        buf.h.copy_(h.detach().float())
    return loss
