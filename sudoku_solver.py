"""
sudoku_solver.py — the rules of Sudoku as code (arXiv 2605.22967 §4.1; NOTES.md §4): a solver, the
difficulty rating, a batched form of both in numpy, and the symmetry group of the grid.

    python -c "import sudoku_solver as S; print(S.rate(S.parse_puzzle('1..8......5..3...........847..6..3...4....9.....2..........95..6.2......8........')))"

Boards are uint8 arrays of 81 cells, row-major; 0 is a blank, 1..9 are digits. Candidates of a
cell are a 9-bit mask (bit d = digit d + 1).

Difficulty: `rate()` runs a solver that applies naked and hidden singles to a fixpoint and
branches on the cell with the fewest candidates. rating = number of branch points the depth-first
search opens before its first solution (0 = singles alone solve it), a rough analogue of the
backtrack count in Sudoku-Extreme's `rating` column. NOTE: it depends on the orientation and
the digit names, so a symmetric copy of a puzzle can rate very differently; compare sets only
after a random symmetry. `rate_many` is the same rating, batched; `symmetry_key` names the class
of a puzzle under the symmetries `augment` draws from.
"""
import hashlib

import numpy as np

from runs import InputError

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


def minimal_puzzle(rng):
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


def parse_puzzle(text):
    """81 characters, row-major, digits for clues and '.' or '0' for blanks -> (81,) uint8 board.
    ValueError if it is not that, or if its clues already repeat a digit in a unit."""
    text = text.strip()
    if len(text) != 81 or any(ch not in ".0123456789" for ch in text):
        raise InputError(f"a puzzle is 81 characters of 1-9 and '.' or '0', got {len(text)} characters: {text!r}")
    q = np.array([0 if ch == "." else int(ch) for ch in text], np.uint8)
    for unit in UNITS:  # clues that already break a rule can have no solution
        digits = q[unit].tolist()
        twice = next((d for d in range(1, 10) if digits.count(d) > 1), None)
        if twice:
            cells = ", ".join(f"r{c // 9 + 1}c{c % 9 + 1}" for c in unit if q[c] == twice)
            raise InputError(f"the clues repeat a {twice} in one row, column or box (cells {cells})")
    return q


def puzzle_text(board):
    """parse_puzzle's inverse: (81,) board -> 81 characters, '.' for a blank."""
    return "".join(str(v) if v else "." for v in np.asarray(board).tolist())


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


def undecided(x):
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
        single = ~undecided(y)
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
    bad |= (upd & undecided(m)).reshape(81, M).any(0)  # two digits that must both live in this cell
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


def branch_cell(x):
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
        solved = ok & ~undecided(x).any(1)
        inner = ok & ~solved  # a branch point
        nsol += np.bincount(owner[solved], minlength=N)
        branches += np.bincount(owner[inner], minlength=N)
        levels.append(dict(owner=owner, parent=parent, digit=digit, inner=inner, solved=solved))
        sol_owner.append(owner[solved])
        sol_digits.append(DIGIT_NP[x[solved]])
        idx = np.flatnonzero(inner)
        x = x[idx]
        best, cb = branch_cell(x)
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


def dfs_branches(tree, N, ranks=None):
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


def solve_many(boards, max_branches=2000):
    """solve() and rate() of every board, batched -> (answer (N, 81) uint8: the solution of a board
    with exactly one, else zeros; nsol (N,): 0, 1, or 2 for two or more; rating (N,) int32: rate()
    of a board with one solution, else 0). Boards past max_branches go to solve() itself."""
    boards = np.asarray(boards)
    tree = search_trees(cands_many(boards), 2, max_branches)
    nsol, answer = np.minimum(tree["nsol"], 2), np.zeros(boards.shape, np.uint8)  # the last level may hold more
    one = (nsol == 1) & ~tree["aborted"]
    owner, digits = tree["solutions"]
    answer[owner[one[owner]]] = digits[one[owner]]
    rating = np.where(one, dfs_branches(tree, len(boards)), 0).astype(np.int32)
    for i in np.flatnonzero(tree["aborted"]):  # a huge tree: the depth-first search decides
        sols, _ = solve(boards[i], limit=2)
        nsol[i] = len(sols)
        if len(sols) == 1:
            answer[i], rating[i] = sols[0], rate(boards[i])[1]
    return answer, nsol, rating


def rate_many(boards, max_branches=2000):
    """rate() of every board, batched: (tier (N,) int8, rating (N,) int32). Boards with several
    solutions (or none) are passed to rate() itself."""
    boards = np.asarray(boards)
    _, nsol, rating = solve_many(boards, max_branches)
    tier = (rating > 0).astype(np.int8)
    for i in np.flatnonzero(nsol != 1):
        tier[i], rating[i] = rate(boards[i])
    return tier, rating


# ----------------------------------------------------------------------------------------------
# the symmetry group (digits, bands/stacks, rows/cols, transpose): augmentation and a class key

def random_geometry(N, rng):
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


def random_digit_orders(N, rng):
    """(N, 10) random renamings of the digits 1..9 (0, the blank, stays 0)."""
    lut = np.zeros((N, 10), np.uint8)
    lut[:, 1:] = rng.permuted(np.tile(np.arange(1, 10, dtype=np.uint8), (N, 1)), axis=1)
    return lut


def augment(q, a, rng):
    """Apply one random symmetry per row to (N, 81) question/answer arrays, the same to both."""
    N = len(q)
    lut = random_digit_orders(N, rng)
    idx = random_geometry(N, rng)
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
