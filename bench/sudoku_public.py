"""
bench/sudoku_public.py — train and test CSVs from public lists of hard Sudoku puzzles, split so that
no test puzzle has a near copy in training (arXiv 2605.22967 §4.1 trains and tests on hard puzzles;
NOTES.md §4).

    python bench/sudoku_public.py puzzles5_forum_hardest_1905_11+ puzzles6_forum_hardest_1106 \\
        puzzles3_magictour_top1465 --out-dir data/public      # ~1 min on 2 cores
    python train_sudoku.py --preset paper --data data/public/train.csv --test-data data/public/test.csv

The lists are not shipped: pass their paths. The ones above are files of tdoku's benchmark data
(data.zip in github.com/t-dillon/tdoku): the enjoysudoku forum's hardest puzzles and magictour's
top 1465, one puzzle per line (sudoku.read_list; Gordon Royle's 17-clue list reads the same way).

1. Read every list; a puzzle symmetric to one read before is dropped (sudoku_solver.symmetry_key).
2. Put each puzzle in a random symmetry (lists keep puzzles in one canonical orientation, and
   rate() depends on the orientation), then solve and rate it as stored. A puzzle without exactly
   one solution is an error naming file:line (--skip-invalid drops it).
3. Test: --n-test puzzles at random from the lists named by --test-from (default: all). Training:
   every other puzzle, less those sharing --near or more clues (same cell, same digit, as listed)
   with a test puzzle. The forum lists hold families of near copies (in forum_hardest_1905_11+, 65 %
   of puzzles share 17 or more clues with another one), so a plain random split would test on
   puzzles training has seen with a few clues moved. NOTE: near copies are compared as listed; one
   stored in another orientation is not caught (exact symmetric copies are, in step 1).
4. Write train.csv and test.csv (question, answer, rating) in --out-dir. Prints one JSON line last.
"""
import json
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import sudoku  # noqa: E402
import sudoku_solver  # noqa: E402
from runs import argparser, positive_int, seed_int  # noqa: E402

p = argparser(__doc__)
p.add_argument("lists", nargs="+", help="puzzle lists, one 81-character puzzle per line")
p.add_argument("--out-dir", default="data/public", help="where train.csv and test.csv go")
p.add_argument("--n-test", type=positive_int, default=1000, help="test puzzles")
p.add_argument("--test-from", nargs="*", default=None, help="draw the test set from these lists only (default: all)")
p.add_argument("--near", type=positive_int, default=16, help="drop a training puzzle sharing this many clues with a "
               "test puzzle (81: only the test puzzles themselves, up to symmetry)")
p.add_argument("--seed", type=seed_int, default=0, help="symmetries and the split")
p.add_argument("--skip-invalid", action="store_true", help="drop puzzles without exactly one solution")
p.add_argument("--workers", type=positive_int, default=None, help="solver processes (default: all cores)")
p.add_argument("--force", action="store_true", help="overwrite train.csv and test.csv in --out-dir")


def clue_onehot(q):
    """(N, 81) boards -> (N, 729) float: 1 where cell i holds digit d; a dot product counts shared clues."""
    x = torch.zeros(len(q), 81, 10)
    x.scatter_(2, torch.from_numpy(q).long()[:, :, None], 1.0)
    return x[:, :, 1:].reshape(len(q), 729)


def near_test(q, test, near, chunk=20000):
    """(N,) bool: puzzle shares >= near clues with one of the test puzzles."""
    t = clue_onehot(q[test])
    return np.concatenate([((clue_onehot(q[i:i + chunk]) @ t.T) >= near).any(1).numpy()
                           for i in range(0, len(q), chunk)])


def stats(q, rating):
    if not len(q):
        return {"n": 0}
    return {"n": len(q), "clues": round(float((q > 0).sum(1).mean()), 1), "rating_median": float(np.median(rating)),
            "rating_mean": round(float(rating.mean()), 1), "rated_40": round(float((rating >= 40).mean()), 3)}


