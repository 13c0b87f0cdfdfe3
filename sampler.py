"""
sampler.py — decoding for masked diffusion models (PAPER.md §3 "Reveal rules", §4 "Decoding").

    python sampler.py --checkpoint out/sudoku/ckpt.pt --n 64 --tau 0.15   # solve generated puzzles

- reveal_confidence_mass: the Sudoku rule. c_i = max softmax prob; sort masked cells by 1 - c_i
  ascending; reveal the prefix whose inclusive cumulative sum stays < tau; at least one cell.
- sample_mdm: fixed-length canvas sampler with relay carry. Greedy argmax; at most `max_steps` loop
  steps, then one final forward fills every cell still masked.

NFE = one call of the model's forward that denoises. Per puzzle: the forwards it took part in
(finished rows leave the batch). Batch level, as the authors log it: loop steps + 1 for the final
fill, i.e. the slowest puzzle + 1 (the authors always run the final fill; we skip it when nothing
is left, so actual forward calls can be one fewer).
"""
import argparse
import json
import time

import torch


def reveal_confidence_mass(conf, masked, tau):
    """conf (B, T) confidence of the argmax token, masked (B, T) bool -> reveal (B, T) bool."""
    u = torch.where(masked, 1.0 - conf.float(), torch.inf)  # uncertainty; inf = not a candidate
    u_sorted, order = u.sort(dim=-1, stable=True)
    keep = u_sorted.cumsum(-1) < tau  # inclusive cumulative uncertainty stays below tau
    keep[:, 0] |= masked.any(-1)  # if none qualifies, the single most confident cell
    return torch.zeros_like(masked).scatter(-1, order, keep)


def predict(logits, mask_id):
    """Greedy argmax and its probability, never predicting MASK itself."""
    logits = logits.float()
    logits[..., mask_id] = -torch.inf
    conf, pred = logits.softmax(-1).max(-1)
    return pred, conf


@torch.no_grad()
def sample_mdm(model, x, *, tau=0.15, max_steps=64, use_relay=True):
    """x (B, T) canvas with MASK at unknown positions; known positions are never changed.
    Returns (tokens (B, T), stats)."""
    t0 = time.time()
    mask_id = model.cfg.mask_id
    x = x.clone()
    B, T = x.shape
    h = torch.zeros(B, T, model.cfg.n_embd, device=x.device) if use_relay and model.relay else None
    nfe = torch.zeros(B, dtype=torch.long, device=x.device)
    steps = calls = fwd_tokens = 0
    for step in range(max_steps + 1):  # the last iteration is the final fill
        rows = (x == mask_id).any(1).nonzero().squeeze(1)
        if len(rows) == 0:
            break
        xa = x[rows]
        logits, h_out = model(xa, relay=None if h is None else h[rows])
        nfe[rows] += 1
        calls += 1
        fwd_tokens += xa.numel()
        pred, conf = predict(logits, mask_id)
        masked = xa == mask_id
        reveal = masked if step == max_steps else reveal_confidence_mass(conf, masked, tau)
        x[rows] = torch.where(reveal, pred, xa)
        if h is not None:
            h[rows] = h_out.float()
        steps = min(step + 1, max_steps)
    stats = {"nfe": nfe, "nfe_batch": steps + 1, "forward_calls": calls,
             "forward_tokens": fwd_tokens, "seconds": time.time() - t0}
    return x, stats


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a train_sudoku.py checkpoint")
    p.add_argument("--n", type=int, default=64, help="generated puzzles that need search")
    p.add_argument("--tau", type=float, default=0.15)
    p.add_argument("--max-steps", type=int, default=64)
    p.add_argument("--seed", type=int, default=12345)
    args = p.parse_args()
    import sudoku
    from train_sudoku import load_model
    model = load_model(args.checkpoint, "cpu")
    data = sudoku.generate(args.seed, args.n, hard=True)
    out, st = sample_mdm(model, torch.from_numpy(data["question"]).long(), tau=args.tau,
                         max_steps=args.max_steps)
    solved = (out.numpy() == data["answer"]).all(1)
    print(json.dumps({"exact_match": float(solved.mean()), "nfe": float(st["nfe"].float().mean()),
                      "nfe_batch": st["nfe_batch"], "seconds": st["seconds"]}))
