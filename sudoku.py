"""
sudoku.py — Sudoku data for the Relay experiment (arXiv 2605.22967 §4.1; NOTES.md §4): a CSV reader for the public
Sudoku-Extreme files, an offline generator of unique-solution puzzles with a difficulty rating,
and the Sudoku symmetry group as augmentation.

    python sudoku.py --n 200 --seed 0              # generate, rate and print speed
    python sudoku.py --check data/test.csv         # validate a CSV file

Boards are uint8 arrays of 81 cells, row-major; 0 is a blank, 1..9 are digits. The token id of a
cell *is* its value, so MASK = 0 and a puzzle array is already the model's input canvas.

Difficulty: `rate()` runs a solver that applies naked and hidden singles to a fixpoint and
branches on the cell with the fewest candidates. tier 0 = solved by singles alone; tier 1 = needs
search. rating = number of branch points the search opened (0 for tier 0), a rough analogue of the
backtrack count in Sudoku-Extreme's `rating` column.
"""
import argparse
import csv
import multiprocessing as mp
import os
import time

import numpy as np
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------
# constraint geometry
ROWS = [[r * 9 + c for c in range(9)] for r in range(9)]
COLS = [[r * 9 + c for r in range(9)] for c in range(9)]
BOXES = [[(br * 3 + r) * 9 + bc * 3 + c for r in range(3) for c in range(3)]
         for br in range(3) for bc in range(3)]
UNITS = ROWS + COLS + BOXES
PEERS = [tuple(sorted({p for u in UNITS if i in u for p in u} - {i})) for i in range(81)]
UNITS_NP = np.array(UNITS)  # (27, 9) cell indices of every row, column and box
ALL = 0x1FF  # candidate bitmask with all nine digits
POP = [bin(m).count("1") for m in range(512)]
ONE = [p == 1 for p in POP]
DIGIT = {1 << d: d + 1 for d in range(9)}


def _propagate(c, done):
    """Naked + hidden singles to a fixpoint, in place on candidate masks `c`. False on contradiction.
    `done[i]` marks solved cells already eliminated from their peers."""
    while True:
        stack = [i for i in range(81) if not done[i] and ONE[c[i]]]
        while stack:  # naked singles: a solved cell removes its digit from its 20 peers
            i = stack.pop()
            if done[i]:
                continue
            done[i] = True
            m = c[i]
            for p in PEERS[i]:
                cp = c[p]
                if cp & m:
                    cp ^= m
                    if not cp:
                        return False
                    c[p] = cp
                    if ONE[cp]:
                        stack.append(p)
        found = False
        for unit in UNITS:  # hidden singles: a digit with one possible cell in a unit goes there
            once = twice = 0
            for i in unit:
                m = c[i]
                twice |= once & m
                once |= m
            if once != ALL:
                return False  # some digit has no place left in this unit
            hidden = once & ~twice
            if hidden:
                for i in unit:
                    m = c[i] & hidden
                    if m and c[i] != m:
                        if not ONE[m]:
                            return False  # two digits that must both live in this one cell
                        c[i] = m
                        found = True
        if not found:
            return True


def _search(c, done, limit, sols, stats, rng=None):
    """Depth-first search with propagation; appends up to `limit` solutions to `sols`."""
    if not _propagate(c, done):
        return
    best, nbest = -1, 10
    for i in range(81):
        if not done[i] and POP[c[i]] < nbest:
            best, nbest = i, POP[c[i]]
            if nbest == 2:
                break
    if best < 0:
        sols.append(c)
        return
    stats[0] += 1  # one more branch point
    digits = [1 << d for d in range(9) if c[best] >> d & 1]
    if rng is not None:
        rng.shuffle(digits)
    for b in digits:
        c2 = c.copy()
        c2[best] = b
        _search(c2, done.copy(), limit, sols, stats, rng)
        if len(sols) >= limit:
            return


def _cands(board):
    return [ALL if v == 0 else 1 << (v - 1) for v in np.asarray(board).tolist()]


def solve(board, limit=2):
    """Return (solutions as uint8 arrays, up to `limit` of them; branch points opened)."""
    sols, stats = [], [0]
    _search(_cands(board), [False] * 81, limit, sols, stats)
    return [np.array([DIGIT[m] for m in s], np.uint8) for s in sols], stats[0]


def rate(board):
    """(tier, rating): tier 0 if singles alone solve it, else 1; rating = branch points to solve."""
    c = _cands(board)
    if _propagate(c, [False] * 81) and all(ONE[m] for m in c):
        return 0, 0
    _, branches = solve(board, limit=1)
    return 1, branches