if __name__ == "__main__":
    args = p.parse_args()
    if args.near > 81:
        p.error(f"argument --near: a puzzle has 81 cells, got {args.near}")
    t0 = time.time()
    paths = {name: os.path.join(args.out_dir, f"{name}.csv") for name in ("train", "test")}
    if not args.force and any(os.path.exists(x) for x in paths.values()):
        raise SystemExit(f"{args.out_dir} already holds train.csv or test.csv: pass --force to replace them")
    test_lists = args.test_from or args.lists
    if not set(test_lists) <= set(args.lists):
        raise SystemExit(f"--test-from names lists that are not given: {sorted(set(test_lists) - set(args.lists))}")
    # 1) read, drop symmetric copies (first one wins)
    q, src, line = [], [], []
    for k, path in enumerate(args.lists):
        try:
            b, n = sudoku.read_list(path)
        except (OSError, ValueError) as e:
            raise SystemExit(str(e))
        q.append(b), src.append(np.full(len(b), k)), line.append(n)
    q, src, line = np.concatenate(q), np.concatenate(src), np.concatenate(line)
    keys = sudoku_solver.symmetry_key(q)
    first = np.sort(np.unique(keys, return_index=True)[1])
    print(f"{len(q)} puzzles read, {len(q) - len(first)} symmetric copies dropped", flush=True)
    q, src, line = q[first], src[first], line[first]
    # 2) a random symmetry each, then solve and rate as stored
    rng = np.random.default_rng(args.seed)
    stored, _ = sudoku_solver.augment(q, q, rng)  # the question only: its answer is solved next
    chunks = np.array_split(stored, max(1, len(q) // 500))
    with mp.Pool(args.workers or os.cpu_count() or 1) as pool:
        out = list(tqdm(pool.imap(sudoku_solver.solve_many, chunks), total=len(chunks), desc="solving", unit="chunk"))
    answer, nsol, rating = (np.concatenate(z) for z in zip(*out))
    bad = np.flatnonzero(nsol != 1)
    for i in bad[:5 if args.skip_invalid else 1]:
        what = "no solution (its clues may break a rule)" if nsol[i] == 0 else "several solutions"
        msg = f"{args.lists[src[i]]}:{line[i]}: {what}"
        if not args.skip_invalid:
            raise SystemExit(msg + " (--skip-invalid drops such puzzles)")
        print(msg)
    if len(bad):
        print(f"dropped {len(bad)} puzzles without exactly one solution")
    ok = nsol == 1
    q, src, stored, answer, rating = q[ok], src[ok], stored[ok], answer[ok], rating[ok]
    # 3) split: test at random, training without the test puzzles' near copies
    pool_ids = np.flatnonzero(np.isin(src, [args.lists.index(x) for x in test_lists]))
    if len(pool_ids) < args.n_test:
        raise SystemExit(f"--n-test {args.n_test}: only {len(pool_ids)} puzzles to draw from")
    test = np.sort(rng.choice(pool_ids, args.n_test, replace=False))
    near = near_test(q, test, args.near)
    near[test] = False
    train = np.setdiff1d(np.flatnonzero(~near), test)
    if not len(train):
        raise SystemExit(f"no training puzzles left: --n-test {args.n_test} took them, or --near {args.near} "
                         f"dropped every other puzzle as a near copy of a test puzzle")
    # 4) write
    os.makedirs(args.out_dir, exist_ok=True)
    for name, ids in (("train", train), ("test", test)):
        sudoku.write_csv(paths[name], {"question": stored[ids], "answer": answer[ids], "rating": rating[ids]})
    result = {"read": len(keys), "distinct": int(len(first)),
              "no_unique_solution": int(len(bad)), "near_copies_dropped": int(near.sum()),
              "train": stats(stored[train], rating[train]), "test": stats(stored[test], rating[test]),
              "per_list": {x: stats(stored[src == k], rating[src == k]) for k, x in enumerate(args.lists)},  # distinct
              "out": paths, "seconds": round(time.time() - t0, 1)}
    for name in ("train", "test"):
        print(f"{name}: {json.dumps(result[name])}")
    print(json.dumps(result))
