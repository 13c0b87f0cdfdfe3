import dataclasses
import json
import os
import runpy
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import relay
import sudoku
import sudoku_solver
import train_sudoku
from checkpoint import load_model
from model import Transformer
from relay import RolloutBuffer, rollout_loss
from relay import reveal_confidence_mass
from runs import Interrupted, release_lock, stop_reason
from sampler import sample_mdm

TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--n-ffn", "64", "--batch-size", "8",
        "--eval-size", "4", "--eval-batch", "4", "--no-sweep", "--eval-every", "1000", "--warmup", "2",
        "--mlm-frac", "0"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def run(tmp, data_dir, *extra):
    return train_sudoku.main([*TINY, "--out-dir", str(tmp), "--data-dir", data_dir, *extra])


@pytest.mark.parametrize("objective,warm,dropout", [("mlm", "0", "0"), ("relay", "0", "0"), ("relay", "0.5", "0"),
                                                    ("relay", "0", "0.3")])
def test_resume_reproduces_the_next_losses(tmp_path, data_dir, objective, warm, dropout):
    """warm=0.5: an MLM warm start whose switch to relay happens right at the resume; dropout (the paper preset
    has 0.1): its masks come from torch's global generator, which the checkpoint must restore."""
    common = ["--objective", objective, "--max-steps", "4", "--mlm-frac", warm, "--dropout", dropout]
    full = run(tmp_path / "a", data_dir, *common)
    run(tmp_path / "b", data_dir, *common, "--stop-after", "2")
    resumed = run(tmp_path / "b", data_dir, *common, "--resume")
    assert resumed["losses"] == full["losses"][2:]  # bit-for-bit on CPU
    assert resumed["steps"] == 4


def test_a_pause_saves_without_evaluating_and_ctrl_c_in_the_evaluation_keeps_the_run(tmp_path, data_dir,
                                                                                     monkeypatch, capsys):
    r = run(tmp_path, data_dir, "--max-steps", "4", "--stop-after", "2", "--eval-every", "1")
    assert r["steps"] == 2 and len(r["losses"]) == 2 and "exact_match" not in r and r["timed_steps"] == 2
    assert f"paused at step 2: {tmp_path / 'ckpt.pt'} saved" in capsys.readouterr().out
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)  # the pause's losses are in its checkpoint
    assert ck["trained"]["train_loss"] == pytest.approx(np.mean(r["losses"]))
    real = train_sudoku.evaluate

    def ctrl_c_in_the_final_evaluation(*a, desc="eval", **k):
        if desc.startswith("eval tau"):
            raise KeyboardInterrupt
        return real(*a, desc=desc, **k)
    monkeypatch.setattr(train_sudoku, "evaluate", ctrl_c_in_the_final_evaluation)
    with pytest.raises(KeyboardInterrupt, match=r"interrupted in the evaluation: .*ckpt.pt \(step 4\) is saved"):
        run(tmp_path, data_dir, "--max-steps", "4", "--resume")
    monkeypatch.undo()
    release_lock(str(tmp_path / ".lock"))
    # the training figures span the invocations: a resume with nothing left to train reports the run's
    train_sudoku.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--export", str(tmp_path / "x.pt")])
    evaluate = lambda ck: train_sudoku.main(["--eval-only", "--checkpoint", str(tmp_path / ck), "--eval-size", "4",
                                             "--no-sweep", "--out-dir", str(tmp_path), "--data-dir", data_dir])
    for e in (evaluate("ckpt.pt"), evaluate("x.pt"),  # an export keeps its run's figures
              run(tmp_path, data_dir, "--max-steps", "4", "--resume", "--eval-every", "1")):
        assert e["steps"] == e["timed_steps"] == 4 and e["train_loss"] is not None and "exact_match" in e
        assert e["train_seconds"] > r["train_seconds"] and [m["step"] for m in e["monitor"]] == [1, 2, 4]  # every 1, then at the end


def test_resume_keeps_the_training_set_when_max_steps_grows(tmp_path, data_dir):
    """The generated set's size follows --max-steps (100 steps x 8 rows -> 100 puzzles); a resume
    that raises --max-steps must still draw from the checkpoint's set."""
    mlm = ["--objective", "mlm"]  # fresh rows at every step (a young rollout buffer drops them)
    full = run(tmp_path / "a", data_dir, *mlm, "--max-steps", "100", "--stop-after", "5")
    run(tmp_path / "b", data_dir, *mlm, "--max-steps", "100", "--stop-after", "2")
    resumed = run(tmp_path / "b", data_dir, *mlm, "--max-steps", "200", "--stop-after", "3", "--resume")
    assert resumed["losses"] == full["losses"][2:5]


