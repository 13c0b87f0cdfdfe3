"""
sudoku.py — Sudoku data for the Relay experiment (arXiv 2605.22967 §4.1; NOTES.md §4): a CSV reader for the public
Sudoku-Extreme files, offline generators of unique-solution puzzles in three difficulty tiers, a
difficulty rating, and the Sudoku symmetry group as augmentation.

    python sudoku.py --n 200 --seed 0              # generate (tiers 0 and 1 as they come), rate, print speed
    python sudoku.py --n 100 --hard --out hard.csv # the hard tier (tier 2): ~5 puzzles/s per core
    python sudoku.py --n 100 --tier 1              # only puzzles that need search, from the plain generator
    python sudoku.py --check data/test.csv         # validate a CSV file

Boards are uint8 arrays of 81 cells, row-major; 0 is a blank, 1..9 are digits. The token id of a
cell *is* its value, so MASK = 0 and a puzzle array is already the model's input canvas.

Difficulty: `rate()` runs a solver that applies naked and hidden singles to a fixpoint and
branches on the cell with the fewest candidates. rating = number of branch points the depth-first
search opens before its first solution (0 = singles alone solve it), a rough analogue of the
backtrack count in Sudoku-Extreme's `rating` column. NOTE: it depends on the orientation and
the digit names, so a symmetric copy of a puzzle can rate very differently; compare sets only
after a random symmetry. Tiers: 0 = singles alone solve it; 1 = needs search (a random minimal
puzzle); 2 = hard (found by the beam search of `hard_island`, started next to hard 17-clue
puzzles); a CSV's tiers follow its rating
(`tier_of_rating`). `rate_many` is the same rating,
batched in numpy; `load_tiered` builds and caches train/test sets that mix the three tiers.
"""
import argparse
import csv
import glob
import hashlib
import itertools
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
    """Candidate masks of a board: a clue's own bit, all nine for a blank."""
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


def _minimal_puzzle(rng):
    """A random grid, then every cell blanked in random order unless that breaks uniqueness:
    a minimal unique-solution puzzle. -> (question, answer) uint8 arrays."""
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
    return np.array(q, np.uint8), answer


def make_puzzle(seed, index):
    """Puzzle number `index` of the stream `seed`: a minimal unique-solution puzzle.
    Deterministic per (seed, index), so a set of n puzzles is a prefix of a set of m > n."""
    q, answer = _minimal_puzzle(np.random.default_rng([seed, index]))
    tier, rating = rate(q)
    return q, answer, tier, rating


def _make(job):
    """make_puzzle for a pool worker."""
    return make_puzzle(*job)


# ----------------------------------------------------------------------------------------------
# batched solver: the propagation and search above, over many boards at once in numpy. It makes
# the hard generator affordable (several times fewer seconds per search node than the loop above
# when thousands of nodes go through together); tests/test_sudoku.py checks it against
# _propagate, solve and rate.

POP_NP = np.array(POP, np.uint8)
SMALL_BATCH = 16  # below this many boards, the plain loop is faster
DIGIT_NP = np.zeros(512, np.uint8)  # single-candidate mask -> its digit
DIGIT_NP[[1 << d for d in range(9)]] = np.arange(1, 10)


def cands_many(boards):
    """(N, 81) boards -> (N, 81) uint16 candidate masks (a clue's own bit, or all nine)."""
    b = np.asarray(boards).astype(np.int64)
    return np.where(b == 0, ALL, 1 << np.maximum(b - 1, 0)).astype(np.uint16)


def _multi(x):
    """More than one candidate left (x & (x - 1) clears the lowest bit)."""
    return (x & (x - np.uint16(1))) != 0


def _once_twice(cells):
    """9 arrays, one per cell position of a unit -> (digits seen at least once, at least twice)."""
    once, twice = cells[0].copy(), np.zeros_like(cells[0])
    for v in cells[1:]:
        twice |= once & v
        once |= v
    return once, twice


