"""
train_sudoku.py — train and evaluate Relay on Sudoku (arXiv 2605.22967 §4.1; NOTES.md §4), the
project's main job.

    python train_sudoku.py                                   # cpu preset, ~15 min on 2 cores
    python train_sudoku.py --max-steps 20 --eval-size 32     # smoke run, well under a minute
    python train_sudoku.py --objective mlm                   # a Table 1 baseline
    python train_sudoku.py --preset paper                    # the paper's recipe (GPU; 300k steps: hours)
    python train_sudoku.py --eval-only --checkpoint out/sudoku/ckpt.pt
    python train_sudoku.py --preset paper --init-from checkpoints/sudoku_relay_hard.pt   # fine-tune shipped weights
    python train_sudoku.py --checkpoint out/sudoku/ckpt.pt --solve 4.....8.5.3..........7......2.....6.....8.4......1.......6.3.7.5..2.....1.4......
    python train_sudoku.py --data train.csv --test-data test.csv   # the real Sudoku-Extreme files

Presets set the flags' defaults before parsing, so `--help` shows what will run; any flag given
wins. `cpu` (default on every machine) is a small fp32 model that learns something in ~15 minutes
on 2 cores; `paper` is the authors' (xtiny, batch 512, AdamW 5e-4, 2000 warmup, clip 0.5, bf16,
EMA 0.9999, 300k steps). Without --data it trains on generated puzzles (sudoku.py) with the symmetry
group as augmentation and tests on a generated set of which half needs search. It prints a table,
saves the checkpoint and a PNG of the accuracy-NFE curve, and prints one JSON object as the last
stdout line.
"""
import argparse
import json
import math
import os
import time
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

import sudoku
import sudoku_solver
from checkpoint import config_diff, export_weights, load_checkpoint, load_model, load_state, save_checkpoint
from model import ModelConfig, Transformer, device_flag, pick_device, shape_problem
from relay import OBJECTIVES, RELAY_OBJECTIVES, RolloutBuffer, mlm_loss, reveal_jittered_mass, rollout_loss
from runs import (InputError, Interrupted, StopOnInterrupt, argparser, check_out_file, claim_out_dir, cpu_info,
                  given_flags, how_to_continue, make_out_dir, nonneg_float, nonneg_int, positive_float,
                  positive_int, run_cli, seed_int, stop_reason, unit_float)
from sampler import sample_mdm

PRESETS = {  # flag defaults per preset; "cpu" is what the add_argument defaults below already say
    "cpu": {},
    # the authors' xtiny (7.1M parameters: their ReLU MLP of width 1536 has two matrices, our SwiGLU three,
    # so SwiGLU width 1024 matches it), their optimisation, and their eval batch of 512. 40,000 generated
    # puzzles hold 20,000 hard ones, ~7 min on 16 cores (RESULTS.md); --data trains on Sudoku-Extreme itself
    "paper": dict(n_layer=4, n_embd=384, n_head=6, n_ffn=1024, dropout=0.1, batch_size=512, lr=5e-4, warmup=2000,
                  max_steps=300_000, ema=0.9999, dtype="bfloat16", pos_emb="none", mlm_frac=0.0, n_train=40_000,
                  eval_size=1000, eval_batch=512, eval_every=5000, ckpt_every=5000, mix=(0.25, 0.25, 0.5),
                  test_mix=(0.25, 0.25, 0.5)),
}
TAUS = (0.05, 0.10, 0.15, 0.20, 0.25)
LOG_EVERY = 50  # steps between reads of the loss (each read waits for the device)
H100_STEPS_PER_S = 42.8  # measured: paper preset, relay, --compile, one H100 (21,900 rows/s; RESULTS.md)


def shares(text):
    """--mix value "a,b,c" -> three non-negative shares of tiers 0, 1, 2 that sum to 1."""
    try:
        v = tuple(float(x) for x in text.split(","))
    except ValueError:
        v = ()
    if len(v) != 3 or not all(math.isfinite(x) and x >= 0 for x in v) or abs(sum(v) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"expected three non-negative shares summing to 1, like 0.25,0.25,0.5; "
                                         f"got {text!r}")
    return v