def test_a_longer_resumed_run_does_not_go_back_to_mlm(tmp_path, data_dir, capsys):
    """--max-steps x --mlm-frac places the switch; raising --max-steps on a resume past it keeps it where it was."""
    common = ["--objective", "relay", "--mlm-frac", "0.5"]
    run(tmp_path, data_dir, *common, "--max-steps", "4", "--stop-after", "3")  # mlm for steps 0-1, relay at step 2
    r = run(tmp_path, data_dir, *common, "--max-steps", "8", "--resume")  # 0.5 x 8 would put the switch at 4
    assert r["mlm_steps"] == 2 and r["steps"] == 8
    assert "MLM warm start: ended at step 2 of this run, which stays" in capsys.readouterr().out


def test_why_a_training_loop_stops_and_its_steady_rate():
    from argparse import Namespace
    a = Namespace(time_limit=1.0, stop_after=5, batch_size=8)
    assert stop_reason(a, False, 59, 0) is None and stop_reason(a, False, 61, 0) == "--time-limit"  # minutes
    assert stop_reason(a, True, 0, 0) == "Ctrl-C" and stop_reason(a, False, 0, 5) == "--stop-after"
    assert stop_reason(a, False, 61, 5) == "--time-limit"  # both due: the run is evaluated
    assert train_sudoku.steady_rate(a, (0.0, 5, 0.0), 5, 0.0) is None  # no step after the first read yet
    assert train_sudoku.steady_rate(a, None, 9, 0.0) is None
    # a resume with nothing left to train keeps the figures of the invocations before it
    before = {"train_seconds": 2.0, "timed_steps": 4, "train_loss": 1.5, "train_rows_per_s_steady": 5.0,
              "monitor": [{"step": 4}]}
    a.objective, a.mlm_steps = "relay", 0
    s = train_sudoku.training_summary(a, 4, [], 0.0, None, [], steps=0, before=before)
    assert (s["train_seconds"], s["timed_steps"], s["train_loss"], s["train_rows_per_s_steady"]) == (2.0, 4, 1.5, 5.0)
    assert s["train_rows_per_s"] == 8 * 4 / 2.0 and s["monitor"] == [{"step": 4}]
    # --eval-only of a checkpoint with no training figures: none, rather than 0 rows/s in 0 s
    s = train_sudoku.training_summary(a, 4, [], 0.0, None, [])
    assert s["train_rows_per_s"] is None and s["train_seconds"] is None and s["train_loss"] is None


def test_the_cpu_name_says_whether_it_has_bf16_hardware(tmp_path):
    """A benchmark's CPU label: a VM's masked model name, plus what decides bf16 speed (AMX: 2x)."""
    from runs import cpu_info, cpu_name
    core = "model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu sse2 avx2 {}\n\n"
    (tmp_path / "a").write_text(core.format("avx512_bf16 amx_bf16 amx_tile") * 2)
    (tmp_path / "b").write_text(core.format("avx512f"))
    assert cpu_name(str(tmp_path / "a")) == "Intel(R) Xeon(R) Processor (AMX, AVX512-BF16)"
    assert cpu_name(str(tmp_path / "b")) == "Intel(R) Xeon(R) Processor (no bf16 hardware)"
    assert cpu_name(str(tmp_path / "none")) == "unknown"
    assert cpu_info(str(tmp_path / "b")) == ("Intel(R) Xeon(R) Processor", [])


def test_threads_is_a_flag_of_the_invocation(tmp_path, data_dir, capsys):
    n = torch.get_num_threads()
    try:
        run(tmp_path, data_dir, "--max-steps", "2", "--stop-after", "1", "--threads", "1")
        assert torch.get_num_threads() == 1
        r = run(tmp_path, data_dir, "--max-steps", "2", "--resume", "--threads", "2")  # no note: not the run's config
        assert torch.get_num_threads() == 2 and r["steps"] == 2 and "other flags" not in capsys.readouterr().out
    finally:
        torch.set_num_threads(n)


def test_bf16_on_a_cpu_without_bf16_hardware_is_named(tmp_path, data_dir, monkeypatch, capsys):
    """--preset paper picks bf16, which such a CPU emulates (README: 150x slower than fp32): said at the start."""
    monkeypatch.setattr(train_sudoku, "cpu_info", lambda: ("Some CPU", []))
    run(tmp_path, data_dir, "--max-steps", "2", "--stop-after", "1", "--dtype", "bfloat16", "--device", "cpu")
    assert "NOTE: Some CPU has no AMX or AVX512-BF16: bf16 autocast is emulated here" in capsys.readouterr().out


def test_the_table_puts_the_batch_nfe_on_the_all_row_only(capsys):
    tier = {"n": 2, "exact_match": 0.5, "token_acc": 0.5, "legal_rate": 0.5, "nfe": 3.0}
    train_sudoku.print_table([{"tau": 0.15, "n": 4, "exact_match": 0.5, "token_acc": 0.5, "legal_rate": 0.5,
                               "nfe": 3.5, "nfe_batch": 7.0, "singles": tier, "search": tier}])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-3:] == ["NFE/puz", "NFE", "batch"] and lines[1].split()[-2:] == ["3.5", "7.0"]
    assert [ln.split()[1] for ln in lines[2:]] == ["singles", "search"] and all(ln.split()[-1] == "3.0" for ln in lines[2:])


