"""
train_sudoku.py — train and evaluate Relay on Sudoku (PAPER.md §4), the project's main job.

    python train_sudoku.py                                   # CPU preset, ~15 min on 2 cores
    python train_sudoku.py --max-steps 20 --eval-size 32     # smoke run, well under a minute
    python train_sudoku.py --objective mlm                   # a Table 1 baseline
    python train_sudoku.py --eval-only --checkpoint out/sudoku/ckpt.pt
    python train_sudoku.py --data train.csv --test-data test.csv   # the real Sudoku-Extreme files

On CUDA the defaults are the paper's (xtiny, batch 512, AdamW 5e-4, 2000 warmup, clip 0.5, bf16,
EMA 0.9999); elsewhere a small fp32 preset (bf16 has no fast path on CPUs without AVX-512 BF16/AMX).
Without --data it trains on generated puzzles (sudoku.py) with the symmetry group as augmentation
and tests on a generated set of which half needs search. Prints a table, saves the checkpoint and
a PNG of the accuracy-NFE curve, and prints one JSON object as the last stdout line.
"""
import argparse
import glob
import json
import os
import re
import time
from contextlib import nullcontext

import numpy as np
import torch
from tqdm import tqdm

import sudoku
from model import ModelConfig, Transformer, load_state
from relay import OBJECTIVES, RolloutBuffer, mlm_loss, rollout_loss
from sampler import pick_device, reveal_confidence_mass, sample_mdm

