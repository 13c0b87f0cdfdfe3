"""
bench/compare_objectives.py — the four objectives of the paper's Table 1 (mlm, rollout, relay_sg,
relay) trained under one budget and seed, their accuracy-NFE curves in one figure and a table.

    python bench/compare_objectives.py                                   # CPU preset, ~1 h on 2 cores
    python bench/compare_objectives.py --max-steps 100 --eval-size 64    # a quick look
    python bench/compare_objectives.py --objectives mlm relay --threads 1   # a subset, e.g. in parallel
    bash bench/sudoku_gpu.sh                                             # one GPU: paper preset, hard data

Any flag it does not know goes to train_sudoku.py unchanged; --mlm-frac defaults to 0 here, so every
row is its pure objective. Each objective's result is saved to
OUT_DIR/OBJECTIVE/result.json and reused when the same flags run again; an objective stopped before
its result resumes from its checkpoint (same flags), so an interrupted comparison goes on where it
stopped. A result or checkpoint of other flags is replaced only with --replace. An objective that
crashes prints its traceback and the next one runs; the exit status is then 1. Prints a markdown
table and one JSON line (then the failed objectives, if any).
"""
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import train_sudoku  # noqa: E402
from runs import Interrupted, argparser, nonneg_int, written_whole  # noqa: E402
from relay import OBJECTIVES  # noqa: E402

p = argparser(__doc__)
p.add_argument("--objectives", nargs="*", choices=OBJECTIVES, default=list(OBJECTIVES),
               help="objectives to train now, in this order (saved results of the others are reused; none: only "
                    "report what is saved)")
p.add_argument("--out-dir", default="out/compare", help="one folder per objective, the figure")
p.add_argument("--threads", type=nonneg_int, default=0, help="torch threads (0 = torch's default)")
p.add_argument("--replace", action="store_true", help="train an objective again whose saved result or checkpoint "
               "was made with other flags (without it, the run stops rather than replace them)")
args, passthrough = p.parse_known_args()
if clash := [f for f in passthrough if f.split("=")[0] in ("--resume", "--overwrite", "--stop-after")]:
    p.error(f"{clash[0]}: this script resumes an unfinished objective itself, and --replace trains one again "
            f"(a budget: --time-limit, which still evaluates)")
if train_sudoku.get_args(passthrough).max_steps < 1:  # read as train_sudoku reads it
    p.error("--max-steps: a row of the table needs at least one training step")
if not any(f.split("=")[0] == "--mlm-frac" for f in passthrough):
    passthrough += ["--mlm-frac", "0"]  # Table 1's rows are pure objectives (no MLM warm start)
if args.threads:
    torch.set_num_threads(args.threads)

PAPER_TABLE1 = {"mlm": 20.3, "rollout": 38.7, "relay_sg": 58.4, "relay": 62.7}  # exact %, Sudoku-Extreme