def test_the_monitor_sees_every_tier():
    test = {"question": np.zeros((1000, 81), np.uint8), "tier": np.repeat(np.arange(3, dtype=np.int8), [250, 250, 500])}
    w = train_sudoku.monitor_set(test)
    assert np.bincount(w["tier"]).tolist() == [32, 32, 64]  # as the set: a quarter, a quarter, a half
    small = train_sudoku.monitor_set({k: v[:100] for k, v in test.items()})
    assert (small["tier"] == test["tier"][:100]).all()


def test_resume_with_another_config_names_the_mismatch(tmp_path, data_dir, monkeypatch, capsys):
    run(tmp_path, data_dir, "--max-steps", "1")
    capsys.readouterr()
    monkeypatch.setattr(train_sudoku, "training_data", lambda *a: pytest.fail("read the data before refusing"))
    with pytest.raises(ValueError, match=r"another configuration: {.*'n_embd': \(48, 32\)}"):
        train_sudoku.main([*TINY[:4], "--n-embd", "48", *TINY[6:], "--out-dir", str(tmp_path),
                           "--data-dir", data_dir, "--max-steps", "2", "--resume"])
    assert "resuming with other flags" not in capsys.readouterr().out  # refused first, not noted
    with pytest.raises(ValueError, match="mix"):
        run(tmp_path, data_dir, "--max-steps", "2", "--resume", "--mix", "1,0,0")
    for flags, name in ((["--ema", "0"], "ema"), (["--batch-size", "4"], "batch_size")):  # not a crash, not lost EMA
        with pytest.raises(ValueError, match=f"another configuration: .*'{name}'"):
            run(tmp_path, data_dir, "--max-steps", "2", "--resume", *flags)


def test_a_resume_with_other_hyperparameters_says_so(tmp_path, data_dir, capsys):
    run(tmp_path, data_dir, "--max-steps", "1")
    run(tmp_path, data_dir, "--max-steps", "2", "--resume", "--lr", "0.01", "--eval-size", "6")
    out = capsys.readouterr().out
    assert "resuming with other flags than the run so far: {'lr': (0.01, 0.002)} (ours, theirs)" in out
    with pytest.raises(ValueError, match=r"--max-steps 1: .*ckpt.pt is at step 2 already \(its run's --max-steps: 2\)"):
        run(tmp_path, data_dir, "--max-steps", "1", "--resume")  # it trained nothing and reported step 2 as done


def test_a_resume_on_a_training_csv_that_changed_is_refused(tmp_path, data_dir):
    d = sudoku.generate(21, 8, workers=1)
    sudoku.write_csv(str(tmp_path / "train.csv"), {k: v[:6] for k, v in d.items()})
    run(tmp_path, data_dir, "--max-steps", "1", "--data", str(tmp_path / "train.csv"))
    with pytest.raises(ValueError, match="another configuration: {'min_rating': \\(1, 0\\)}"):  # named, before the data
        run(tmp_path, data_dir, "--max-steps", "2", "--resume", "--data", str(tmp_path / "train.csv"), "--min-rating", "1")
    sudoku.write_csv(str(tmp_path / "train.csv"), d)
    with pytest.raises(ValueError, match="train.csv: 8 training puzzles now, 6 when .* was trained"):
        run(tmp_path, data_dir, "--max-steps", "2", "--resume", "--data", str(tmp_path / "train.csv"))


def test_ctrl_c_stops_at_a_step_with_a_checkpoint_that_resumes_exactly(tmp_path, data_dir, monkeypatch):
    full = run(tmp_path / "a", data_dir, "--max-steps", "5")
    step = train_sudoku.train_step

    def interrupted_at_step_2(args, i, *rest):
        if i == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as a Ctrl-C during step 2: it finishes, then the run stops
        return step(args, i, *rest)
    monkeypatch.setattr(train_sudoku, "train_step", interrupted_at_step_2)
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 3: .*ckpt.pt saved; the same command with --resume"):
        run(tmp_path / "b", data_dir, "--max-steps", "5")
    monkeypatch.setattr(train_sudoku, "train_step", step)
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    assert run(tmp_path / "b", data_dir, "--max-steps", "5", "--resume")["losses"] == full["losses"][3:]


