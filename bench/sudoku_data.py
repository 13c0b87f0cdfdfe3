"""
bench/sudoku_data.py — the default tiered Sudoku train and test sets (sudoku.load_tiered): how hard
each tier is by sudoku_solver.rate, a histogram figure, and generator speed per tier.

    python bench/sudoku_data.py --n-train 400 --n-test 200 --speed 0 --speed-hard 0   # a quick look (minutes)
    python bench/sudoku_data.py                      # the figure in assets/ and speeds (~1.5 h on 2 cores)
    python bench/sudoku_data.py --scale 20000        # time 20,000 training hard puzzles (~35 min on 2 cores)

Sets come from (and go to) the cache in --data-dir, so a second run only re-plots. The speed part
times each tier's generator on fresh puzzles with --workers processes: --speed puzzles of tiers 0
and 1, --speed-hard of tier 2 (default: 100 per training seed; an island's first puzzles cost its
climb), and reports puzzles/s and puzzles/s per process (the hard tier runs at most one process
per seed). --scale N only times the first N puzzles of the training hard stream, fresh, with each
island's seconds (with one core per island, the slowest island is the wall time), and caches them
for training. Every rating is rate() of the puzzle as stored, which the hard tier stores in a fresh
random symmetry (rate depends on the symmetry). Prints one JSON line last.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402

import sudoku  # noqa: E402
import sudoku_hard  # noqa: E402
import sudoku_solver  # noqa: E402
from runs import argparser, cpu_name, nonneg_int, positive_int, seed_int  # noqa: E402

NAMES = ("singles", "search", "hard")

p = argparser(__doc__)
p.add_argument("--n-train", type=positive_int, default=1000, help="puzzles in the training set")
p.add_argument("--n-test", type=positive_int, default=500, help="puzzles in the test set")
p.add_argument("--seed", type=seed_int, default=0, help="set seed (the test set uses other streams)")
p.add_argument("--data-dir", default="data", help="cache of generated sets")
p.add_argument("--workers", type=positive_int, default=None, help="generator processes (default: all cores)")
p.add_argument("--speed", type=nonneg_int, default=400, help="tier 0 and 1 puzzles to time (0: skip)")
p.add_argument("--speed-hard", type=int, default=-1, help="tier 2 puzzles to time (0: skip, -1: 100 per training seed)")
p.add_argument("--scale", type=nonneg_int, default=0, help="only time the first N training hard puzzles (0: off)")
p.add_argument("--out", default="assets/sudoku_difficulty.png", help="the histogram figure")
args = p.parse_args()
if args.speed_hard < -1:
    p.error(f"--speed-hard {args.speed_hard}: 0 skips, -1 means 100 per training seed, else a count")


def stats(d):
    """Per tier: count, rating median / mean / p90 and mean clues."""
    out = {}
    for t, name in enumerate(NAMES):
        m = d["tier"] == t
        r = d["rating"][m]
        if m.any():
            out[name] = {"n": int(m.sum()), "rating_median": float(np.median(r)), "rating_mean": float(r.mean()),
                         "rating_p90": float(np.percentile(r, 90)), "clues_mean": float((d["question"][m] > 0).sum(1).mean())}
    return out


def speed(counts, workers):
    """Puzzles per second of each tier's generator on counts[t] fresh puzzles (a stream no set uses)."""
    out = {}
    for t, (name, n) in enumerate(zip(NAMES, counts)):
        if n:
            t0 = time.time()
            sudoku.generate_tier(t, 999, n, workers)
            out[name] = n / (time.time() - t0)
    return out


