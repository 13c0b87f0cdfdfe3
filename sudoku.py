"""
sudoku.py — Sudoku data for the Relay experiment (arXiv 2605.22967 §4.1; NOTES.md §4): train and
test sets that mix three difficulty tiers, cached on disk, and a reader and writer for CSV files
such as the public Sudoku-Extreme ones. The puzzle logic (solver, rating, symmetries) is in
sudoku_solver.py, the search for hard puzzles in sudoku_hard.py.

    python sudoku.py --n 200 --seed 0              # generate (tiers 0 and 1 as they come), rate, print speed
    python sudoku.py --n 100 --hard --out hard.csv # the hard tier (tier 2): ~5 puzzles/s per core
    python sudoku.py --n 100 --tier 1              # only puzzles that need search, from the plain generator
    python sudoku.py --check checkpoints/sudoku_test_public.csv   # validate a CSV file

Boards are uint8 arrays of 81 cells, row-major; 0 is a blank, 1..9 are digits. The token id of a
cell *is* its value, so MASK = 0 and a puzzle array is already the model's input canvas.

Tiers: 0 = singles alone solve it; 1 = needs search (a random minimal puzzle); 2 = hard (found by
the beam search of `sudoku_hard.hard_island`, started next to hard 17-clue puzzles); a CSV's tiers
follow its rating (`tier_of_rating`). `load_tiered` builds and caches train/test sets that mix the
three tiers.
"""
import csv
import glob
import itertools
import multiprocessing as mp
import os
import time

import numpy as np
from tqdm import tqdm

from runs import InputError, argparser, cached, check_out_file, positive_int, run_cli, seed_int, written_whole
from sudoku_hard import HARD_SEEDS, HARD_VERSION, generate_hard
from sudoku_solver import UNITS_NP, minimal_puzzle, puzzle_text, rate, rate_many

# ----------------------------------------------------------------------------------------------
# the plain generator: random minimal puzzles (tiers 0 and 1)

def make_puzzle(seed, index):
    """Puzzle number `index` of the stream `seed`: a minimal unique-solution puzzle.
    Deterministic per (seed, index), so a set of n puzzles is a prefix of a set of m > n."""
    q, answer = minimal_puzzle(np.random.default_rng([seed, index]))
    tier, rating = rate(q)
    return q, answer, tier, rating


def _make(job):
    """make_puzzle for a pool worker."""
    return make_puzzle(*job)


# ----------------------------------------------------------------------------------------------
# data sets: dicts of numpy arrays {"question": (N,81) u8, "answer": (N,81) u8, "tier": (N,) i8,
# "rating": (N,) i32}

def generate(seed, n, search=None, workers=None, desc="generating"):
    """n puzzles from stream `seed`. search=None: as they come; search=True: tier 1 only (needs
    search); search=False: tier 0 only (the filter scans the stream in order, so results stay deterministic)."""
    workers = workers or min(os.cpu_count() or 1, 8)
    out, i = [], 0
    bar = tqdm(total=n, desc=desc, unit="puzzle", leave=False)
    with mp.get_context("fork" if hasattr(os, "fork") else "spawn").Pool(workers) as pool:
        while len(out) < n:
            chunk = max(workers * 4, 2 * (n - len(out)) if search is not None else n - len(out))
            for q, a, tier, rating in pool.imap(_make, [(seed, j) for j in range(i, i + chunk)],
                                                chunksize=4):
                if search is None or (tier == 1) == search:
                    out.append((q, a, tier, rating))
                    bar.update(1)
                    if len(out) == n:
                        break
            i += chunk
    bar.close()
    return {"question": np.stack([o[0] for o in out]), "answer": np.stack([o[1] for o in out]),
            "tier": np.array([o[2] for o in out], np.int8),
            "rating": np.array([o[3] for o in out], np.int32)}


def generate_tier(tier, seed, n, workers=None, family="train"):
    """n puzzles of one tier from stream `seed`: 0 = singles alone solve it, 1 = needs search
    (both from the plain generator, filtered in stream order), 2 = hard (generate_hard, seeded
    from HARD_SEEDS[family])."""
    if tier == 2:
        return generate_hard(seed, n, family, workers)
    return generate(seed, n, search=tier == 1, workers=workers, desc=f"tier {tier} puzzles")


# Tiered sets mix the tiers as Sudoku-Extreme mixes ratings. Every tier of every set is a stream of
# its own, cached in a file of its own; a set of n puzzles takes the first tier_counts(shares, n)
# puzzles of each. The test set draws from other streams, so it never shares a puzzle with the
# training set, and any mix of tiers reuses what is cached.
MIX = {"train": (0.25, 0.25, 0.5), "test": (0.25, 0.25, 0.5)}  # default share of tiers 0, 1, 2
STREAMS = {"train": (10, 11, 12), "test": (20, 21, 22)}       # stream of tier t is 100 * seed + STREAMS[kind][t]
PLAIN_VERSION = 1  # bump when the plain generator (tiers 0 and 1) changes what a seed produces