def test_main_prints_json_last_and_eval_only(tmp_path, data_dir, capsys):
    r = run(tmp_path, data_dir, "--max-steps", "2", "--objective", "relay_sg")
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("objective", "exact_match", "token_acc", "nfe", "nfe_batch", "legal_rate", "steps", "seconds"):
        assert k in last
    assert last["objective"] == "relay_sg" and last["steps"] == 2
    e = train_sudoku.main(["--eval-only", "--checkpoint", str(tmp_path / "ckpt.pt"), "--eval-size", "4",
                           "--no-sweep", "--data-dir", data_dir, "--out-dir", str(tmp_path)])
    assert e["exact_match"] == r["exact_match"] and e["token_acc"] == r["token_acc"] and e["nfe"] == r["nfe"]
    assert e["objective"] == "relay_sg"  # labelled from the checkpoint, not the default --objective


def test_trains_from_csv_files(tmp_path, data_dir, capsys):
    d = sudoku.generate(21, 6, workers=1)
    sudoku.write_csv(str(tmp_path / "train.csv"), d)
    sudoku.write_csv(str(tmp_path / "test.csv"), {k: v[:4] for k, v in d.items()})
    r = run(tmp_path, data_dir, "--max-steps", "2", "--data", str(tmp_path / "train.csv"),
            "--test-data", str(tmp_path / "test.csv"))
    assert r["steps"] == 2 and r["n_test"] == 4 and r["test_data"] == str(tmp_path / "test.csv")
    assert r["dtype"] == "float32"  # the precision the numbers were measured in (bf16 gives others)
    assert sum(r[t]["n"] for t in ("singles", "search") if r.get(t)) == 4  # evaluated on the CSV's 4 puzzles
    assert "NOTE: 0 training puzzles repeat an earlier one; 4 test puzzles are training puzzles too" in \
        capsys.readouterr().out  # here on purpose, but a user hears of it
    # evaluating: a test file shorter than --eval-size says so; the curve is named after the checkpoint, so the
    # training run's own curve stays
    (tmp_path / "curve_relay.png").write_bytes(b"the run's curve")
    e = train_sudoku.main(["--eval-only", "--checkpoint", str(tmp_path / "ckpt.pt"), "--test-data",
                           str(tmp_path / "test.csv"), "--eval-size", "10", "--out-dir", str(tmp_path)])
    assert e["n_test"] == 4 and "test.csv: 4 test puzzles, fewer than --eval-size 10" in capsys.readouterr().out
    assert (tmp_path / "curve_relay.png").read_bytes() == b"the run's curve" and (tmp_path / "eval_ckpt.png").exists()


def test_min_rating_keeps_only_the_hard_rows_of_a_training_csv(tmp_path, capsys):
    d = sudoku.generate(23, 12, workers=1)  # ratings from the solver: singles rate 0, search rows more
    sudoku.write_csv(str(tmp_path / "train.csv"), d)
    cut = int(np.median(d["rating"])) + 1
    args = train_sudoku.get_args(["--data", str(tmp_path / "train.csv"), "--min-rating", str(cut)])
    train = train_sudoku.load_train(args)
    hard = d["rating"] >= cut
    assert 0 < hard.sum() < len(hard) and (train["question"] == d["question"][hard]).all()
    assert f"training on {hard.sum()} of {len(hard)} puzzles" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no row is rated"):
        train_sudoku.load_train(train_sudoku.get_args(["--data", str(tmp_path / "train.csv"), "--min-rating", "100000"]))
    (tmp_path / "plain.csv").write_text("question,answer\n" + "\n".join(
        sudoku_solver.puzzle_text(q) + "," + sudoku_solver.puzzle_text(a) for q, a in zip(d["question"], d["answer"])) + "\n")
    with pytest.raises(ValueError, match="plain.csv: --min-rating needs a rating column"):
        train_sudoku.load_train(train_sudoku.get_args(["--data", str(tmp_path / "plain.csv"), "--min-rating", "1"]))
    with pytest.raises(SystemExit):  # a filter of generated data is nonsense
        train_sudoku.get_args(["--min-rating", "10"])


