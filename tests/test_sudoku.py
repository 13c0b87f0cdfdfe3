import numpy as np
import pytest

import sudoku


def grid_ok(a):
    return sudoku.is_legal(a[None])[0]


def test_generator_unique_valid_deterministic():
    for i in range(6):
        q, a, tier, rating = sudoku.make_puzzle(7, i)
        assert grid_ok(a)
        assert ((q == 0) | (q == a)).all()
        sols, _ = sudoku.solve(q, limit=2)
        assert len(sols) == 1 and (sols[0] == a).all()  # unique solution
        q2, a2, _, _ = sudoku.make_puzzle(7, i)
        assert (q2 == q).all() and (a2 == a).all()
        assert tier in (0, 1) and (rating > 0) == (tier == 1)
    assert not (sudoku.make_puzzle(7, 0)[0] == sudoku.make_puzzle(8, 0)[0]).all()


def test_generate_filter_and_tiers():
    hard = sudoku.generate(3, 4, hard=True, workers=1)
    easy = sudoku.generate(3, 4, hard=False, workers=1)
    assert (hard["tier"] == 1).all() and (easy["tier"] == 0).all()
    for q in hard["question"]:  # singles alone get stuck: search is needed
        c = sudoku._cands(q)
        sudoku._propagate(c, [False] * 81)
        assert not all(sudoku.ONE[m] for m in c)
    for q, a in zip(easy["question"], easy["answer"]):
        c = sudoku._cands(q)
        assert sudoku._propagate(c, [False] * 81)
        assert [sudoku.DIGIT[m] for m in c] == a.tolist()


def test_solver_counts_multiple_solutions():
    q, a, _, _ = sudoku.make_puzzle(0, 0)
    empty = np.zeros(81, np.uint8)
    sols, _ = sudoku.solve(empty, limit=2)
    assert len(sols) == 2 and all(grid_ok(s) for s in sols)


def test_augment_preserves_puzzles():
    d = sudoku.generate(5, 3, workers=1)
    rng = np.random.default_rng(0)
    q, a = sudoku.augment(d["question"], d["answer"], rng)
    assert not (q == d["question"]).all()
    for qi, ai, q0 in zip(q, a, d["question"]):
        assert grid_ok(ai) and ((qi == 0) | (qi == ai)).all()
        assert (qi > 0).sum() == (q0 > 0).sum()
        sols, _ = sudoku.solve(qi, limit=2)
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


def test_csv_header_and_columns(tmp_path):
    q, a = good_row(0)
    with pytest.raises(ValueError, match="header"):
        sudoku.read_csv(write(tmp_path, [f"{q},{a}"], header="puzzle,solution"))
    with pytest.raises(ValueError, match=":2: expected 4 columns"):
        sudoku.read_csv(write(tmp_path, ["x,y"]))
