"""Checkpoints. Those written before the one-stage-per-file layout (commit 01218a3) still load and
compute what the old code computed from them; the shipped checkpoints load on a CPU.
tests/fixtures/old_layout/ holds a tiny train_sudoku.py
checkpoint, a tiny Fast-dLLM v2 directory written by the old save_pretrained, and the old code's
outputs on fixed inputs; tests/fixtures/old_layout/make.py is the script that wrote them (run with
the old tree on sys.path)."""
import os

import pytest
import torch

from checkpoint import from_pretrained, load_model
from sampler import generate, sample_mdm

D = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "old_layout")


def old_outputs():
    return torch.load(os.path.join(D, "old_layout_outputs.pt"), weights_only=False)


def test_old_sudoku_checkpoint_loads_and_reproduces_the_old_outputs():
    old = old_outputs()
    model, ck = load_model(os.path.join(D, "sudoku_ckpt.pt"))
    assert ck["step"] == 2 and model.relay is not None  # relay.norm.* from the old key names
    with torch.no_grad():
        logits, h_out = model(old["question"], relay=old["relay"])
    torch.testing.assert_close(logits, old["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_out, old["h_out"], rtol=1e-5, atol=1e-5)
    tokens, st = sample_mdm(model, old["question"], tau=0.15)
    assert torch.equal(tokens, old["tokens"]) and torch.equal(st["nfe"], old["nfe"])


def test_old_fastdllm_directory_loads_and_decodes_the_same_tokens():
    old = old_outputs()
    model = from_pretrained(os.path.join(D, "fastdllm_tiny"), dtype=torch.float32)
    assert model.relay is not None and model.cfg.bd_size == 8
    with torch.no_grad():
        logits, h = model(old["llm_idx"])
    torch.testing.assert_close(logits, old["llm_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, old["llm_h"], rtol=1e-5, atol=1e-5)
    out, st = generate(model, old["prompts"], max_new_tokens=37, threshold=0.2, sub_block=4, stop_ids=[])
    assert out == old["generated"] and st["nfe"] == old["gen_nfe"]


@pytest.mark.parametrize("name", ["sudoku_relay_cpu.pt", "sudoku_relay_hard.pt"])
def test_the_shipped_sudoku_checkpoints_load_on_cpu_and_fill_boards(name):
    path = os.path.join(os.path.dirname(D), "..", "..", "checkpoints", name)
    model, ck = load_model(path)
    assert model.relay is not None and next(model.parameters()).dtype == torch.float32
    import sudoku
    q = torch.from_numpy(sudoku.generate(777, 4, workers=1)["question"]).long()
    out, st = sample_mdm(model, q)
    assert (out > 0).all() and (out[q > 0] == q[q > 0]).all() and (st["nfe"] >= 1).all()


@pytest.mark.parametrize("name", ["code_relay", "code_sft"])
def test_the_shipped_code_checkpoints_load_on_cpu_and_finish_held_out_problems(name):
    from code_tasks import make_problems
    from tokenizer import load_tokenizer
    path = os.path.join(os.path.dirname(D), "..", "..", "checkpoints", name)
    model, tok = from_pretrained(path, dtype=torch.float32), load_tokenizer(path)
    assert (model.relay is not None) == (name == "code_relay") and model.cfg.vocab_size >= tok.n_vocab
    assert model.cfg.mask_id == tok.mask_id and len(tok.merges) > 0  # the BPE it was trained with
    eot = tok.added["<|endoftext|>"]
    problems = make_problems("test", 4)
    out, st = generate(model.eval(), [tok.encode(p["prompt"]) for p in problems], max_new_tokens=96,
                       threshold=0.85, stop_ids=[eot])
    for ids, n in zip(out, st["new_tokens"]):  # each body ends with the stop token, well before the limit
        assert eot in ids and n < 96 and tok.decode(ids, skip_special=True).startswith("    ")  # an indented body


def test_checkpoint_cli_describes_both_formats_and_refuses_a_corrupt_file(tmp_path):
    import shutil
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = lambda path: subprocess.run([sys.executable, os.path.join(root, "checkpoint.py"), path], capture_output=True,
                                      text=True, timeout=120)
    r = run(os.path.join(D, "sudoku_ckpt.pt"))
    assert r.returncode == 0 and "sudoku model" in r.stdout and "step 2" in r.stdout and "relay True" in r.stdout
    r = run(os.path.join(root, "checkpoints", "code_relay"))
    assert r.returncode == 0 and '"bd_size"' in r.stdout and "relay True" in r.stdout, r.stderr
    bad = tmp_path / "bad.pt"
    shutil.copy(os.path.join(root, "checkpoints", "sudoku_relay_cpu.pt"), bad)
    with open(bad, "r+b") as f:  # flip bytes in the middle of the weights: the file still unpickles
        f.seek(os.path.getsize(bad) // 2)
        f.write(bytes(64))
    r = run(str(bad))
    assert r.returncode != 0 and "corrupt checkpoint" in r.stderr, r.stderr[-2000:]