def test_relay_training_can_fit_a_handful_of_puzzles(tiny_cfg):
    """An optimisation check, not an accuracy claim: a few hundred relay steps on 4 fixed puzzles
    (each slot replays its own) drive the rollout plumbing, the relay gradient and the optimizer far
    enough that the sampler reproduces those 4 training puzzles. Accuracy on unseen puzzles is what
    train_sudoku.py's test set measures."""
    torch.manual_seed(0)
    d = sudoku.generate(31, 4, workers=1)
    x0, q = torch.from_numpy(d["answer"]).long(), torch.from_numpy(d["question"]).long()
    cfg = dataclasses.replace(tiny_cfg, n_embd=64, n_head=4, n_kv_head=4, n_ffn=128, relay=True, n_pos=81, embed_std=1.0)
    m = Transformer(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    buf = RolloutBuffer(4, 81, 64, 0, "cpu")
    reveal = lambda conf, masked: reveal_confidence_mass(conf, masked, 0.15)
    for step in range(300):
        buf.refill(lambda n: (x0[buf.finished()], q[buf.finished()] > 0))  # each slot replays its puzzle
        loss = rollout_loss(m, buf, 2, "relay", reveal)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out, st = sample_mdm(m.eval(), q)
    assert (out == x0).all(1).sum() >= 3, (out == x0).float().mean()


def test_generated_sets_follow_the_mix_flags(tmp_path):
    args = train_sudoku.get_args(["--device", "cpu", "--max-steps", "2", "--data-dir", str(tmp_path),
                                  "--mix", "0.25,0.75,0", "--eval-size", "8", "--test-mix", "1,0,0"])
    train, test = train_sudoku.load_train(args), train_sudoku.load_test(args)
    assert np.bincount(train["tier"], minlength=3).tolist() == [16, 48, 0]  # a short run: the minimum, 64
    assert (test["tier"] == 0).all() and len(test["tier"]) == 8
    with pytest.raises(SystemExit):
        train_sudoku.get_args(["--mix", "0.5,0.6,0"])


def test_presets_are_defaults_that_help_shows_and_flags_override(capsys):
    cpu = train_sudoku.get_args(["--device", "cpu"])
    assert cpu.preset == "cpu" and cpu.max_steps == 1200 and cpu.mlm_steps == 600  # the default everywhere
    paper = train_sudoku.get_args(["--device", "cpu", "--preset", "paper", "--max-steps", "10"])
    assert paper.batch_size == 512 and paper.max_steps == 10 and paper.mlm_steps == 0  # a given flag wins
    with pytest.raises(SystemExit):
        train_sudoku.get_args(["--preset", "paper", "--help"])
    assert "(default: 300000)" in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")


@pytest.mark.parametrize("tamper", ["reshape", "dtype", "drop", "add"])
def test_the_digest_covers_shape_dtype_and_the_set_of_tensors(tmp_path, tamper):
    """The same bytes under another shape or dtype, or a tensor dropped or added, are a corrupt checkpoint."""
    from checkpoint import load_checkpoint, save_checkpoint
    p = str(tmp_path / "ck.pt")
    save_checkpoint({"model": {"w": torch.arange(6.0).reshape(2, 3), "n": torch.arange(4, dtype=torch.int32)},
                     "config": {}, "step": 0}, p)
    load_checkpoint(p)  # as saved: fine
    ck = torch.load(p, weights_only=False)
    m = ck["model"]
    if tamper == "reshape":
        m["w"] = m["w"].reshape(3, 2)
    elif tamper == "dtype":
        m["n"] = m["n"].view(torch.float32)
    elif tamper == "drop":
        del m["n"]
    else:
        m["extra"] = torch.ones(1)
    torch.save(ck, p)
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(p)


def test_a_corrupt_checkpoint_names_the_file(tmp_path):
    from checkpoint import load_model
    bad = tmp_path / "ckpt.pt"
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(1000)}, "config": {}, "step": 0}, good)
    for data in (b"not a checkpoint", good.read_bytes()[:-100]):  # (a copy cut short)
        bad.write_bytes(data)
        with pytest.raises(ValueError, match=f"{bad}: corrupt checkpoint, truncated or not one at all"):
            load_model(str(bad))
    with pytest.MonkeyPatch.context() as mp:  # a good file that this machine cannot load is not called corrupt
        mp.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA out of memory")))
        with pytest.raises(ValueError, match=f"{good}: cannot read the checkpoint \\(RuntimeError: CUDA out of"):
            load_model(str(good))
    torch.save({"model": {}}, bad)
    with pytest.raises(ValueError, match="not a training checkpoint"):
        load_model(str(bad))


@pytest.mark.parametrize("tie", [False, True])
def test_first_loss_at_the_paper_shape_is_order_one(tie):
    """A fresh paper-preset model predicts about uniformly (ln 9 = 2.2). A head tied to N(0, 1)
    embeddings gave ~350 (logits of size ~D); with the authors' std d^-0.5 it is O(1)."""
    args = train_sudoku.get_args(["--device", "cpu", "--preset", "paper"] + (["--tie-embeddings"] if tie else []))
    torch.manual_seed(0)
    m = train_sudoku.build_model(args).eval()
    d = sudoku.generate(41, 8, workers=1)
    x0, fixed = torch.from_numpy(d["answer"]).long(), torch.from_numpy(d["question"] > 0)
    from relay import mlm_loss
    loss = mlm_loss(m, x0, fixed, torch.Generator().manual_seed(0)).item()
    assert abs(loss - np.log(9)) < 1.5, loss


