"""eval_code.py: the sandbox contains what --self-check promises; problem loading; the harness end to end."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import eval_code as ev
import sandbox

# the sandbox refuses to run without root (namespaces, a per-run uid): see tests/test_sandbox.py
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root (it refuses otherwise)")


@needs_root
def test_canonical_solutions_pass_and_bad_bodies_fail():
    probs = ev.load_problems()
    assert len(probs) == 164
    for p in probs[:12]:
        assert sandbox.run_sandboxed(p["prompt"] + p["canonical_solution"] + p["check"])["status"] == "passed", p["task_id"]
        assert sandbox.run_sandboxed(p["prompt"] + "    pass\n" + p["check"])["status"] == "failed", p["task_id"]


@needs_root
def test_infinite_loop_times_out():
    t = time.time()
    assert sandbox.run_sandboxed("while True:\n    pass\n", timeout=1.0)["status"] == "timed out"
    assert time.time() - t < 5


@needs_root
def test_fork_bomb_and_huge_allocation_are_contained():
    r = sandbox.run_sandboxed("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                         timeout=1.0)
    assert r["status"] == "timed out"
    assert sandbox.count_sandbox_processes(r["uid"]) == 0
    r = sandbox.run_sandboxed("x = bytearray(64 * 2**30)\n", timeout=5)
    assert r["status"] == "failed" and "MemoryError" in r["stderr"]


@needs_root
def test_no_network_and_no_signals_to_the_caller():
    r = sandbox.run_sandboxed("import socket\nsocket.socket().connect(('127.0.0.1', 22))\n")
    assert r["status"] == "failed" and "Network is unreachable" in r["stderr"]  # an empty network namespace
    assert sandbox.run_sandboxed(f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)\n")["status"] == "failed"


@needs_root
def test_cannot_touch_files_outside(tmp_path):
    victim = tmp_path / "repo_file.py"
    victim.write_text("keep")
    r = sandbox.run_sandboxed(f"open({str(victim)!r}, 'w').write('gone')\n")
    assert r["status"] == "failed" and "No such file" in r["stderr"]  # not in the sandbox's root
    assert sandbox.run_sandboxed(f"import os\nos.remove({str(victim)!r})\n")["status"] == "failed"
    assert victim.read_text() == "keep"


def test_problem_files_and_errors(tmp_path):
    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text(json.dumps({"task_id": 2, "text": "Write a function add(a, b).", "code": "def add(a, b):\n    return a + b",
                                "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]}) + "\n")
    (p,) = ev.load_problems(str(mbpp))
    assert p["entry_point"] == "add"
    if os.geteuid() == 0:  # the sandbox refuses to run without root
        assert sandbox.run_sandboxed(ev.check_program(p, p["canonical_solution"], base=False))["status"] == "passed"
        assert sandbox.run_sandboxed(ev.check_program(p, "def add(a, b):\n    return a - b", base=False))["status"] == "failed"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": 1, "prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: neither HumanEval"):
        ev.load_problems(str(bad))
    assert ev.extract_code("def f():\n    return 1\n```\nSome prose") == "def f():\n    return 1\n"


def test_a_chat_answer_that_restates_only_the_entry_point_can_pass(tmp_path):
    """HumanEval/38's shape: the tests call a helper that only the prompt defines. An answer that restates
    only the asked function passes; no answer (the prompt's stub) fails."""
    row = {"task_id": "h/38", "entry_point": "decode",
           "prompt": "def encode(s):\n    return s[::-1]\n\n\ndef decode(s):\n    \"\"\"Undo encode.\"\"\"\n",
           "test": "def check(candidate):\n    assert candidate(encode('abc')) == 'abc'\n"}
    f = tmp_path / "he.jsonl"
    f.write_text(json.dumps(row) + "\n")
    (p,) = ev.load_problems(str(f))
    run = lambda program: subprocess.run([sys.executable, "-c", program], capture_output=True).returncode
    assert run(ev.check_program(p, "def decode(s):\n    return s[::-1]\n", base=False)) == 0
    assert run(ev.check_program(p, "", base=False)) != 0
    assert run(ev.check_program(p, "    return s[::-1]\n", base=True)) == 0  # base: the body after the prompt


@pytest.mark.parametrize("row, msg", [
    (5, "expected a JSON object, got int"),
    ({"text": "t", "test_list": []}, "non-empty list of strings"),
    ({"text": "t", "test_list": "assert f(1) == 1"}, "non-empty list of strings"),
    ({"prompt": "def f():\n", "entry_point": None, "test": "x"}, "entry_point \\(a name\\)"),
    ({"task_id": [1], "prompt": "def f():\n", "entry_point": "f", "test": "x"}, "task_id must be"),
    ({"task_id": True, "prompt": "def f():\n", "entry_point": "f", "test": "x"}, "task_id must be a string or an int"),
    ({"prompt": "def f():\n    '<|im_end|>'\n", "entry_point": "f", "test": "x"}, "contains the ChatML marker <\\|im_end"),
    ({"text": "say <|endoftext|>", "test_list": ["assert f()"]}, "contains the ChatML marker <\\|endoftext"),
])
def test_a_malformed_problem_row_names_its_line(tmp_path, row, msg):
    f = tmp_path / "p.jsonl"
    f.write_text("\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: .*" + msg):
        ev.load_problems(str(f))


def test_bytes_that_are_not_utf8_and_a_damaged_gzip_name_their_file(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_bytes(b'{"task_id": 1, "prompt": "x", "entry_point": "f", "test": "x"}\n{"task_id": "\xff"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: not UTF-8"):
        ev.load_problems(str(f))
    g = tmp_path / "p.jsonl.gz"
    g.write_bytes(b'{"task_id": 1}\n')  # named .gz, not gzip
    with pytest.raises(ValueError, match=r"p.jsonl.gz: not a readable gzip file"):
        ev.load_problems(str(g))


def test_pass_at_1_says_how_many_of_its_prompts_differ(monkeypatch):
    """A problem file may repeat a prompt (under another task_id): pass@1 "of n" comes with the distinct count."""
    probs = ev.load_problems("synthetic")[:3]
    probs.append(dict(probs[0], task_id="again"))
    monkeypatch.setattr(ev, "complete", lambda model, tok, problems, **kw: (
        [{"task_id": p["task_id"], "code": "", "nfe": 1, "nfe_ref": 1, "new_tokens": 1, "latency_s": 0.0}
         for p in problems], 1.0))
    monkeypatch.setattr(ev, "check_all", lambda problems, rows, **kw: [
        r.update(passed=r["task_id"] != probs[1]["task_id"]) for r in rows])
    res, _ = ev.evaluate(None, None, probs, threshold=0.9, base=True)
    assert res["n"] == 4 and res["distinct"] == 3 and res["pass@1"] == 3 / 4  # over rows, not distinct prompts


def test_mbpp_setup_code_runs_before_the_tests():
    r = ev.problem_row({"text": "t", "code": "def f():\n    return K\n", "test_list": ["assert f() == 3"],
                        "test_setup_code": "K = 3"}, "w:1", 1)
    prog = ev.check_program(r, r["canonical_solution"], base=False)
    assert prog.index("K = 3") < prog.index("assert f() == 3")
    exec(prog, {})  # the setup defines K: the tests pass
    for test, name in [("assert set(similar_elements((3, 4), (5, 4))) == set((4,))", "similar_elements"),
                       ("assert math.isclose(volume_cone(5, 12), 314.159, rel_tol=0.001)", "volume_cone"),
                       ("assert f(1) == 1", "f"), ("assert not(g(2))", "g")]:  # not a builtin, module or keyword
        assert ev.problem_row({"text": "t", "test_list": [test]}, "w:1", 1)["entry_point"] == name


def test_a_repeated_task_id_is_refused(tmp_path):
    row = {"task_id": "a", "prompt": "def f():\n", "entry_point": "f", "test": "x"}
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: task_id 'a' again \(first on line 1\)"):
        ev.load_problems(str(f))


@needs_root
def test_harness_end_to_end_on_a_random_model(tmp_path):
    out = tmp_path / "samples.jsonl"
    s = ev.main(["--random-init", "tiny", "--limit", "2", "--max-new-tokens", "16", "--out", str(out)])
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 2 and s["n"] == 2 and s["pass@1"] == 0.0
    assert all(r["status"] == "failed" and r["nfe"] >= 1 and r["latency_s"] > 0 for r in rows)


def test_static_decoding_completes_exactly_as_the_dynamic_cache():
    """--static (the CUDA-graph path on a GPU) changes the speed, not one completion, NFE or stop."""
    model, tok = ev.random_model("tiny", "cpu", torch.float32, 0)
    probs = ev.load_problems("synthetic")[:3]  # prompts of different lengths: one left-padded batch
    kw = dict(base=True, system=None, batch=3, threshold=0.5, max_new_tokens=24)
    keys = ("completion", "nfe", "nfe_ref", "new_tokens")
    dyn, _ = ev.complete(model, tok, probs, **kw)
    sta, _ = ev.complete(model, tok, probs, static=True, **kw)
    assert [[r[k] for k in keys] for r in sta] == [[r[k] for k in keys] for r in dyn]
    assert len({len(r["completion"]) for r in dyn}) > 1 or len({r["nfe"] for r in dyn}) > 1  # rows differ


@needs_root
def test_check_all_runs_each_distinct_program_once():
    """A sweep shares `seen`: the second call with the same codes starts no sandbox; a wrong body fails."""
    probs = ev.load_problems("synthetic")[:3]
    rows = [{"task_id": p["task_id"], "code": c} for p, c in
            zip(probs, [probs[0]["canonical_solution"], "    return None\n", probs[2]["canonical_solution"]])]
    seen = {}
    ev.check_all(probs, rows, base=True, timeout=10, workers=2, seen=seen)
    assert [r["passed"] for r in rows] == [True, False, True] and len(seen) == 3
    calls = []
    real = sandbox.run_sandboxed
    sandbox.run_sandboxed = lambda *a, **k: calls.append(a) or real(*a, **k)
    try:
        again = [dict(r) for r in rows]
        ev.check_all(probs, again, base=True, timeout=10, workers=2, seen=seen)
    finally:
        sandbox.run_sandboxed = real
    assert not calls and [r["passed"] for r in again] == [True, False, True]


@needs_root
def test_synthetic_sweep_end_to_end(tmp_path):
    """--problems synthetic with a threshold sweep: one run per threshold, the figure, per-family counts."""
    out, fig = tmp_path / "samples.jsonl", tmp_path / "sweep.png"
    s = ev.main(["--random-init", "tiny", "--problems", "synthetic", "--limit", "3", "--max-new-tokens", "16",
                 "--sweep", "0.5,0.9", "--batch", "3", "--out", str(out), "--plot", str(fig)])
    assert [r["threshold"] for r in s["runs"]] == [0.5, 0.9] and s["n"] == 3 and fig.stat().st_size > 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and {r["threshold"] for r in rows} == {0.5, 0.9}
    assert all(r["family"] and r["nfe"] >= 1 for r in rows)


# ---------------------------------------------------------------------------------------------
# reading completions, counting passes (the sandbox replaced where it is not the point)

def test_completions_are_cut_at_the_first_fence_and_the_next_top_level_statement():
    assert ev.extract_code("x = 1\n```\nprose\n```python\ny = 2\n```\n") == "x = 1\n"
    body = "    return n + 1\n"
    for tail in ("def g():\n    pass\n", "assert f(1) == 3\n", "print(f(1))\n", "# done\n", "class A:\n    pass\n",
                 "if __name__ == '__main__':\n    f(1)\n"):
        assert ev.truncate_base(body + "\n" + tail) == body, tail


def fake_sandbox(monkeypatch, status_of):
    monkeypatch.setattr(ev, "run_sandboxed", lambda prog, timeout, **kw: {"status": status_of(prog), "stderr": ""})


def test_a_timeout_is_no_pass_and_another_completion_of_a_task_runs_again(monkeypatch):
    (p,) = ev.load_problems("synthetic")[:1]
    fake_sandbox(monkeypatch, lambda prog: "timed out")
    (r,) = ev.check_all([p], [{"task_id": p["task_id"], "code": "x"}], base=True, timeout=1, workers=1)
    assert r["status"] == "timed out" and r["passed"] is False
    fake_sandbox(monkeypatch, lambda prog: "passed" if "#MARK_OK" in prog else "failed")
    seen, row = {}, lambda code: [{"task_id": p["task_id"], "code": code}]
    assert ev.check_all([p], row("#MARK_OK"), base=True, timeout=1, workers=1, seen=seen)[0]["passed"]
    assert not ev.check_all([p], row("#wrong"), base=True, timeout=1, workers=1, seen=seen)[0]["passed"]


def test_nfe_is_the_measured_count_and_nfe_ref_the_references(monkeypatch):
    probs = ev.load_problems("synthetic")[:2]
    monkeypatch.setattr(ev, "complete", lambda model, tok, problems, **kw: (
        [{"task_id": p["task_id"], "code": "", "nfe": 6, "nfe_ref": 2, "new_tokens": 1, "latency_s": 0.0}
         for p in problems], 1.0))
    monkeypatch.setattr(ev, "check_all", lambda problems, rows, **kw: [r.update(passed=True) for r in rows])
    res, _ = ev.evaluate(None, None, probs, threshold=0.9, base=True)
    assert res["nfe"] == 6 and res["nfe_ref"] == 2


def test_families_group_compositions_and_count_passes_at_each_models_first_threshold(capsys):
    import code_tasks as ct
    trained = next(f"{a.name}+{b.name}" for a, b in ct.PAIRS if f"{a.name}+{b.name}" not in ct.TEST_ONLY)
    rows = [{"family": "add_k", "passed": True}, {"family": "add_k", "passed": False},
            {"family": sorted(ct.TEST_ONLY)[0], "passed": False}, {"family": trained, "passed": True},
            {"family": None, "passed": False}]
    assert ev.by_family(rows) == {"?": (1, 0), "add_k": (2, 1), "composition, test-only pair": (1, 0),
                                  "composition, trained pair": (1, 1)}
    run = lambda t, fams: {"model": "m", "threshold": t, "pass@1": 0.5, "nfe": 1.0, "new_tokens": 1.0,
                           "tokens_per_s": 1.0, "families": fams}
    ev.print_runs([run(0.5, {"a": (2, 1), "b": (2, 2)}), run(0.9, {"a": (2, 0), "b": (2, 0)})])
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("pass@1 by family (threshold 0.5)") for line in lines)
    assert [line.split()[1] for line in lines if line[:2] in ("a ", "b ")] == ["1/2", "2/2"]


def evaluate_calls(monkeypatch, tmp_path, *argv):
    """eval_code.main with evaluate() replaced: the keyword arguments each evaluate call got."""
    calls = []

    def evaluate(model, tok, problems, **kw):
        calls.append(kw)
        rows = [{"task_id": p["task_id"], "family": p.get("family"), "passed": False} for p in problems]
        return {"pass@1": 0.0, "n": len(rows), "nfe": 1.0, "new_tokens": 1.0, "tokens_per_s": 1.0,
                "threshold": kw["threshold"]}, rows
    monkeypatch.setattr(ev, "evaluate", evaluate)
    ev.main(["--random-init", "tiny", "--limit", "1", "--max-new-tokens", "8", "--out", str(tmp_path / "o.jsonl"),
             *argv])
    return calls


def test_synthetic_problems_complete_the_raw_prompt_and_no_relay_reaches_the_decoder(monkeypatch, tmp_path):
    (kw,) = evaluate_calls(monkeypatch, tmp_path, "--problems", "synthetic")
    assert kw["base"] is True and kw["use_relay"] is True
    (kw,) = evaluate_calls(monkeypatch, tmp_path / "b", "--problems", "synthetic", "--no-relay")
    assert kw["use_relay"] is False


def test_a_byte_order_mark_on_the_first_line_is_read(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"task_id": "a", "prompt": "def f():\n", "entry_point": "f",
                                                "test": "x"}).encode() + b"\n")
    assert [p["task_id"] for p in ev.load_problems(str(f))] == ["a"]
