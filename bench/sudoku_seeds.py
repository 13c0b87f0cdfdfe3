"""
bench/sudoku_seeds.py — choose the seed puzzles of the hard tier (sudoku_seeds.txt) from a list of
17-clue puzzles, e.g. Gordon Royle's collection of 49,151 (one puzzle per line, digits, 0 or '.'
for blanks, '#' comment lines: sudoku.read_list; not shipped: pass its path).

    python bench/sudoku_seeds.py sudoku17.txt   # ~13 min on 2 cores; seeds already in --out keep their side

1. Rate every puzzle in 4 random symmetries x 2 digit orders (sudoku_hard.rate_samples); keep those
   with median >= 30, rate them again in 16 x 2, keep median >= --min-median.
2. Screen the --max-candidates highest-rated: --rounds rounds of the hard search started next to
   each (emitting at HARD's rating); keep those that emitted >= --min-emitted. A seed's own rating
   predicts this (correlation 0.8 on top95's 17-clue puzzles, RESULTS.md).
3. Split: seeds sharing >= 14 clue cells are one family, on one side. Seeds already in --out keep
   their side (and so does their family); of the new families (by emitted count) every
   --test-every-th seeds the test streams, the rest the training streams.
Prints one JSON line last.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import multiprocessing as mp  # noqa: E402

import numpy as np  # noqa: E402

import sudoku  # noqa: E402
import sudoku_hard  # noqa: E402
import sudoku_solver  # noqa: E402
from runs import argparser, nonneg_float, nonneg_int, positive_int  # noqa: E402

p = argparser(__doc__)
p.add_argument("puzzles", help="text file, one 81-character puzzle per line")
p.add_argument("--out", default="sudoku_seeds.txt", help="the seed file to write")
p.add_argument("--min-median", type=nonneg_float, default=35, help="keep puzzles rating at least this (median of 32 draws)")
p.add_argument("--max-candidates", type=positive_int, default=160, help="screen only this many, the highest-rated first")
p.add_argument("--rounds", type=positive_int, default=12, help="rounds of the screening search")
p.add_argument("--min-emitted", type=nonneg_int, default=80, help="keep seeds whose screen emitted at least this many")
p.add_argument("--test-every", type=positive_int, default=4, help="every n-th family (by emitted count) seeds the test streams")
p.add_argument("--workers", type=positive_int, default=None, help="processes (default: all cores)")
p.add_argument("--force", action="store_true", help="write --out even if seeds already in it are not kept again")
args = p.parse_args()
if os.path.isdir(args.out):
    p.error(f"--out {args.out} is a directory; it names the seed file to write")


def rate(lines, geometries, seed):
    q = np.stack([sudoku_solver.parse_puzzle(s) for s in lines])
    return np.median(sudoku_hard.rate_samples(q, np.random.default_rng(seed), geometries, 2), 1)


def screen(s):
    """Puzzles emitted by --rounds rounds of the search started next to s, and seconds taken."""
    rng, t0 = np.random.default_rng(7), time.time()
    pool, emit = sudoku_hard._seed_pool(sudoku_solver.parse_puzzle(s), rng, sudoku_hard.HARD["pool"]), {}
    for _ in range(args.rounds):
        pool = sudoku_hard._beam_round(pool, rng, emit, sudoku_hard.HARD["kids"], sudoku_hard.HARD["emit_rating"])
    return len(emit), time.time() - t0


def assign_sides(kept, fixed):
    """kept: [(emitted, puzzle)], best first; fixed: {puzzle: side} of an earlier seed file. A family (seeds
    sharing >= 14 clue cells) takes the side of its fixed members; of the other families, every
    --test-every-th goes to test. -> (number of families, {puzzle: side})."""
    families = []  # [([clue cells of each member], [puzzles])], in order of their first seed
    for _, s in kept:
        cells = {i for i, ch in enumerate(s) if ch != "."}
        near = [k for k, f in enumerate(families) if any(len(cells & c) >= 14 for c in f[0])]
        if not near:
            families.append(([cells], [s]))
            continue
        first = families[near[0]]
        first[0].append(cells)
        first[1].append(s)
        for k in reversed(near[1:]):  # s joins families that were apart: one family now (transitive)
            first[0].extend(families[k][0])
            first[1].extend(families[k][1])
            del families[k]
    side, new = {}, 0
    for _, members in families:
        old = {fixed[s] for s in members if s in fixed}
        if len(old) > 1:
            raise SystemExit(f"{args.out}: one family holds train and test seeds: {members}")
        if not old:
            new += 1
            old = {"test" if new % args.test_every == 0 else "train"}
        kind = old.pop()
        side.update((s, kind) for s in members)
    return len(families), side


if __name__ == "__main__":
    t0 = time.time()
    try:
        q, numbers = sudoku.read_list(args.puzzles)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e))
    lines = [sudoku_solver.puzzle_text(b) for b in q]
    for n, s in zip(numbers, lines):
        try:
            sudoku_solver.parse_puzzle(s)  # the clues break no rule
        except ValueError as e:
            raise SystemExit(f"{args.puzzles}:{n}: {e}")
    workers = args.workers or os.cpu_count() or 1
    split = lambda xs: [list(c) for c in np.array_split(np.array(xs, dtype=object), workers) if len(c)]
    with mp.Pool(workers) as pool:
        med = np.concatenate(pool.starmap(rate, [(c, 4, i) for i, c in enumerate(split(lines))]))
        hard = [s for s, m in zip(lines, med) if m >= 30]
        med2 = np.concatenate(pool.starmap(rate, [(c, 16, 10 + i) for i, c in enumerate(split(hard))])) if hard else []
        order = np.argsort(-np.asarray(med2, float), kind="stable")
        cand = [hard[i] for i in order if med2[i] >= args.min_median][:args.max_candidates]
        print(f"{len(lines)} puzzles, {len(hard)} rate median >= 30 in 8 draws; screening {len(cand)} of those "
              f"with median >= {args.min_median} in 32", flush=True)
        result = pool.map(screen, cand, chunksize=1)
    kept = sorted([(n, s) for s, (n, _) in zip(cand, result) if n >= args.min_emitted], reverse=True)
    fixed = {}  # seeds of an earlier file keep their side: a seed that moved would put a training grid into test sets
    if os.path.exists(args.out):
        fixed = {p: kind for kind, ps in sudoku_hard.read_seeds(args.out).items() for p in ps}
    if (dropped := sorted(set(fixed) - {s for _, s in kept})) and not args.force:
        raise SystemExit(f"{args.out}: {len(dropped)} of its {len(fixed)} seeds were not kept by this run (other "
                         f"puzzles or settings?) and would be lost: pass --force to write only this run's "
                         f"{len(kept)}, or --out another file")
    families, side = assign_sides(kept, fixed)
    if set(side.values()) != {"train", "test"}:  # sudoku_hard.read_seeds refuses such a file, and sudoku imports it
        raise SystemExit(f"{len(kept)} seeds in {families} families, all {set(side.values()) or 'none'}: a seed file "
                         f"needs train and test seeds (lower --test-every, or screen more candidates)")
    with open(args.out, "w") as f:
        f.write(f"# Seeds of the hard tier (sudoku_hard.hard_island): written by `python bench/sudoku_seeds.py "
                f"{os.path.basename(args.puzzles)} --min-median {args.min_median:g} --max-candidates "
                f"{args.max_candidates}`.\n# Hard 17-clue puzzles whose screening search emitted >= {args.min_emitted} "
                f"puzzles in {args.rounds} rounds;\n# seeds sharing >= 14 clue cells are one family, on one side; a "
                "seed keeps its side from run to run. Columns: family, puzzle, puzzles emitted by the screen.\n")
        for n, s in kept:
            f.write(f"{side[s]} {s} screen={n}\n")
    out = {"puzzles": len(lines), "candidates": len(cand), "kept": len(kept), "families": families,
           "test": sum(v == "test" for v in side.values()), "seconds": round(time.time() - t0, 1)}
    print(json.dumps(out))