def get_args(argv=None):
    pre = argparser(None, add_help=False)
    pre.add_argument("--preset", choices=list(PRESETS), default="cpu")
    preset = pre.parse_known_args(argv)[0].preset
    p = argparser(__doc__, show_defaults=True)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help="flag defaults: cpu or the paper's")
    # the method
    p.add_argument("--objective", choices=OBJECTIVES, default="relay", help="a row of Table 1")
    p.add_argument("--K", type=positive_int, default=2, help="rollout steps per optimizer step (truncated BPTT window)")
    p.add_argument("--mlm-frac", type=unit_float, default=0.5, help="rollout objectives: train this fraction of "
                   "--max-steps with mlm first (a warm start: from scratch the rollout buffer starts slowly)")
    p.add_argument("--tau", type=unit_float, default=0.15, help="inference reveal threshold")
    p.add_argument("--train-tau", type=unit_float, default=0.15, help="training threshold mean (jitter 0.1 std)")
    # optimisation
    p.add_argument("--max-steps", type=nonneg_int, default=1200, help="optimizer steps")
    p.add_argument("--stop-after", type=nonneg_int, default=0, help="pause after this many steps of this invocation: "
                   "a checkpoint, no evaluation; --resume continues (0 = run to --max-steps)")
    p.add_argument("--time-limit", type=nonneg_float, default=0.0,
                   help="stop training after this many minutes (0 = no limit), then save and evaluate")
    p.add_argument("--batch-size", type=positive_int, default=64, help="rows per step (= rollout buffer slots)")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="AdamW learning rate after warmup (constant)")
    p.add_argument("--warmup", type=nonneg_int, default=50, help="linear warmup steps, then constant")
    p.add_argument("--weight-decay", type=nonneg_float, default=0.01, help="AdamW weight decay (not on biases/norms)")
    p.add_argument("--clip", type=positive_float, default=0.5, help="gradient norm clip")
    p.add_argument("--ema", type=unit_float, default=0.99, help="EMA decay of the evaluated weights (0 = off)")
    # model
    p.add_argument("--n-layer", type=positive_int, default=4, help="Transformer blocks")
    p.add_argument("--n-embd", type=positive_int, default=128, help="model width")
    p.add_argument("--n-head", type=positive_int, default=4, help="attention heads")
    p.add_argument("--n-ffn", type=positive_int, default=512, help="SwiGLU hidden width")
    p.add_argument("--dropout", type=unit_float, default=0.0, help="dropout")
    p.add_argument("--tie-embeddings", action="store_true", help="share the token embedding with the head")
    p.add_argument("--pos-emb", choices=["none", "sudoku"], default="sudoku", help="learned position table: "
                   "none (RoPE only, the paper's) or sudoku (initialised as row + column + box embeddings)")
    p.add_argument("--device", type=device_flag, default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="autocast dtype")
    p.add_argument("--compile", nargs="?", const="default", default="", metavar="MODE",
                   choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="torch.compile the training forward, in this mode (default; reduce-overhead: CUDA graphs)")
    p.add_argument("--threads", type=nonneg_int, default=0, help="CPU threads (0: torch's default, one per core; "
                   "on a small machine with other work running, 1 is often many times faster)")
    # data, evaluation, files
    p.add_argument("--data", default="", help="training CSV (question,answer[,...]); default: generated")
    p.add_argument("--test-data", default="", help="test CSV; default: generated, tiers mixed by --test-mix")
    p.add_argument("--mix", type=shares, default=(0.5, 0.5, 0.0), help="generated training set: shares of tier 0 "
                   "(singles solve it), 1 (needs search) and 2 (hard: minutes to generate), e.g. 0.25,0.25,0.5")
    p.add_argument("--test-mix", type=shares, default=(0.5, 0.5, 0.0), help="generated test set: shares of the "
                   "three tiers")
    p.add_argument("--skip-invalid", action="store_true", help="skip and count invalid CSV rows")
    p.add_argument("--min-rating", type=nonneg_int, default=0,
                   help="with --data: train only on rows whose rating column is at least this (e.g. 10: the hard "
                        "part of a public set, RESULTS.md)")
    p.add_argument("--n-train", type=positive_int, default=6000, help="generated training puzzles, at most (before "
                   "augmentation; a short run makes only what it can use)")
    p.add_argument("--eval-size", type=positive_int, default=512, help="test puzzles")
    p.add_argument("--eval-batch", type=positive_int, default=256, help="puzzles per sampler batch (NFE batch depends on it)")
    p.add_argument("--eval-every", type=positive_int, default=500, help="steps between monitoring evals (128 test puzzles)")
    p.add_argument("--ckpt-every", type=positive_int, default=250, help="steps between checkpoints")
    p.add_argument("--no-sweep", action="store_true", help="skip the tau sweep / curve")
    p.add_argument("--out-dir", default="out/sudoku", help="checkpoint, curve")
    p.add_argument("--data-dir", default="data", help="cache of generated puzzle sets")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
    p.add_argument("--init-from", default="", help="fine-tune: start from this checkpoint's evaluated weights "
                   "(fresh optimizer, rollout buffer and step count; the model flags must match it)")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if OUT_DIR holds a checkpoint "
                   "(without it, or --resume, a run refuses to replace one); --export: replace an existing file")
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint, no training (its curve: "
                   "OUT_DIR/eval_<checkpoint name>.png)")
    p.add_argument("--checkpoint", default="", help="checkpoint for --eval-only, --solve and --export")
    p.add_argument("--export", default=None, help="with --checkpoint: write its evaluated weights in fp16 to this "
                   "file (a small checkpoint for sharing) and exit")
    p.add_argument("--solve", default=None, help="solve one puzzle (81 characters, '.' or '0' for blanks) with "
                   "--checkpoint: print the grid, NFE and legality, draw OUT_DIR/solve.png")
    p.add_argument("--seed", type=seed_int, default=1337, help="model init, data order, noise")
    p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    args.device = pick_device(args.device)
    check_args(p, args, given_flags(p, argv, vars(args)))
    args.mlm_steps = 0 if args.objective == "mlm" else round(args.mlm_frac * args.max_steps)  # derived
    return args


MODEL_FLAGS = ("objective", "n_layer", "n_embd", "n_head", "n_ffn", "dropout", "tie_embeddings", "pos_emb")