def random_grid(rng):
    """A uniformly seeded random complete grid (randomised search on the empty board)."""
    sols = []
    _search([ALL] * 81, [False] * 81, 1, sols, [0], rng)
    return np.array([DIGIT[m] for m in sols[0]], np.uint8)


def make_puzzle(seed, index):
    """Puzzle number `index` of the stream `seed`: a minimal unique-solution puzzle.
    Deterministic per (seed, index), so a set of n puzzles is a prefix of a set of m > n."""
    rng = np.random.default_rng([seed, index])
    answer = random_grid(rng)
    q = answer.tolist()
    for cell in rng.permutation(81).tolist():  # try to blank every cell; keep it if still unique
        v = q[cell]
        q[cell] = 0
        c = _cands(q)
        c[cell] &= ~(1 << (v - 1))  # unique <=> no solution with another digit in this cell
        sols = []
        _search(c, [False] * 81, 1, sols, [0])
        if sols:
            q[cell] = v
    q = np.array(q, np.uint8)
    tier, rating = rate(q)
    return q, answer, tier, rating


def _make(job):
    return make_puzzle(*job)


# ----------------------------------------------------------------------------------------------
# data sets: dicts of numpy arrays {"question": (N,81) u8, "answer": (N,81) u8, "tier": (N,) i8,
# "rating": (N,) i32}

def generate(seed, n, hard=None, workers=None, desc="generating"):
    """n puzzles from stream `seed`. hard=None: as they come; hard=True: tier 1 only; hard=False:
    tier 0 only (the filter scans the stream in order, so results stay deterministic)."""
    workers = workers or min(os.cpu_count() or 1, 8)
    out, i = [], 0
    bar = tqdm(total=n, desc=desc, unit="puzzle", leave=False)
    with mp.get_context("fork" if hasattr(os, "fork") else "spawn").Pool(workers) as pool:
        while len(out) < n:
            chunk = max(workers * 4, 2 * (n - len(out)) if hard is not None else n - len(out))
            for q, a, tier, rating in pool.imap(_make, [(seed, j) for j in range(i, i + chunk)],
                                                chunksize=4):
                if hard is None or (tier == 1) == hard:
                    out.append((q, a, tier, rating))
                    bar.update(1)
                    if len(out) == n:
                        break
            i += chunk
    bar.close()
    return {"question": np.stack([o[0] for o in out]), "answer": np.stack([o[1] for o in out]),
            "tier": np.array([o[2] for o in out], np.int8),
            "rating": np.array([o[3] for o in out], np.int32)}


def cached(path, make):
    """Load the npz at `path`, or build it with make() and save it atomically."""
    if os.path.exists(path):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    data = make()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"  # unique: two runs may build the same set at once
    np.savez_compressed(tmp, **data)
    os.replace(tmp, path)
    return data


def add_tiers(data):
    """Rate puzzles that came without our tiers (e.g. from a CSV)."""
    if "tier" not in data:
        tr = [rate(q) for q in tqdm(data["question"], desc="rating", leave=False)]
        data["tier"] = np.array([t for t, _ in tr], np.int8)
        data.setdefault("rating", np.array([r for _, r in tr], np.int32))
    return data


# ----------------------------------------------------------------------------------------------
# CSV (Sudoku-Extreme: header with `question` and `answer` columns; '.' or '0' for blanks)

def board_errors(q, a):
    """Reasons a (question, answer) pair of uint8 arrays (N, 81) is invalid, per row ('' = ok)."""
    bad = np.full(len(q), "", dtype=object)
    clash = (q != 0) & (q != a)
    bad[clash.any(1)] = "answer contradicts a clue"
    grid = a[:, UNITS_NP]  # (N, 27, 9) digits of every unit
    full = (np.sort(grid, axis=2) == np.arange(1, 10)).all(2).all(1)
    bad[~full & (bad == "")] = "answer breaks a Sudoku rule (a row, column or box repeats a digit)"
    return bad