PRESETS = {  # defaults per preset; any flag given explicitly wins
    "paper": dict(n_layer=4, n_embd=384, n_head=6, n_ffn=1536, dropout=0.1, batch_size=512,
                  lr=5e-4, warmup=2000, max_steps=300_000, ema=0.9999, dtype="bfloat16", pos_emb="none",
                  n_train=100_000, eval_size=1000, eval_every=5000, ckpt_every=5000),
    "cpu": dict(n_layer=4, n_embd=128, n_head=4, n_ffn=512, dropout=0.0, batch_size=64,
                lr=2e-3, warmup=50, max_steps=1200, ema=0.99, dtype="float32", pos_emb="sudoku",
                n_train=6000, eval_size=512, eval_every=500, ckpt_every=250),
}
TAUS = (0.05, 0.10, 0.15, 0.20, 0.25)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objective", choices=OBJECTIVES, default="relay")
    p.add_argument("--preset", choices=["auto", *PRESETS], default="auto", help="auto: paper on CUDA, cpu elsewhere")
    p.add_argument("--mlm-steps", type=int, help="rollout objectives: train the first N steps with mlm, then "
                   "switch (a warm start: from scratch the rollout buffer starts slowly). Default: half of "
                   "--max-steps with the cpu preset, 0 with the paper's")
    p.add_argument("--K", type=int, default=2, help="rollout steps per optimizer step (truncated BPTT window)")
    p.add_argument("--tau", type=float, default=0.15, help="inference reveal threshold")
    p.add_argument("--train-tau", type=float, default=0.15, help="training threshold mean (jitter 0.1 std)")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--time-limit", type=float, default=0.0,
                   help="stop training after this many minutes (0 = no limit), then evaluate and save")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int, help="linear warmup steps, then constant")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=0.5)
    p.add_argument("--ema", type=float, help="EMA decay of the evaluated weights (0 = off)")
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-embd", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--n-ffn", type=int)
    p.add_argument("--dropout", type=float)
    p.add_argument("--tie-embeddings", action="store_true")
    p.add_argument("--pos-emb", choices=["none", "sudoku"], help="learned position table: none (RoPE "
                   "only, the paper's) or sudoku (initialised as row + column + box embeddings)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="autocast dtype")
    p.add_argument("--data", default="", help="training CSV (question,answer[,...]); default: generated")
    p.add_argument("--test-data", default="", help="test CSV; default: generated, half need search")
    p.add_argument("--skip-invalid", action="store_true", help="skip and count invalid CSV rows")
    p.add_argument("--n-train", type=int, help="generated training puzzles (before augmentation)")
    p.add_argument("--eval-size", type=int, help="test puzzles")
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--eval-every", type=int, help="steps between monitoring evals (128 test puzzles)")
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--no-sweep", action="store_true", help="skip the tau sweep / curve")
    p.add_argument("--out-dir", default="out/sudoku")
    p.add_argument("--data-dir", default="data", help="cache of generated puzzle sets")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--checkpoint", default="", help="checkpoint for --eval-only")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args(argv)
    args.device = pick_device(args.device)
    preset = args.preset if args.preset != "auto" else ("paper" if args.device.startswith("cuda") else "cpu")
    args.preset = preset
    for k, v in PRESETS[preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.mlm_steps is None:
        args.mlm_steps = args.max_steps // 2 if preset == "cpu" and args.objective != "mlm" else 0
    if args.K < 1 or args.mlm_steps < 0 or args.max_steps < 0 or args.batch_size < 1 or args.eval_size < 2 or args.time_limit < 0:
        p.error("need --K >= 1, --mlm-steps >= 0, --max-steps >= 0, --batch-size >= 1, --eval-size >= 2, --time-limit >= 0")
    if args.eval_only and not args.checkpoint:
        p.error("--eval-only needs --checkpoint PATH")
    if args.n_embd % args.n_head:
        p.error(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
    return args


# ---------------------------------------------------------------------------------------------
# data

def load_train(args):
    """Training boards: a CSV, or generated. The generator needs ~one base puzzle per 8 rows a run
    can consume; the symmetry group (~1e12 boards per puzzle) supplies the rest, so short runs only
    make what they need."""
    if args.data:
        return sudoku.read_csv(args.data, args.skip_invalid)
    n = min(args.n_train, max(64, args.max_steps * args.batch_size // 8))
    # puzzle i depends only on (stream, i): a larger cached set's first n puzzles are this set
    for f in sorted(glob.glob(os.path.join(args.data_dir, "train_s0_*.npz")), key=lambda f: len(f)):
        m = int(re.search(r"train_s0_(\d+)\.npz$", f).group(1))
        if m > n:
            return {k: v[:n] for k, v in sudoku.cached(f, None).items()}
    return sudoku.cached(os.path.join(args.data_dir, f"train_s0_{n}.npz"),
                         lambda: sudoku.generate(0, n, desc="train puzzles"))


def load_test(args):
    """The test set with difficulty tiers: a CSV's first --eval-size rows, or generated: half
    singles-only, half needs-search, from streams the training set never sees."""
    if args.test_data:
        return sudoku.add_tiers(sudoku.read_csv(args.test_data, args.skip_invalid, limit=args.eval_size))
    n = args.eval_size // 2
    make = lambda: cat(sudoku.generate(1, n, hard=True, desc="test puzzles (search)"),
                       sudoku.generate(2, args.eval_size - n, hard=False, desc="test puzzles (singles)"))
    return sudoku.cached(os.path.join(args.data_dir, f"test_{args.eval_size}.npz"), make)


def cat(a, b):
    return {k: np.concatenate([a[k], b[k]]) for k in a}


class Stream:
    """Random training rows with a random symmetry each; its state is the data position."""

    def __init__(self, data, seed, device):
        self.q, self.a, self.device = data["question"], data["answer"], device
        self.rng = np.random.default_rng(seed)

    def __call__(self, n):  # -> x0 (n, 81) long, fixed (n, 81) bool
        i = self.rng.integers(len(self.q), size=n)
        q, a = sudoku.augment(self.q[i], self.a[i], self.rng)
        return (torch.from_numpy(a).long().to(self.device), torch.from_numpy(q > 0).to(self.device))


# ---------------------------------------------------------------------------------------------
# model, checkpoints

def model_config(args):
    return ModelConfig(vocab_size=10, n_layer=args.n_layer, n_head=args.n_head, n_kv_head=args.n_head,
                       n_embd=args.n_embd, n_ffn=args.n_ffn, dropout=args.dropout, mask_id=0,
                       n_pos=81 if args.pos_emb == "sudoku" else 0, embed_std=1.0,
                       tie_embeddings=args.tie_embeddings, relay=args.objective in ("relay_sg", "relay"))


def init_sudoku_positions(model, gen):
    """Cell i starts as row[r] + col[c] + box[b] (random vectors): cells that share a unit start
    with correlated positions, so attention finds a cell's 20 peers without first discovering the
    board's geometry from 1-D positions. Then trained freely. (Not in the paper; see README.)"""
    D = model.cfg.n_embd
    r, c, b = (torch.randn(9, D, generator=gen) * model.cfg.embed_std / 3 ** 0.5 for _ in range(3))
    cells = torch.arange(81)
    with torch.no_grad():
        model.embed_pos.weight.copy_(r[cells // 9] + c[cells % 9] + b[(cells // 27) * 3 + (cells % 9) // 3])


def save_checkpoint(path, obj):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint


def load_model(path, device):
    """The evaluated (EMA) weights of a checkpoint, in eval mode."""
    ck = torch.load(path, map_location=device, weights_only=False)
    model = Transformer(ModelConfig(**ck["config"])).to(device)
    load_state(model, ck.get("ema") or ck["model"], path)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(model, test, tau, batch, ctx, desc="eval"):
    q, a = test["question"], test["answer"]
    outs, nfe, nfe_batch, secs = [], [], [], 0.0
    for i in tqdm(range(0, len(q), batch), desc=desc, leave=False):
        x = torch.from_numpy(q[i:i + batch]).long().to(next(model.parameters()).device)
        with ctx:
            out, st = sample_mdm(model, x, tau=tau)
        assert (out[x > 0] == x[x > 0]).all(), "sampler overwrote a clue"
        outs.append(out.cpu().numpy())
        nfe.append(st["nfe"].cpu().numpy())
        nfe_batch.append(st["nfe_batch"])
        secs += st["seconds"]
    out, nfe = np.concatenate(outs), np.concatenate(nfe)
    blank = q == 0
    exact = (out == a).all(1)
    tok = ((out == a) & blank).sum(1) / blank.sum(1)
    legal = sudoku.is_legal(out)
    res = {"tau": tau, "exact_match": exact.mean(), "token_acc": tok.mean(), "nfe": nfe.mean(),
           "nfe_batch": float(np.mean(nfe_batch)), "legal_rate": legal.mean(),
           "puzzles_per_s": len(q) / max(secs, 1e-9)}
    for t, name in [(0, "singles"), (1, "search")]:
        m = test["tier"] == t
        if m.any():
            res[name] = {"n": int(m.sum()), "exact_match": exact[m].mean(), "token_acc": tok[m].mean(),
                         "nfe": nfe[m].mean(), "legal_rate": legal[m].mean()}
    return jsonable(res)


def jsonable(d):
    return {k: jsonable(v) if isinstance(v, dict) else (float(v) if isinstance(v, (np.floating, float)) else v)
            for k, v in d.items()}


def print_table(results):
    print(f"{'tau':>5} {'tier':>8} {'n':>5} {'exact':>7} {'token':>7} {'legal':>7} {'NFE':>6}")
    for r in results:
        for name in ("all", "singles", "search"):
            s = r if name == "all" else r.get(name)
            if s:
                print(f"{r['tau']:>5.2f} {name:>8} {s.get('n', ''):>5} "
                      f"{s['exact_match']:>7.1%} {s['token_acc']:>7.1%} {s['legal_rate']:>7.1%} {s['nfe']:>6.1f}")


def plot_curves(curves, path, title):
    """curves: {label: [eval result per tau]} -> accuracy-NFE PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, rs in curves.items():
        ax.plot([r["nfe"] for r in rs], [100 * r["exact_match"] for r in rs], "o-", label=label)
        for r in rs:
            ax.annotate(f"{r['tau']:.2f}", (r["nfe"], 100 * r["exact_match"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("mean NFE per puzzle")
    ax.set_ylabel("exact match (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    print(json.dumps({"args": vars(args)}))
    torch.manual_seed(args.seed)
    device = args.device
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    ctx = torch.autocast(device.split(":")[0], dtype=dtype) if dtype != torch.float32 else nullcontext()
    os.makedirs(args.out_dir, exist_ok=True)
    t_start = time.time()

    if args.eval_only:
        model = load_model(args.checkpoint, device)
        test = load_test(args)
        return finish(args, model, test, ctx, step=torch.load(args.checkpoint, weights_only=False)["step"],
                      t_start=t_start)

    t0 = time.time()
    train, test = load_train(args), load_test(args)
    print(f"data: {len(train['question'])} training puzzles, {len(test['question'])} test puzzles "
          f"({(test['tier'] == 1).mean():.0%} need search), {time.time() - t0:.1f}s")
    cfg = model_config(args)
    model = Transformer(cfg)
    if cfg.n_pos:
        init_sudoku_positions(model, torch.Generator().manual_seed(args.seed))
    model = model.to(device)
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, objective {args.objective}, K={args.K}, "
          f"device {device}, {args.dtype}")
    ema = Transformer(cfg).to(device).eval() if args.ema > 0 else None
    if ema is not None:
        ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.param_groups(args.weight_decay), lr=args.lr,
                            fused=device.startswith("cuda"))
    stream = Stream(train, args.seed, device)
    gen = torch.Generator(device=device).manual_seed(args.seed)  # tau jitter and MLM noise
    buf = RolloutBuffer(args.batch_size, 81, cfg.n_embd, cfg.mask_id, device)
    step = 0
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if args.resume:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path} (check --out-dir)")
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        diff = {k: (v, ck["config"].get(k)) for k, v in model.config_dict().items() if ck["config"].get(k) != v}
        if diff or ck["args"]["objective"] != args.objective:
            raise ValueError(f"{ckpt_path} was trained with another configuration: "
                             f"{diff or {'objective': (args.objective, ck['args']['objective'])}} (ours, theirs)")
        load_state(model, ck["model"], ckpt_path)
        if ema is not None:
            load_state(ema, ck["ema"], ckpt_path + " (ema)")
        opt.load_state_dict(ck["optimizer"])
        buf.load_state_dict(ck["buffer"])
        stream.rng.bit_generator.state = ck["data_rng"]
        gen.set_state(ck["gen"])
        torch.set_rng_state(ck["torch_rng"])
        if ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"], device)
        step = ck["step"]
        print(f"resumed from {ckpt_path} at step {step}")
    train_model = torch.compile(model) if args.compile else model
    reveal = lambda tau: (lambda conf, masked: reveal_confidence_mass(conf, masked, tau))

    def checkpoint():
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "optimizer": opt.state_dict(), "buffer": buf.state_dict(), "step": step,
            "config": model.config_dict(), "args": vars(args), "data_rng": stream.rng.bit_generator.state,
            "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.startswith("cuda") else None})

    model.train()
    bar = tqdm(total=args.max_steps, initial=step, desc=args.objective, dynamic_ncols=True)
    t0, seen, losses, monitor = time.time(), 0, [], []
    while step < args.max_steps:
        if args.time_limit and time.time() - t0 > 60 * args.time_limit:
            tqdm.write(f"--time-limit {args.time_limit} min reached at step {step}")
            checkpoint()
            break
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))  # linear warmup, then constant
        for g in opt.param_groups:
            g["lr"] = lr
        objective = "mlm" if step < args.mlm_steps else args.objective
        with ctx:
            if objective == "mlm":
                x0, fixed = stream(args.batch_size)
                loss = mlm_loss(train_model, x0, fixed, gen)
                seen += args.batch_size
            else:
                seen += buf.refill(stream)
                tau = max(0.0, args.train_tau + 0.1 * torch.randn(1, generator=gen, device=device).item())
                loss = rollout_loss(train_model, buf, args.K, args.objective, reveal(tau))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        if ema is not None:
            d = min(args.ema, (1 + step) / (10 + step))  # warm EMA so short runs are not stuck at init
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.1e}")
        if step % args.eval_every == 0 or step == args.max_steps:
            sub = {k: v[:128] for k, v in test.items()}
            r = evaluate(ema or model, sub, args.tau, args.eval_batch, ctx, desc="monitor")
            model.train()
            monitor.append({"step": step, "exact_match": r["exact_match"], "token_acc": r["token_acc"],
                            "nfe": r["nfe"], "seconds": time.time() - t0})
            tqdm.write(f"step {step}: loss {np.mean(losses[-50:]):.4f}, monitor exact {r['exact_match']:.1%} "
                       f"token {r['token_acc']:.1%} NFE {r['nfe']:.1f}, {seen / (time.time() - t0):.0f} new puzzles/s")
        if step % args.ckpt_every == 0 or step == args.max_steps:
            checkpoint()
    bar.close()
    train_seconds = time.time() - t0
    return finish(args, ema or model, test, ctx, step, t_start, train_seconds, losses,
                  rows_per_s=args.batch_size * len(losses) / max(train_seconds, 1e-9), monitor=monitor)


def finish(args, model, test, ctx, step, t_start, train_seconds=0.0, losses=(), rows_per_s=0.0, monitor=()):
    """Evaluate at tau, sweep tau, draw the curve, print the table and the JSON line."""
    model.eval()
    taus = sorted(set(([] if args.no_sweep else list(TAUS)) + [args.tau]))
    curve = [evaluate(model, test, t, args.eval_batch, ctx, desc=f"eval tau={t}") for t in taus]
    main_r = next(r for r in curve if r["tau"] == args.tau)
    print_table(curve)
    png = os.path.join(args.out_dir, f"curve_{args.objective}.png")
    if len(curve) > 1:
        plot_curves({args.objective: curve}, png, f"Sudoku, {len(test['question'])} test puzzles, step {step}")
        print(f"curve: {png}")
    result = {"objective": args.objective, "mlm_steps": min(args.mlm_steps, step), **{k: main_r[k] for k in (
        "tau", "exact_match", "token_acc", "nfe", "nfe_batch", "legal_rate", "puzzles_per_s")},
        "singles": main_r.get("singles"), "search": main_r.get("search"), "steps": step,
        "train_loss": float(np.mean(losses[-50:])) if len(losses) else None,
        "train_rows_per_s": rows_per_s, "train_seconds": train_seconds,
        "seconds": time.time() - t_start, "curve": [{k: r[k] for k in ("tau", "exact_match", "nfe")} for r in curve],
        "monitor": list(monitor)}
    print(json.dumps(result))
    return {**result, "losses": list(losses)}


if __name__ == "__main__":
    main()