def _unit_cells(x, kind):
    """x (9, 9, M) -> for the rows (kind 0), columns (1) or boxes (2), the 9 views x[unit, k-th
    cell of the unit]."""
    if kind == 2:
        x5 = x.reshape(3, 3, 3, 3, -1)  # (band, row in band, stack, column in stack, M)
        return [x5[:, r, :, c] for r in range(3) for c in range(3)]
    return [x[:, k] for k in range(9)] if kind == 0 else [x[k] for k in range(9)]


def _naked_many(x, bad):
    """Naked singles to a fixpoint, in place on x (9, 9, M); marks contradictions in bad (M,).
    The fixpoint of eliminations does not depend on their order, so all cells go at once; only
    the states that still change stay in the loop. All 27 units go through one gather (27, 9, M):
    the arrays are small, so the number of numpy calls is what costs."""
    act = np.arange(x.shape[-1])
    while len(act):
        y = x[:, :, act]
        M = len(act)
        single = ~_multi(y)
        s = (y * single).reshape(81, M)[UNITS_NP]  # (27, 9, M) solved digits of every unit
        once, twice = _once_twice(s.transpose(1, 0, 2))
        bd = (twice != 0).any(0)  # a digit solved twice in a unit
        peer = (once[:9].reshape(3, 3, 1, 1, M) | once[9:18].reshape(1, 1, 3, 3, M)
                | once[18:].reshape(3, 1, 3, 1, M)).reshape(9, 9, M)  # (band, row, stack, column)
        y2 = np.where(single, y, y & ~peer)
        bd |= (y2 == 0).any((0, 1))
        bad[act[bd]] = True
        x[:, :, act] = y2
        act = act[(y2 != y).any((0, 1)) & ~bd]


def _hidden_many(x, kind, bad):
    """One hidden-singles pass over all rows (kind 0), columns (1) or boxes (2), in place.
    _propagate visits rows, then columns, then boxes; units of one kind share no cell, so doing a
    kind at once is the same pass. NOTE: like _propagate, a cell whose candidates are exactly
    several hidden digits of one unit is left alone (not flagged): the rating depends on it."""
    M = x.shape[-1]
    once, twice = _once_twice(_unit_cells(x, kind))
    bad |= (once != ALL).reshape(-1, M).any(0)  # a digit with no place left in some unit
    h = (once & ~twice).reshape([(9, 1, M), (1, 9, M), (3, 1, 3, 1, M)][kind])
    xv = x.reshape(3, 3, 3, 3, M) if kind == 2 else x
    m = xv & h
    upd = (m != 0) & (m != xv)
    bad |= (upd & _multi(m)).reshape(81, M).any(0)  # two digits that must both live in this cell
    np.copyto(xv, m, where=upd)


def propagate_many(c):
    """_propagate on every row of c (N, 81) uint16 -> (fixpoints (N, 81), ok (N,)); a row that is
    not ok holds a contradiction and its state is meaningless. Few rows go through _propagate
    itself: numpy only pays off when a call has many boards to share its overhead."""
    c = np.asarray(c, np.uint16)
    if len(c) <= SMALL_BATCH:
        rows = [row.tolist() for row in c]
        ok = np.array([_propagate(row, [False] * 81) for row in rows], bool)
        return np.array(rows, np.uint16).reshape(-1, 81), ok
    c = np.ascontiguousarray(c.T).reshape(9, 9, -1)  # cells first: every unit operation is contiguous
    ok = np.ones(c.shape[-1], bool)
    act = np.arange(c.shape[-1])
    while len(act):  # as _propagate: naked singles to a fixpoint, one hidden pass, until nothing changes
        x = c[:, :, act]
        bad = np.zeros(len(act), bool)
        _naked_many(x, bad)
        before = x.copy()
        for kind in range(3):
            _hidden_many(x, kind, bad)
        c[:, :, act] = x
        ok[act[bad]] = False
        act = act[(x != before).any((0, 1)) & ~bad]
    return c.reshape(81, -1).T.copy(), ok