def read_flags(path, what):
    """The "flags" list in a JSON file this script wrote (None if there is no file)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)["flags"]
    except (ValueError, KeyError, TypeError) as e:
        sys.exit(f"{path}: not {what} of this script ({e!r}); move it away to train again")


def settings(flags):
    """A flag list as {flag: value}: `--f=v` and `--f v` alike, the last of a repeated flag (as argparse)."""
    out = {}
    for i, f in enumerate(flags):
        if f.startswith("--"):
            name, eq, value = f.partition("=")
            out[name] = value if eq else flags[i + 1] if i + 1 < len(flags) and not flags[i + 1].startswith("--") \
                else True
    return out


def flag_diff(old, new):
    """What differs between two flag lists, as {flag: (then, now)} (empty: the same settings)."""
    a, b = settings(old or []), settings(new)
    return {f: (a.get(f, "-"), b.get(f, "-")) for f in sorted(a.keys() | b.keys()) if a.get(f) != b.get(f)}


def write_json(path, obj):
    with written_whole(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f)


results, failed = {}, []
for obj in [*args.objectives, *(o for o in OBJECTIVES if o not in args.objectives)]:  # --objectives' order first
    out = os.path.join(args.out_dir, obj)
    path, started = os.path.join(out, "result.json"), os.path.join(out, "started.json")
    flags = [*passthrough, "--objective", obj, "--out-dir", out]
    old = read_flags(path, "a saved result")
    if old and not flag_diff(old, flags):
        with open(path) as f:
            results[obj] = json.load(f)
        continue
    if obj not in args.objectives:
        if old:
            print(f"{obj}: the result saved in {path} is for other flags, left out")
        continue
    ckpt = os.path.join(out, "ckpt.pt")
    begun = read_flags(started, "a run record") if os.path.exists(ckpt) else None
    same_run = begun is not None and not flag_diff(begun, flags)
    if (old or os.path.exists(ckpt)) and not same_run and not args.replace:  # never lose a result or a run
        then = old or begun
        what = f"other flags ({flag_diff(then, flags)}, as {{flag: (then, now)}})" if then else "unrecorded flags"
        sys.exit(f"{obj}: {path if old else ckpt} holds a run of {what}: pass --replace to train {obj} again, or "
                 f"choose another --out-dir")
    mode = "--resume" if same_run else "--overwrite"  # an unfinished run of these flags goes on
    os.makedirs(out, exist_ok=True)
    write_json(started, {"flags": flags})
    try:
        r = train_sudoku.main([*flags, mode])
    except KeyboardInterrupt as e:  # the budget's Ctrl-C (timeout -s INT): saved at a step; this command resumes it
        said = e.saved if isinstance(e, Interrupted) else "interrupted"  # (train_sudoku's way on is not this one)
        sys.exit(f"{obj}: {said}; the same compare_objectives.py command continues it")
    except Exception:  # NOTE: one GPU call runs all four: a crash in one must not cost the others their turn
        traceback.print_exc()
        failed.append(obj)
        continue
    r.pop("losses")
    results[obj] = {**r, "flags": flags, "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    write_json(path, results[obj])

results = {k: results[k] for k in OBJECTIVES if k in results}  # Table 1's order
if results:
    first = next(iter(results.values()))  # the figure names the run's device and torch, not this process's
    train_sudoku.plot_curves({k: r["curve"] for k, r in results.items()}, os.path.join(args.out_dir, "curves.png"),
                             f"Sudoku, equal budget ({next(iter(results.values()))['steps']} steps), "
                             f"{first.get('gpu') or 'CPU'}, torch {first['torch']}")
    pct = lambda r, g: f"{100 * r[g]['exact_match']:.1f}" if r.get(g) else "-"
    steady = lambda r: (f"{r['train_rows_per_s_steady']:.0f}" if r.get("train_rows_per_s_steady") else
                        f"{r['train_rows_per_s']:.0f} (mean, warm-up in it)" if r.get("train_rows_per_s") else "-")
    print("| objective | exact % (tau 0.15) | paper's exact % (300k steps) | singles | search | hard | "
          "hard, rating >= 40 | token acc % | NFE / puzzle | NFE batch | train rows/s | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, r in results.items():
        print(f"| {k} | {100 * r['exact_match']:.1f} | {PAPER_TABLE1[k]} | {pct(r, 'singles')} | {pct(r, 'search')} | "
              f"{pct(r, 'hard')} | {pct(r, 'rating40')} | {100 * r['token_acc']:.1f} | {r['nfe']:.1f} | "
              f"{r['nfe_batch']:.1f} | {steady(r)} | {r['train_seconds']:.0f} |")
    print(f"figure: {os.path.join(args.out_dir, 'curves.png')}")
print(json.dumps({k: {m: r.get(m) for m in ("exact_match", "token_acc", "nfe", "nfe_batch", "legal_rate", "hard",
                                            "rating40", "train_rows_per_s", "train_rows_per_s_steady", "steps")}
                  for k, r in results.items()}))
if failed:  # after the table of those that finished; the tracebacks are above
    sys.exit(f"failed: {failed} (tracebacks above); the others' results are saved")
