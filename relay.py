"""
relay.py — the method of Learned Relay Representations (arXiv 2605.22967), top to bottom:

  1. predict, reveal rules  which masked positions a denoising step commits (NOTES.md §3); the
                            sampler uses the same functions at inference.
  2. add_relay              give a pretrained LLM a relay channel that starts at zero (NOTES.md §1).
  3. mlm_loss, sft_loss     the baselines: plain masked diffusion (Table 1, "MLM") and Fast-dLLM v2's
                            block-diffusion SFT over [x_t ‖ x_0] (NOTES.md §5).
  4. RolloutBuffer          per-slot trajectories that walk from fully masked to solved across steps.
  5. rollout_loss           K forwards on the buffer, revealing the ground truth where the model is
                            confident: "rollout" (no relay), "relay_sg" (h detached between the K
                            steps) or "relay" (the gradient flows through h: truncated BPTT) (NOTES.md §2).

The relay channel itself (h -> LayerNorm(h) added to the next step's embeddings) is part of the
network and lives in model.py. No command of its own: `python train_sudoku.py` and
`python train_code.py` drive it.
"""
import torch
import torch.nn.functional as F

from model import RelayChannel, forward_doubled, rows_forward, unwrap

OBJECTIVES = ("mlm", "rollout", "relay_sg", "relay")  # the four rows of Table 1
RELAY_OBJECTIVES = ("relay_sg", "relay")  # the two that carry h from step to step (a relay channel, a buffered h)


# ---------------------------------------------------------------------------------------------
# 1. predictions and reveal rules (NOTES.md §3)

def predict(logits, mask_id=None):
    """Greedy argmax and its probability under the softmax over the whole vocabulary, as the
    authors compute it -> (pred, conf), each logits.shape[:-1]. mask_id: never predict that token
    (the sampler); its probability stays in the softmax, so conf is the number training uses (except
    where MASK is the argmax: training's conf is then p(MASK), the sampler's the best other token's)."""
    p = logits.float().softmax(-1)
    if mask_id is not None:
        p = p.index_fill(-1, torch.full((1,), mask_id, device=p.device), 0.0)  # no host copy: CUDA graphs
    conf, pred = p.max(-1)
    return pred, conf


def reveal_confidence_mass(conf, masked, tau):
    """The Sudoku rule. conf (B, T) confidence of the argmax token, masked (B, T) bool -> reveal (B, T)
    bool: sort masked cells by uncertainty 1 - conf, reveal the prefix whose inclusive cumulative
    uncertainty stays < tau; if none qualifies, the single most confident cell."""
    u = torch.where(masked, 1.0 - conf.float(), torch.inf)  # uncertainty; inf = not a candidate
    u_sorted, order = u.sort(dim=-1, stable=True)
    keep = u_sorted.cumsum(-1) < tau
    keep[:, 0] |= masked.any(-1)  # at least one cell per row that has any
    return torch.zeros_like(masked).scatter(-1, order, keep)


def reveal_jittered_mass(conf, masked, tau, gen, std=0.1):
    """The Sudoku rule as the authors train it: a fresh threshold max(0, N(tau, std)) at every call,
    i.e. at every rollout step. The draw stays on the device (no host sync)."""
    jittered = (tau + std * torch.randn((), generator=gen, device=conf.device)).clamp(min=0.0)
    return reveal_confidence_mass(conf, masked, jittered)