def _branch_cell(x):
    """x (M, 81) candidate masks -> (cell (M,), its candidates (M,)): the first cell with the
    fewest candidates (more than one), the cell _search branches on."""
    count = POP_NP[x]
    count[count < 2] = 10
    best = count.argmin(1)
    return best, x[np.arange(len(x)), best]


def search_trees(c, limit=2, max_branches=20000):
    """Breadth-first search of the tree `_search` walks depth first (same propagation, same branch
    cell, children in digit order) for every row of c (N, 81), stopping a row at `limit`
    solutions or past `max_branches` branch points. -> dict with nsol, branches, aborted (N,),
    `levels` (one dict per depth: owner, parent index one level up, digit, inner, solved) and
    `solutions` (owner (S,), digits (S, 81)). A row with fewer than `limit` solutions has a
    complete tree, so its `branches` equals solve(board, limit)[1] whatever the visiting order."""
    N = len(c)
    nsol, branches = np.zeros(N, np.int64), np.zeros(N, np.int64)
    front, owner = np.asarray(c, np.uint16), np.arange(N)
    parent, digit = np.full(N, -1), np.zeros(N, np.int64)
    levels, sol_owner, sol_digits = [], [np.zeros(0, np.int64)], [np.zeros((0, 81), np.uint8)]
    while len(front):
        x, ok = propagate_many(front)
        solved = ok & ~_multi(x).any(1)
        inner = ok & ~solved  # a branch point
        nsol += np.bincount(owner[solved], minlength=N)
        branches += np.bincount(owner[inner], minlength=N)
        levels.append(dict(owner=owner, parent=parent, digit=digit, inner=inner, solved=solved))
        sol_owner.append(owner[solved])
        sol_digits.append(DIGIT_NP[x[solved]])
        idx = np.flatnonzero(inner)
        x = x[idx]
        best, cb = _branch_cell(x)
        kids = []
        for d in range(9):  # children in digit order
            has = np.flatnonzero(cb >> d & 1)
            k = x[has]
            k[np.arange(len(has)), best[has]] = 1 << d
            kids.append((k, owner[idx[has]], idx[has], np.full(len(has), d + 1)))
        front, owner, parent, digit = [np.concatenate(z) for z in zip(*kids)]
        alive = ((nsol < limit) & (branches <= max_branches))[owner]
        front, owner, parent, digit = front[alive], owner[alive], parent[alive], digit[alive]
    return dict(nsol=nsol, branches=branches, aborted=(branches > max_branches) & (nsol < limit),
                levels=levels, solutions=(np.concatenate(sol_owner), np.concatenate(sol_digits)))


def _dfs_branches(tree, N, ranks=None):
    """For rows whose tree is complete with one solution: the branch points a depth-first search
    opens before reaching it (what rate() counts) = the branch points on the path to the solution
    plus every branch point under a sibling of the path visited before it. Siblings are visited in
    digit order, or for ranks (R, N, 10) in the order ranks[r, row, digit] gives (the visiting
    order of the puzzle with its digits renamed d -> ranks[r, row, d]): -> (N,), or (N, R)."""
    levels = tree["levels"]
    sub = [lv["inner"].astype(np.int64) for lv in levels]  # branch points in each node's subtree
    for d in range(len(levels) - 1, 0, -1):
        sub[d - 1] += np.bincount(levels[d]["parent"], weights=sub[d], minlength=len(sub[d - 1])).astype(np.int64)
    path = np.full((len(levels), N), -1)  # node index of each row's solution path at each depth
    for d in range(len(levels) - 1, -1, -1):
        s = np.flatnonzero(levels[d]["solved"])
        path[d, levels[d]["owner"][s]] = s
        if d + 1 < len(levels):
            below = path[d + 1] >= 0
            path[d, below] = levels[d + 1]["parent"][path[d + 1, below]]
    order = np.arange(10)[None, None] if ranks is None else ranks  # (R, N or 1, 10)
    on_path_count = (path >= 0).sum(0) - 1  # branch points on the path: every node but the solution
    out = np.tile(on_path_count[:, None], (1, len(order)))
    for d in range(1, len(levels)):
        lv = levels[d]
        on_path = path[d, lv["owner"]]
        path_digit = np.where(on_path >= 0, lv["digit"][np.maximum(on_path, 0)], 0)
        sibling = lv["parent"] == path[d - 1, lv["owner"]]
        row = lv["owner"] if ranks is not None else 0
        for r, rk in enumerate(order):
            first = sibling & (rk[row, lv["digit"]] < rk[row, path_digit])
            out[:, r] += np.bincount(lv["owner"][first], weights=sub[d][first], minlength=N).astype(np.int64)
    return out[:, 0] if ranks is None else out