def tier_counts(shares, n):
    """Puzzles of each tier in a set of n: floor(share * n), and the few left over to the tiers with the
    largest fractions (the easier tier on a tie). They add up to n, and a tier of share 0 gets none."""
    if len(shares) != 3 or min(shares) < 0 or abs(sum(shares) - 1) > 1e-6:
        raise ValueError(f"tier shares must be three non-negative numbers summing to 1, got {shares}")
    exact = [f * n / sum(shares) for f in shares]  # the flag allows a sum 1e-6 off 1
    counts = [int(x) for x in exact]
    for t in sorted(range(3), key=lambda t: counts[t] - exact[t])[:n - sum(counts)]:  # largest fraction first
        counts[t] += 1
    return tuple(counts)


def tier_path(data_dir, tier, stream, n, family="train"):
    """Cache file of the first n puzzles of one tier's stream: tier, the hard tier's seed family,
    stream, size, generator version."""
    version = HARD_VERSION if tier == 2 else PLAIN_VERSION
    seeds = f"_{family}" if tier == 2 else ""
    return os.path.join(data_dir, f"sudoku_tier{tier}{seeds}_stream{stream}_n{n}_v{version}.npz")


def load_tier(tier, stream, n, data_dir="data", workers=None, family="train"):
    """The first n puzzles of tier `tier` of stream `stream` (the hard tier seeded from
    HARD_SEEDS[family]): cut from any cached file of that stream that holds at least n (each stream
    is prefix-deterministic), else generated and cached."""
    files = glob.glob(tier_path(glob.escape(data_dir), tier, stream, "*", family))
    for f in sorted(files, key=lambda f: int(f.rsplit("_n", 1)[1].split("_")[0])):
        d = cached(f, None)
        if len(d["question"]) >= n:
            return {k: v[:n] for k, v in d.items()}
    return cached(tier_path(data_dir, tier, stream, n, family), lambda: generate_tier(tier, stream, n, workers, family))


def load_tiered(kind, n, seed=0, data_dir="data", workers=None, shares=None):
    """A `kind` ("train" or "test") set of n puzzles, tiers mixed by `shares` (default MIX[kind]),
    tier 0 first; the hard tier is seeded from HARD_SEEDS[kind]. -> dict question, answer, tier, rating."""
    shares = MIX[kind] if shares is None else shares
    parts = [load_tier(t, 100 * seed + STREAMS[kind][t], c, data_dir, workers, kind)
             for t, c in enumerate(tier_counts(shares, n)) if c]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


HARD_RATING = 20  # a rating at least this makes a CSV puzzle tier 2: < 1 in 1000 random minimal puzzles
HARD_TEST_RATING = 40  # the level of real hard sets (a public hard set rates median 42): a group of its own in tests


def tier_of_rating(rating):
    """Tier from a rating column: 0 -> tier 0 (no search), 1..HARD_RATING-1 -> 1, more -> 2. Our
    rating counts branch points, Sudoku-Extreme's counts tdoku backtracks: both are 0 exactly
    when no search is needed, and large for hard puzzles."""
    rating = np.asarray(rating)
    return np.where(rating == 0, 0, np.where(rating < HARD_RATING, 1, 2)).astype(np.int8)


def add_tiers(data):
    """Tiers for puzzles that came without them (e.g. from a CSV): tier_of_rating of the `rating`
    column, rating every puzzle here with rate_many (== rate) when there is none."""
    if "tier" not in data:
        if "rating" not in data:
            data["rating"] = rate_many(data["question"])[1]
        data["tier"] = tier_of_rating(data["rating"])
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


def _row_reason(row, cols, width):
    """Why a CSV row is invalid ('' if it is fine); cols maps column name -> index."""
    if len(row) != width:
        return f"expected {width} columns, got {len(row)}"
    q, a = row[cols["question"]].strip(), row[cols["answer"]].strip()
    if len(q) != 81 or len(a) != 81:
        return f"question and answer must have 81 cells, got {len(q)} and {len(a)}"
    if any(ch not in ".0123456789" for ch in q):
        return "question may hold only digits 1-9 and '.' or '0' for blanks"
    if any(ch not in "123456789" for ch in a):
        return "answer may hold only digits 1-9"
    if "." not in q and "0" not in q:
        return "question has no blank cell: nothing to predict, so no loss and no token accuracy"
    rating = row[cols["rating"]].strip() if "rating" in cols else "0"
    if not (rating.isascii() and rating.isdigit() and int(rating) < 2 ** 31):  # isdigit alone takes "²"
        return f"rating must be an integer in [0, 2^31), got {row[cols['rating']]!r}"
    if "tier" in cols and row[cols["tier"]].strip() not in ("0", "1", "2"):
        return f"tier must be 0, 1 or 2, got {row[cols['tier']]!r}"
    return ""