def reveal_threshold_blocks(conf, masked, threshold, bd_size):
    """The block-diffusion training rule: masked positions with conf > threshold, plus the most
    confident masked position of every bd_size-block that still has masks (every block advances).
    conf, masked (B, T) with T a multiple of bd_size -> reveal (B, T) bool. (The sampler applies it
    to the masked positions of the current sub-block only: sampler.reveal_block.)"""
    B, T = conf.shape
    reveal = masked & (conf > threshold)
    c = torch.where(masked, conf.float(), -1.0).view(B, T // bd_size, bd_size)
    best = torch.zeros_like(c, dtype=torch.bool).scatter_(-1, c.argmax(-1, keepdim=True), True)
    return reveal | (best & masked.view(B, T // bd_size, bd_size)).view(B, T)


# ---------------------------------------------------------------------------------------------
# 2. a relay for a pretrained model

def add_relay(model):
    """Add the relay channel to a model that has none (a pretrained Fast-dLLM v2). With the LLM's
    config it starts at zero, so the model computes exactly what it did before (NOTES.md §1)."""
    if model.relay is None:
        cfg = model.cfg
        cfg.relay = True
        model.relay = RelayChannel(cfg.n_embd, cfg.relay_eps, cfg.relay_masked_only, cfg.relay_zero_init).to(
            model.norm.weight.device)
    return model


# ---------------------------------------------------------------------------------------------
# 3. the baselines

def dense_masked_ce(logits, targets, masked):
    """Mean CE over the masked positions without selecting them: logits (B, T, V), targets and masked
    (B, T); no masked position gives an exact zero that still backpropagates. No boolean indexing, so
    no host sync: what a GPU step wants when the vocabulary is small (Sudoku's 10). The LLM's losses
    use model.HeadCE instead, which never makes full-vocabulary logits."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return (ce * masked.flatten()).sum() / masked.sum().clamp(min=1)


def mlm_loss(model, x0, fixed, gen):
    """MLM: t ~ U[0,1] per row, mask every free position with probability t, CE on the masked ones
    (plain token mean, no 1/t weight). x0 (B, T) clean tokens, fixed (B, T) bool: clues or prompt,
    never masked and never in the loss."""
    B, T = x0.shape
    t = torch.rand(B, 1, generator=gen, device=x0.device)
    masked = (torch.rand(B, T, generator=gen, device=x0.device) < t) & ~fixed
    xt = torch.where(masked, unwrap(model).cfg.mask_id, x0)
    logits, _ = rows_forward(model, xt)  # (B, T, V)
    return dense_masked_ce(logits, x0, masked)


def sft_masks(fixed, gen, bd_size):
    """Fast-dLLM v2's noise: per block t ~ U(0,1), mask supervised tokens with probability
    (1-1e-3)t + 1e-3; then the complementary copy, so every supervised token is masked in exactly
    one of the two. fixed (B, L) -> masks (2B, L) bool."""
    B, L = fixed.shape
    n_blocks = L // bd_size
    t = torch.rand(B, n_blocks, 1, generator=gen, device=fixed.device).expand(B, n_blocks, bd_size).reshape(B, L)
    m = (torch.rand(B, L, generator=gen, device=fixed.device) < (1 - 1e-3) * t + 1e-3) & ~fixed
    return torch.cat([m, ~m & ~fixed])


def used_width(fixed, bd_size):
    """The columns up to the end of the last block with a free position in any row. In the block-causal
    [x_t ‖ x_0] layout a later column changes nothing before it and holds no loss, so a batch cut there
    has the same loss and gradients: short rows' padding costs nothing. fixed (B, L) -> int (host sync)."""
    free = (~fixed).any(0).nonzero()
    last = int(free.max()) + 1 if len(free) else 1
    return min(-(-last // bd_size) * bd_size, fixed.shape[1])


def sft_loss(model, x0, fixed, gen):
    """Block-diffusion SFT (NOTES.md §5): both noisy copies in the [x_t ‖ x_0] layout, CE over the
    masked supervised tokens. x0 (B, L), fixed (B, L) bool (prompt and padding)."""
    cfg = unwrap(model).cfg
    w = used_width(fixed, cfg.bd_size)
    masks = sft_masks(fixed, gen, cfg.bd_size)[:, :w]  # (2B, w); the noise is drawn at full width, then cut
    x0 = torch.cat([x0, x0])[:, :w]
    (ce, _), _ = forward_doubled(model, torch.where(masks, cfg.mask_id, x0), x0, masks, targets=x0[masks])  # (N,)
    return ce.sum() / max(len(ce), 1)  # no (N, V) logits: model.HeadCE


# ---------------------------------------------------------------------------------------------
# 4. the rollout buffer (NOTES.md §2)

class RolloutBuffer:
    """A persistent set of `capacity` trajectories. Per slot: clean target x0, current canvas x,
    fixed mask (clues/prompt), relay state h (fp32, detached; what the next forward reads, so for the
    LLM already indexed by token: forward_doubled shifts it) and implicitly "finished" (no free
    position is masked any more). Every slot walks its whole unmasking trajectory across optimizer
    steps, so training sees early (all masked) and late (almost solved) canvases alike. D = 0 keeps
    no relay state (the rollout objective: an empty h)."""

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
        masked, h = 0. Fetches exactly as many rows as there are finished slots (no row of a finite
        data set is wasted: the LLM's epochs). Returns the count. Reads the count on the host."""
        idx = self.finished().nonzero().squeeze(1)
        if len(idx):
            x0, fixed = fetch(len(idx))
            self.x0[idx], self.fixed[idx] = x0, fixed
            self.x[idx] = torch.where(fixed, x0, self.mask_id)
            self.h[idx] = 0.0
        return len(idx)

    def replace_finished(self, x0, fixed):
        """refill as the authors do it: x0, fixed (capacity, T) is a full batch of fresh rows and each
        finished slot takes the row of its own index; the rest are dropped. No host sync (the GPU
        step of train_sudoku). Returns the count as a 0-d tensor."""
        done = self.finished()[:, None]  # (capacity, 1)
        self.x0.copy_(torch.where(done, x0, self.x0))
        self.fixed.copy_(torch.where(done, fixed, self.fixed))
        self.x.copy_(torch.where(done, torch.where(fixed, x0, self.mask_id), self.x))
        self.h.masked_fill_(done[..., None], 0.0)
        return done.sum()

    def state_dict(self):
        return {k: getattr(self, k).cpu() for k in ("x0", "x", "fixed", "h")}

    def load_state_dict(self, sd):
        for k, v in sd.items():
            if k == "h" and self.h.numel() == 0:  # no relay: older checkpoints stored unused zeros
                continue
            if v.shape != getattr(self, k).shape:
                raise ValueError(f"rollout buffer {k}: checkpoint has {tuple(v.shape)}, "
                                 f"this run expects {tuple(getattr(self, k).shape)}")
            getattr(self, k).copy_(v)


# ---------------------------------------------------------------------------------------------
# 5. the K-step rollout loss with truncated BPTT (NOTES.md §2)

def rollout_loss(model, buf, K, objective, reveal, doubled=False):
    """One micro-step on the buffer; returns loss = L_1 + ... + L_K, each the mean CE over the
    positions masked at that step. reveal(conf, masked) -> bool (B, T) picks positions by the model's
    own confidence (no gradient); the ground truth is written there (teacher forcing: the trajectory
    follows the model's order but never its mistakes). doubled: the block-diffusion LLM's
    [x_t ‖ x_0] layout with x_t = the buffer's canvas (model.forward_doubled); else model(x, relay=h)."""
    assert objective in ("rollout", "relay_sg", "relay"), objective
    carry_h = objective != "rollout"
    w = used_width(buf.fixed, unwrap(model).cfg.bd_size) if doubled else buf.x.shape[1]  # LLM rows: cut padding
    x, x0, free = buf.x[:, :w].clone(), buf.x0[:, :w], ~buf.fixed[:, :w]
    h = buf.h[:, :w].clone() if carry_h else None  # detached: the truncation of BPTT between optimizer steps
    loss = 0.0
    for _ in range(K):
        # 1) forward on the current canvas, with the relay state of the previous step
        masked = (x == buf.mask_id) & free  # (B, T) the positions still to predict
        # 2) L_k: CE over the masked positions (an exact zero once a slot has none left), and the
        #    confidence of every masked position (zero elsewhere)
        if doubled:  # an LLM: CE and confidence of the masked positions, chunked (the vocabulary is large)
            (ce, conf_m), h_out = forward_doubled(model, x, x0, masked, relay=h, targets=x0[masked])  # (N,) x 2
            loss = loss + ce.sum() / max(len(ce), 1)
            conf = torch.zeros(x.shape, device=x.device).masked_scatter_(masked, conf_m)
        else:  # Sudoku: full logits and no boolean indexing, so a GPU step never waits for the host
            logits, h_out = rows_forward(model, x, relay=h)  # (B, T, V), (B, T, D)
            loss = loss + dense_masked_ce(logits, x0, masked)
            conf = torch.where(masked, predict(logits.detach())[1], 0.0)
        # 3) reveal the ground truth where the model is most confident
        with torch.no_grad():
            x = torch.where(reveal(conf, masked), x0, x)
        # 4) hand h to the next step: relay keeps the graph (BPTT), relay_sg cuts it
        if carry_h:
            h = h_out if objective == "relay" else h_out.detach()
    # 5) write back: the next optimizer step continues these trajectories, detached
    buf.x[:, :w] = x
    if carry_h:
        buf.h[:, :w] = h.detach().float()
    return loss