def test_evaluation_runs_without_dropout(tmp_path, data_dir):
    args = train_sudoku.get_args(["--device", "cpu", "--eval-size", "4", "--data-dir", data_dir, "--dropout", "0.5"])
    m = train_sudoku.build_model(args).train()
    test = train_sudoku.load_test(args)
    a = train_sudoku.evaluate(m, test, 0.15, 4, train_sudoku.nullcontext())
    assert not m.training
    m.train()
    b = train_sudoku.evaluate(m, test, 0.15, 4, train_sudoku.nullcontext())
    a.pop("puzzles_per_s"), b.pop("puzzles_per_s")
    assert a == b
    x = torch.from_numpy(test["question"][:4]).long()
    m.train()
    assert not torch.equal(m(x)[0], m(x)[0])  # with dropout on, two evaluations could differ


def test_one_training_step_moves_the_ema_towards_the_model(tmp_path, data_dir):
    args = train_sudoku.get_args([*TINY, "--device", "cpu", "--data-dir", data_dir, "--max-steps", "2",
                                  "--objective", "relay", "--ema", "0.9"])
    torch.manual_seed(0)
    model, ema, opt, buf, stream, gen = train_sudoku.training_objects(args, train_sudoku.load_train(args))
    before = [p.detach().clone() for p in ema.parameters()]
    step = 50
    train_sudoku.train_step(args, step, model, model, ema, opt, buf, stream, gen, train_sudoku.nullcontext())
    d = min(0.9, (2 + step) / (11 + step))  # the warm-up of the decay: 0.852 at step 50
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, d * b + (1 - d) * p.detach())


def test_the_training_threshold_is_drawn_at_every_rollout_step(tmp_path, data_dir, monkeypatch):
    """The authors draw tau ~ max(0, N(0.15, 0.1)) afresh at each of the K rollout steps, not once per
    optimizer step."""
    args = train_sudoku.get_args([*TINY, "--device", "cpu", "--data-dir", data_dir, "--max-steps", "2",
                                  "--objective", "relay", "--K", "3", "--train-tau", "0.5"])  # no clamp at 0
    model, ema, opt, buf, stream, gen = train_sudoku.training_objects(args, train_sudoku.load_train(args))
    taus, real = [], relay.reveal_confidence_mass
    monkeypatch.setattr(relay, "reveal_confidence_mass", lambda conf, masked, tau: taus.append(float(tau)) or
                        real(conf, masked, tau))
    train_sudoku.train_step(args, 0, model, model, ema, opt, buf, stream, gen, train_sudoku.nullcontext())
    assert len(taus) == 3 and len(set(taus)) == 3, taus


def test_solve_prints_the_grid_and_draws_the_steps(tmp_path, data_dir, capsys):
    run(tmp_path, data_dir, "--max-steps", "2")
    d = sudoku.generate(51, 1, workers=1)
    puzzle = sudoku_solver.puzzle_text(d["question"][0])
    r = train_sudoku.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--solve", puzzle, "--out-dir", str(tmp_path)])
    board = np.array([int(ch) for ch in r["solution"]], np.uint8)
    assert (board[d["question"][0] > 0] == d["question"][0][d["question"][0] > 0]).all() and (board > 0).all()
    assert r["legal"] == bool(sudoku_solver.is_legal(board[None])[0]) and r["nfe"] >= 1
    assert os.path.getsize(r["picture"]) > 10_000
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["solution"] == r["solution"]
    assert r["puzzle_solutions"] == 1 and r["correct"] == (board == d["answer"][0]).all()
    r = train_sudoku.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--solve", "12345678" + "." * 9 + "9" + "." * 63,
                           "--out-dir", str(tmp_path)])  # no digit fits the ninth cell
    assert r["puzzle_solutions"] == 0 and not r["correct"] and "NOTE: this puzzle has no solution" in \
        capsys.readouterr().out
    for bad, msg in [(puzzle[:80], "81 characters"), ("x" + puzzle[1:], "81 characters"),
                     ("11" + "." * 79, r"repeat a 1 in one row, column or box \(cells r1c1, r1c2\)"),
                     ("." * 9 + "5" + "." * 8 + "5" + "." * 62, r"repeat a 5 .* \(cells r2c1, r3c1\)")]:
        with pytest.raises(ValueError, match=msg):
            train_sudoku.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--solve", bad, "--out-dir", str(tmp_path)])


def test_export_writes_small_fp16_weights_that_evaluate_alike(tmp_path, data_dir):
    r = run(tmp_path, data_dir, "--max-steps", "2")
    out = tmp_path / "small.pt"
    train_sudoku.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--export", str(out)])
    assert os.path.getsize(out) < os.path.getsize(tmp_path / "ckpt.pt") / 3  # no optimizer, no buffer, fp16
    e = train_sudoku.main(["--eval-only", "--checkpoint", str(out), "--eval-size", "4", "--no-sweep",
                           "--data-dir", data_dir, "--out-dir", str(tmp_path)])
    assert e["steps"] == r["steps"] and abs(e["token_acc"] - r["token_acc"]) < 0.1
    # an existing file is replaced only with --overwrite, and the checkpoint read never
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(FileExistsError, match="small.pt exists: pass --overwrite"):
        train_sudoku.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--export", str(out)])
    for extra in ([], ["--overwrite"]):
        with pytest.raises(FileExistsError, match="ckpt.pt is the checkpoint it reads"):
            train_sudoku.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--export", str(tmp_path / "ckpt.pt"), *extra])
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    train_sudoku.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--export", str(out), "--overwrite"])
    # an export where a run's checkpoint belongs: --resume names what it is and what to do instead
    os.makedirs(tmp_path / "x")
    os.replace(out, tmp_path / "x" / "ckpt.pt")
    with pytest.raises(ValueError, match="holds weights only .* --init-from"):
        run(tmp_path / "x", data_dir, "--max-steps", "3", "--resume")


