import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from tqdm import tqdm

import sudoku
import sudoku_hard
import sudoku_solver


def grid_ok(a):
    return sudoku_solver.is_legal(a[None])[0]


def test_generator_unique_valid_deterministic():
    for i in range(6):
        q, a, tier, rating = sudoku.make_puzzle(7, i)
        assert grid_ok(a)
        assert ((q == 0) | (q == a)).all()
        sols, _ = sudoku_solver.solve(q, limit=2)
        assert len(sols) == 1 and (sols[0] == a).all()  # unique solution
        q2, a2, _, _ = sudoku.make_puzzle(7, i)
        assert (q2 == q).all() and (a2 == a).all()
        assert tier in (0, 1) and (rating > 0) == (tier == 1)
    assert not (sudoku.make_puzzle(7, 0)[0] == sudoku.make_puzzle(8, 0)[0]).all()


def test_generate_filter_and_tiers():
    hard = sudoku.generate(3, 4, search=True, workers=1)
    easy = sudoku.generate(3, 4, search=False, workers=1)
    assert (hard["tier"] == 1).all() and (easy["tier"] == 0).all()
    for q in hard["question"]:  # singles alone get stuck: search is needed
        c = sudoku_solver._cands(q)
        sudoku_solver._propagate(c, [False] * 81)
        assert not all(sudoku_solver.ONE[m] for m in c)
    for q, a in zip(easy["question"], easy["answer"]):
        c = sudoku_solver._cands(q)
        assert sudoku_solver._propagate(c, [False] * 81)
        assert [sudoku_solver.DIGIT[m] for m in c] == a.tolist()


def test_solver_counts_multiple_solutions():
    q, a, _, _ = sudoku.make_puzzle(0, 0)
    empty = np.zeros(81, np.uint8)
    sols, _ = sudoku_solver.solve(empty, limit=2)
    assert len(sols) == 2 and all(grid_ok(s) for s in sols)


def one_swap(a):
    """A grid with cells 1 and 2 of row 1 swapped: the row still holds every digit, two columns do not."""
    bad = a.copy()
    bad[[0, 1]] = a[[1, 0]]
    return bad


def test_one_broken_unit_makes_a_grid_illegal_and_an_answer_wrong():
    q, a, _, _ = sudoku.make_puzzle(11, 0)
    bad = one_swap(a)
    assert sudoku_solver.is_legal(np.stack([a, bad])).tolist() == [True, False]
    q = np.where((np.arange(81) < 9) | (q != bad), 0, q).astype(np.uint8)  # no clue it contradicts: only the rules
    assert sudoku.board_errors(q[None], bad[None])[0].startswith("answer breaks a Sudoku rule")


def test_a_search_that_ends_exactly_at_max_branches_is_complete():
    q = sudoku_solver.parse_puzzle(sudoku_hard.HARD_SEEDS["train"][0])
    b = sudoku_solver.solve(q, 2)[1]  # the branch points of the whole tree
    for k in (b, b + 1):
        assert sudoku_solver.solve_many(q[None], max_branches=k)[1][0] == 1, k