MAX_LINE_BYTES = 1 << 16  # a puzzle row is ~200 bytes; a longer line is not one


def _text_lines(f, path):
    """The lines of a binary file as text for csv.reader, one at a time: a UTF-8 BOM is fine; bad
    bytes or an overlong line (read no further than MAX_LINE_BYTES) raise naming file:line."""
    for n in itertools.count(1):
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if len(raw) > MAX_LINE_BYTES:
            raise InputError(f"{path}:{n}: line longer than {MAX_LINE_BYTES} bytes: not a puzzle row")
        try:
            yield raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start})") from None


_CELLS = bytes.maketrans(b".0123456789", bytes([0, *range(10)]))  # a cell's character -> its value


def read_list(path):
    """A puzzle list: one puzzle per line as its first word (81 characters, digits for clues, '.'
    or '0' for blanks; the rest of the line is ignored), '#' comment lines and blank lines skipped:
    the format of the public collections (tdoku's benchmark files, the 17-clue list). -> (q (N, 81)
    uint8, line numbers (N,)). A line that holds no puzzle raises ValueError naming file:line."""
    qs, lines = [], []
    with open(path, "rb") as f:
        for n, text in enumerate(_text_lines(f, path), 1):
            word = (text.split() or [""])[0]
            if not word or word.startswith("#"):
                continue
            if len(word) != 81 or not set(word) <= set(".0123456789"):
                raise InputError(f"{path}:{n}: a puzzle is 81 characters of 1-9 and '.' or '0', got {word[:90]!r}")
            qs.append(word.encode().translate(_CELLS))
            lines.append(n)
    if not qs:
        raise InputError(f"{path}: no puzzles")
    return np.frombuffer(b"".join(qs), np.uint8).reshape(-1, 81).copy(), np.array(lines)


def read_csv(path, skip_invalid=False, limit=None):
    """Read and validate a Sudoku CSV (columns `question`, `answer`, optional `rating` and `tier`,
    which come back as arrays when present). Raises ValueError naming file, line and reason,
    unless skip_invalid, which skips bad rows and prints how many. limit: the first `limit` valid rows."""
    qs, ans, extra, lines, bad = [], [], [], [], []
    boards = lambda xs, i=0: np.frombuffer(b"".join(xs[i:]), np.uint8).reshape(-1, 81)
    checked, valid, parts = 0, 0, []  # with a limit: rows board-checked while reading, how many passed, reasons
    with open(path, "rb") as f:
        reader = csv.reader(_text_lines(f, path))
        header = next(reader, None)
        if header is None or "question" not in header or "answer" not in header:
            raise InputError(f"{path}:1: header must name 'question' and 'answer' columns, got {header}")
        if twice := sorted({h for h in header if header.count(h) > 1}):
            raise InputError(f"{path}:1: column {twice[0]!r} is named twice in the header")
        cols = {name: header.index(name) for name in ("question", "answer", "rating", "tier") if name in header}
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            reason = _row_reason(row, cols, len(header))
            if reason:
                if not skip_invalid:
                    raise InputError(f"{path}:{line}: {reason}")
                bad.append(line)
                continue
            qs.append(row[cols["question"]].strip().encode().translate(_CELLS))
            ans.append(row[cols["answer"]].strip().encode().translate(_CELLS))
            extra.append([int(row[cols[k]]) for k in ("rating", "tier") if k in cols])
            lines.append(line)
            if limit and len(qs) - checked >= limit - valid:  # enough, if the rows not checked yet pass: check them
                if not skip_invalid:
                    break
                parts.append(board_errors(boards(qs, checked), boards(ans, checked)))
                valid, checked = valid + int((parts[-1] == "").sum()), len(qs)
                if valid >= limit:
                    break
    if not qs:
        raise InputError(f"{path}: no valid puzzles")
    q, a = boards(qs), boards(ans)
    reasons = np.concatenate([*parts, board_errors(q[checked:], a[checked:])])  # the rows not checked yet
    keep = reasons == ""
    if not keep.all():
        i = int(np.flatnonzero(~keep)[0])
        if not skip_invalid:
            raise InputError(f"{path}:{lines[i]}: {reasons[i]}")
        bad += [lines[j] for j in np.flatnonzero(~keep)]
    if bad:
        print(f"{path}: skipped {len(bad)} invalid rows (first at line {min(bad)})")
    out = {"question": q[keep].copy(), "answer": a[keep].copy()}
    names = [k for k in ("rating", "tier") if k in cols]
    for j, (name, dtype) in enumerate((k, np.int32 if k == "rating" else np.int8) for k in names):
        out[name] = np.array([e[j] for e in extra], dtype)[keep]
    return out