def test_init_fine_tunes_from_another_runs_weights(tmp_path, data_dir):
    run(tmp_path / "a", data_dir, "--max-steps", "3")
    src, _ = load_model(str(tmp_path / "a" / "ckpt.pt"))  # the EMA weights: what --init-from starts from
    args = train_sudoku.get_args([*TINY, "--init-from", str(tmp_path / "a" / "ckpt.pt")])
    model = train_sudoku.build_model(args)
    ema = Transformer(model.cfg)
    train_sudoku.init_from(args.init_from, model, ema)
    for m in (model, ema):
        assert all(torch.equal(v, src.state_dict()[k]) for k, v in m.state_dict().items())
    r = run(tmp_path / "b", data_dir, "--max-steps", "1", "--init-from", str(tmp_path / "a" / "ckpt.pt"))
    assert r["steps"] == 1  # a new run: its own step count, optimizer and buffer
    with pytest.raises(ValueError, match="n_embd"):
        train_sudoku.main([*TINY[:4], "--n-embd", "48", *TINY[6:], "--out-dir", str(tmp_path / "c"),
                           "--data-dir", data_dir, "--max-steps", "1", "--init-from", str(tmp_path / "a" / "ckpt.pt")])
    # a fine-tune that stopped resumes from its own checkpoint (the same command with --resume), not from A again
    full = run(tmp_path / "d", data_dir, "--max-steps", "2", "--init-from", str(tmp_path / "a" / "ckpt.pt"))
    r = run(tmp_path / "b", data_dir, "--max-steps", "2", "--resume", "--init-from", str(tmp_path / "a" / "ckpt.pt"))
    assert r["steps"] == 2 and r["losses"] == full["losses"][1:]


def test_compare_objectives_goes_on_past_an_objective_that_crashes(tmp_path, data_dir, monkeypatch, capsys):
    """One GPU call trains all four: a crash in one prints its traceback, the others still run and report,
    and the exit status says which failed."""
    real = train_sudoku.main

    def main(argv):
        if argv[argv.index("--objective") + 1] == "mlm":
            raise RuntimeError("an objective's crash")
        return real(argv)

    monkeypatch.setattr(train_sudoku, "main", main)
    out = tmp_path / "cmp"
    monkeypatch.setattr(sys, "argv", ["compare_objectives.py", "--objectives", "mlm", "relay", "--out-dir", str(out),
                                      *TINY, "--data-dir", data_dir, "--max-steps", "1"])
    with pytest.raises(SystemExit, match=r"failed: \['mlm'\]"):
        runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "bench", "compare_objectives.py"),
                       run_name="__main__")
    std = capsys.readouterr()
    assert "RuntimeError: an objective's crash" in std.err and "| relay |" in std.out and "| mlm |" not in std.out
    assert (out / "relay" / "result.json").exists() and not (out / "mlm" / "result.json").exists()


def compare_with_fake_training(monkeypatch, calls, *argv):
    """bench/compare_objectives.py with train_sudoku.main (and the figure) replaced: calls gets each run's flags."""
    def main(flags):
        calls.append(flags)
        return {"losses": [], "curve": [], "steps": 1, "exact_match": 0.5, "token_acc": 0.9, "nfe": 10.0,
                "nfe_batch": 10.0, "train_seconds": 1.0, "train_rows_per_s": 8.0, "train_rows_per_s_steady": None}
    monkeypatch.setattr(train_sudoku, "main", main)
    monkeypatch.setattr(train_sudoku, "plot_curves", lambda *a, **k: None)
    monkeypatch.setattr(sys, "argv", ["compare_objectives.py", *argv])
    runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "bench", "compare_objectives.py"), run_name="__main__")