def read_csv(path, skip_invalid=False, limit=None):
    """Read and validate a Sudoku CSV. Raises ValueError naming file, line and reason, unless
    skip_invalid, which skips bad rows and prints how many."""
    qs, ans, lines, bad = [], [], [], []
    table = bytearray(range(256))
    table[ord(".")] = 0
    for d in range(10):
        table[ord(str(d))] = d
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or "question" not in header or "answer" not in header:
            raise ValueError(f"{path}:1: header must name 'question' and 'answer' columns, got {header}")
        iq, ia = header.index("question"), header.index("answer")
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            reason = ""
            if len(row) <= max(iq, ia):
                reason = f"expected {len(header)} columns, got {len(row)}"
            else:
                q, a = row[iq].strip(), row[ia].strip()
                if len(q) != 81 or len(a) != 81:
                    reason = f"question and answer must have 81 cells, got {len(q)} and {len(a)}"
                elif any(ch not in ".0123456789" for ch in q):
                    reason = "question may hold only digits 1-9 and '.' or '0' for blanks"
                elif any(ch not in "123456789" for ch in a):
                    reason = "answer may hold only digits 1-9"
            if reason:
                if not skip_invalid:
                    raise ValueError(f"{path}:{line}: {reason}")
                bad.append(line)
                continue
            qs.append(q.encode().translate(table))
            ans.append(a.encode().translate(table))
            lines.append(line)
            if limit and len(qs) >= limit:
                break
    if not qs:
        raise ValueError(f"{path}: no valid puzzles")
    q = np.frombuffer(b"".join(qs), np.uint8).reshape(-1, 81)
    a = np.frombuffer(b"".join(ans), np.uint8).reshape(-1, 81)
    reasons = board_errors(q, a)
    keep = reasons == ""
    if not keep.all():
        i = int(np.flatnonzero(~keep)[0])
        if not skip_invalid:
            raise ValueError(f"{path}:{lines[i]}: {reasons[i]}")
        bad += [lines[j] for j in np.flatnonzero(~keep)]
    if bad:
        print(f"{path}: skipped {len(bad)} invalid rows (first at line {min(bad)})")
    return {"question": q[keep].copy(), "answer": a[keep].copy()}


def write_csv(path, data):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer", "rating"])
        for q, a, r in zip(data["question"], data["answer"], data.get("rating", [0] * len(data["question"]))):
            w.writerow(["".join(str(v) if v else "." for v in q), "".join(map(str, a)), int(r)])


# ----------------------------------------------------------------------------------------------
# augmentation: the validity-preserving symmetry group (digits, bands/stacks, rows/cols, transpose)

def augment(q, a, rng):
    """Apply one random symmetry per row to (N, 81) question/answer arrays, the same to both."""
    N = len(q)
    lut = np.zeros((N, 10), np.uint8)
    lut[:, 1:] = rng.permuted(np.tile(np.arange(1, 10, dtype=np.uint8), (N, 1)), axis=1)

    def line_perm():  # a permutation of 0..8 that moves bands as wholes and lines within bands
        band = rng.permuted(np.tile(np.arange(3), (N, 1)), axis=1)  # (N, 3)
        within = rng.permuted(np.tile(np.arange(3), (N, 3, 1)), axis=2)  # (N, 3, 3)
        return (band[:, :, None] * 3 + within).reshape(N, 9)

    rows, cols = line_perm(), line_perm()
    idx = rows[:, :, None] * 9 + cols[:, None, :]  # (N, 9, 9): source cell of every target cell
    flip = rng.random(N) < 0.5
    idx[flip] = idx[flip].transpose(0, 2, 1)
    idx = idx.reshape(N, 81)
    take = lambda b: lut[np.arange(N)[:, None], np.take_along_axis(b, idx, 1)]
    return take(q), take(a)


def is_legal(boards):
    """(N,) bool: board full and no row/column/box conflict (whether or not it equals the answer)."""
    grid = np.asarray(boards)[:, UNITS_NP]
    return (np.sort(grid, axis=2) == np.arange(1, 10)).all((1, 2))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="puzzles to generate")
    p.add_argument("--seed", type=int, default=0, help="puzzle stream: puzzle i depends only on (seed, i)")
    p.add_argument("--hard", action="store_true", help="keep only puzzles that need search")
    p.add_argument("--out", default="", help="write the generated puzzles to this CSV")
    p.add_argument("--check", default="", help="validate this CSV and print a summary")
    args = p.parse_args()
    if args.check:
        d = add_tiers(read_csv(args.check))
        print(f"{args.check}: {len(d['question'])} valid puzzles, "
              f"{(d['tier'] == 1).mean():.1%} need search")
    else:
        t0 = time.time()
        d = generate(args.seed, args.n, hard=True if args.hard else None)
        dt = time.time() - t0
        print(f"{args.n} puzzles in {dt:.1f}s = {args.n / dt:.1f} puzzles/s; "
              f"clues {np.mean((d['question'] > 0).sum(1)):.1f}, need search {np.mean(d['tier']):.1%}, "
              f"mean rating of those {d['rating'][d['tier'] == 1].mean() if d['tier'].any() else 0:.1f}")
        if args.out:
            write_csv(args.out, d)
