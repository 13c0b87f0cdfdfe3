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
import os
import sys
import time

import torch

from model import KVCache, block_mask


def reveal_confidence_mass(conf, masked, tau):
    """conf (B, T) confidence of the argmax token, masked (B, T) bool -> reveal (B, T) bool."""
    u = torch.where(masked, 1.0 - conf.float(), torch.inf)  # uncertainty; inf = not a candidate
    u_sorted, order = u.sort(dim=-1, stable=True)
    keep = u_sorted.cumsum(-1) < tau  # inclusive cumulative uncertainty stays below tau
    keep[:, 0] |= masked.any(-1)  # if none qualifies, the single most confident cell
    return torch.zeros_like(masked).scatter(-1, order, keep)


def reveal_threshold_blocks(conf, masked, threshold, bd):
    """The block-diffusion training rule: reveal masked positions with conf > threshold, plus the
    most confident masked position of every bd-block that still has masks (every block advances).
    conf, masked (B, T) with T a multiple of bd -> reveal (B, T) bool."""
    B, T = conf.shape
    reveal = masked & (conf > threshold)
    c = torch.where(masked, conf.float(), -1.0).view(B, T // bd, bd)
    best = torch.zeros_like(c, dtype=torch.bool).scatter_(-1, c.argmax(-1, keepdim=True), True)
    return reveal | (best & masked.view(B, T // bd, bd)).view(B, T)


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


# ---------------------------------------------------------------------------------------------
# Fast-dLLM v2 block decoding with a KV cache and relay carry (PAPER.md §5–6)

def shift_right(t):
    """THE token shift. Fast-dLLM v2 keeps its AR parent's next-token head: the logit (and relay
    state) at position j-1 is about token j. shifted[j] = t[j-1]; shifted[0] = t[0] as in the
    reference (a block's position 0 is always known, so it is never read)."""
    return torch.cat([t[:, :1], t[:, :-1]], 1)


@torch.no_grad()
def generate(model, prompts, *, max_new_tokens=256, threshold=0.85, block_size=None, sub_block=8,
             stop_ids=(), use_cache=True, use_relay=True, pad_id=0):
    """Block decoding of a batch of prompts (lists of token ids) -> (list of generated id lists, stats).

    Every row produces exactly what it produces alone: rows are left-padded by whole blocks so
    that the block holding each prompt's end (where generation starts) is the same batch block,
    with their own RoPE positions and padding hidden from attention. A row stops after its first
    stop token once nothing before it is masked, or after max_new_tokens; stopped rows leave the
    batch (and the cache). use_cache=False recomputes the whole prefix every forward: the oracle.
    NFE per row = denoising forwards in which the row still had masked positions to decode."""
    t0 = time.time()
    cfg, dev = model.cfg, next(model.parameters()).device
    bs, sb, mask_id = block_size or cfg.bd_size, sub_block, cfg.mask_id
    if bs <= 0 or sb <= 0 or bs % sb:
        raise ValueError(f"block size {bs} must be a positive multiple of the sub-block size {sb}")
    if mask_id < 0 or max_new_tokens < 1 or not prompts or min(map(len, prompts)) == 0:
        raise ValueError("need a model with a mask token, max_new_tokens >= 1 and non-empty prompts")
    if any(mask_id in p for p in prompts):
        raise ValueError(f"a prompt contains the mask token id {mask_id}")
    limit = (getattr(model, "hf_config", None) or {}).get("max_position_embeddings")
    if limit and max(map(len, prompts)) + max_new_tokens > limit:
        raise ValueError(f"prompt ({max(map(len, prompts))} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"checkpoint's max_position_embeddings ({limit})")
    relay_on = use_relay and model.relay is not None
    B = len(prompts)
    L = torch.tensor([len(p) for p in prompts], device=dev)
    pad = (L.max() // bs - L // bs) * bs  # left padding: every row's first generated block = batch block G
    G = int(L.max() // bs)
    start = pad + L  # batch position of each row's first generated token
    end = start + max_new_tokens  # just past its last one
    T = int((end.max() + bs - 1) // bs * bs)
    ar = torch.arange(T, device=dev)
    x = torch.full((B, T), mask_id, device=dev)
    x[ar[None] < pad[:, None]] = pad_id
    for r, p in enumerate(prompts):
        x[r, pad[r]:start[r]] = torch.tensor(p, device=dev)
    valid = ar[None] >= pad[:, None]  # not padding
    padded = bool((pad > 0).any())
    pos = (ar[None] - pad[:, None]).clamp(min=0)  # each row's own positions
    ids = torch.arange(B, device=dev)  # original row of each active row
    stops = torch.tensor(list(stop_ids), device=dev, dtype=torch.long)
    cache = KVCache(cfg.n_layer, T) if use_cache else None
    out, nfe_out = [None] * B, [0] * B
    nfe = torch.zeros(B, dtype=torch.long, device=dev)
    n = {"prefill": 0, "denoise": 0, "commit": 0, "tokens": 0}

    def forward(q0, q1, relay=None, commit=False):  # the active rows' logits, h at positions [q0, q1)
        k0 = q0 if use_cache else 0  # uncached: recompute everything before q0 too
        m = None if q1 - k0 <= bs == cfg.bd_size else block_mask(q1, bs, q0=k0, device=dev)  # one block after the cache: all True
        if padded:  # padding is seen by no real token (pads see everything, so no row is empty)
            m = (True if m is None else m) & (valid[:, None, None, :q1] | ~valid[:, None, k0:q1, None])
        if relay is not None and not use_cache:
            relay = torch.cat([relay.new_zeros(len(x), q0, relay.shape[-1]), relay], 1)
        n["tokens"] += len(x) * (q1 - k0)
        logits, h = model(x[:, k0:q1], pos=pos[:, k0:q1], attn_mask=m, relay=relay, kv_cache=cache,
                          commit=commit)
        return logits[:, q0 - k0:], h[:, q0 - k0:]

    def retire():  # rows with nothing left to decode leave the batch
        nonlocal x, valid, pos, ids, start, end, nfe, h
        gen = (ar[None] >= start[:, None]) & (ar[None] < end[:, None])
        is_stop = torch.isin(x, stops) & gen
        stop_at = torch.where(is_stop.any(1), is_stop.float().argmax(1), end - 1)
        done = ~((x == mask_id) & gen & (ar[None] <= stop_at[:, None])).any(1)
        for r in done.nonzero().flatten().tolist():
            out[ids[r]] = x[r, start[r]:stop_at[r] + 1].tolist()
            nfe_out[ids[r]] = int(nfe[r])
        keep = (~done).nonzero().flatten()
        if len(keep) < len(x):
            x, valid, pos, ids, start, end, nfe = (t[keep] for t in (x, valid, pos, ids, start, end, nfe))
            h = h[keep] if h is not None else None
            if cache is not None:
                cache.keep(keep)

    h = None
    if G > 0:  # prefill: the prompts' complete blocks
        logits, _ = forward(0, G * bs, commit=True)
        n["prefill"] += 1
        first = (start == G * bs) & (start < end)  # prompt ends on a block boundary: its last logit is token 1
        x[first, G * bs] = predict(logits[first, -1], mask_id)[0]
        retire()
    for b in range(G, T // bs):
        if len(x) == 0:
            break
        q0, q1, h = b * bs, (b + 1) * bs, None  # relay carry resets at every block
        while True:
            todo = (x[:, q0:q1] == mask_id) & (ar[None, q0:q1] < end[:, None])  # (B', bs)
            stepping = todo.any(1)
            if not stepping.any():
                break
            logits, h_out = forward(q0, q1, relay=shift_right(h) if h is not None else None)
            n["denoise"] += 1
            nfe += stepping
            pred, conf = predict(shift_right(logits), mask_id)
            sub = todo.view(len(x), bs // sb, sb).any(-1).float().argmax(-1)  # current sub-block per row
            cand = todo & ((torch.arange(bs, device=dev) // sb)[None] == sub[:, None])
            reveal = cand & (conf > threshold)
            best = torch.where(cand, conf, -1.0).argmax(-1)  # most confident candidate, first on ties
            reveal[torch.arange(len(x), device=dev), best] |= stepping
            x[:, q0:q1] = torch.where(reveal, pred, x[:, q0:q1])
            h = h_out if relay_on else None
            retire()
            if len(x) == 0:
                break
        if len(x) == 0:
            break
        logits, _ = forward(q0, q1, commit=True)  # the block is complete: cache it, predict the next token
        n["commit"] += 1
        if q1 < T:
            nxt = predict(logits[:, -1], mask_id)[0]
            x[:, q1] = torch.where(q1 < end, nxt, x[:, q1])
        retire()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    secs = time.time() - t0
    gen_tokens = sum(map(len, out))
    return out, {"nfe": nfe_out, "new_tokens": [len(o) for o in out], "forward_calls": sum(n[k] for k in (
        "prefill", "denoise", "commit")), "denoise_calls": n["denoise"], "prefill_calls": n["prefill"],
        "commit_calls": n["commit"], "forward_tokens": n["tokens"], "seconds": secs,
        "tokens_per_s": gen_tokens / max(secs, 1e-9)}


# ---------------------------------------------------------------------------------------------
# command line

RANDOM_SHAPES = {  # --random-init: Qwen2.5 shapes with random weights (speed and memory without a download)
    "tiny": dict(vocab_size=260, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, n_ffn=384),
    "1.5b": dict(vocab_size=151936, n_layer=28, n_head=12, n_kv_head=2, n_embd=1536, n_ffn=8960),
}
BENCH_PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Implement binary search over a sorted list and explain its complexity.",
    "Write a function that parses a CSV line with quoted fields.",
]


def random_model(name, device, dtype, seed):
    from model import ModelConfig, Transformer, byte_tokenizer
    tok = byte_tokenizer()
    cfg = ModelConfig(**RANDOM_SHAPES[name], rope_theta=1e6, norm_eps=1e-6, qkv_bias=True, tie_embeddings=True,
                      mask_id=tok.mask_id, bd_size=32, relay=True, relay_masked_only=True, relay_after_norm=True,
                      relay_zero_init=True, relay_eps=1e-6)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(cfg)
    return model.to(dtype).eval(), tok


def pick_device(name):
    """auto -> cuda, then mps, then cpu; anything else as given."""
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def bench(model, tok, args, gen_kw):
    """Cached vs uncached tokens/s over BENCH_PROMPTS, one prompt at a time, after a warm-up."""
    rows = []
    for n in args.bench_lengths:
        res = {}
        for cache in (True, False):
            generate(model, [tok.encode(BENCH_PROMPTS[0])], **{**gen_kw, "max_new_tokens": 8, "use_cache": cache})
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            outs, secs, nfe, toks = [], 0.0, 0, 0
            for prompt in BENCH_PROMPTS:
                ids = tok.encode(tok.chat(prompt))
                o, st = generate(model, [ids], **{**gen_kw, "max_new_tokens": n, "use_cache": cache})
                outs.append(o[0])
                secs, nfe, toks = secs + st["seconds"], nfe + st["nfe"][0], toks + st["new_tokens"][0]
            res[cache] = {"tokens_per_s": toks / secs, "nfe": nfe / len(BENCH_PROMPTS), "new_tokens": toks,
                          "seconds": secs, "outs": outs,
                          "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if args.device.startswith("cuda") else None}
        rows.append({"max_new_tokens": n, "cached_tok_s": res[True]["tokens_per_s"],
                     "uncached_tok_s": res[False]["tokens_per_s"],
                     "speedup": res[True]["tokens_per_s"] / res[False]["tokens_per_s"],
                     "nfe": res[True]["nfe"], "new_tokens": res[True]["new_tokens"],
                     "same_tokens": res[True]["outs"] == res[False]["outs"],
                     "cached_peak_gib": res[True]["peak_mem_gib"], "uncached_peak_gib": res[False]["peak_mem_gib"]})
        r = rows[-1]
        print(f"{n:>8} new tokens | cached {r['cached_tok_s']:8.1f} tok/s | uncached {r['uncached_tok_s']:8.1f} tok/s"
              f" | x{r['speedup']:5.2f} | NFE {r['nfe']:7.1f} | same tokens {r['same_tokens']}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a Fast-dLLM v2 directory, or a train_sudoku.py checkpoint (.pt)")
    p.add_argument("--random-init", choices=list(RANDOM_SHAPES), help="random weights of this shape, byte tokenizer")
    p.add_argument("--prompt", help="text to continue (see --chat)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a ChatML user turn")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--threshold", type=float, default=0.85, help="reveal confidence threshold (strict)")
    p.add_argument("--block-size", type=int, help="diffusion block (default: bd_size of the checkpoint)")
    p.add_argument("--sub-block", type=int, default=8)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every forward (oracle)")
    p.add_argument("--no-relay", action="store_true", help="do not carry the relay state")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights dtype; auto = bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--seed", type=int, default=0, help="random-init weights (decoding itself is greedy)")
    p.add_argument("--bench", action="store_true", help="cached vs uncached tokens/s table, JSON line last")
    p.add_argument("--save", help="with --random-init: write the model and tokenizer as a checkpoint directory")
    p.add_argument("--bench-lengths", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--n", type=int, default=64, help="Sudoku: generated puzzles that need search")
    p.add_argument("--tau", type=float, default=0.15, help="Sudoku: reveal threshold")
    p.add_argument("--max-steps", type=int, default=64, help="Sudoku: loop steps before the final fill")
    args = p.parse_args(argv)
    args.device = pick_device(args.device)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    dtype = getattr(torch, args.dtype)
    if (args.checkpoint is None) == (args.random_init is None):
        p.error("give exactly one of --checkpoint and --random-init")

    if args.checkpoint and os.path.isfile(args.checkpoint):  # a Sudoku checkpoint
        import sudoku
        from train_sudoku import load_model
        model = load_model(args.checkpoint, args.device)
        data = sudoku.generate(args.seed + 12345, args.n, hard=True)
        out, st = sample_mdm(model, torch.from_numpy(data["question"]).long().to(args.device), tau=args.tau,
                             max_steps=args.max_steps, use_relay=not args.no_relay)
        solved = (out.cpu().numpy() == data["answer"]).all(1)
        print(json.dumps({"exact_match": float(solved.mean()), "nfe": float(st["nfe"].float().mean()),
                          "nfe_batch": st["nfe_batch"], "seconds": st["seconds"]}))
        return
    if args.random_init:
        model, tok = random_model(args.random_init, args.device, dtype, args.seed)
        if args.save:
            from model import save_byte_tokenizer, save_pretrained
            save_pretrained(model, args.save)
            save_byte_tokenizer(args.save)
            print(f"saved a random {args.random_init} checkpoint to {args.save}")
            return
    else:
        from model import from_pretrained, load_tokenizer
        model = from_pretrained(args.checkpoint, device=args.device, dtype=dtype)
        tok = load_tokenizer(args.checkpoint)
    gen_kw = dict(threshold=args.threshold, block_size=args.block_size, sub_block=args.sub_block,
                  stop_ids=tok.stop_ids, use_relay=not args.no_relay, pad_id=tok.stop_ids[-1] if tok.stop_ids else 0)
    print(f"model: {model.num_params() / 1e6:.1f}M parameters, bd_size {model.cfg.bd_size}, relay "
          f"{model.relay is not None}, {args.device} {args.dtype}", file=sys.stderr)
    if args.bench:
        rows = bench(model, tok, args, gen_kw)
        print(json.dumps({"bench": rows, "device": args.device, "dtype": args.dtype, "torch": torch.__version__,
                          "model": args.random_init or args.checkpoint}))
        return
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            args.prompt = f.read()
    if args.prompt is None:
        p.error("give --prompt or --prompt-file (or --bench)")
    ids = tok.encode(tok.chat(args.prompt) if args.chat else args.prompt)
    out, st = generate(model, [ids], max_new_tokens=args.max_new_tokens, use_cache=not args.no_cache, **gen_kw)
    print(tok.decode(out[0], skip_special=True))
    print(json.dumps({"tokens": out[0], "prompt_tokens": len(ids), **st}))


if __name__ == "__main__":
    main()