def rate_many(boards, max_branches=2000):
    """rate() of every board, batched: (tier (N,) int8, rating (N,) int32). Boards with several
    solutions (or past max_branches) are passed to rate() itself."""
    boards = np.asarray(boards)
    tree = search_trees(cands_many(boards), 2, max_branches)
    one = (tree["nsol"] == 1) & ~tree["aborted"]
    rating = np.where(one, _dfs_branches(tree, len(boards)), 0)
    tier = (rating > 0).astype(np.int8)
    for i in np.flatnonzero(~one):
        tier[i], rating[i] = rate(boards[i])
    return tier, rating.astype(np.int32)


# ----------------------------------------------------------------------------------------------
# the symmetry group (digits, bands/stacks, rows/cols, transpose): augmentation and a class key

def _geometry(N, rng):
    """(N, 81) cell maps of N random symmetries of the grid (bands, stacks, lines within them,
    transposition): row n takes cell idx[n, j] of the original into cell j."""
    def line_perm():  # a permutation of 0..8 that moves bands as wholes and lines within bands
        band = rng.permuted(np.tile(np.arange(3), (N, 1)), axis=1)  # (N, 3)
        within = rng.permuted(np.tile(np.arange(3), (N, 3, 1)), axis=2)  # (N, 3, 3)
        return (band[:, :, None] * 3 + within).reshape(N, 9)

    rows, cols = line_perm(), line_perm()
    idx = rows[:, :, None] * 9 + cols[:, None, :]  # (N, 9, 9): source cell of every target cell
    flip = rng.random(N) < 0.5
    idx[flip] = idx[flip].transpose(0, 2, 1)
    return idx.reshape(N, 81)


def _digit_orders(N, rng):
    """(N, 10) random renamings of the digits 1..9 (0, the blank, stays 0)."""
    lut = np.zeros((N, 10), np.uint8)
    lut[:, 1:] = rng.permuted(np.tile(np.arange(1, 10, dtype=np.uint8), (N, 1)), axis=1)
    return lut


def augment(q, a, rng):
    """Apply one random symmetry per row to (N, 81) question/answer arrays, the same to both."""
    N = len(q)
    lut = _digit_orders(N, rng)
    idx = _geometry(N, rng)
    take = lambda b: lut[np.arange(N)[:, None], np.take_along_axis(b, idx, 1)]
    return take(q), take(a)


def is_legal(boards):
    """(N,) bool: board full and no row/column/box conflict (whether or not it equals the answer)."""
    grid = np.asarray(boards)[:, UNITS_NP]
    return (np.sort(grid, axis=2) == np.arange(1, 10)).all((1, 2))


