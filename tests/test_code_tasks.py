"""code_tasks.py: deterministic prefixes, disjoint splits, canonical solutions pass their tests, trivial programs
do not, and eval_code.load_problems reads the JSONL."""
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter

import pytest

import code_tasks as ct
import eval_code as ev
import sandbox


def key(p):
    return p["family"], json.dumps(p["params"], sort_keys=True)


def test_deterministic_and_prefix():
    a = ct.make_problems("train", 50, seed=3)
    assert a == ct.make_problems("train", 50, seed=3)
    assert ct.make_problems("train", 80, seed=3)[:50] == a
    assert ct.make_problems("train", 50, seed=4) != a  # the seed matters
    assert all(p["task_id"] == f"synthetic/train/{i}" for i, p in enumerate(a))


def test_held_out_prompts_are_distinct_and_still_a_prefix():
    """A repeated held-out prompt would count twice in pass@1: test draws that repeat one are redrawn."""
    test = ct.make_problems("test", 400, seed=0)
    assert len({p["prompt"] for p in test}) == 400
    assert ct.make_problems("test", 150, seed=0) == test[:150]
    assert [p["task_id"] for p in test] == [f"synthetic/test/{i}" for i in range(400)]
    first = [ct.make_problem("test", 0, i) for i in range(400)]  # the plain draws do repeat (so the test can fail)
    assert len({p["prompt"] for p in first}) < 400


def test_asking_for_more_distinct_held_out_prompts_than_there_are_is_a_named_error(monkeypatch):
    one = ct.make_problem("test", 0, 0)
    monkeypatch.setattr(ct, "draw_problem", lambda split, task_id, rng: one)  # a space of one prompt
    with pytest.raises(ValueError, match="the test split has no more distinct prompts: 1 found, 3 asked for"):
        ct.make_problems("test", 3)


def test_splits_disjoint_and_test_has_unseen_compositions():
    train, test = ct.make_problems("train", 2000, seed=0), ct.make_problems("test", 500, seed=0)
    assert not {key(p) for p in train} & {key(p) for p in test}
    # stronger: no parameter value of a family (or a composition's component) in test appears in train
    def values(ps):
        out = set()
        for p in ps:
            parts = [(p["family"].split("+")[0], p["params"]["first"]), (p["family"].split("+")[1],
                     p["params"]["then"])] if "+" in p["family"] else [(p["family"], p["params"])]
            out |= {(f, n, v) for f, d in parts for n, v in d.items()}
        return out
    assert not values(train) & values(test)
    train_fams, test_fams = {p["family"] for p in train}, {p["family"] for p in test}
    assert not train_fams & ct.TEST_ONLY  # test-only pairs never appear in training
    # some compositions only appear in test (a 2000-problem train sample misses some train pairs too, so
    # check against the held-out list rather than "not in this sample")
    assert len(test_fams & ct.TEST_ONLY) >= 20
    assert len(ct.FAMILIES) >= 30 and {f.name for f in ct.FAMILIES} <= train_fams  # every base family trains


def test_problem_shape():
    for p in ct.make_problems("test", 40, seed=1):
        assert set(p) == {"task_id", "family", "params", "prompt", "entry_point", "canonical_solution", "test",
                          "instruction"}
        assert p["prompt"].startswith(f"def {p['entry_point']}(") and p["instruction"] in p["prompt"]
        assert p["test"].startswith("def check(candidate):\n") and p["test"].count("    assert candidate(") >= 3


def sample_covering_every_family(n=60):
    """~60 problems: the first of each base family in a train set, topped up with compositions from test."""
    train, test = ct.make_problems("train", 400, seed=0), ct.make_problems("test", 100, seed=0)
    first = {}
    for p in train:
        first.setdefault(p["family"], p)
    picked = [first[f.name] for f in ct.FAMILIES]
    picked += [p for p in test if "+" in p["family"]][:n - len(picked)]
    return picked


def program(p, body):
    return p["prompt"] + body + "\n" + p["test"] + f"\ncheck({p['entry_point']})\n"


def test_canonical_solutions_pass_in_the_sandbox():
    probs = sample_covering_every_family()
    assert {f.name for f in ct.FAMILIES} <= {p["family"] for p in probs} and len(probs) >= 55
    for p in probs:
        try:
            status = sandbox.run_sandboxed(program(p, p["canonical_solution"]), timeout=5.0)["status"]
        except RuntimeError:  # no isolation here (not root): our own reference code, so a plain subprocess
            r = subprocess.run([sys.executable, "-c", program(p, p["canonical_solution"])], capture_output=True,
                               timeout=10)
            status = "passed" if r.returncode == 0 else "failed"
        assert status == "passed", p["task_id"]


class Timeout(Exception):
    pass


def score_in_process(problems, body_for, limit_s=1.0):
    """Fraction of problems whose test passes with body_for(p) as the body: exec in this process (our own
    trivial programs, not model output), each stopped after limit_s by SIGALRM."""
    def alarm(*_):
        raise Timeout
    old = signal.signal(signal.SIGALRM, alarm)
    passed = 0
    try:
        for p in problems:
            signal.setitimer(signal.ITIMER_REAL, limit_s)
            try:
                exec(program(p, body_for(p)), {})
                passed += 1
            except (Exception, Timeout):
                pass
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, old)
    return passed / len(problems)