def check_args(p, args, given):
    """Usage errors that need more than one flag (given: what the command line set)."""
    modes = [f"--{m.replace('_', '-')}" for m in ("eval_only", "solve", "export") if getattr(args, m) not in (False, None)]
    if len(modes) > 1:
        p.error(f"{' and '.join(modes)}: one at a time")
    if modes and not args.checkpoint:
        p.error(f"{modes[0]} needs --checkpoint PATH")
    if args.checkpoint and not modes:
        p.error("--checkpoint is read by --eval-only, --solve and --export (to train from its weights: --init-from)")
    if "" in (args.solve, args.export):
        p.error(f"{'--solve' if args.solve == '' else '--export'}: empty")
    if modes and (mine := [f"--{f.replace('_', '-')}" for f in MODEL_FLAGS if f in given]):
        p.error(f"{' '.join(mine)}: {modes[0]} takes the model from --checkpoint")
    if args.eval_size < 2:
        p.error(f"--eval-size: need at least 2 test puzzles, got {args.eval_size}")
    if problem := shape_problem(args.n_embd, args.n_head, args.n_head):
        p.error(f"--n-embd/--n-head: {problem}")
    if args.min_rating and not args.data:
        p.error("--min-rating filters a training CSV's rating column: it needs --data FILE.csv")
    if args.resume and args.overwrite:
        p.error("--resume continues the checkpoint in --out-dir, --overwrite replaces it: pick one")
    if args.init_from and modes:
        p.error("--init-from starts a training run: it goes with neither --eval-only, --solve nor --export")


# ---------------------------------------------------------------------------------------------
# data

