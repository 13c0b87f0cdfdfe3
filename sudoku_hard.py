"""
sudoku_hard.py — the hard tier of the Sudoku data (arXiv 2605.22967 §4.1; NOTES.md §4): a beam search
over clue sets, started next to hard 17-clue seed puzzles (sudoku_seeds.txt), that emits puzzles
rating median >= 50 branch points, and the parallel driver that makes a data set of them.

    python sudoku.py --n 100 --hard --out hard.csv   # ~5 puzzles/s per core (the CLI is sudoku.py's)

RESULTS.md ("Hard data") tells how it got here and what did not work.
"""
import math
import multiprocessing as mp
import os
import time

import numpy as np
from tqdm import tqdm

from runs import InputError
from sudoku_solver import (ALL, augment, branch_cell, cands_many, dfs_branches, parse_puzzle, propagate_many,
                           random_digit_orders, random_geometry, rate_many, search_trees, solve, symmetry_key, undecided)

# ----------------------------------------------------------------------------------------------
# the hard tier: a beam search over clue sets, started next to hard 17-clue puzzles
#
# Random minimal puzzles almost never need many branch points (rate: median 2, p90 5), and a beam
# search from them rarely finds a rich cluster (3 of 11 pools in 200 rounds, RESULTS.md). Hard
# puzzles are rare and isolated: one clue added to a 21-clue puzzle that rates median 96 gives
# median 26. But next to some hard 17-clue puzzles the clue sets of 18-22 clues are rich (they
# hold the 17 clues and a few more from the answer), and a search started there emits from its
# first rounds. The seeds (HARD_SEEDS, from sudoku_seeds.txt) are the 17-clue puzzles of Gordon
# Royle's collection that rate highest and whose search emits most (bench/sudoku_seeds.py).
#
# rate() depends on the symmetry a puzzle is shown in (the branch cell is the first of the tied
# ones in row-major order; whether the search meets a "backdoor" cell first is luck of the
# orientation). So a puzzle is scored by `rate_samples`: its rating in G random grid symmetries x
# O digit renamings, from one search tree per grid symmetry (renaming the digits only changes the
# order in which a tree is visited).
#
# A stream has one island per seed, each one long search, and every island runs the same number of
# rounds: an island never emits a symmetry class twice, islands of different seeds have different
# solution grids, and a seed whose hard neighbourhood runs out (some do after ~750 puzzles) only
# contributes less. Many short islands per seed met each other (30 islands of 100 next to one seed
# gave 1,395 classes in 3,000 puzzles, 3 of 1,000 gave 2,064); equal puzzles per seed stalled on the
# seed that ran out (RESULTS.md, v8).
#
# An island is one seeded search: a pool of `pool` unique puzzles around one seed; every round each
# proposes `kids` children (one or two moves: swap a clue for a blank, add a clue from the answer,
# or drop one; so an island keeps its seed's solution grid, and seeds with the same or nearly the
# same clue cells are on one side: training or test streams). Most children are not unique; random
# dives (_second_solution) prove most of those so before any search tree is built.
# The pool keeps the best by mean log(1 + rating) over every sample drawn so far (pool puzzles get
# new samples each round, so a lucky draw does not stay on top), and a child whose median rating
# over VERIFY fresh grid symmetries is at least `emit_rating` is emitted (the second half of those
# symmetries is rated only when the first half's median is >= 0.75 * emit_rating), one per symmetry class
# (never a seed's), and stored in a fresh symmetry. The fresh draws matter: the search keeps the
# lucky draws of many similar children, so deciding on its own draws overestimates what a puzzle
# rates in the stored symmetry (RESULTS.md).

HARD_VERSION = 9   # bump when anything below changes what a seed produces
HARD = dict(pool=128, kids=8, emit_rating=50)  # the search
GEOMETRIES, ORDERS = 3, 4  # rating samples of a child: grid symmetries x digit orders
HOPEFUL, VERIFY = 0.5, 8   # a child whose median is >= HOPEFUL * emit_rating is rated in VERIFY fresh symmetries
CUT = 0.0  # children rated below this quantile of the pool's scores in their first symmetry are dropped
           # (0: below the worst pool puzzle; 0.25 stalls the climb: it removes the exploring children)
MAX_CLUES = 25     # moves keep at most this many clues (Sudoku-Extreme: 24.6 on average)
MAX_TREE = 5000    # a child whose search tree is larger than this is dropped (never seen: hard ones have ~100-300)