def test_compare_objectives_prints_the_papers_numbers_and_trains_pure_objectives(monkeypatch, tmp_path, capsys):
    calls = []
    compare_with_fake_training(monkeypatch, calls, "--objectives", "relay", "relay_sg", "mlm", "rollout", "--out-dir",
                               str(tmp_path), "--max-steps", "1")
    out = capsys.readouterr().out
    for obj, paper in (("mlm", 20.3), ("rollout", 38.7), ("relay_sg", 58.4), ("relay", 62.7)):
        assert f"| {obj} | 50.0 | {paper} |" in out
    assert "| 8 (mean, warm-up in it) | 1 |" in out  # one step: no steady rate, the mean (so marked)
    assert len(calls) == 4 and all(f[f.index("--mlm-frac") + 1] == "0" for f in calls)  # no MLM warm start
    out = tmp_path / "relay"  # a checkpoint of other flags, stopped before its result, is not replaced unasked
    (out / "ckpt.pt").write_bytes(b"a run of 5 steps")
    (out / "result.json").unlink()
    (out / "started.json").write_text(json.dumps({"flags": ["--max-steps", "5", "--mlm-frac", "0", "--objective",
                                                            "relay", "--out-dir", str(out)]}))
    calls.clear()
    with pytest.raises(SystemExit, match="ckpt.pt holds a run of other flags"):
        compare_with_fake_training(monkeypatch, calls, "--objectives", "relay", "--out-dir", str(tmp_path),
                                   "--max-steps", "1")
    assert calls == [] and (out / "ckpt.pt").read_bytes() == b"a run of 5 steps"


def test_only_the_relay_objectives_keep_a_relay_state_in_the_buffer(tmp_path, data_dir):
    for obj, width in (("rollout", 0), ("mlm", 0), ("relay_sg", 32), ("relay", 32)):
        args = train_sudoku.get_args([*TINY, "--objective", obj, "--out-dir", str(tmp_path), "--data-dir", data_dir,
                                      "--max-steps", "8"])
        buf = train_sudoku.training_objects(args, train_sudoku.load_train(args))[3]
        assert buf.h.shape == (8, 81, width), obj


def test_compare_objectives_says_how_to_go_on_after_its_budget(tmp_path, monkeypatch):
    """The budget's Ctrl-C (timeout -s INT) ends an objective saved; the way on is this script again, not
    train_sudoku.py --resume (which it refuses as a passthrough flag)."""
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "compare_objectives.py")

    def interrupted(argv):
        raise Interrupted(f"interrupted at step 3: {tmp_path}/relay/ckpt.pt saved", "the same command with --resume "
                          "in place of --overwrite continues")
    monkeypatch.setattr(train_sudoku, "main", interrupted)
    monkeypatch.setattr(sys, "argv", [script, "--objectives", "relay", "--out-dir", str(tmp_path), *TINY])
    with pytest.raises(SystemExit, match=r"^relay: interrupted at step 3: .*ckpt.pt saved; the same "
                                         r"compare_objectives.py command continues it$"):
        runpy.run_path(script, run_name="__main__")


def test_compare_objectives_reuses_resumes_and_never_replaces_unasked(tmp_path, data_dir):
    """A saved result of the same flags is reused; one of other flags stops the script unless --replace;
    an objective stopped before its result resumes from its checkpoint."""
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "compare_objectives.py")
    out = str(tmp_path / "cmp")
    base = [*TINY, "--data-dir", data_dir, "--max-steps", "2"]
    compare = lambda *extra: subprocess.run([sys.executable, script, "--objectives", "mlm", "--out-dir", out, *base,
                                             *extra], capture_output=True, text=True)
    result = lambda: json.load(open(os.path.join(out, "mlm", "result.json")))
    assert compare().returncode == 0 and result()["steps"] == 2
    r = compare()
    assert r.returncode == 0 and "resumed" not in r.stdout and "| mlm |" in r.stdout  # reused, not trained
    r = compare("--max-steps=2", "--eval-size", "4")  # the same settings written otherwise: reused too
    assert r.returncode == 0 and "| mlm |" in r.stdout and "model:" not in r.stdout, r.stderr
    r = compare("--max-steps", "3")
    assert r.returncode == 1 and "holds a run of other flags ({'--max-steps': ('2', '3')}" in r.stderr
    assert result()["steps"] == 2  # untouched
    assert compare("--max-steps", "3", "--replace").returncode == 0 and result()["steps"] == 3
    # stopped after step 1 of 4 (as a time budget stops it), then the same command again: it resumes
    flags = [*base, "--max-steps", "4", "--objective", "relay", "--out-dir", os.path.join(out, "relay")]  # as it runs
    os.makedirs(os.path.join(out, "relay"))
    json.dump({"flags": flags}, open(os.path.join(out, "relay", "started.json"), "w"))
    train_sudoku.main([*flags, "--stop-after", "1"])
    release_lock(os.path.join(out, "relay", ".lock"))  # this process's run is over (its lock goes at exit)
    r = subprocess.run([sys.executable, script, "--objectives", "relay", "--out-dir", out, *base, "--max-steps", "4"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "at step 1" in r.stdout, r.stderr
    assert json.load(open(os.path.join(out, "relay", "result.json")))["steps"] == 4