def write_csv(path, data):
    """Write question, answer, rating (0 when unknown) and, when known, tier: read_csv reads them
    back unchanged. Whole or not at all (a temporary file, then a rename)."""
    n = len(data["question"])
    rating, tier = data.get("rating", np.zeros(n, np.int32)), data.get("tier")
    with written_whole(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer", "rating"] + (["tier"] if tier is not None else []))
        for i, (q, a) in enumerate(zip(data["question"], data["answer"])):
            w.writerow([puzzle_text(q), "".join(map(str, a)), int(rating[i])]
                       + ([int(tier[i])] if tier is not None else []))


def row_keys(q):
    """(N,) uint64, one hash per board: equal boards have equal keys, and two of 10^7 different ones
    share a key with probability ~3e-6 (a fixed random linear hash mod 2^64)."""
    w = np.random.default_rng(0).integers(1, 2 ** 63, 81, dtype=np.uint64)
    return np.concatenate([np.zeros(0, np.uint64)] + [(q[i:i + 65536].astype(np.uint64) * w).sum(1, dtype=np.uint64)
                                                      for i in range(0, len(q), 65536)])


def repeats(train_q, test_q=()):
    """(training questions that repeat an earlier one, test questions that are training questions too),
    exact copies only (the symmetry group makes more: bench/sudoku_public.py keeps those apart)."""
    train = row_keys(train_q)
    return len(train) - len(np.unique(train)), int(np.isin(row_keys(np.asarray(test_q).reshape(-1, 81)), train).sum())


def summary(d):
    """One line per tier: count, clues and rating (median / mean / p90)."""
    lines = []
    for t in np.unique(d["tier"]):
        m = d["tier"] == t
        line = f"tier {t}: {m.sum()} puzzles, clues {np.mean((d['question'][m] > 0).sum(1)):.1f}"
        if "rating" in d:  # a CSV may give tiers without ratings
            r = d["rating"][m]
            line += f", rating median {np.median(r):.0f} mean {r.mean():.1f} p90 {np.percentile(r, 90):.0f}"
        lines.append(line)
    return "\n".join(lines)


def main():
    p = argparser(__doc__)
    p.add_argument("--n", type=positive_int, default=200, help="puzzles to generate")
    p.add_argument("--seed", type=seed_int, default=0, help="puzzle stream: puzzle i depends only on (seed, i)")
    p.add_argument("--tier", type=int, choices=(0, 1, 2), default=None,
                   help="only this tier: 0 singles, 1 needs search, 2 hard (default: tiers 0 and 1 as they come)")
    p.add_argument("--hard", action="store_true", help="the hardest tier, same as --tier 2")
    p.add_argument("--family", choices=tuple(HARD_SEEDS), default="train",
                   help="hard tier: the seed puzzles its search starts next to (the default sets' own split)")
    p.add_argument("--workers", type=positive_int, default=None, help="processes (default: all cores, up to 8 for "
                   "tiers 0 and 1; the hard tier runs at most one per seed)")
    p.add_argument("--out", default=None, help="write the generated puzzles to this CSV")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--check", default="", help="validate this CSV and print a summary")
    args = p.parse_args()
    if args.check and not os.path.isfile(args.check):
        p.error(f"--check {args.check}: no such file")
    if args.check and args.out is not None:
        p.error("--check validates a CSV and writes nothing: drop --out")
    if args.out is not None:
        check_out_file("--out", args.out, args.overwrite)  # before minutes of generating
    if args.check:
        d = read_csv(args.check)  # the first bad row, as a check reports it: one line (run_cli)
        print(f"{args.check}: {len(d['question'])} puzzles, {repeats(d['question'])[0]} repeating an earlier "
              f"question\n{summary(add_tiers(d))}")
    else:
        t0 = time.time()
        tier = 2 if args.hard else args.tier
        if tier is None:
            d = generate(args.seed, args.n, workers=args.workers)
        else:
            d = generate_tier(tier, args.seed, args.n, args.workers, args.family)
        dt = time.time() - t0
        print(f"{args.n} puzzles in {dt:.1f}s = {args.n / dt:.2f} puzzles/s\n{summary(d)}")
        if args.out is not None:
            write_csv(args.out, d)
            print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