SEEDS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sudoku_seeds.txt")


def read_seeds(path=SEEDS_PATH):
    """The seed puzzles of the hard tier: lines `family puzzle source` (family "train" or "test";
    '#' starts a comment) -> {"train": [puzzle, ...], "test": [...]}. Seeds of one family start the
    islands of the training streams, the other's those of the test streams (sudoku_seeds.txt says
    where they come from and how they were chosen)."""
    seeds = {"train": [], "test": []}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) != 3 or fields[0] not in seeds:
                raise InputError(f"{path}:{n}: expected `train|test PUZZLE SOURCE`, got {line.strip()!r}")
            try:
                parse_puzzle(fields[1])
            except InputError as e:
                raise InputError(f"{path}:{n}: {e}") from None
            seeds[fields[0]].append(fields[1])
    if not all(seeds.values()):
        raise InputError(f"{path}: needs at least one train and one test seed")
    return seeds


HARD_SEEDS = read_seeds()


def _seed_keys():
    """Symmetry keys of every seed: the search never emits one."""
    return set(symmetry_key(np.stack([parse_puzzle(s) for f in HARD_SEEDS.values() for s in f])))


def rate_samples(q, rng, geometries=GEOMETRIES, orders=ORDERS):
    """rate() of each puzzle (N, 81) in `geometries` random grid symmetries x `orders` random digit
    renamings -> (N, geometries * orders) int64; -1 for a puzzle without exactly one solution
    (found in the first tree; it gets no further trees). One search tree per grid symmetry serves
    every digit order: renaming the digits does not change the tree, only the order it is visited in."""
    N = len(q)
    out = np.full((N, geometries * orders), -1, np.int64)
    alive = np.arange(N)
    for g in range(geometries):
        if not len(alive):
            break
        idx = random_geometry(len(alive), rng)
        tree = search_trees(cands_many(np.take_along_axis(q[alive], idx, 1)), 2, MAX_TREE)
        ok = (tree["nsol"] == 1) & ~tree["aborted"]
        ranks = np.stack([random_digit_orders(len(alive), rng) for _ in range(orders)])
        out[alive, g * orders:(g + 1) * orders] = np.where(ok[:, None], dfs_branches(tree, len(alive), ranks), -1)
        alive = alive[ok]
    return out


def _log_score(samples):
    """Mean log(1 + rating) of each row's samples: a geometric-mean rating, so one lucky draw with a
    huge tree counts for less than steady ratings."""
    return np.log1p(np.maximum(samples, 0)).mean(1)


def _propose(q, a, rng):
    """One or two moves on puzzle q (answer a); a move swaps a clue for a blank (mostly), adds a
    clue, or drops one when at MAX_CLUES. Clues come from the answer, so a unique result keeps that
    answer. Two moves at once let the search cross the many non-unique single-move neighbours."""
    q = q.copy()
    for _ in range(1 + (rng.random() < 0.5)):
        clues, blanks = np.flatnonzero(q), np.flatnonzero(q == 0)
        swap = rng.random() < 0.7
        if swap or len(clues) >= MAX_CLUES:
            q[rng.choice(clues)] = 0
        if (swap and len(clues) <= MAX_CLUES) or (not swap and len(clues) < MAX_CLUES):
            b = rng.choice(blanks)
            q[b] = a[b]
    return q


def _second_solution(q, a, parent_q, rng, tries=2, follow=0.7):
    """(N,) bool: True where random dives found a solution of child q other than its answer a, so
    the child is not unique. It never says True wrongly; it misses some, which rate_samples drops.
    Any other solution differs from a at a clue the parent (unique, answer a) had and the child
    lacks, else it would solve the parent too. So each dive rules a's digit out at one such cell,
    then guesses at the first fewest-candidate cell, taking a's digit with probability `follow`
    (another solution mostly agrees with a) until the board is solved or contradicts. Most
    children are not unique and their search trees are wide: this check costs a fraction."""
    gone = (parent_q > 0) & (q == 0)  # (N, 81) the clues the moves took away
    rows = np.repeat(np.flatnonzero(gone.any(1)), tries)  # a child without such a cell is unique
    pick = (rng.random((len(rows), 81)) * gone[rows]).argmax(1)  # a random one of its taken clues
    x = cands_many(q[rows])
    x[np.arange(len(rows)), pick] = ALL & ~(1 << (a[rows, pick].astype(np.int64) - 1))
    found = np.zeros(len(q), bool)
    while len(rows):
        x, ok = propagate_many(x)
        solved = ok & ~undecided(x).any(1)
        found[rows[solved]] = True
        go = ok & ~solved & ~found[rows]
        x, rows = x[go], rows[go]
        best, cb = branch_cell(x)  # the cell to guess at
        cb = cb.astype(np.int64)
        guess = (rng.random((len(x), 9)) * (cb[:, None] >> np.arange(9) & 1)).argmax(1)  # a random candidate
        ad = a[rows, best].astype(np.int64) - 1
        guess = np.where((rng.random(len(x)) < follow) & (cb >> ad & 1 == 1), ad, guess)
        x[np.arange(len(x)), best] = 1 << guess
    return found