def plot(sets, path):
    """Rating (log-binned, 0 in the first bin) and clue-count histograms per tier, one row per set."""
    import matplotlib  # only the figure needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(sets), 2, figsize=(11, 3.6 * len(sets)), squeeze=False)
    top = max(int(d["rating"].max()) for d in sets.values())
    bins = np.unique(np.r_[0, np.round(np.geomspace(1, top + 2, 30))]) - 0.5  # whole ratings, ~log-spaced
    for row, (kind, d) in zip(axes, sets.items()):
        for t, name in enumerate(NAMES):
            m = d["tier"] == t
            if not m.any():
                continue
            r = d["rating"][m]
            row[0].hist(r, bins=bins, histtype="step", lw=1.8, label=f"{name}: n {m.sum()}, median {np.median(r):.0f}")
            clues = (d["question"][m] > 0).sum(1)
            row[1].hist(clues, bins=np.arange(16.5, 31.5), histtype="step", lw=1.8, label=f"{name}: mean {clues.mean():.1f}")
        row[0].set_xscale("symlog", linthresh=1)
        row[0].set(title=f"{kind}: rating (branch points of sudoku_solver.rate)", xlabel="rating", ylabel="puzzles")
        row[1].set(title=f"{kind}: clues", xlabel="clues", ylabel="puzzles")
        row[0].legend(fontsize=8)
        row[1].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)


def scale(n, workers):
    """Generate the first n puzzles of the training hard stream (the one load_tiered uses), fresh,
    timed; cache them for training -> dict of timings, rounds and the stats of the set."""
    report, t0 = {}, time.time()
    d = sudoku_hard.generate_hard(100 * args.seed + sudoku.STREAMS["train"][2], n, "train", workers, report=report)
    seconds = time.time() - t0
    sudoku.cached(sudoku.tier_path(args.data_dir, 2, 100 * args.seed + sudoku.STREAMS["train"][2], n), lambda: d)
    q, r = d["question"], d["rating"]
    return {"n": len(q), "distinct": len(set(sudoku_solver.symmetry_key(q))), "seconds": seconds, "workers": workers,
            "puzzles_per_s": n / seconds, "rating_median": float(np.median(r)), "rating_mean": float(r.mean()),
            "at_least_40": float((r >= 40).mean()), "clues_mean": float((q > 0).sum(1).mean()),
            "slowest_island_s": max(report["island_seconds"]), **report}


if args.scale:
    out = {"seed": args.seed, "hard_version": sudoku_hard.HARD_VERSION, "cores": os.cpu_count(), "cpu": cpu_name(),
           **scale(args.scale, args.workers or os.cpu_count() or 1)}
    print(f"{out['n']} hard puzzles ({out['distinct']} distinct) in {out['seconds']:.0f} s on {out['workers']} processes, "
          f"{out['rounds']} rounds; slowest island {out['slowest_island_s']:.0f} s; rating median {out['rating_median']:.0f}")
    print(json.dumps(out))
    sys.exit()

t0 = time.time()
sets = {kind: sudoku.load_tiered(kind, n, args.seed, args.data_dir, args.workers)
        for kind, n in (("train", args.n_train), ("test", args.n_test))}
out = {"seed": args.seed, "hard_version": sudoku_hard.HARD_VERSION, "mix": sudoku.MIX, "cores": os.cpu_count(),
       "load_s": time.time() - t0, **{kind: stats(d) for kind, d in sets.items()}}
for kind, s in out.items():
    if kind in sets:
        for name, v in s.items():
            print(f"{kind:>5} {name:>8}: n {v['n']:5d}  rating median {v['rating_median']:5.1f}  mean {v['rating_mean']:6.1f}"
                  f"  p90 {v['rating_p90']:6.1f}  clues {v['clues_mean']:.1f}")
plot(sets, args.out)
print(f"figure: {args.out}")
workers = args.workers or os.cpu_count() or 1
n_hard = 100 * len(sudoku_hard.HARD_SEEDS["train"]) if args.speed_hard < 0 else args.speed_hard
if args.speed or n_hard:
    out["puzzles_per_s"] = speed((args.speed, args.speed, n_hard), workers)
    procs = {name: min(workers, len(sudoku_hard.HARD_SEEDS["train"])) if name == NAMES[2] else workers for name in NAMES}
    out["puzzles_per_s_per_core"] = {k: v / procs[k] for k, v in out["puzzles_per_s"].items()}
    out["workers"] = workers
    for name, v in out["puzzles_per_s"].items():
        print(f"generator {name:>8}: {v:7.2f} puzzles/s on {procs[name]} processes = {v / procs[name]:.2f} per core")
print(json.dumps(out))