def test_trivial_programs_score_at_most_10_percent():
    probs = ct.make_problems("test", 200, seed=0)
    arg = {p["task_id"]: p["prompt"].split("(", 1)[1].split(":", 1)[0] for p in probs}
    identity = score_in_process(probs, lambda p: f"    return {arg[p['task_id']]}\n")
    fam = Counter(p["family"] for p in probs).most_common(1)[0][0]
    common = next(p for p in probs if p["family"] == fam)["canonical_solution"]
    common_score = score_in_process(probs, lambda p: common)
    print(f"identity {identity:.1%}, most common family {fam} body {common_score:.1%}")
    assert identity <= 0.10 and common_score <= 0.10
    assert common_score > 0  # the harness can pass: that body solves at least its own problem


def test_write_jsonl_round_trips_through_load_problems(tmp_path):
    probs = ct.make_problems("test", 30, seed=2)
    path = str(tmp_path / "synthetic_test.jsonl")
    ct.write_jsonl(path, probs)
    loaded = ev.load_problems(path)
    assert [p["task_id"] for p in loaded] == [p["task_id"] for p in probs]
    assert all(q["prompt"] == p["prompt"] and q["check"].strip().endswith(f"check({p['entry_point']})")
               for p, q in zip(probs, loaded))


def test_cli_writes_file_and_prints_summary(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    ct.main(["--split", "test", "--n", "20", "--out", str(out)])
    text = capsys.readouterr().out
    assert "20 problems" in text and len(out.read_text().splitlines()) == 20


def test_bad_split_raises():
    with pytest.raises(ValueError, match="split"):
        ct.make_problems("valid", 3, seed=0)


def test_synthetic_rows_supervise_the_body_and_its_padding():
    """The training layout eval_code.py --base decodes: prompt as context; body, then <|endoftext|> to the
    end of its block, learned (visible padding would give away the body's length)."""
    from code_data import synthetic_rows
    from tokenizer import byte_tokenizer
    tok = byte_tokenizer()
    probs = ct.make_problems("train", 5)
    for p, (ids, sup) in zip(probs, synthetic_rows(probs, tok, 384, 32)):
        assert len(ids) % 32 == 0 and len(ids) <= 384
        n = len(tok.encode(p["prompt"]))
        assert tok.decode(ids[:n].tolist()) == p["prompt"] and not sup[:n].any()
        assert sup[n:].all()
        pad = len(ids) - n - len(tok.encode(p["canonical_solution"]))
        assert pad >= 1 and tok.decode(ids[sup].tolist()) == p["canonical_solution"] + "<|endoftext|>" * pad
    with pytest.raises(ValueError, match="synthetic/train/0: .* do not fit --seq-len 64"):
        synthetic_rows(probs, tok, 64, 32)


def test_a_caesar_shift_after_uppercasing_keeps_the_uppercase_letters():
    """The instruction shifts lowercase letters only; the reference must do what it says on every input
    a composition can hand it (upper_first_k makes uppercase ones)."""
    probs = [p for p in ct.make_problems("test", 3000) if p["family"] == "upper_first_k+caesar_k"]
    assert probs
    for p in probs:
        k = int(re.search(r"uppercase, then shift every lowercase letter of s forward by (\d+)", p["prompt"]).group(1))
        n = int(re.search(r"first (\d+) characters", p["prompt"]).group(1))
        ns = {}
        exec(p["prompt"] + p["canonical_solution"], ns)
        f = ns[p["entry_point"]]
        for s in ("abcxyz", "hello world", "", "zz"):
            u = s[:n].upper() + s[n:]
            assert f(s) == "".join(chr((ord(c) - 97 + k) % 26 + 97) if c.islower() else c for c in u)


def io_pairs(p):
    """The (input, expected output) pairs of a problem's asserts."""
    import ast
    return [(ast.literal_eval(x), ast.literal_eval(y))
            for x, y in re.findall(r"assert candidate\((.*)\) == (.*)$", p["test"], re.M)]


def test_no_problem_is_passed_by_the_identity_or_a_constant_and_lists_are_long_enough():
    probs = ct.make_problems("test", 300) + ct.make_problems("train", 300)
    for p in probs:
        pairs = io_pairs(p)
        assert len(pairs) == 5 and any(x != y for x, y in pairs), p["task_id"]  # the identity fails
        assert len({repr(y) for _, y in pairs}) > 1, p["task_id"]  # so does a constant
    lens = [len(x) for p in probs[:300] for x, _ in io_pairs(p) if isinstance(x, list)]
    assert max(lens) == 9 and sum(n >= 6 for n in lens) > len(lens) // 4  # long enough for "the first k" families


def test_the_test_only_pairs_are_the_same_in_every_process_and_counted():
    code = "import code_tasks; print(sorted(code_tasks.TEST_ONLY))"  # not hash(): PYTHONHASHSEED differs
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                           env={**os.environ, "PYTHONHASHSEED": s}).stdout.strip() for s in ("1", "2")}
    assert outs == {str(sorted(ct.TEST_ONLY))}
    probs = ct.make_problems("test", 200)
    n_comp, n_new = sum("+" in p["family"] for p in probs), sum(p["family"] in ct.TEST_ONLY for p in probs)
    assert 0 < n_new < n_comp
    assert f"{n_comp} compositions, {n_new} of them from the {len(ct.TEST_ONLY)} test-only pairs" in ct.summary(probs)