def _mix(x):
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a well-spread hash of x."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def symmetry_key(boards, rounds=4):
    """A key per puzzle that the symmetries `augment` draws from leave unchanged: colour
    refinement (Weisfeiler-Lehman) on the graph of cells, lines, boxes and digits, where a cell
    touches its row, column and box and, if it is a clue, its digit. Rows and columns are one kind
    of node (transposition swaps them) and digits have no names, so digit relabelling, line and
    band permutations and transposition all give the same key. Different keys => not symmetric,
    so deduplicating by key keeps puzzles distinct up to symmetry; equal keys of non-symmetric
    puzzles would only drop a puzzle that could have stayed (none seen in the tests). NOTE: full
    grids all look alike to colour refinement: use it on puzzles. -> list of str (N,)."""
    b = np.asarray(boards).astype(np.int64)
    N = len(b)
    const = lambda k, shape: _mix(np.full(shape, k, np.uint64))
    cell = _mix((b > 0).astype(np.uint64) + np.uint64(1))  # (N, 81) clue or blank
    line, box, digit = const(3, (N, 18)), const(4, (N, 9)), const(5, (N, 10))  # lines: 9 rows then 9 columns
    rows, cols = np.arange(81) // 9, 9 + np.arange(81) % 9
    boxes = (np.arange(81) // 27) * 3 + (np.arange(81) % 9) // 3
    n_idx = np.arange(N)[:, None]
    for _ in range(rounds):  # new colour = mix(own colour, sum of the neighbours' mixed colours)
        mc = _mix(cell + np.uint64(7))
        line_in, box_in, digit_in = np.zeros_like(line), np.zeros_like(box), np.zeros_like(digit)
        np.add.at(line_in, (slice(None), rows), mc)
        np.add.at(line_in, (slice(None), cols), mc)
        np.add.at(box_in, (slice(None), boxes), mc)
        np.add.at(digit_in, (n_idx, b), mc)  # digit 0 collects the blanks and is not used below
        cell_in = _mix(line[:, rows]) + _mix(line[:, cols]) + _mix(box[:, boxes] + np.uint64(13))
        cell_in += np.where(b > 0, _mix(digit[n_idx, b] + np.uint64(11)), np.uint64(0))
        cell = _mix(cell * np.uint64(31) + cell_in)
        line, box = _mix(line * np.uint64(37) + line_in), _mix(box * np.uint64(41) + box_in)
        digit = _mix(digit * np.uint64(43) + digit_in)
    parts = np.concatenate([np.sort(cell, 1), np.sort(line, 1), np.sort(box, 1), np.sort(digit[:, 1:], 1)], 1)
    return [hashlib.blake2b(p.tobytes(), digest_size=16).hexdigest() for p in parts]


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

HARD_VERSION = 7   # bump when anything below changes what a seed produces
ISLAND = 100       # hard puzzles per island; island j of a stream starts next to seed j % len(seeds)
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
                raise ValueError(f"{path}:{n}: expected `train|test PUZZLE SOURCE`, got {line.strip()!r}")
            try:
                parse_puzzle(fields[1])
            except ValueError as e:
                raise ValueError(f"{path}:{n}: {e}") from None
            seeds[fields[0]].append(fields[1])
    if not all(seeds.values()):
        raise ValueError(f"{path}: needs at least one train and one test seed")
    return seeds


def parse_puzzle(text):
    """81 characters, row-major, digits for clues and '.' or '0' for blanks -> (81,) uint8 board.
    ValueError if it is not that, or if its clues already repeat a digit in a unit."""
    text = text.strip()
    if len(text) != 81 or any(ch not in ".0123456789" for ch in text):
        raise ValueError(f"a puzzle is 81 characters of 1-9 and '.' or '0', got {len(text)} characters: {text!r}")
    q = np.array([0 if ch == "." else int(ch) for ch in text], np.uint8)
    for unit in UNITS:  # clues that already break a rule can have no solution
        clues = q[unit][q[unit] > 0]
        if len(clues) != len(set(clues.tolist())):
            raise ValueError(f"the clues repeat a digit in a row, column or box (cells {unit})")
    return q


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
        idx = _geometry(len(alive), rng)
        tree = search_trees(cands_many(np.take_along_axis(q[alive], idx, 1)), 2, MAX_TREE)
        ok = (tree["nsol"] == 1) & ~tree["aborted"]
        ranks = np.stack([_digit_orders(len(alive), rng) for _ in range(orders)])
        out[alive, g * orders:(g + 1) * orders] = np.where(ok[:, None], _dfs_branches(tree, len(alive), ranks), -1)
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
        solved = ok & ~_multi(x).any(1)
        found[rows[solved]] = True
        go = ok & ~solved & ~found[rows]
        x, rows = x[go], rows[go]
        best, cb = _branch_cell(x)  # the cell to guess at
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


def hard_island(seed, island, n=ISLAND, family="train", pool=None, kids=None, emit_rating=None, warmup=200,
                patience=50, min_rate=0.3, max_rounds=20000, progress=None):
    """The first n hard puzzles of island `island` of stream `seed`, searched next to seed puzzle
    HARD_SEEDS[family][island % its length], in the order the search emits them, each in a fresh
    random symmetry of its own, rated with rate_many (== rate). Deterministic per (seed, island,
    family); the first n do not depend on n. Search settings default to HARD. A pool that, after
    `warmup` rounds, emits fewer than min_rate puzzles a round over `patience` rounds starts over
    next to the seed. progress(k), if given, is called with the number emitted after every round.
    -> dict question, answer (n, 81), tier (n,) = 2, rating (n,)."""
    given = dict(pool=pool, kids=kids, emit_rating=emit_rating)
    pool, kids, emit_rating = [HARD[k] if v is None else v for k, v in given.items()]
    seeds = HARD_SEEDS[family]
    q0 = parse_puzzle(seeds[island % len(seeds)])
    rng = np.random.default_rng([seed, island, HARD_VERSION])
    state, begun, emit, counts, banned = _seed_pool(q0, rng, pool), 0, {}, [], _seed_keys()
    for r in range(max_rounds):
        if len(emit) >= n:
            break
        counts.append(len(emit))
        if r - begun >= warmup and counts[-1] - counts[-1 - patience] < min_rate * patience:
            state, begun = _seed_pool(q0, rng, pool), r  # a poor pool: climb again from the seed
        state = _beam_round(state, rng, emit, kids, emit_rating, banned)
        if progress:
            progress(min(len(emit), n))
    else:
        raise RuntimeError(f"hard_island({seed}, {island}): {len(emit)} of {n} puzzles after {max_rounds} rounds")
    found = list(emit.values())[:n]
    qa = [augment(q[None], a[None], np.random.default_rng([seed, island, HARD_VERSION, i]))
          for i, (q, a) in enumerate(found)]  # one generator per puzzle: its symmetry does not depend on n
    q, a = np.concatenate([x[0] for x in qa]), np.concatenate([x[1] for x in qa])
    tier, rating = rate_many(q)
    assert (tier == 1).all(), "a hard puzzle that singles alone solve"
    return {"question": q, "answer": a, "tier": np.full(n, 2, np.int8), "rating": rating}


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


_EMITTED = None  # a pool worker's shared count of emitted hard puzzles (generate_hard's progress bar)


def _count_into(counter):
    """Pool initializer: remember the shared counter."""
    global _EMITTED
    _EMITTED = counter


def _island(job):
    """hard_island for a pool worker, adding what it emits to the shared counter."""
    last = [0]

    def progress(k):
        with _EMITTED.get_lock():
            _EMITTED.value += k - last[0]
        last[0] = k
    return hard_island(*job, progress=progress if _EMITTED is not None else None)


def _run_islands(jobs, workers, bar):
    """hard_island(*job) for every job, in parallel when workers > 1 -> list of results in job
    order. The bar counts the puzzles the islands emit."""
    start = bar.n
    if workers == 1:  # in-process: no pool to start (tests, one island)
        parts = []
        for job in jobs:
            before = bar.n
            parts.append(hard_island(*job, progress=lambda k: bar.update(before + k - bar.n)))
        return parts
    ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
    counter = ctx.Value("l", 0)
    with ctx.Pool(workers, initializer=_count_into, initargs=(counter,)) as pool:
        result = pool.map_async(_island, jobs, chunksize=1)  # islands differ in speed: one at a time
        while not result.ready():
            result.wait(1.0)
            bar.update(start + counter.value - bar.n)
        return result.get()


def generate_hard(seed, n, family="train", workers=None, desc="hard puzzles"):
    """The first n puzzles of hard stream `seed` (tier 2), seeded from HARD_SEEDS[family]: whole
    islands 0, 1, ... of ISLAND puzzles, searched in parallel, concatenated in order, keeping the
    first puzzle of each symmetry class. Islands next to the same seed can meet; a set that comes
    out short runs the next islands. So puzzle i depends only on (seed, family, i), and a set of n
    is a prefix of a set of m > n."""
    workers = workers or os.cpu_count() or 1
    data, seen, island = None, set(), 0
    with tqdm(total=0, desc=desc, unit="puzzle", leave=False) as bar:
        while data is None or len(data["question"]) < n:
            have = 0 if data is None else len(data["question"])
            jobs = [(seed, j, ISLAND, family) for j in range(island, island - (-(n - have) // ISLAND))]
            island += len(jobs)
            bar.total += len(jobs) * ISLAND  # emitted puzzles; repeats are dropped below
            for part in _run_islands(jobs, min(workers, len(jobs)), bar):
                new = []
                for i, key in enumerate(symmetry_key(part["question"])):  # the first of each class
                    if key not in seen:
                        seen.add(key)
                        new.append(i)
                part = {k: v[new] for k, v in part.items()}
                data = part if data is None else {k: np.concatenate([data[k], part[k]]) for k in data}
            bar.set_postfix(kept=f"{len(data['question'])}/{n}")
    return {k: v[:n] for k, v in data.items()}


def generate_tier(tier, seed, n, workers=None, family="train"):
    """n puzzles of one tier from stream `seed`: 0 = singles alone solve it, 1 = needs search
    (both from the plain generator, filtered in stream order), 2 = hard (generate_hard, seeded
    from HARD_SEEDS[family])."""
    if tier == 2:
        return generate_hard(seed, n, family, workers)
    return generate(seed, n, hard=tier == 1, workers=workers, desc=f"tier {tier} puzzles")


# Tiered sets mix the tiers as Sudoku-Extreme mixes ratings. Every tier of every set is a stream of
# its own, cached in a file of its own; a set of n puzzles takes the first tier_counts(shares, n)
# puzzles of each. The test set draws from other streams, so it never shares a puzzle with the
# training set, and any mix of tiers reuses what is cached.
MIX = {"train": (0.25, 0.25, 0.5), "test": (0.25, 0.25, 0.5)}  # default share of tiers 0, 1, 2
STREAMS = {"train": (10, 11, 12), "test": (20, 21, 22)}       # stream of tier t is 100 * seed + STREAMS[kind][t]
PLAIN_VERSION = 1  # bump when the plain generator (tiers 0 and 1) changes what a seed produces


def tier_counts(shares, n):
    """Puzzles of each tier in a set of n: round(share * n) for tiers 0 and 1, the rest tier 2."""
    n0, n1 = (round(f * n) for f in shares[:2])
    if n0 + n1 > n or min(shares) < 0 or len(shares) != 3:
        raise ValueError(f"tier shares must be three non-negative numbers summing to 1, got {shares}")
    return n0, n1, n - n0 - n1


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
    files = glob.glob(tier_path(data_dir, tier, stream, "*", family))
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
    if len(row) <= max(cols.values()):
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
    if "rating" in cols and not row[cols["rating"]].strip().isdigit():
        return f"rating must be a non-negative integer, got {row[cols['rating']]!r}"
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
            raise ValueError(f"{path}:{n}: line longer than {MAX_LINE_BYTES} bytes: not a puzzle row")
        try:
            yield raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_csv(path, skip_invalid=False, limit=None):
    """Read and validate a Sudoku CSV (columns `question`, `answer`, optional `rating` and `tier`,
    which come back as arrays when present). Raises ValueError naming file, line and reason,
    unless skip_invalid, which skips bad rows and prints how many."""
    qs, ans, extra, lines, bad = [], [], [], [], []
    table = bytearray(range(256))
    table[ord(".")] = 0
    for d in range(10):
        table[ord(str(d))] = d
    with open(path, "rb") as f:
        reader = csv.reader(_text_lines(f, path))
        header = next(reader, None)
        if header is None or "question" not in header or "answer" not in header:
            raise ValueError(f"{path}:1: header must name 'question' and 'answer' columns, got {header}")
        cols = {name: header.index(name) for name in ("question", "answer", "rating", "tier") if name in header}
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            reason = _row_reason(row, cols, len(header))
            if reason:
                if not skip_invalid:
                    raise ValueError(f"{path}:{line}: {reason}")
                bad.append(line)
                continue
            qs.append(row[cols["question"]].strip().encode().translate(table))
            ans.append(row[cols["answer"]].strip().encode().translate(table))
            extra.append([int(row[cols[k]]) for k in ("rating", "tier") if k in cols])
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
    out = {"question": q[keep].copy(), "answer": a[keep].copy()}
    names = [k for k in ("rating", "tier") if k in cols]
    for j, (name, dtype) in enumerate((k, np.int32 if k == "rating" else np.int8) for k in names):
        out[name] = np.array([e[j] for e in extra], dtype)[keep]
    return out


def write_csv(path, data):
    """Write question, answer, rating (0 when unknown) and, when known, tier: read_csv reads them
    back unchanged."""
    n = len(data["question"])
    rating, tier = data.get("rating", np.zeros(n, np.int32)), data.get("tier")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer", "rating"] + (["tier"] if tier is not None else []))
        for i, (q, a) in enumerate(zip(data["question"], data["answer"])):
            w.writerow(["".join(str(v) if v else "." for v in q), "".join(map(str, a)), int(rating[i])]
                       + ([int(tier[i])] if tier is not None else []))

def summary(d):
    """One line per tier: count, clues and rating (median / mean / p90)."""
    lines = []
    for t in np.unique(d["tier"]):
        m = d["tier"] == t
        r = d["rating"][m]
        lines.append(f"tier {t}: {m.sum()} puzzles, clues {np.mean((d['question'][m] > 0).sum(1)):.1f}, rating "
                     f"median {np.median(r):.0f} mean {r.mean():.1f} p90 {np.percentile(r, 90):.0f}")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="puzzles to generate")
    p.add_argument("--seed", type=int, default=0, help="puzzle stream: puzzle i depends only on (seed, i)")
    p.add_argument("--tier", type=int, choices=(0, 1, 2), default=None,
                   help="only this tier: 0 singles, 1 needs search, 2 hard (default: tiers 0 and 1 as they come)")
    p.add_argument("--hard", action="store_true", help="the hardest tier, same as --tier 2")
    p.add_argument("--family", choices=tuple(HARD_SEEDS), default="train",
                   help="hard tier: the seed puzzles its search starts next to (the default sets' own split)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--out", default="", help="write the generated puzzles to this CSV")
    p.add_argument("--check", default="", help="validate this CSV and print a summary")
    args = p.parse_args()
    if args.check:
        print(f"{args.check}:\n{summary(add_tiers(read_csv(args.check)))}")
    else:
        t0 = time.time()
        tier = 2 if args.hard else args.tier
        if tier is None:
            d = generate(args.seed, args.n, workers=args.workers)
        else:
            d = generate_tier(tier, args.seed, args.n, args.workers, args.family)
        dt = time.time() - t0
        print(f"{args.n} puzzles in {dt:.1f}s = {args.n / dt:.2f} puzzles/s\n{summary(d)}")
        if args.out:
            write_csv(args.out, d)