def test_geometry_moves_lines_within_their_bands_and_transposes_half_the_time():
    idx = sudoku_solver.random_geometry(400, np.random.default_rng(0)).reshape(400, 9, 9)  # target -> source cell
    transposed = (idx[:, :, :1] // 9 != idx // 9).any((1, 2))  # a target row draws from several source rows
    assert 0.3 < transposed.mean() < 0.7
    lines = np.where(transposed[:, None], idx[:, 0, :] % 9, idx[:, :, 0] // 9)  # each target row's source line
    assert (lines // 3 == (lines // 3).reshape(-1, 3, 3)[:, :, :1].repeat(3, 2).reshape(-1, 9)).all()  # bands whole


def test_augment_preserves_puzzles():
    d = sudoku.generate(5, 3, workers=1)
    rng = np.random.default_rng(0)
    q, a = sudoku_solver.augment(d["question"], d["answer"], rng)
    assert not (q == d["question"]).all()
    for qi, ai, q0 in zip(q, a, d["question"]):
        assert grid_ok(ai) and ((qi == 0) | (qi == ai)).all()
        assert (qi > 0).sum() == (q0 > 0).sum()
        sols, _ = sudoku_solver.solve(qi, limit=2)
        assert len(sols) == 1 and (sols[0] == ai).all()


def write(tmp_path, rows, header="source,question,answer,rating"):
    p = tmp_path / "s.csv"
    p.write_text(header + "\n" + "\n".join(rows) + "\n")
    return str(p)


def good_row(i=0, blank="."):
    q, a, _, _ = sudoku.make_puzzle(11, i)
    return "".join(str(v) if v else blank for v in q), "".join(map(str, a))


def test_csv_reads_the_public_format(tmp_path):
    (q1, a1), (q2, a2) = good_row(0), good_row(1, blank="0")
    d = sudoku.read_csv(write(tmp_path, [f"x,{q1},{a1},3", f"y,{q2},{a2},0"]))
    assert d["question"].shape == (2, 81)
    assert (d["question"][0] == sudoku.make_puzzle(11, 0)[0]).all()
    assert (d["answer"][1] == sudoku.make_puzzle(11, 1)[1]).all()


def change_first_clue(q):
    i = next(i for i, c in enumerate(q) if c != ".")
    return q[:i] + str(int(q[i]) % 9 + 1) + q[i + 1:]


@pytest.mark.parametrize("mutate,reason", [
    (lambda q, a: (q[:-1], a), "81 cells"),
    (lambda q, a: (q[:5] + "x" + q[6:], a), "only digits"),
    (lambda q, a: (q, a[:3] + "0" + a[4:]), "answer may hold only digits"),
    (lambda q, a: (change_first_clue(q), a), "contradicts a clue"),
    (lambda q, a: (q.replace("1", ".").replace("2", "."), a.replace("1", "2")), "breaks a Sudoku rule"),
    (lambda q, a: (a, a), "no blank"),
])
def test_csv_errors_name_file_line_and_reason(tmp_path, mutate, reason):
    q, a = good_row(0)
    bq, ba = mutate(q, a)
    path = write(tmp_path, [f"x,{q},{a},1", f"x,{bq},{ba},1", f"x,{q},{a},1"])
    with pytest.raises(ValueError, match=reason) as e:
        sudoku.read_csv(path)
    assert str(e.value).startswith(f"{path}:3:")
    d = sudoku.read_csv(path, skip_invalid=True)
    assert len(d["question"]) == 2


def test_csv_bom_is_valid_and_bad_bytes_or_huge_fields_name_the_line(tmp_path):
    q, a = good_row(0)
    p = tmp_path / "bom.csv"
    p.write_bytes(b"\xef\xbb\xbfquestion,answer\n" + f"{q},{a}\n".encode())
    assert len(sudoku.read_csv(str(p))["question"]) == 1
    p.write_bytes(f"question,answer\n{q},{a}\n".encode() + b"\xff\xfe,x\n")
    with pytest.raises(ValueError, match=f"{p}:3: not UTF-8"):
        sudoku.read_csv(str(p), skip_invalid=True)
    p.write_bytes(f"question,answer\n{q},{a}\n".encode() + b"x" * (1 << 20) + b",y\n")
    with pytest.raises(ValueError, match=f"{p}:3: line longer than"):
        sudoku.read_csv(str(p), skip_invalid=True)


def test_csv_header_and_columns(tmp_path):
    q, a = good_row(0)
    with pytest.raises(ValueError, match="header"):
        sudoku.read_csv(write(tmp_path, [f"{q},{a}"], header="puzzle,solution"))
    with pytest.raises(ValueError, match=":2: expected 4 columns"):
        sudoku.read_csv(write(tmp_path, ["x,y"]))
    with pytest.raises(ValueError, match=":3: expected 4 columns, got 5"):  # a field too many: misaligned, not dropped
        sudoku.read_csv(write(tmp_path, [f"x,{q},{a},1", f"x,{q},{a},1,7"]))
    with pytest.raises(ValueError, match=":1: column 'question' is named twice"):
        sudoku.read_csv(write(tmp_path, [f"{q},{a},{q}"], header="question,answer,question"))


def test_repeated_puzzles_and_test_puzzles_in_training_are_counted(tmp_path):
    d = sudoku.generate(21, 6, workers=1)
    train = np.concatenate([d["question"], d["question"][:2]])
    assert sudoku.repeats(train, d["question"][4:]) == (2, 2)
    assert sudoku.repeats(d["question"][:3], d["question"][3:]) == (0, 0)
    sudoku.write_csv(str(tmp_path / "t.csv"), {k: np.concatenate([v, v[:1]]) for k, v in d.items()})
    script = os.path.join(os.path.dirname(__file__), "..", "sudoku.py")
    r = subprocess.run([sys.executable, script, "--check", str(tmp_path / "t.csv")], capture_output=True, text=True)
    assert "t.csv: 7 puzzles, 1 repeating an earlier question" in r.stdout, r.stderr


def test_a_damaged_cache_file_names_itself(tmp_path):
    path = str(tmp_path / "set.npz")
    np.savez_compressed(path, question=np.arange(4000).reshape(40, 100) % 10)
    good = open(path, "rb").read()
    damaged = [good[:len(good) // 2], good[:62] + bytes([good[62] ^ 0xFF]) + good[63:]]  # cut short; one byte of
    for bad in damaged:  # the deflate stream flipped (zlib's own error, not the zip module's)
        open(path, "wb").write(bad)
        with pytest.raises(ValueError, match="set.npz: damaged cache file .* delete it"):
            sudoku.cached(path, lambda: {})


# ----------------------------------------------------------------------------------------------
# batched solver, symmetry key, hard tier, tiered sets

TINY = dict(pool=6, kids=8, emit_rating=3)  # a hard-tier search small enough for a test


@pytest.fixture(scope="module")
def hard():
    return sudoku_hard.hard_island(5, 0, 2, **TINY)  # two rounds: about ten puzzles


def boards(n=40):
    """Search-tier, singles-tier and a few special boards: an empty board and a board with two
    solutions (both go through rate() itself in rate_many)."""
    q = [sudoku.make_puzzle(21, i)[0] for i in range(n)]
    two = sudoku.make_puzzle(21, 0)[0].copy()
    two[np.flatnonzero(two)[:3]] = 0
    return np.stack(q + [np.zeros(81, np.uint8), two])


def test_propagate_many_matches_propagate(hard, monkeypatch):
    seen, orig = [], sudoku_solver._propagate

    def record(c, done):
        before = list(c)
        ok = orig(c, done)
        seen.append((before, ok, list(c)))
        return ok
    monkeypatch.setattr(sudoku_solver, "_propagate", record)
    for q in list(boards(20)[:-2]) + list(hard["question"]):
        sudoku_solver.solve(q, limit=2)
    monkeypatch.setattr(sudoku_solver, "_propagate", orig)
    c = np.array([s[0] for s in seen], np.uint16)
    ok = np.array([s[1] for s in seen])
    x, ok_many = sudoku_solver.propagate_many(c)
    assert len(c) > 1000 and 0.1 < ok.mean() < 0.95  # both outcomes are well represented
    assert (ok_many == ok).all()
    assert (x[ok] == np.array([s[2] for s in seen], np.uint16)[ok]).all()


def test_rate_many_equals_rate(hard):
    b = np.concatenate([boards(), hard["question"]])
    tier, rating = sudoku_solver.rate_many(b, max_branches=300)
    ref = [sudoku_solver.rate(q) for q in b]
    assert tier.tolist() == [t for t, _ in ref] and rating.tolist() == [r for _, r in ref]
    assert (rating[-len(hard["question"]):] == hard["rating"]).all()
    assert {0, 1} <= set(tier.tolist()) and rating.max() >= 10
    tree = sudoku_solver.search_trees(sudoku_solver.cands_many(b[:40]), 2)
    assert tree["branches"].tolist() == [sudoku_solver.solve(q, 2)[1] for q in b[:40]]
    # 17-clue seeds: at the first branch point of the second, no cell has two candidates (ties among threes)
    seeds = np.stack([sudoku_solver.parse_puzzle(s) for s in sudoku_hard.HARD_SEEDS["train"][:6]])
    assert sudoku_solver.rate_many(seeds)[1].tolist() == [sudoku_solver.rate(q)[1] for q in seeds]


def test_symmetry_key_is_a_class_invariant(hard):
    q = np.concatenate([boards()[:-2], hard["question"]])
    a = np.stack([sudoku_solver.solve(x, 1)[0][0] for x in q])
    key = sudoku_solver.symmetry_key(q)
    assert len(set(key)) == len(q)  # different puzzles, different keys
    rng = np.random.default_rng(0)
    for _ in range(3):
        qa, _ = sudoku_solver.augment(q, a, rng)
        assert not (qa == q).all(1).any() and sudoku_solver.symmetry_key(qa) == key
    one_less = q.copy()
    one_less[np.arange(len(q)), (q > 0).argmax(1)] = 0  # drop the first clue
    assert all(k1 != k2 for k1, k2 in zip(sudoku_solver.symmetry_key(one_less), key))
    rows = [r for r in range(len(q)) if (q[r] == 1).sum() >= 2 and (q[r] == 2).sum() >= 2]  # (a lone 1 and a lone 2
    traded = q[rows].copy()  # trading cells is a renaming) a 1 and a 2 trade cells: same clue cells and counts
    for t in traded:
        i, j = np.flatnonzero(t == 1)[0], np.flatnonzero(t == 2)[0]
        t[[i, j]] = 2, 1
    assert len(rows) >= 20 and all(k1 != key[r] for k1, r in zip(sudoku_solver.symmetry_key(traded), rows))


def test_rate_samples_are_rate_in_renamed_symmetries(hard):
    # one search tree per grid symmetry serves every digit renaming: the rating of the renamed
    # puzzle is the tree visited in the renamed order
    q = np.concatenate([boards()[:-2], hard["question"]])
    rng = np.random.default_rng(3)
    tree = sudoku_solver.search_trees(sudoku_solver.cands_many(q), 2)
    ranks = np.stack([sudoku_solver.random_digit_orders(len(q), rng) for _ in range(3)])
    got = sudoku_solver.dfs_branches(tree, len(q), ranks)
    for r in range(3):
        renamed = np.take_along_axis(ranks[r], q.astype(np.int64), 1)
        assert got[:, r].tolist() == [sudoku_solver.rate(x)[1] for x in renamed]
    assert (got != got[:, :1]).any()  # the renaming changes some ratings
    assert (sudoku_solver.dfs_branches(tree, len(q)) == [sudoku_solver.rate(x)[1] for x in q]).all()
    s = sudoku_hard.rate_samples(q, rng, 2, 3)
    assert s.shape == (len(q), 6) and (s >= 0).all() and (s.max(1) > 0).any()
    two = q[:1].copy()
    two[0, np.flatnonzero(two[0])[:3]] = 0  # several solutions
    assert (sudoku_hard.rate_samples(two, rng) == -1).all()


def test_second_solution_screen_is_never_wrong_and_catches_most(hard):
    # the climb drops children the dives prove not unique before rating them: a unique child must
    # never be flagged, and most non-unique ones should be, or the screen saves nothing
    rng = np.random.default_rng(4)
    pq, pa = hard["question"], hard["answer"]
    parent = np.repeat(np.arange(len(pq)), 40)
    q = np.stack([sudoku_hard._propose(pq[j], pa[j], rng) for j in parent])
    flagged = sudoku_hard._second_solution(q, pa[parent], pq[parent], rng)
    unique = np.array([len(sudoku_solver.solve(x, limit=2)[0]) == 1 for x in q])
    assert not (flagged & unique).any()
    assert (~unique).sum() >= 20 and (flagged & ~unique).sum() >= 0.5 * (~unique).sum()
    added = pq.copy()  # only adding clues keeps a unique puzzle unique: nothing to dive from
    added[np.arange(len(pq)), (pq == 0).argmax(1)] = pa[np.arange(len(pq)), (pq == 0).argmax(1)]
    assert not sudoku_hard._second_solution(added, pa, pq, rng).any()


def test_moves_keep_the_answer_and_drop_a_clue_at_the_cap():
    rng = np.random.default_rng(0)
    _, a, _, _ = sudoku.make_puzzle(11, 0)
    q = a.copy()
    q[np.random.default_rng(1).permutation(81)[:81 - sudoku_hard.MAX_CLUES]] = 0  # MAX_CLUES clues
    moved = np.stack([sudoku_hard._propose(q, a, rng) for _ in range(200)])
    assert ((moved == 0) | (moved == a)).all()
    counts = (moved > 0).sum(1)
    assert counts.max() == sudoku_hard.MAX_CLUES and counts.min() == sudoku_hard.MAX_CLUES - 1


def test_a_beam_round_keeps_the_best_emits_only_unique_and_never_a_banned_class():
    q0 = sudoku_solver.parse_puzzle(sudoku_hard.HARD_SEEDS["train"][0])
    assert sudoku_hard._is_unique(boards(2)[-3:]).tolist() == [True, False, False]  # unique, empty, two solutions
    pool = sudoku_hard._seed_pool(q0, np.random.default_rng(0), 4)
    first = {}
    sudoku_hard._beam_round(pool, np.random.default_rng(1), first, 2, 0)
    assert first  # emit_rating 0: every unique child qualifies
    again = {}
    sudoku_hard._beam_round(pool, np.random.default_rng(1), again, 2, 0, banned=frozenset(first))
    assert not again
    best = dict(pool, total=np.array([100.0, 0, 0, 0]), count=np.ones(4))  # puzzle 0 scores far above any child
    kept = sudoku_hard._beam_round(best, np.random.default_rng(0), {}, 4, 1000)
    assert (kept["q"] == pool["q"][0]).all(1).any()


def test_hard_island_valid_unique_distinct_deterministic(hard):
    q, a = hard["question"], hard["answer"]
    assert sudoku_solver.is_legal(a).all() and ((q == 0) | (q == a)).all()
    for qi, ai in zip(q, a):
        sols, _ = sudoku_solver.solve(qi, limit=2)
        assert len(sols) == 1 and (sols[0] == ai).all()
    assert ((q > 0).sum(1) <= sudoku_hard.MAX_CLUES).all() and (hard["tier"] == 2).all()
    assert len(set(sudoku_solver.symmetry_key(q))) == len(q)
    assert hard["rating"].tolist() == [sudoku_solver.rate(x)[1] for x in q] and (hard["rating"] > 0).all()
    assert len(q) >= 6 and (np.diff(hard["round"]) >= 0).all() and set(hard["round"].tolist()) == {0, 1}
    again = sudoku_hard.hard_island(5, 0, 1, **TINY)  # same island, fewer rounds: the same first round
    first = hard["round"] == 0
    assert all((again[k] == hard[k][first]).all() for k in hard)
    other = sudoku_hard.hard_island(5, 1, 1, **TINY)
    assert not set(sudoku_solver.symmetry_key(other["question"])) & set(sudoku_solver.symmetry_key(q))


def test_island_goes_on_where_it_stopped(hard):
    # a short set runs its islands on, in worker processes: one round, a trip through pickle, one more
    # round must give exactly the puzzles of one two-round run
    island = sudoku_hard.Island(5, 0, **TINY).run(1)
    assert len(island.puzzles()["round"]) == (hard["round"] == 0).sum()
    island = pickle.loads(pickle.dumps(island)).run(2)
    d = island.puzzles()
    assert set(d) == set(hard) and all((d[k] == hard[k]).all() for k in hard)
    # a worker process sends its island back with the rounds it ran, so the next step goes on from there
    (back,), (part,) = sudoku_hard._run_islands([sudoku_hard.Island(5, 0, **TINY)], 1, 2, tqdm(disable=True))
    assert len(back.counts) == 1 and back.beam is not None and (part["question"] == hard["question"][hard["round"] == 0]).all()


@pytest.mark.skipif(not os.environ.get("SUDOKU_SLOW"), reason="minutes of search: set SUDOKU_SLOW=1")
def test_hard_tier_is_harder_than_the_search_tier():
    # one island with the real settings (a tiny search only tests the plumbing). Minimal puzzles that need search
    # rate median 2 (p90 5); the hard tier must be well clear of that in a fresh symmetry.
    hard = sudoku_hard.hard_island(0, 0, 12)  # a rich seed emits ~30 a round
    search = sudoku.generate(0, 200, search=True)
    assert np.median(hard["rating"]) >= 10 * np.median(search["rating"])
    assert hard["rating"].mean() >= 10 * search["rating"].mean()


def two_train_seeds(monkeypatch):
    seeds = dict(sudoku_hard.HARD_SEEDS, train=sudoku_hard.HARD_SEEDS["train"][:2])
    monkeypatch.setattr(sudoku_hard, "HARD_SEEDS", seeds)


def test_generate_hard_orders_by_round_then_island(monkeypatch):
    # with what an island's first rounds emit independent of `rounds` (tested above) this makes a set a prefix
    two_train_seeds(monkeypatch)
    monkeypatch.setattr(sudoku_hard, "HARD", TINY)
    monkeypatch.setattr(sudoku_hard, "PER_ROUND", 3.0)
    d = sudoku_hard.generate_hard(5, 15, workers=1)  # 15 / (2 * 3) -> 3 rounds
    a, b = sudoku_hard.hard_island(5, 0, 3), sudoku_hard.hard_island(5, 1, 3)
    both = {k: np.concatenate([a[k], b[k]]) for k in a}
    order = np.lexsort((np.r_[np.zeros(len(a["round"])), np.ones(len(b["round"]))], both["round"]))
    assert all((d[k] == both[k][order][:15]).all() for k in d) and "round" not in d
    # one round first, then on, with the islands travelling to worker processes and back: the same prefix
    monkeypatch.setattr(sudoku_hard, "PER_ROUND", 30.0)
    report = {}
    more = sudoku_hard.generate_hard(5, 40, workers=2, report=report)
    assert report["steps"][0] == 1 and len(report["steps"]) > 1 and report["kept"] >= 40
    assert all((more[k][:15] == d[k]).all() for k in d)


def test_generate_hard_drops_repeats_and_runs_more_rounds(monkeypatch):
    # islands can emit the same puzzle (two seeds of one grid): the set keeps the first of each symmetry
    # class in (round, island) order, runs every island on when it comes out short, and is a prefix
    q = np.stack([sudoku.make_puzzle(31, i)[0] for i in range(6)])
    rng = np.random.default_rng(0)
    made = {0: [[0, 1], [], [2], [5]], 1: [[1], [3], [4, 0], []]}  # island -> the puzzles of each round
    calls = []

    class Island:  # emits made[j] round by round
        def __init__(self, seed, j, family):
            self.j, self.rounds, self.emit = j, 0, {}

        def run(self, rounds, progress=None):
            calls.append((self.j, self.rounds, rounds))
            self.rounds = rounds
            return self

        def puzzles(self):
            idx = sum(made[self.j][:self.rounds], [])
            qa, _ = sudoku_solver.augment(q[idx], q[idx], rng)  # another symmetry: the same class
            r = np.repeat(np.arange(self.rounds), [len(x) for x in made[self.j][:self.rounds]])
            return {"question": qa, "answer": qa, "tier": np.full(len(idx), 2, np.int8), "rating": np.array(idx), "round": r}
    two_train_seeds(monkeypatch)
    monkeypatch.setattr(sudoku_hard, "Island", Island)
    monkeypatch.setattr(sudoku_hard, "PER_ROUND", 1.0)
    d = sudoku_hard.generate_hard(5, 4, workers=1)  # 2 rounds: 0 1 1 | 3 -> 3 kept, go on to 2 * 4 / 3 -> 3: ... | 2 4 0
    assert d["rating"].tolist() == [0, 1, 3, 2] and calls == [(0, 0, 2), (1, 0, 2), (0, 2, 3), (1, 2, 3)]
    calls.clear()
    small = sudoku_hard.generate_hard(5, 3, workers=1)
    assert small["rating"].tolist() == [0, 1, 3] and calls == [(0, 0, 2), (1, 0, 2)]


def test_seed_file_errors_name_the_line(tmp_path):
    good, test = sudoku_hard.HARD_SEEDS["train"][0], sudoku_hard.HARD_SEEDS["test"][0]
    path = tmp_path / "seeds.txt"
    cases = [(f"train {good}", ":3: expected `train|test PUZZLE SOURCE`"),
             (f"dev {good} x", ":3: expected `train|test PUZZLE SOURCE`"),
             (f"train {good[:80]} x", ":3: a puzzle is 81 characters"),
             (f"train {good} x", "needs at least one train and one test seed")]
    for text, msg in cases:
        path.write_text(f"# a comment\n\n{text}\n")
        with pytest.raises(ValueError) as e:
            sudoku_hard.read_seeds(str(path))
        assert msg in str(e.value) and str(path) in str(e.value)
    path.write_text(f"train {good} here  # comment\ntest {test} there\n")
    assert sudoku_hard.read_seeds(str(path)) == {"train": [good], "test": [test]}


def test_seed_families_are_unique_hard_and_apart():
    # the hard search starts next to these: each must be a unique puzzle, and the training and test
    # streams must never start next to the same or nearly the same clue cells
    cells = {}
    for family, seeds in sudoku_hard.HARD_SEEDS.items():
        qs = np.stack([sudoku_solver.parse_puzzle(s) for s in seeds])
        assert all(len(sudoku_solver.solve(q, limit=2)[0]) == 1 and sudoku_solver.rate(q)[0] == 1 for q in qs)
        cells[family] = (qs > 0).astype(int)
    assert (cells["train"] @ cells["test"].T).max() < 14  # shared clue cells of any train/test pair
    keys = sudoku_hard._seed_keys()
    assert len(keys) == sum(map(len, sudoku_hard.HARD_SEEDS.values()))
    emit, rng = {}, np.random.default_rng(0)
    q0 = sudoku_solver.parse_puzzle(sudoku_hard.HARD_SEEDS["train"][0])
    pool = sudoku_hard._seed_pool(q0, rng, 4)
    assert (pool["q"][0] == q0).all() and len(pool["q"]) == 4
    sudoku_hard._beam_round(dict(pool, q=np.stack([q0] * 4)), rng, emit, 2, 0, banned=keys)
    assert not set(emit) & keys  # a child equal to its seed is never emitted


@pytest.fixture
def tiny_hard(monkeypatch):
    two_train_seeds(monkeypatch)
    monkeypatch.setattr(sudoku_hard, "HARD", TINY)


def test_tiered_sets_mix_tiers_from_disjoint_streams(tiny_hard, tmp_path):
    train = sudoku.load_tiered("train", 8, 0, str(tmp_path), workers=1)
    test = sudoku.load_tiered("test", 8, 0, str(tmp_path), workers=1)
    for d, kind in ((train, "train"), (test, "test")):
        assert [int((d["tier"] == t).sum()) for t in range(3)] == list(sudoku.tier_counts(sudoku.MIX[kind], 8))
        assert (d["rating"][d["tier"] == 0] == 0).all() and (d["rating"][d["tier"] > 0] > 0).all()
    assert not set(sudoku_solver.symmetry_key(train["question"])) & set(sudoku_solver.symmetry_key(test["question"]))
    with pytest.raises(ValueError, match="shares"):
        sudoku.tier_counts((0.8, 0.8, 0), 10)


def test_tier_cache_is_named_reused_and_serves_smaller_sets(tiny_hard, tmp_path, monkeypatch):
    tmp_path = tmp_path / "data[1]"  # a glob pattern's characters in the name are only characters
    d = str(tmp_path)
    big = sudoku.load_tiered("train", 8, seed=0, data_dir=d, workers=1)
    counts = sudoku.tier_counts(sudoku.MIX["train"], 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"sudoku_tier{t}{'_train' if t == 2 else ''}_stream{10 + t}_n{c}"
        f"_v{sudoku_hard.HARD_VERSION if t == 2 else sudoku.PLAIN_VERSION}.npz"
        for t, c in enumerate(counts))

    (tmp_path / "sudoku_tier0_stream10_n99_v1.npz.123.tmp.npz").write_bytes(b"a killed run's leftover")

    def fail(*a, **k):
        raise AssertionError("regenerated a cached set")
    monkeypatch.setattr(sudoku, "generate_tier", fail)
    again = sudoku.load_tiered("train", 8, seed=0, data_dir=d)
    assert all((again[k] == big[k]).all() for k in big)
    small = sudoku.load_tiered("train", 6, seed=0, data_dir=d)  # a prefix of each tier's file
    for t, c in enumerate(sudoku.tier_counts(sudoku.MIX["train"], 6)):
        assert (small["question"][small["tier"] == t] == big["question"][big["tier"] == t][:c]).all()
    only_hard = sudoku.load_tiered("train", 3, seed=0, data_dir=d, shares=(0, 0, 1))  # another mix, same files
    assert (only_hard["question"] == big["question"][big["tier"] == 2][:3]).all()
    with pytest.raises(AssertionError, match="regenerated"):  # more than is cached, or another seed
        sudoku.load_tiered("train", 12, seed=0, data_dir=d)
    with pytest.raises(AssertionError, match="regenerated"):
        sudoku.load_tiered("train", 6, seed=1, data_dir=d)


def test_rating_and_tier_columns_round_trip(tmp_path):
    d = sudoku.generate(6, 6, workers=1)
    d["tier"][:2] = 2  # tiers need not follow from ratings: the file keeps both
    path = str(tmp_path / "r.csv")
    sudoku.write_csv(path, d)
    back = sudoku.read_csv(path)
    assert (back["rating"] == d["rating"]).all() and (back["tier"] == d["tier"]).all()
    assert (sudoku.add_tiers(back)["tier"] == d["tier"]).all()
    q, a = good_row(0)
    rows = [f"x,{q},{a},{r}" for r in (0, 5, sudoku.HARD_RATING)]
    got = sudoku.add_tiers(sudoku.read_csv(write(tmp_path, rows)))
    assert got["rating"].tolist() == [0, 5, sudoku.HARD_RATING] and got["tier"].tolist() == [0, 1, 2]
    for rating in ("hard", "-1", "\u00b2", str(2 ** 31)):  # "²" passes str.isdigit; 2^31 is past int32
        with pytest.raises(ValueError, match=":2: rating must be an integer in"):
            sudoku.read_csv(write(tmp_path, [f"x,{q},{a},{rating}"]))
    with pytest.raises(ValueError, match=":2: tier must be 0, 1 or 2"):
        sudoku.read_csv(write(tmp_path, [f"x,{q},{a},3"], header="source,question,answer,tier"))


def test_a_failed_write_keeps_the_old_csv(tmp_path, monkeypatch):
    d = sudoku.generate(6, 2, workers=1)
    path = str(tmp_path / "o.csv")
    sudoku.write_csv(path, d)
    before = open(path).read()

    def full_disk(q):
        raise OSError("No space left on device")
    monkeypatch.setattr(sudoku, "puzzle_text", full_disk)
    with pytest.raises(OSError):
        sudoku.write_csv(path, d)
    assert open(path).read() == before and os.listdir(tmp_path) == ["o.csv"]


def test_a_csv_with_tiers_and_no_ratings_is_summarised(tmp_path):
    rows = [",".join(good_row(i)) + f",{i % 3}" for i in range(6)]
    d = sudoku.add_tiers(sudoku.read_csv(write(tmp_path, rows, header="question,answer,tier")))
    assert d["tier"].tolist() == [0, 1, 2, 0, 1, 2] and "rating" not in d
    assert sudoku.summary(d).splitlines()[2].startswith("tier 2: 2 puzzles, clues ")


def test_a_limit_counts_valid_rows_when_invalid_ones_are_skipped(tmp_path, capsys):
    rows = [good_row(i) for i in range(6)]
    rows[1] = (change_first_clue(rows[1][0]), rows[1][1])  # a board that contradicts its answer: the board check
    d = sudoku.read_csv(write(tmp_path, [f"x,{q},{a},0" for q, a in rows]), skip_invalid=True, limit=4)
    assert [sudoku.puzzle_text(q) for q in d["question"]] == [q for q, _ in rows[:1] + rows[2:5]]
    assert "skipped 1 invalid rows (first at line 3)" in capsys.readouterr().out
    rows[1], rows[5] = rows[5], rows[1]  # now the bad row comes after the first four valid ones: it is not read
    d = sudoku.read_csv(write(tmp_path, [f"x,{q},{a},0" for q, a in rows]), skip_invalid=True, limit=4)
    assert len(d["question"]) == 4 and "skipped" not in capsys.readouterr().out


def test_tier_counts_add_up_and_a_zero_share_gets_none():
    for shares in ((0.5, 0.5, 0.0), (0.25, 0.25, 0.5), (0.0, 0.0, 1.0), (0.1, 0.3, 0.6)):
        for n in range(1, 300):
            c = sudoku.tier_counts(shares, n)
            assert sum(c) == n and all(abs(k - f * n) < 1 for k, f in zip(c, shares)), (shares, n, c)
            assert all(k == 0 for k, f in zip(c, shares) if f == 0), (shares, n, c)


def test_add_tiers_rates_a_csv_without_ratings(tmp_path):
    rows = [",".join(good_row(i)) for i in range(6)]
    got = sudoku.add_tiers(sudoku.read_csv(write(tmp_path, rows, header="question,answer")))
    ref = [sudoku.make_puzzle(11, i) for i in range(6)]
    assert got["rating"].tolist() == [r[3] for r in ref]
    assert got["tier"].tolist() == sudoku.tier_of_rating([r[3] for r in ref]).tolist()


def test_read_list_reads_public_lists_and_names_bad_lines(tmp_path):
    (q1, _), (q2, _) = good_row(0), good_row(1, blank="0")
    p = tmp_path / "list.txt"
    p.write_text(f"# From a forum\n#\n{q1}\n\n{q2}  ER=11.2\n")
    q, lines = sudoku.read_list(str(p))
    assert lines.tolist() == [3, 5]
    assert (q == np.stack([sudoku.make_puzzle(11, i)[0] for i in range(2)])).all()
    for bad in (q1[:-1], "x" + q1[1:]):
        p.write_text(f"{q1}\n{bad}\n")
        with pytest.raises(ValueError, match=f"{p}:2: a puzzle is 81 characters"):
            sudoku.read_list(str(p))
    p.write_text("# nothing here\n")
    with pytest.raises(ValueError, match="no puzzles"):
        sudoku.read_list(str(p))


def test_solve_many_equals_solve(hard):
    b = np.concatenate([boards(), hard["question"]])
    bad = b[0].reshape(9, 9).copy()
    r = next(r for r in range(9) if (bad[r] > 0).any() and (bad[r] == 0).any())
    bad[r, np.flatnonzero(bad[r] == 0)[0]] = bad[r][bad[r] > 0][0]  # a digit twice in a row: no solution
    b = np.concatenate([b, bad.reshape(1, 81)])
    answer, nsol, rating = sudoku_solver.solve_many(b, max_branches=300)
    for i, q in enumerate(b):
        sols, _ = sudoku_solver.solve(q, limit=2)
        assert nsol[i] == len(sols)
        if len(sols) == 1:
            assert (answer[i] == sols[0]).all() and rating[i] == sudoku_solver.rate(q)[1]
        else:
            assert not answer[i].any() and rating[i] == 0
    assert set(nsol.tolist()) == {0, 1, 2} and rating.max() >= 10
    q = sudoku.make_puzzle(21, 0)[0].copy()
    q[np.flatnonzero(q)[:4]] = 0  # five solutions on the search's last level: still "2 for two or more"
    assert sudoku_solver.solve_many(q[None])[1].tolist() == [2]


def test_public_split_keeps_near_copies_of_test_puzzles_out_of_training(tmp_path):
    """bench/sudoku_public.py end to end: list B holds a near copy (one more clue) of every puzzle of
    list A; the test set comes from A, and no training puzzle may be a near copy of a test puzzle."""
    a = [sudoku.make_puzzle(11, i) for i in range(20)]
    near = []
    for q, ans, _, _ in a:
        c = q.copy()
        c[np.flatnonzero(c == 0)[0]] = ans[np.flatnonzero(c == 0)[0]]
        near.append(c)
    text = lambda qs: "# a list\n" + "".join(sudoku_solver.puzzle_text(q) + "\n" for q in qs)
    (tmp_path / "A").write_text(text([x[0] for x in a]))
    (tmp_path / "B").write_text(text(near))
    run = lambda *extra: subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "..", "bench", "sudoku_public.py"),
                                         "A", "B", "--n-test", "6", "--test-from", "A", "--workers", "1", "--out-dir", "out", *extra],
                                        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    r = run()
    assert r.returncode == 0, r.stderr
    test, train = (sudoku.read_csv(str(tmp_path / "out" / f"{n}.csv")) for n in ("test", "train"))  # answers are checked here
    key = lambda qs: sudoku_solver.symmetry_key(np.asarray(qs))
    in_test = [i for i, k in enumerate(key([x[0] for x in a])) if k in set(key(test["question"]))]
    assert len(in_test) == 6 and len(train["question"]) == 40 - 12
    train_keys = set(key(train["question"]))
    assert not any(k in train_keys for k in key([near[i] for i in in_test]))
    assert all(k in train_keys for i, k in enumerate(key(near)) if i not in in_test)
    assert "already holds" in run().stderr  # no run overwrites earlier sets unless told to
    assert run("--force", "--near", "81").returncode == 0  # no near-copy filter now, yet test puzzles stay out
    train = sudoku.read_csv(str(tmp_path / "out" / "train.csv"))
    assert len(train["question"]) == 40 - 6 and not set(key(train["question"])) & set(key(test["question"]))
    two = a[0][0].copy()
    two[np.flatnonzero(two)[:3]] = 0
    with open(tmp_path / "B", "a") as f:
        f.write(sudoku_solver.puzzle_text(two) + "\n")
    r = run("--force")
    assert r.returncode != 0 and "B:22: several solutions" in r.stderr
    assert run("--force", "--skip-invalid").returncode == 0
    # the same list under two paths: per-list statistics for each path, the second one's empty (all copies)
    (tmp_path / "C").mkdir()
    (tmp_path / "C" / "A").write_text((tmp_path / "A").read_text())
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "..", "bench", "sudoku_public.py"), "A",
                        "B", "C/A", "--n-test", "6", "--test-from", "A", "--workers", "1", "--out-dir", "out", "--force",
                        "--skip-invalid"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    per = json.loads(r.stdout.splitlines()[-1], parse_constant=lambda c: pytest.fail(f"{c} in the JSON line"))["per_list"]
    assert r.returncode == 0 and [v["n"] for v in per.values()] == [20, 20, 0], per


def test_seed_families_are_transitive(monkeypatch):
    """bench/sudoku_seeds.py: seeds sharing >= 14 clue cells are one family, and so are their chains (A~B, B~C:
    one family even if A and C share fewer), so no two such seeds land on opposite sides."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("seeds", os.path.join(os.path.dirname(__file__), "..", "bench",
                                                                       "sudoku_seeds.py"))
    seeds = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "argv", ["sudoku_seeds.py", "list.txt", "--test-every", "2"])  # it reads its flags
    spec.loader.exec_module(seeds)
    puzzle = lambda cells: "".join("1" if i in cells else "." for i in range(81))
    a, b, c, d = puzzle(range(0, 17)), puzzle(range(3, 20)), puzzle(range(6, 23)), puzzle(range(40, 57))
    n, side = seeds.assign_sides([(9, a), (8, d), (7, c), (6, b)], {})  # b, seen last, joins a's and c's families
    assert n == 2 and side[a] == side[b] == side[c] != side[d]