def load_train(args, n=None):
    """Training boards: a CSV (with --min-rating, its rows rated at least that; a rating of 0 means
    unknown, so such rows are left out too), or n generated with the tiers mixed by --mix. The generator needs
    ~one base puzzle per 8 rows a run can consume; the symmetry group (~1e12 boards per puzzle)
    supplies the rest, so short runs only make what they need (n = None). Every tier is cached on
    its own in --data-dir and a later run, with any mix, takes a prefix of what is there."""
    if args.data:
        train = sudoku.read_csv(args.data, args.skip_invalid)
        if not args.min_rating:
            return train
        if "rating" not in train:
            raise InputError(f"{args.data}: --min-rating needs a rating column")
        keep = train["rating"] >= args.min_rating
        if not keep.any():
            raise InputError(f"{args.data}: no row is rated {args.min_rating} or more (--min-rating)")
        print(f"--min-rating {args.min_rating}: training on {keep.sum()} of {len(keep)} puzzles")
        return {k: v[keep] for k, v in train.items()}
    n = n or min(args.n_train, max(64, args.max_steps * args.batch_size // 8))
    return sudoku.load_tiered("train", n, 0, args.data_dir, shares=args.mix)


def load_test(args):
    """The test set with difficulty tiers: a CSV's first --eval-size rows (tiers from its rating
    column, or rated here), or generated with the tiers mixed by --test-mix, from streams the
    training set never sees."""
    if args.test_data:
        test = sudoku.add_tiers(sudoku.read_csv(args.test_data, args.skip_invalid, limit=args.eval_size))
        if len(test["question"]) < args.eval_size:
            print(f"{args.test_data}: {len(test['question'])} test puzzles, fewer than --eval-size {args.eval_size}")
        return test
    return sudoku.load_tiered("test", args.eval_size, 0, args.data_dir, shares=args.test_mix)


def training_data(args, ck, ckpt_path):
    """The training and test sets of a run (ck: the checkpoint it resumes, or None), with what a user
    should know about them printed: sizes, tiers, repeated puzzles, test puzzles seen in training."""
    t0 = time.time()
    train, test = load_train(args, ck and ck.get("train_size")), load_test(args)
    if ck and ck.get("train_size", len(train["question"])) != len(train["question"]):  # a CSV that changed since
        raise InputError(f"{args.data}: {len(train['question'])} training puzzles now, {ck['train_size']} when "
                         f"{ckpt_path} was trained: resume with the data it was trained on")
    print(f"data: {len(train['question'])} training puzzles, {len(test['question'])} test puzzles, {time.time() - t0:.1f}s")
    dup, leak = sudoku.repeats(train["question"], test["question"])
    if dup or leak:  # kept (a user may mean it), but never unnoticed
        print(f"NOTE: {dup} training puzzles repeat an earlier one; {leak} test puzzles are training puzzles too")
    for name, d in (("train", train), ("test", test)):
        if "tier" in d:
            print(f"{name}:\n{sudoku.summary(d)}")
    return train, test


class Stream:
    """Random training rows with a random symmetry each; its state is the data position. The symmetry
    is drawn in numpy on the host; on a GPU the rows travel from pinned memory without a sync, so
    the host prepares the next batch while the device runs this one."""

    def __init__(self, data, seed, device):
        self.q, self.a, self.device = data["question"], data["answer"], device
        self.rng = np.random.default_rng(seed)
        self.pin = device.startswith("cuda")

    def __call__(self, n):  # -> x0 (n, 81) long, fixed (n, 81) bool
        i = self.rng.integers(len(self.q), size=n)
        q, a = (torch.from_numpy(b) for b in sudoku_solver.augment(self.q[i], self.a[i], self.rng))
        if self.pin:
            q, a = q.pin_memory(), a.pin_memory()
        q, a = q.to(self.device, non_blocking=True), a.to(self.device, non_blocking=True)
        return a.long(), q > 0


# ---------------------------------------------------------------------------------------------
# model and checkpoints

def build_model(args):
    """The from-scratch Sudoku Transformer of model_config(args), its cell positions initialised."""
    cfg = model_config(args)
    model = Transformer(cfg)
    if cfg.n_pos:
        init_sudoku_positions(model, torch.Generator().manual_seed(args.seed))
    return model.to(args.device)


def model_config(args):
    """The Sudoku model the flags describe: 10 tokens (0 = MASK), 81 cells, full attention.
    Embeddings start at std 1 (on the relay's scale, NOTES.md §1); tied to the head they start at
    std d^-0.5 as the authors', so the first logits are O(1) (the first loss is about ln 9, not ~350)."""
    return ModelConfig(vocab_size=10, n_layer=args.n_layer, n_head=args.n_head, n_kv_head=args.n_head,
                       n_embd=args.n_embd, n_ffn=args.n_ffn, dropout=args.dropout, mask_id=0,
                       n_pos=81 if args.pos_emb == "sudoku" else 0,
                       embed_std=args.n_embd ** -0.5 if args.tie_embeddings else 1.0,
                       tie_embeddings=args.tie_embeddings, relay=args.objective in RELAY_OBJECTIVES)


def init_sudoku_positions(model, gen):
    """Cell i starts as row[r] + col[c] + box[b] (random vectors): cells that share a unit start
    with correlated positions, so attention finds a cell's 20 peers without first discovering the
    board's geometry from 1-D positions. Then trained freely. (Not in the paper; see RESULTS.md.)"""
    D = model.cfg.n_embd
    r, c, b = (torch.randn(9, D, generator=gen) * model.cfg.embed_std / 3 ** 0.5 for _ in range(3))
    cells = torch.arange(81)
    with torch.no_grad():
        model.embed_pos.weight.copy_(r[cells // 9] + c[cells % 9] + b[(cells // 27) * 3 + (cells % 9) // 3])


def training_state(args, step, model, ema, opt, buf, stream, gen, trained):
    """Everything a bit-exact resume needs, in one dict; trained: the run's training figures so far
    (training_summary), which a resumed run adds to."""
    return {"trained": trained, "model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "optimizer": opt.state_dict(), "buffer": buf.state_dict(), "step": step, "config": model.config_dict(),
            "args": vars(args), "kind": "sudoku", "objective": args.objective, "train_size": len(stream.q),
            "data_rng": stream.rng.bit_generator.state,
            "gen": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(args.device) if args.device.startswith("cuda") else None}


# what a resume may change without a note (tau: the evaluation's; --init-from: the checkpoint has the weights now)
RUN_FLAGS = {"resume", "overwrite", "max_steps", "stop_after", "time_limit", "eval_every", "ckpt_every", "device",
             "compile", "threads", "no_sweep", "eval_batch", "eval_size", "mlm_steps", "data_dir", "out_dir",
             "test_data", "test_mix", "skip_invalid", "export", "solve", "checkpoint", "eval_only", "init_from", "tau"}


def check_resume(ck, path, args):
    """Before any data is read: refuse to resume `ck` (from `path`) with flags that change the training
    set, the objective or the rollout buffer, and say which other flags differ from its run's."""
    if "optimizer" not in ck:
        raise InputError(f"{path} holds weights only (an --export), not a training run: --resume needs the run's "
                         f"ckpt.pt; to train from these weights, --init-from {path}")
    theirs = lambda k: ck["args"].get(k, getattr(args, k))  # older checkpoints lack some flags
    same = lambda a, b: tuple(np.atleast_1d(a or "")) == tuple(np.atleast_1d(b or ""))  # None and "" alike
    diff = {k: (getattr(args, k), theirs(k)) for k in ("objective", "data", "min_rating", "mix", "seed", "batch_size")
            if not same(theirs(k), getattr(args, k))}  # (--skip-invalid cannot change the set: a bad row stops a run)
    if (args.ema > 0) != (ck["ema"] is not None):  # an EMA cannot start late, nor be dropped without losing it
        diff["ema"] = (args.ema, theirs("ema"))
    diff.update(config_diff(model_config(args), ck))  # the model flags
    if diff:
        raise InputError(f"{path} was trained with another configuration: {diff} (ours, theirs)")
    if args.max_steps < ck["step"]:  # it would train nothing and report the checkpoint as a run of max_steps
        raise InputError(f"--max-steps {args.max_steps}: {path} is at step {ck['step']} already (its run's "
                         f"--max-steps: {theirs('max_steps')})")
    if changed := {k: (v, ck["args"][k]) for k, v in vars(args).items() if k not in RUN_FLAGS and k in ck["args"]
                   and not same(v, ck["args"][k])}:  # allowed, but the log says so (the checkpoint keeps ours)
        print(f"resuming with other flags than the run so far: {changed} (ours, theirs)")


def resume(ck, path, args, model, ema, opt, buf, stream, gen):
    """Restore training_state() `ck` (loaded from `path`, check_resume'd) into the live objects; returns the step."""
    theirs = lambda k: ck["args"].get(k, getattr(args, k))
    if ck["step"] >= theirs("mlm_steps") and theirs("mlm_steps") != args.mlm_steps:  # an ended warm start stays ended
        print(f"MLM warm start: ended at step {theirs('mlm_steps')} of this run, which stays (--max-steps "
              f"{args.max_steps} x --mlm-frac {args.mlm_frac:g} would move it to {args.mlm_steps})")
        args.mlm_steps = theirs("mlm_steps")
    load_state(model, ck["model"], path)
    if ema is not None:
        load_state(ema, ck["ema"], path + " (ema)")
    opt.load_state_dict(ck["optimizer"])
    buf.load_state_dict(ck["buffer"])
    stream.rng.bit_generator.state = ck["data_rng"]
    gen.set_state(ck["gen"])
    torch.set_rng_state(ck["torch_rng"])
    if ck.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(ck["cuda_rng"], args.device)
    print(f"resumed from {path} at step {ck['step']}")
    return ck["step"]


def init_from(path, model, ema):
    """--init-from: another run's evaluated weights (EMA when it kept one) become this run's model and EMA.
    The architecture must match exactly: a fine-tune that silently changed the model would not be one."""
    src, ck = load_model(path, kind="sudoku")  # fp32, whatever the file stores
    if diff := config_diff(model.cfg, ck):
        preset = (ck.get("args") or {}).get("preset", "?")
        raise InputError(f"--init-from {path}: its model differs from the one these flags build: {diff} (ours, "
                         f"theirs); give the model flags it was trained with (its run used --preset {preset})")
    for m in (model, ema):
        if m is not None:
            load_state(m, src.state_dict(), path)
    print(f"initialised from {path} (step {ck['step']} of its run)")


# ---------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(model, test, tau, batch, ctx, desc="eval"):
    """Sample every test puzzle at threshold tau -> exact match, token accuracy, legal rate, NFE,
    overall and per difficulty tier."""
    model.eval()  # no dropout while sampling; the training loop sets train() again
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
    legal = sudoku_solver.is_legal(out)
    res = {"tau": tau, "n": len(q), "exact_match": exact.mean(), "token_acc": tok.mean(), "nfe": nfe.mean(),
           "nfe_batch": float(np.mean(nfe_batch)), "legal_rate": legal.mean(),
           "puzzles_per_s": len(q) / max(secs, 1e-9)}
    for name, m in groups(test).items():
        if m.any():
            res[name] = {"n": int(m.sum()), "exact_match": exact[m].mean(), "token_acc": tok[m].mean(),
                         "nfe": nfe[m].mean(), "legal_rate": legal[m].mean()}
    return jsonable(res)


def groups(test):
    """The rows of each difficulty group: the three tiers, and the hard puzzles of rating >= 40
    (sudoku_solver.rate's branch points; a CSV's own rating column), the level of real hard sets."""
    tier = test["tier"]
    rating = test.get("rating", np.zeros(len(tier)))
    return {"singles": tier == 0, "search": tier == 1, "hard": tier == 2,
            "rating40": (tier == 2) & (rating >= sudoku.HARD_TEST_RATING)}


def jsonable(d):
    return {k: jsonable(v) if isinstance(v, dict) else (float(v) if isinstance(v, (np.floating, float)) else v)
            for k, v in d.items()}


def print_table(results):
    """NFE/puz: the mean of each puzzle's own forwards; NFE batch: the authors' count (the paper's NFE,
    per sampler batch: its slowest puzzle + 1), for all puzzles."""
    print(f"{'tau':>5} {'tier':>8} {'n':>5} {'exact':>7} {'token':>7} {'legal':>7} {'NFE/puz':>8} {'NFE batch':>9}")
    for r in results:
        for name in ("all", "singles", "search", "hard", "rating40"):
            s = r if name == "all" else r.get(name)
            if s:
                batch = f"{r['nfe_batch']:>9.1f}" if name == "all" else ""
                print(f"{r['tau']:>5.2f} {name:>8} {s.get('n', ''):>5} {s['exact_match']:>7.1%} "
                      f"{s['token_acc']:>7.1%} {s['legal_rate']:>7.1%} {s['nfe']:>8.1f} {batch}".rstrip())


def plot_curves(curves, path, title):
    """curves: {label: [eval result per tau]} -> accuracy-NFE PNG."""
    import matplotlib  # only the final figure needs it
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


def training_summary(args, step, losses, train_seconds, steady, monitor, steps=0, before=None):
    """A run's training figures for its JSON line: this invocation's `steps` in train_seconds, added to
    `before`, the figures of the invocations it resumes (their checkpoint's "trained"). steady: training
    rows/s after the first LOG_EVERY steps (no compilation or warm-up in it)."""
    before = before or {}
    timed = before.get("timed_steps", 0) + steps
    train_seconds += before.get("train_seconds", 0.0)
    return {"objective": args.objective, "mlm_steps": min(args.mlm_steps, step), "steps": step,
            "train_loss": float(np.mean(losses[-LOG_EVERY:])) if len(losses) else before.get("train_loss"),
            "train_rows_per_s": args.batch_size * timed / max(train_seconds, 1e-9) if timed else None,
            "train_seconds": train_seconds if timed else None,
            "timed_steps": timed, "train_rows_per_s_steady": steady or before.get("train_rows_per_s_steady"),
            "monitor": before.get("monitor", []) + list(monitor)}


def finish(args, model, test, ctx, step, t_start, trained=None):
    """Evaluate at tau, sweep tau, draw the curve, print the table and the JSON line. trained: the
    training_summary of the run (for --eval-only, the checkpoint's; none in older files)."""
    trained = trained or training_summary(args, step, [], 0.0, None, [])
    model.eval()
    taus = sorted(set(([] if args.no_sweep else list(TAUS)) + [args.tau]))
    curve = [evaluate(model, test, t, args.eval_batch, ctx, desc=f"eval tau={t}") for t in taus]
    main_r = next(r for r in curve if r["tau"] == args.tau)
    print_table(curve)
    name = f"eval_{os.path.splitext(os.path.basename(args.checkpoint))[0]}" if args.eval_only else f"curve_{args.objective}"
    png = os.path.join(args.out_dir, f"{name}.png")  # --eval-only never replaces a training run's curve
    if len(curve) > 1:
        plot_curves({args.objective: curve}, png, f"Sudoku, {len(test['question'])} test puzzles, step {step}")
        print(f"curve: {png}")
    result = {**trained, **{k: main_r[k] for k in (
        "tau", "exact_match", "token_acc", "nfe", "nfe_batch", "legal_rate", "puzzles_per_s")},
        **{g: main_r.get(g) for g in ("singles", "search", "hard", "rating40")},
        "n_test": len(test["question"]), "test_data": args.test_data or "generated", "dtype": args.dtype,
        "seconds": time.time() - t_start, "curve": [{k: r[k] for k in ("tau", "exact_match", "nfe")} for r in curve]}
    print(json.dumps(result))
    return result


def parse_puzzle(text):
    """--solve's argument -> (81,) uint8 board (sudoku_solver.parse_puzzle, errors naming the flag)."""
    try:
        return sudoku_solver.parse_puzzle(text)
    except InputError as e:
        raise InputError(f"--solve: {e}") from None


def solve_one(args, q, ctx):
    """--solve: one puzzle through the sampler; prints the grid and a JSON line, draws each cell
    coloured by the denoising step that revealed it."""
    model, ck = load_model(args.checkpoint, args.device, kind="sudoku")
    x = torch.from_numpy(q).long()[None].to(args.device)
    with ctx, torch.no_grad():
        out, st = sample_mdm(model, x, tau=args.tau)
    board, when = out[0].cpu().numpy(), st["revealed_at"][0].cpu().numpy()
    legal = bool(sudoku_solver.is_legal(board[None])[0])
    sols, _ = sudoku_solver.solve(q, limit=2)  # whether a wrong grid is the model's fault or the puzzle's
    if len(sols) != 1:
        print(f"NOTE: this puzzle has {'no solution' if not sols else 'more than one solution'}")
    for r in range(9):
        print(" ".join("".join(str(v) for v in board[r * 9 + c:r * 9 + c + 3]) for c in (0, 3, 6)))
        if r in (2, 5):
            print()
    png = os.path.join(args.out_dir, "solve.png")
    make_out_dir(args.out_dir)
    plot_solve(q, board, when, png, f"NFE {int(st['nfe'][0])}, tau {args.tau}, {'legal' if legal else 'NOT legal'}")
    result = {"solution": "".join(map(str, board)), "nfe": int(st["nfe"][0]), "legal": legal,
              "puzzle_solutions": len(sols), "correct": len(sols) == 1 and bool((sols[0] == board).all()), "picture": png,
              "checkpoint": args.checkpoint, "step": ck["step"]}
    print(json.dumps(result))
    return result


def plot_solve(q, board, when, path, title):
    """The solved grid, each revealed cell coloured by the step that revealed it; clues in white."""
    import matplotlib  # only the picture needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = np.where(q > 0, np.nan, when).reshape(9, 9).astype(float)
    clash = np.zeros(81, bool)  # cells whose digit repeats in one of their units
    for unit in sudoku_solver.UNITS:
        d = board[unit]
        clash[unit] |= (d[:, None] == d[None, :]).sum(1) > 1
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    top = np.nanmax(steps) if (q == 0).any() else 1  # a grid given complete reveals nothing
    im = ax.imshow(steps, cmap="viridis", vmin=1, vmax=max(2, top))
    for i in range(81):
        r, c = divmod(i, 9)
        ax.text(c, r, str(board[i]) if board[i] else "", ha="center", va="center", fontsize=13,
                fontweight="bold" if q[i] else "normal", color="black" if q[i] else "red" if clash[i] else "white")
    for k in range(10):  # thin cell lines, thick box lines
        lw = 2.2 if k % 3 == 0 else 0.5
        ax.axhline(k - 0.5, color="black", lw=lw)
        ax.axvline(k - 0.5, color="black", lw=lw)
    ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="revealed at step (clues: bold on white; red: breaks a rule)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------

def training_objects(args, train):
    """What a training step works on: the model, its EMA copy (the evaluated weights), the optimizer,
    the rollout buffer, the stream of training rows, the generator of noise and tau jitter."""
    model = build_model(args)
    ema = None
    if args.ema > 0:
        ema = Transformer(model.cfg).to(args.device).eval()
        ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.param_groups(args.weight_decay), lr=args.lr, fused=args.device.startswith("cuda"))
    stream = Stream(train, args.seed, args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)  # tau jitter and MLM noise
    D = model.cfg.n_embd if args.objective in RELAY_OBJECTIVES else 0  # rollout and mlm carry no relay state
    buf = RolloutBuffer(args.batch_size, 81, D, model.cfg.mask_id, args.device)
    return model, ema, opt, buf, stream, gen


def main(argv=None):
    # 1) arguments and device
    args = get_args(argv)
    torch.manual_seed(args.seed)  # model init; data order and noise have their own generators below
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    # bf16 autocast only when asked: on CPUs without AMX / AVX512-BF16 it is slower than fp32
    ctx = torch.autocast(args.device.split(":")[0], dtype=dtype) if dtype != torch.float32 else nullcontext()
    make_out_dir(args.out_dir)
    t_start = time.time()
    if args.checkpoint:  # --export, --solve or --eval-only (get_args: one of them)
        return checkpoint_mode(args, ctx, t_start)
    print(json.dumps({"args": vars(args)}))  # a training run's flags (the modes above take the checkpoint's)
    if args.device.startswith("cuda") and args.preset == "cpu":
        print(f"CUDA found, running the cpu preset. The paper's recipe is `python train_sudoku.py --preset paper --compile`: "
              f"300k steps, about {300_000 / H100_STEPS_PER_S / 3600:.0f} h on one H100.")
    if args.device == "cpu" and args.dtype == "bfloat16" and (cpu := cpu_info())[1] == []:
        print(f"NOTE: {cpu[0]} has no AMX or AVX512-BF16: bf16 autocast is emulated here and far slower "
              "than --dtype float32")

    # 2) data: training puzzles (augmented on the fly) and the tiered test set; a resumed run keeps
    #    its checkpoint's training set (its size follows --max-steps, which a resume may raise)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    claim_out_dir(args.out_dir, args.resume, args.overwrite)  # never replace a checkpoint; one run per dir
    ck = load_checkpoint(ckpt_path, args.device, kind="sudoku") if args.resume else None
    if ck:
        check_resume(ck, ckpt_path, args)
    train, test = training_data(args, ck, ckpt_path)
    # 3) model, its EMA copy (the evaluated weights), optimizer, data stream, noise, rollout buffer
    model, ema, opt, buf, stream, gen = training_objects(args, train)
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, objective {args.objective}, K={args.K}, "
          f"device {args.device}, {args.dtype}")
    # 4) resume: model, EMA, optimizer, buffer, data position and every RNG; or fine-tune from --init-from
    step = resume(ck, ckpt_path, args, model, ema, opt, buf, stream, gen) if ck else 0
    before = ck.get("trained") if ck else None  # the training figures of the invocations this one continues
    if args.init_from and not ck:  # resumed: the run's checkpoint holds the fine-tuned weights
        init_from(args.init_from, model, ema)
    train_model = torch.compile(model, mode=args.compile) if args.compile else model  # what the losses call
    summary = lambda: training_summary(args, step, losses, time.time() - t0 - t_off,  # noqa: E731
                                       steady_rate(args, warm, step, t_off), monitor, steps=step - step0, before=before)

    def save():  # -> its seconds, which are not training time
        t1 = time.time()
        save_checkpoint(training_state(args, step, model, ema, opt, buf, stream, gen, summary()), ckpt_path)
        return time.time() - t1

    # 5) the training loop. Losses stay on the device and are read every LOG_EVERY steps: a host
    #    read is a sync, and without one the host prepares the next step while the GPU runs this one.
    model.train()
    bar = tqdm(total=args.max_steps, initial=step, desc=args.objective, dynamic_ncols=True)
    t0, step0, losses, pending, monitor, seen, t_off = time.time(), step, [], [], [], 0, 0.0
    watch = monitor_set(test)
    warm = None  # (time, step, seconds off training) at the first read: the speed after it leaves out compilation
    stop = None
    with StopOnInterrupt() as interrupted:  # Ctrl-C: stop at the next step, with a checkpoint
        while step < args.max_steps:
            # a budget of this invocation ends the loop with a checkpoint, so --resume continues exactly
            if stop := stop_reason(args, interrupted, time.time() - t0, step - step0):
                tqdm.write(f"stopping at step {step}: {stop}")
                losses += [x[0] for x in torch.stack(pending).tolist()] if pending else []  # in the checkpoint too
                t_off += save()
                break
            loss, new_rows = train_step(args, step, train_model, model, ema, opt, buf, stream, gen, ctx)
            step += 1
            bar.update(1)  # host-side only; the loss in its postfix waits for the next read
            pending.append(torch.stack([loss.float(), new_rows.float()]))
            monitor_now = step % args.eval_every == 0 or step == args.max_steps
            if len(pending) == LOG_EVERY or monitor_now or step % args.ckpt_every == 0:
                read = torch.stack(pending).tolist()  # the one sync
                losses += [x[0] for x in read]
                seen += sum(x[1] for x in read)  # fresh puzzles: with a cold rollout buffer few slots finish per step
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr_at(args, step - 1):.1e}")
                pending = []
                warm = warm or (time.time(), step, t_off)
            # a) monitor: the EMA weights solve 128 test puzzles of every tier (nothing is selected on it)
            if monitor_now:
                t1 = time.time()
                r = evaluate(ema or model, watch, args.tau, args.eval_batch, ctx, desc="monitor")
                model.train()
                t_off += time.time() - t1
                monitor.append({"step": step, "exact_match": r["exact_match"], "token_acc": r["token_acc"],
                                "nfe": r["nfe"], "seconds": time.time() - t0})
                tqdm.write(f"step {step}: loss {np.mean(losses[-LOG_EVERY:]):.4f}, monitor exact {r['exact_match']:.1%} "
                           f"token {r['token_acc']:.1%} NFE {r['nfe']:.1f}, "
                           f"{seen / (time.time() - t0 - t_off):.0f} new puzzles/s")
            # b) checkpoint (atomic); its seconds, like the monitor's, are not training time
            if step % args.ckpt_every == 0 or step == args.max_steps:
                t_off += save()
    bar.close()
    if interrupted:
        StopOnInterrupt.exit(step, ckpt_path, args.overwrite)
    # 6) finish: evaluate at tau, sweep tau, curve, table, JSON line (a pause: the training figures only)
    # train_seconds leave out the monitor's evaluations and the saves (rows/s is the training speed)
    trained = summary()
    return {**end_of_run(args, ema or model, test, ctx, step, t_start, trained, stop, ckpt_path), "losses": losses}


def end_of_run(args, model, test, ctx, step, t_start, trained, stop, ckpt_path):
    """After the loop (the checkpoint saved): a pause prints the training figures; a finished run, or one
    out of time, is evaluated (finish), and Ctrl-C there loses only the evaluation."""
    if stop == "--stop-after":
        print(f"paused at step {step}: {ckpt_path} saved; {how_to_continue(args.overwrite)} (--eval-only "
              f"--checkpoint {ckpt_path} evaluates it)")
        print(json.dumps({**trained, "seconds": time.time() - t_start}))
        return trained
    try:
        return finish(args, model, test, ctx, step, t_start, trained)
    except KeyboardInterrupt:  # (run_cli prints this)
        raise Interrupted(f"interrupted in the evaluation: {ckpt_path} (step {step}) is saved",
                          f"--eval-only --checkpoint {ckpt_path} evaluates it") from None


def checkpoint_mode(args, ctx, t_start):
    """--export, --solve or --eval-only: one checkpoint, no training."""
    if args.export:
        if os.path.exists(args.export) and os.path.samefile(args.export, args.checkpoint):
            raise FileExistsError(f"--export {args.export} is the checkpoint it reads: write the export elsewhere")
        check_out_file("--export", args.export, args.overwrite)  # it may be a training checkpoint, or a shipped one
        save_checkpoint(ex := export_weights(args.checkpoint), args.export)
        return print(f"wrote {args.export} ({os.path.getsize(args.export) / 2 ** 20:.1f} MiB, fp16 weights of step "
                     f"{ex['step']} of --max-steps {(ex['args'] or {}).get('max_steps', '?')})")
    if args.solve is not None:
        return solve_one(args, parse_puzzle(args.solve), ctx)
    model, ck = load_model(args.checkpoint, args.device, kind="sudoku")
    # results are labelled with the checkpoint's objective and warm start, not this command's flags
    args.objective = ck.get("objective") or ck.get("args", {}).get("objective", args.objective)
    args.mlm_steps = ck.get("args", {}).get("mlm_steps", 0)
    print(f"model: {args.checkpoint}, {model.num_params() / 1e6:.2f}M parameters, objective {args.objective}, "
          f"step {ck['step']}")
    return finish(args, model, load_test(args), ctx, ck["step"], t_start, ck.get("trained"))  # how it was trained


def monitor_set(test, n=128):
    """The monitor's puzzles: n spread evenly over the test set, so that every tier of a tiered set
    (stored tier after tier) is in it."""
    m = len(test["question"])
    return {k: v[np.linspace(0, m - 1, min(m, n)).astype(int)] for k, v in test.items()}


def steady_rate(args, warm, step, t_off):
    """Training rows/s since `warm` = (time, step, seconds off training) of the first loss read, which
    leaves compilation and warm-up out; None before a step after it."""
    if not warm or step <= warm[1]:
        return None
    return args.batch_size * (step - warm[1]) / (time.time() - warm[0] - (t_off - warm[2]))


def train_step(args, step, train_model, model, ema, opt, buf, stream, gen, ctx):
    """One optimizer step; returns (loss, fresh training rows it used), both 0-d tensors on the
    device: nothing here waits for the device, so a GPU runs step after step (read them rarely)."""
    # 1) learning rate: linear warmup, then constant (the authors')
    for g in opt.param_groups:
        g["lr"] = lr_at(args, step)
    # 2) the loss: MLM on fresh rows, or K rollout steps on the buffer (finished slots take fresh rows)
    with ctx:
        if step < args.mlm_steps or args.objective == "mlm":
            x0, fixed = stream(args.batch_size)  # (B, 81) answers, (B, 81) clue mask
            loss = mlm_loss(train_model, x0, fixed, gen)
            new_rows = torch.tensor(args.batch_size, device=x0.device)
        else:
            new_rows = buf.replace_finished(*stream(args.batch_size))  # the authors' way: draw B, keep what fits
            # NOTE: as the authors train, a fresh threshold tau ~ max(0, N(--train-tau, 0.1)) at every rollout step
            reveal = partial(reveal_jittered_mass, tau=args.train_tau, gen=gen)
            loss = rollout_loss(train_model, buf, args.K, args.objective, reveal)
    # 3) backward, clip, step
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    opt.step()
    # 4) EMA of the weights, warmed so that short runs are not stuck near the initialisation: the decay
    #    (2 + step) / (11 + step) reaches 0.99 at step 889 (RESULTS.md, Deviations)
    if ema is not None:
        d = min(args.ema, (2 + step) / (11 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)
    return loss.detach(), new_rows


def lr_at(args, step):
    """Linear warmup, then constant (the authors')."""
    return args.lr * min(1.0, (step + 1) / max(1, args.warmup))


if __name__ == "__main__":
    run_cli(main)