def _is_unique(q):
    """(N,) bool: puzzle has exactly one solution, by a full search (MAX_TREE branch points at most)."""
    tree = search_trees(cands_many(q), 2, MAX_TREE)
    return (tree["nsol"] == 1) & ~tree["aborted"]


def _beam_round(pool, rng, emit, kids, emit_rating, banned=frozenset()):
    """One round: re-sample the pool's ratings, rate `kids` proposals per pool puzzle, put children
    that rate at least emit_rating (median over VERIFY fresh symmetries, for those whose first
    samples look hopeful) into `emit` (keyed by symmetry class, first one wins; never a key in
    `banned`), keep the best len(pool) of pool + unique children. pool: dict of q, a (P, 81),
    total (sum of per-draw scores) and count (P,)."""
    P = len(pool["q"])
    pool = dict(pool, total=pool["total"] + _log_score(rate_samples(pool["q"], rng, 1)), count=pool["count"] + 1)
    parent = np.repeat(np.arange(P), kids)
    q, a = np.stack([_propose(pool["q"][j], pool["a"][j], rng) for j in parent]), pool["a"][parent]
    other = _second_solution(q, a, pool["q"][parent], rng)
    q, a = q[~other], a[~other]
    s = rate_samples(q, rng, 1)  # one grid symmetry first: most children are clearly worse than the pool
    score = (pool["total"] + 1.0) / (pool["count"] + 1)
    go = np.flatnonzero((s[:, 0] >= 0) & (_log_score(s) >= np.quantile(score, CUT)))
    q, a, s = q[go], a[go], np.concatenate([s[go], rate_samples(q[go], rng, GEOMETRIES - 1)], 1)
    unique = s[:, 0] >= 0
    hopeful = np.flatnonzero(unique & (np.median(s, 1) >= HOPEFUL * emit_rating))
    if len(hopeful):  # decide on fresh draws only: the first ones are the lucky ones the search kept
        fresh = rate_samples(q[hopeful], rng, VERIFY // 2)  # half first: most hopefuls are clearly below
        more = np.median(fresh, 1) >= 0.75 * emit_rating
        hopeful, fresh = hopeful[more], np.concatenate([fresh[more], rate_samples(q[hopeful[more]], rng, VERIFY // 2)], 1)
        hard = hopeful[np.median(fresh, 1) >= emit_rating]
        for i, key in zip(hard, symmetry_key(q[hard])):
            if key not in banned:
                emit.setdefault(key, (q[i], a[i]))
    child = dict(q=q[unique], a=a[unique], total=_log_score(s[unique]) * GEOMETRIES,
                 count=np.full(unique.sum(), float(GEOMETRIES)))
    both = {k: np.concatenate([pool[k], child[k]]) for k in pool}
    first = np.sort(np.unique(both["q"], axis=0, return_index=True)[1])  # a child equal to a pool puzzle adds nothing
    score = (both["total"][first] + 1.0) / (both["count"][first] + 1)  # shrink few draws towards log(1 + 1.7)
    keep = first[np.argsort(-score, kind="stable")[:P]]
    return {k: v[keep] for k, v in both.items()}


def _seed_pool(q0, rng, size):
    """A starting pool next to seed puzzle q0: q0 and up to size - 1 distinct unique puzzles one or
    two answer-keeping moves away, not yet scored."""
    a0 = np.asarray(solve(q0, 1)[0][0], np.uint8)
    q = q0[None]
    for _ in range(20):  # a 17-clue seed fills a pool of 128 in one or two tries
        if len(q) >= size:
            break
        k = np.stack([_propose(q0, a0, rng) for _ in range(4 * size)])
        k = k[~_second_solution(k, np.tile(a0, (len(k), 1)), np.tile(q0, (len(k), 1)), rng)]
        q = np.concatenate([q, k[_is_unique(k)]])
        q = q[np.sort(np.unique(q, axis=0, return_index=True)[1])]
    q = q[:size]
    return dict(q=q, a=np.tile(a0, (len(q), 1)), total=np.zeros(len(q)), count=np.zeros(len(q)))


class Island:
    """The beam search of island `island` of hard stream `seed`, next to seed puzzle
    HARD_SEEDS[family][island % its length], that can be continued: run(rounds) goes on from the
    round the last call stopped at, exactly as one longer run would (the random generator is part of
    the state), so a set that comes out short costs only its extra rounds. Search settings default to
    HARD. A pool that, after `warmup` rounds, emits fewer than min_rate puzzles a round over
    `patience` rounds starts over next to the seed. Picklable: a worker process runs it and sends it
    back."""

    def __init__(self, seed, island, family="train", pool=None, kids=None, emit_rating=None, warmup=200,
                 patience=50, min_rate=0.3):
        given = dict(pool=pool, kids=kids, emit_rating=emit_rating)
        self.pool, self.kids, self.emit_rating = [HARD[k] if v is None else v for k, v in given.items()]
        self.seed, self.island, self.warmup, self.patience, self.min_rate = seed, island, warmup, patience, min_rate
        seeds = HARD_SEEDS[family]
        self.q0 = parse_puzzle(seeds[island % len(seeds)])
        self.rng = np.random.default_rng([seed, island, HARD_VERSION])
        self.beam, self.begun = None, 0  # the pool, made by the first run (a worker's job, not the caller's)
        self.seconds = 0.0  # wall time spent in run and puzzles (what one core per island would take)
        self.emit, self.counts = {}, []  # symmetry class -> (q, a) in emit order; counts[r]: emitted before round r
        self.rated = {k: np.zeros((0, 81), np.uint8) for k in ("question", "answer")} | {"rating": np.zeros(0, np.int32)}

    def run(self, rounds, progress=None):
        """Search until `rounds` rounds have run in all. progress(k), if given, is called with the
        number emitted after every round. -> self"""
        t0, banned = time.perf_counter(), _seed_keys()
        if self.beam is None:
            self.beam = _seed_pool(self.q0, self.rng, self.pool)
        for r in range(len(self.counts), rounds):
            self.counts.append(len(self.emit))
            if r - self.begun >= self.warmup and r >= self.patience:  # emitted in the last `patience` rounds:
                if self.counts[-1] - self.counts[-1 - self.patience] < self.min_rate * self.patience:
                    self.beam, self.begun = _seed_pool(self.q0, self.rng, self.pool), r  # a poor pool: climb again
            self.beam = _beam_round(self.beam, self.rng, self.emit, self.kids, self.emit_rating, banned)
            if progress:
                progress(len(self.emit))
        self.seconds += time.perf_counter() - t0
        return self

    def puzzles(self):
        """Every puzzle emitted so far, in emit order, each in a fresh random symmetry of its own, rated
        with rate_many (== rate) -> dict question, answer (N, 81), tier (N,) = 2, rating (N,), round
        (N,): the round that emitted each."""
        t0, done, emitted = time.perf_counter(), len(self.rated["rating"]), list(self.emit.values())
        qa = [augment(q[None], a[None], np.random.default_rng([self.seed, self.island, HARD_VERSION, i]))
              for i, (q, a) in enumerate(emitted[done:], done)]  # one generator per puzzle: its symmetry does not depend on rounds
        if qa:  # rate only what the last run added
            q, a = np.concatenate([x[0] for x in qa]), np.concatenate([x[1] for x in qa])
            tier, rating = rate_many(q)
            assert (tier == 1).all(), "a hard puzzle that singles alone solve"
            new = {"question": q, "answer": a, "rating": rating}
            self.rated = {k: np.concatenate([self.rated[k], new[k]]) for k in self.rated}
        round_of = np.repeat(np.arange(len(self.counts)), np.diff(self.counts + [len(self.emit)]))
        self.seconds += time.perf_counter() - t0
        return dict(self.rated, tier=np.full(len(self.emit), 2, np.int8), round=round_of)


def hard_island(seed, island, rounds, family="train", progress=None, **search):
    """Every hard puzzle that island `island` of stream `seed` emits in its first `rounds` rounds
    (Island.puzzles). Deterministic per (seed, island, family); what the first r rounds emit does not
    depend on `rounds`."""
    return Island(seed, island, family, **search).run(rounds, progress).puzzles()


_EMITTED = None  # a pool worker's shared count of emitted hard puzzles (generate_hard's progress bar)


def _count_into(counter):
    """Pool initializer: remember the shared counter."""
    global _EMITTED
    _EMITTED = counter


def _island(job):
    """Island.run for a pool worker, adding what it emits to the shared counter -> (island, puzzles)."""
    island, rounds = job
    last = [len(island.emit)]

    def progress(k):
        with _EMITTED.get_lock():
            _EMITTED.value += k - last[0]
        last[0] = k
    island.run(rounds, progress if _EMITTED is not None else None)
    return island, island.puzzles()


def _advance(bar, to):
    bar.total = max(bar.total or 0, to)  # the islands emit more than PER_ROUND guessed: a bar never past its end
    bar.update(to - bar.n)


def _run_islands(islands, rounds, workers, bar):
    """Run every island on to `rounds` rounds, in parallel when workers > 1 -> (islands, their
    puzzles), in order. The islands come back from the workers with their state. The bar counts the
    puzzles the islands emit."""
    if workers == 1:  # in-process: no pool to start (tests, one island)
        for island in islands:
            island.run(rounds, lambda k, before=bar.n - len(island.emit): _advance(bar, before + k))
        return islands, [island.puzzles() for island in islands]
    ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
    counter = ctx.Value("l", 0)
    start = bar.n
    with ctx.Pool(workers, initializer=_count_into, initargs=(counter,)) as pool:
        result = pool.map_async(_island, [(island, rounds) for island in islands], chunksize=1)  # islands differ in speed
        while not result.ready():
            result.wait(1.0)
            _advance(bar, start + counter.value)
        return tuple(map(list, zip(*result.get())))


PER_ROUND = 15.0  # a first guess of the puzzles an island emits a round, on the low side: going on costs nothing


def generate_hard(seed, n, family="train", workers=None, desc="hard puzzles", report=None):
    """The first n puzzles of hard stream `seed` (tier 2): island k searches next to seed k of
    HARD_SEEDS[family] (L seeds), every island for the same number of rounds, in parallel (at most L
    processes). The stream orders puzzles by the round that emitted them, then by island, keeping the
    first of each symmetry class. So each seed gets the same search effort (a seed whose neighbourhood
    runs out contributes less instead of stalling the set), puzzle i depends only on (seed, family,
    i), and a set of n is a prefix of a set of m > n. The rounds are guessed from n (PER_ROUND); a set
    that comes out short runs every island on for the rounds that its latest rate says are missing
    (at most doubling them).
    report, if a dict, gets the rounds run and each island's puzzles and seconds (bench/sudoku_data.py)."""
    L = len(HARD_SEEDS[family])
    workers, rounds = min(workers or os.cpu_count() or 1, L), max(1, math.ceil(n / (L * PER_ROUND)))
    islands, last = [Island(seed, k, family) for k in range(L)], (0, 0)  # last: rounds and puzzles kept at the last step
    with tqdm(total=n, desc=desc, unit="puzzle", leave=False) as bar:  # counts emitted puzzles, repeats included
        while True:  # every island runs whole rounds: the bar's total is what they should emit, n at least
            bar.total = max(n, bar.n, round(L * rounds * PER_ROUND))
            bar.set_postfix(rounds=rounds)
            islands, parts = _run_islands(islands, rounds, workers, bar)
            key = np.concatenate([p["round"] * L + k for k, p in enumerate(parts)])  # round, then island
            order = np.argsort(key, kind="stable")  # stable: an island's own order within a round
            data = {k: np.concatenate([p[k] for p in parts])[order] for k in ("question", "answer", "tier", "rating")}
            seen, keep = set(), []
            for i, c in enumerate(symmetry_key(data["question"])):  # the first of each class
                if c not in seen:
                    seen.add(c)
                    keep.append(i)
            if report is not None:
                report.setdefault("steps", []).append(rounds)  # the rounds each run went to
                report.update(rounds=rounds, kept=len(keep), island_puzzles=[len(p["round"]) for p in parts],
                              island_seconds=[round(i.seconds, 1) for i in islands])
            if len(keep) >= n:
                return {k: v[keep[:n]] for k, v in data.items()}
            rate = (len(keep) - last[1]) / (rounds - last[0])  # kept a round since the last step: later rounds keep fewer
            last = rounds, len(keep)
            rounds += min(rounds, max(1, math.ceil((n - len(keep)) / rate))) if rate > 0 else rounds
