"""train_code.py: the SFT masks and loss, the relay gradient through h, resume, chat JSONL
validation, and 2-process gloo DDP against 1 process with the same global batch."""
import contextlib
import json
import os
import signal
import shutil
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import code_data
import eval_code
import relay
import train_code
from checkpoint import save_checkpoint
from model import block_mask, shift_right
from relay import RolloutBuffer
from tokenizer import byte_tokenizer, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sft_masks_are_complementary_over_supervised_tokens():
    fixed = torch.zeros(3, 64, dtype=torch.bool)
    fixed[:, :5] = True  # a prompt
    fixed[1, 40:] = True  # padding
    masks = relay.sft_masks(fixed, torch.Generator().manual_seed(0), 16)
    a, b = masks[:3], masks[3:]
    assert not (a & b).any() and torch.equal(a | b, ~fixed)
    assert not (masks & fixed.repeat(2, 1)).any()
    # one noise level per block, not per row: test_method.test_sft_noise_level_varies_between_blocks_of_a_row


def test_sft_loss_is_ce_over_masked_supervised_tokens(tiny_llm):
    x0 = torch.randint(0, 60, (2, 32))
    fixed = torch.zeros(2, 32, dtype=torch.bool)
    fixed[:, :3] = True
    loss = relay.sft_loss(tiny_llm, x0, fixed, torch.Generator().manual_seed(1))
    masks = relay.sft_masks(fixed, torch.Generator().manual_seed(1), 8)
    x0d = torch.cat([x0, x0])
    inp = torch.cat([torch.where(masks, 63, x0d), x0d], 1)
    logits, _ = tiny_llm(inp, pos=torch.arange(32).repeat(2), attn_mask=block_mask(32, 8, doubled=True))
    want = F.cross_entropy(shift_right(logits[:, :32])[masks], x0d[masks])
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("objective,flows", [("relay", True), ("relay_sg", False)])
def test_relay_gradient_reaches_the_first_forward_only_for_relay(tiny_llm, objective, flows):
    torch.nn.init.normal_(tiny_llm.relay.norm.weight)  # zero-init would block the gradient into h
    tiny_llm.train()
    probe = {}

    def hook(mod, args, out):
        if "z" not in probe:  # the first forward: add a zero leaf to the relay state it hands on
            probe["z"] = torch.zeros_like(out[1], requires_grad=True)
            return out[0], out[1] + probe["z"]

    handle = tiny_llm.register_forward_hook(hook)
    buf = RolloutBuffer(2, 32, 32, 63, "cpu")
    buf.refill(lambda n: (torch.randint(0, 60, (n, 32)), torch.arange(32).expand(n, 32) < 4))
    reveal = partial(relay.reveal_threshold_blocks, threshold=0.85, bd_size=8)
    loss = relay.rollout_loss(tiny_llm, buf, 2, objective, reveal, doubled=True)
    loss.backward()
    handle.remove()
    g = probe["z"].grad
    assert (g is not None and g.abs().sum() > 0) == flows


def run_main(argv):
    return train_code.main(["--preset", "tiny", "--samples", "0", *argv])


def test_ctrl_c_stops_at_a_step_with_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch):
    """Stopped at step 2, where the run validates but would not checkpoint (every 4): it checkpoints there."""
    common = ["--objective", "relay", "--max-steps", "4", "--data-dir", str(tmp_path / "data"), "--eval-every", "1",
              "--ckpt-every", "4"]
    straight = run_main(common + ["--out-dir", str(tmp_path / "a")])
    step = train_code.train_step

    def interrupted_at_step_1(args, d, i, *rest):
        if i == 1:
            os.kill(os.getpid(), signal.SIGINT)  # as a Ctrl-C during step 1: it finishes, then the run stops
        return step(args, d, i, *rest)
    monkeypatch.setattr(train_code, "train_step", interrupted_at_step_1)
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 2: .*ckpt.pt saved; the same command with --resume"):
        run_main(common + ["--out-dir", str(tmp_path / "b")])
    monkeypatch.setattr(train_code, "train_step", step)
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 2
    assert not (tmp_path / "b" / "hf").exists()  # stopped: no export of a half-trained model
    assert run_main(common + ["--out-dir", str(tmp_path / "b"), "--resume"])["losses"] == straight["losses"][2:]


@pytest.mark.parametrize("objective,warm", [("sft", 0), ("relay", 0), ("relay", 0.5)])
def test_resume_reproduces_the_next_losses(tmp_path, objective, warm):
    """warm=0.5: two sft warm-up steps, then relay; the switch happens right at the resume."""
    common = ["--objective", objective, "--max-steps", "4", "--data-dir", str(tmp_path / "data"),
              "--sft-frac", str(warm)]
    straight = run_main(common + ["--out-dir", str(tmp_path / "a")])
    paused = run_main(common + ["--out-dir", str(tmp_path / "b"), "--stop-after", "2"])
    assert paused["steps"] == 2 and "hf_dir" not in paused and not (tmp_path / "b" / "hf").exists()  # a pause
    resumed = run_main(common + ["--out-dir", str(tmp_path / "b"), "--resume"])
    assert resumed["losses"] == straight["losses"][2:]
    # the training figures span both invocations (the pause validated where it stopped)
    assert resumed["timed_steps"] == straight["timed_steps"] == 4 and resumed["train_seconds"] > paused["train_seconds"]
    assert resumed["val_curve"] == paused["val_curve"] + [v for v in straight["val_curve"] if v["step"] > 2]
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="another setup"):
        run_main(common[:1] + ["sft" if objective == "relay" else "relay"] + common[2:] +
                 ["--out-dir", str(tmp_path / "b"), "--resume"])
    # another split of the batch deals other rows and noise: not a continuation of this run
    with pytest.raises(ValueError, match=r"flags \{'micro_batch': \(4, 2\)\}"):
        run_main(common + ["--out-dir", str(tmp_path / "b"), "--resume", "--max-steps", "6", "--micro-batch", "4"])


def test_a_longer_resumed_run_does_not_go_back_to_its_warm_start(tmp_path, capsys):
    """--max-steps x --sft-frac places the switch; raising --max-steps on a resume that stopped right at it keeps
    it where it was."""
    common = ["--objective", "relay", "--sft-frac", "0.5", "--data-dir", str(tmp_path / "data"),
              "--out-dir", str(tmp_path / "r")]
    run_main(common + ["--max-steps", "4", "--stop-after", "2"])  # sft for steps 0-1; step 2 would be relay
    r = run_main(common + ["--max-steps", "8", "--resume"])  # 0.5 x 8 would put the switch at 4
    assert r["sft_steps"] == 2 and r["steps"] == 8
    assert "step 2: sft warm start done, switching to relay" in capsys.readouterr().out  # at step 2, not 3


def test_rows_come_in_epochs_dealt_to_the_chunks():
    """Every row once an epoch over all chunks of the batch (as a distributed sampler deals them),
    with or without length buckets, in fetches of any size; the next epoch is another order; a saved
    data position resumes the same rows; length buckets make a micro-batch's rows about equally long
    but do not order the micro-batches by length."""
    import numpy as np
    data = [(np.array([i + 1] + [200] * (i * 7 % 13), dtype=np.int32), np.ones(1 + i * 7 % 13, dtype=bool))
            for i in range(2000)]
    spread, trend = {}, {}
    for bucket in (0, 400):
        streams = [code_data.Rows(data, 16, 0, c, 0, "cpu", bucket, chunks=2, group=5) for c in range(2)]
        epochs, widths, means = [], [], []
        for _ in range(2):
            seen = []
            for s in streams:
                for n in (5,) * 196 + (3, 4, 6, 7):  # 1000 rows: this chunk's share of one epoch
                    x0, fixed = s(n)
                    seen += x0[:, 0].tolist()
                    lengths = ((~fixed).sum(1) + 1).float()
                    if n == 5:
                        widths.append(float(lengths.max() - lengths.min()))
                        means.append(float(lengths.mean()))
            assert sorted(seen) == list(range(1, 2001))
            epochs.append(seen)
        assert epochs[0] != epochs[1]
        spread[bucket] = np.mean(widths)
        trend[bucket] = abs(np.corrcoef(means[:-1], means[1:])[0, 1])  # neighbouring micro-batches' lengths
        a, b = (code_data.Rows(data, 16, 0, 1, 0, "cpu", bucket, chunks=2, group=5) for _ in range(2))
        a(1030)  # into the second epoch
        b.load_state(a.state())
        assert torch.equal(a(9)[0], b(9)[0])
    assert spread[400] < spread[0] / 2 and trend[400] < 0.3
    with pytest.raises(ValueError, match="7 rows cannot be dealt to 2 chunks of the batch in groups of 4"):
        code_data.Rows(data[:7], 16, 0, 0, 0, "cpu", chunks=2, group=4)


def test_chunks_stay_in_one_epoch_when_the_rows_do_not_divide_evenly():
    """10 rows, 4 chunks of groups of 2: padded to 16 (the first 6 rows again), every chunk's share is 4
    rows, so after 2 fetches of 2 every chunk is in epoch 1 and each row was drawn once or twice; a data
    position saved on other data (a file that changed size) is refused rather than read past the end."""
    import numpy as np
    data = [(np.array([i + 1], dtype=np.int32), np.ones(1, dtype=bool)) for i in range(10)]
    streams = [code_data.Rows(data, 4, 0, c, 0, "cpu", chunks=4, group=2) for c in range(4)]
    for rnd in range(3):
        seen = [v for s in streams for _ in range(2) for v in s(2)[0][:, 0].tolist()]
        assert sorted(set(seen)) == list(range(1, 11)) and len(seen) == 16  # every row, 6 of them twice
        assert [s.epoch for s in streams] == [rnd + 1] * 4
    smaller = code_data.Rows(data[:8], 4, 0, 0, 0, "cpu", chunks=4, group=2)
    with pytest.raises(ValueError, match="data position is in 10 rows, the data now has 8"):
        smaller.load_state(streams[0].state())


def test_chat_jsonl_validation(tmp_path, capsys):
    tok = byte_tokenizer()
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    cases = [("{not json", "2: not valid JSON"),
             (json.dumps({"messages": []}), "2: expected an object"),
             (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "2: message 0 needs a role"),
             (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), "2: no assistant"),
             ('{"messages": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "x"}]}',
              "2: message 0 \\(user\\) holds a lone surrogate")]
    for bad, msg in cases:
        p = tmp_path / "bad.jsonl"
        p.write_text(json.dumps(good) + "\n" + bad + "\n")
        with pytest.raises(ValueError, match=f"{p}:{msg}"):
            code_data.read_chat_jsonl(str(p), tok, 512, 16)
    long = {"messages": [{"role": "user", "content": "x" * 600}, {"role": "assistant", "content": "y"}]}
    p = tmp_path / "ok.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [good, long, good]) + "\n")
    rows, numbers = code_data.read_chat_jsonl(str(p), tok, 512, 16)
    assert len(rows) == 2 and "dropped 1 rows longer than --seq-len 512 tokens (lines [2])" in capsys.readouterr().out
    assert numbers == [1, 3]  # their places in the file: a held-out choice by them ignores what was dropped
    ids, sup = rows[0]
    assert len(ids) % 16 == 0 and tok.decode(ids[sup].tolist()) == "hello<|im_end|>"


def test_a_resume_refuses_other_rows_of_the_same_count_and_other_optimizer_flags(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(12)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--data", str(data), "--val-every-n", "4", "--max-steps", "3", "--out-dir", str(tmp_path / "o")]
    run_main(common + ["--stop-after", "2"])
    for extra, name in ((["--beta2", "0.5"], "beta2"), (["--weight-decay", "0.2"], "weight_decay")):
        with pytest.raises(ValueError, match=f"another setup: .*'{name}'"):  # the optimizer's state would win
            run_main(common + ["--resume", *extra])
    with pytest.raises(ValueError, match="--max-steps 1: .* is at step 2 already"):
        run_main(common + ["--resume", "--max-steps", "1"])
    with pytest.MonkeyPatch.context() as mp:  # another model is refused before it is built or the rows are read
        for name in ("build_model", "load_data"):
            mp.setattr(train_code, name, lambda *a, name=name: pytest.fail(f"{name} before the refusal"))
        with pytest.raises(ValueError, match=r"another setup: config \{'n_embd': \(64, 32\)\}"):
            run_main(common + ["--resume", "--n-embd", "64"])
    # a checkpoint from before held-out rows were chosen by their place in the file (no digest in its args)
    ck = torch.load(tmp_path / "o" / "ckpt.pt", weights_only=False)
    old = {**ck, "args": {k: v for k, v in ck["args"].items() if k != "data_digest"}}
    save_checkpoint({k: v for k, v in old.items() if k != "sha256"}, str(tmp_path / "o" / "ckpt.pt"))
    with pytest.raises(ValueError, match="written before held-out chat rows were chosen by their place"):
        run_main(common + ["--resume"])
    save_checkpoint({k: v for k, v in ck.items() if k != "sha256"}, str(tmp_path / "o" / "ckpt.pt"))
    rows[0]["messages"][1]["content"] = "another answer"  # same file, same count: another training row
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="another setup: .*'data_digest'"):
        run_main(common + ["--resume"])


def test_a_resume_goes_by_the_rows_not_the_path_and_says_what_else_changed(tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(12)]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--val-every-n", "4", "--max-steps", "3", "--out-dir", str(tmp_path / "o")]
    run_main(common + ["--data", str(tmp_path / "a" / "chat.jsonl"), "--stop-after", "1"])
    shutil.move(tmp_path / "a" / "chat.jsonl", tmp_path / "moved.jsonl")  # the same rows elsewhere
    r = run_main(common + ["--data", str(tmp_path / "moved.jsonl"), "--resume", "--stop-after", "1", "--lr", "1e-3",
                           "--max-steps", "4"])
    out = capsys.readouterr().out
    assert r["steps"] == 2 and "resuming with other flags than the run so far: {'lr': (0.001, " in out
    assert "lr schedule: 4 steps now, 3 so far" in out and "data" not in out.split("other flags")[1].split("\n")[0]
    # a checkpoint of one unsharded process cannot give its optimizer state to a sharded run
    args = train_code.get_args(["--preset", "tiny", *common, "--data", str(tmp_path / "moved.jsonl"), "--resume",
                                "--max-steps", "4"])
    args.fsdp, d = True, train_code.Dist(False, 0, 1, "cpu")  # as under torchrun
    train_code.my_chunks(args, d)
    tok = train_code.get_tokenizer(args)
    args.tokenizer_digest = tok.digest()
    with pytest.raises(ValueError, match="saved without --fsdp: .* resume without --fsdp"):
        train_code.check_resume(args, d, str(tmp_path / "o" / "ckpt.pt"), train_code.model_config(args, tok))


def test_a_resume_with_another_objective_is_refused_and_one_at_its_end_validates_once(tmp_path):
    common = ["--max-steps", "4", "--out-dir", str(tmp_path / "o"), "--data-dir", str(tmp_path / "data"),
              "--sft-frac", "0.25"]
    paused = run_main(common + ["--stop-after", "2"])
    with pytest.raises(ValueError, match=r"another setup: flags \{'objective': \('relay_sg', 'relay'\)\}"):
        run_main(common + ["--resume", "--objective", "relay_sg"])  # the same model: only the flag tells
    again = run_main(common + ["--resume", "--max-steps", "2"])  # nothing left to train: no second validation
    assert again["val_curve"] == paused["val_curve"] and again["timed_steps"] == 2


def test_the_validation_set_does_not_depend_on_eval_problems_and_seq_len_may_reach_the_limit(tmp_path):
    d = train_code.Dist(False, 0, 1, "cpu")
    vals = []
    for n in ("2", "300"):
        args = train_code.get_args(["--preset", "tiny", "--eval-problems", n, "--train-problems", "64"])
        tok = train_code.get_tokenizer(args)
        vals.append(train_code.load_data(args, tok, d)[1])
    assert len(vals[0]) == len(vals[1]) == train_code.VAL_PROBLEMS
    assert all((a[0] == b[0]).all() for a, b in zip(*vals))
    run_main(["--max-steps", "1", "--objective", "sft", "--out-dir", str(tmp_path / "o"), "--data-dir", str(tmp_path)])
    cfg = json.loads((tmp_path / "o" / "hf" / "config.json").read_text())
    (tmp_path / "o" / "hf" / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 384}))
    args = train_code.get_args(["--init-from", str(tmp_path / "o" / "hf"), "--seq-len", "384", "--objective", "sft"])
    assert train_code.model_config(args, load_tokenizer(str(tmp_path / "o" / "hf"))).bd_size == 16  # at the limit: fine


def test_only_the_relay_objectives_keep_a_relay_state_in_their_buffers():
    d = train_code.Dist(False, 0, 1, "cpu")
    for obj, width in (("rollout", 0), ("relay", 32)):
        args = train_code.get_args(["--preset", "tiny", "--objective", obj, "--samples", "0", "--train-problems", "64"])
        chunks, tok = train_code.my_chunks(args, d), train_code.get_tokenizer(args)
        cfg = train_code.model_config(args, tok)
        cfg.relay = True  # e.g. --init-from a relay run's export: the objective decides, not the weights
        train_data, val_data, _ = train_code.load_data(args, tok, d)
        bufs = train_code.chunk_states(args, d, chunks, train_data, val_data, cfg, tok)[3]
        assert bufs and all(b.h.shape[-1] == width for b in bufs), obj


def test_overwrite_removes_the_replaced_runs_export_with_its_checkpoint(tmp_path, capsys):
    common = ["--max-steps", "2", "--out-dir", str(tmp_path / "o"), "--data-dir", str(tmp_path / "data")]
    run_main(common)  # a finished run: ckpt.pt and hf/
    hf = tmp_path / "o" / "hf"
    run_main(common + ["--overwrite", "--objective", "sft", "--stop-after", "1"])
    assert not hf.exists() and "--overwrite: removed" in capsys.readouterr().out  # no other run's model beside it


def test_a_sequence_past_the_models_positions_is_refused_before_training(tmp_path):
    run_main(["--max-steps", "1", "--out-dir", str(tmp_path / "o"), "--data-dir", str(tmp_path / "data")])
    cfg = json.loads((tmp_path / "o" / "hf" / "config.json").read_text())
    (tmp_path / "o" / "hf" / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 64}))
    with pytest.raises(ValueError, match="--seq-len 384 is past .*hf's max_position_embeddings \\(64\\)"):
        train_code.main(["--init-from", str(tmp_path / "o" / "hf"), "--out-dir", str(tmp_path / "p"), "--max-steps", "1", "--objective", "sft",
                         "--samples", "0", "--seq-len", "384"])


def test_init_from_refusals(tmp_path, capsys):
    """--init-from: its own export as the source, model flags it brings itself, a path that is no checkpoint."""
    err = lambda argv: (pytest.raises(SystemExit, train_code.get_args, argv), capsys.readouterr().err)[1]
    assert "is this run's own export" in err(["--init-from", str(tmp_path / "o" / "hf"), "--out-dir", str(tmp_path / "o")])
    assert "--n-layer --bd-size: the model comes from --init-from" in err(["--init-from", "D", "--n-layer", "2",
                                                                          "--bd-size", "8"])
    assert "would train no relay step" in err(["--max-steps", "3", "--sft-frac", "0.9"])
    with pytest.raises(FileNotFoundError, match="nodir: no such file or directory"):
        run_main(["--init-from", str(tmp_path / "nodir"), "--out-dir", str(tmp_path / "o2")])


def test_the_stdlib_cache_is_keyed_by_the_tokenizer(tmp_path, monkeypatch):
    """Two tokenizers of one size (exports are all named hf) must not share tokenized data."""
    from tokenizer import bpe_tokenizer
    src = tmp_path / "lib"
    src.mkdir()
    for name in ("a.py", "m5.py"):  # m5.py: held out (crc32 % 50 == 0)
        (src / name).write_text(f"def {name[0]}(a, b):\n    return a + b\n" * 20)
    monkeypatch.setattr(code_data, "stdlib_files", lambda: (str(src), [str(src / "a.py"), str(src / "m5.py")]))
    toks = [bpe_tokenizer([(b"a", b"d")]), bpe_tokenizer([(b"r", b"e")])]
    assert toks[0].n_vocab == toks[1].n_vocab
    for tok in toks:
        got = code_data.load_stdlib(tok, str(tmp_path / "cache"))
        eot = [tok.added["<|endoftext|>"]]
        assert got["train"].tolist() + got["val"].tolist() == sum((tok.encode((src / n).read_text()) + eot
                                                                   for n in ("a.py", "m5.py")), [])
    assert len(os.listdir(tmp_path / "cache")) == 2


def process_tree(pid):
    """pid and every process below it. torchrun starts each worker in a session of its own, so the
    launcher's process group does not reach them: walk the parent links in /proc instead."""
    children = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:  # field 4, after the ")" that ends the name: the parent
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
        except (ValueError, OSError):
            continue  # not a process, or it has just exited
    tree = [pid]
    for p in tree:  # grows while it is walked: breadth first
        tree += children.get(p, [])
    return tree


def torchrun(args, nproc, tmp_path, timeout=300):
    """Run train_code.py under torchrun; its JSON line. Output goes to files, not pipes: a worker that
    outlives the launcher then cannot keep the test waiting for the end of a pipe."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "train_code.py"), "--preset", "tiny", "--samples", "0", *args]
    out_path, err_path = tmp_path / f"torchrun{nproc}.out", tmp_path / f"torchrun{nproc}.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                               "PYTHONFAULTHANDLER": "1"})
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # a hung run: every process prints its stack, then all of them stop
            tree = process_tree(p.pid)
            for sig, grace in ((signal.SIGABRT, 20), (signal.SIGKILL, None)):
                for pid in reversed(tree):  # workers first, so the launcher does not tear them down first
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                try:
                    p.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
            pytest.fail(f"torchrun hung for {timeout} s; its stderr ends:\n{err_path.read_text()[-8000:]}")
    assert p.returncode == 0, err_path.read_text()[-3000:]
    return json.loads(out_path.read_text().strip().splitlines()[-1])


@pytest.mark.parametrize("objective,shard", [("sft", []), ("relay", []), ("relay", ["--fsdp"])])
def test_two_process_ddp_equals_one_process(tmp_path, objective, shard):
    """DDP, and FSDP (fully_shard over gloo), give the parameters of one process with accumulation."""
    common = ["--objective", objective, "--max-steps", "3", "--batch-size", "4", "--micro-batch", "2",
              "--data-dir", str(tmp_path / "data")]
    one = torchrun(common + ["--out-dir", str(tmp_path / "one")], 1, tmp_path)  # 1 process, 2 micro-steps
    solve = bool(shard) and os.geteuid() == 0  # FSDP: rank 0 decodes with the gathered model (the sandbox needs root)
    two = torchrun(common + shard + ["--eval-problems", "2"] * solve + ["--out-dir", str(tmp_path / "two")], 2,
                   tmp_path)  # 2 processes, 1 micro-step each
    assert one["world"] == 1 and two["world"] == 2
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=False)["model"]
    if shard:  # the gathered export loads like any checkpoint and holds the checkpoint's weights
        from checkpoint import from_pretrained
        hf = from_pretrained(str(tmp_path / "two" / "hf"), dtype=torch.float32)
        assert hf.cfg.relay and all(torch.equal(v, b[k]) for k, v in hf.state_dict().items())
        if solve:  # as root: rank 0 solved held-out problems with that model in the sandbox
            assert "pass@1" in two
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5, msg=k)
    assert abs(one["val_loss"] - two["val_loss"]) < 1e-4


@pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root (it refuses otherwise)")
def test_synthetic_run_ends_with_pass_at_1_and_samples(tmp_path, capsys):
    """The default data: train on generated problems, then solve held-out ones through the sandbox."""
    r = train_code.main(["--preset", "tiny", "--max-steps", "2", "--eval-problems", "4", "--samples", "2",
                         "--out-dir", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert r["pass@1"] * 4 in (0, 1, 2, 3, 4) and r["nfe"] >= 1  # a share of 4 problems
    assert r["gen_tokens_per_s"] > 0 and r["tokens_per_s"] == pytest.approx(2 * 4 * 384 / r["train_seconds"])  # training
    assert out.count("--- synthetic/test/") == 2 and "held-out problems: pass@1" in out


def test_every_asked_held_out_problem_is_solved(monkeypatch, capsys):
    """--eval-problems past eval_code's 200: as many problems as asked, the first 200 being those."""
    got = []
    monkeypatch.setattr(train_code, "evaluate", lambda model, tok, problems, **kw: got.append(problems) or (
        {"pass@1": 0.0, "n": len(problems), "distinct": len(problems), "nfe": 1.0, "tokens_per_s": 1.0},
        [{}] * len(problems)))
    args = train_code.get_args(["--eval-problems", "250", "--samples", "0"])
    train_code.solve_held_out(args, torch.nn.Linear(1, 1), None, contextlib.nullcontext(), "cpu")
    assert len(got[0]) == 250 and got[0][:200] == eval_code.load_problems("synthetic")
    assert "pass@1 0.0% of 250" in capsys.readouterr().out


def test_stdlib_corpus_stays_a_flag(tmp_path):
    r = run_main(["--data", "stdlib", "--seq-len", "64", "--max-steps", "2", "--data-dir", str(tmp_path / "data"),
                  "--out-dir", str(tmp_path / "o")])
    assert r["steps"] == 2 and r["val_loss"] > 0 and "pass@1" not in r


def test_lr_schedule_can_span_epochs_past_the_last_step():
    """--lr-epochs: the authors' cosine spans 3 epochs of the data and training stops long before it."""
    args = train_code.get_args(["--max-steps", "100", "--lr", "1e-3", "--lr-epochs", "3", "--batch-size", "16"])
    args.schedule = train_code.schedule_steps(args, [None] * 4000)  # 4000 rows: 3 epochs = 750 steps
    assert args.schedule == 750
    lrs = [train_code.lr_at(s, args) for s in range(751)]
    assert lrs.index(max(lrs)) == 22 and max(lrs) == 1e-3  # warmup: 3% of 750 steps
    assert lrs[99] > 0.9e-3 and abs(lrs[750] - 1e-4) < 1e-12  # at the last trained step still near the peak
    assert all(abs(train_code.lr_at(s, args) - 1e-4) < 1e-12 for s in (751, 900, 3000))  # the floor, past the end
    args.lr_epochs = 0
    assert train_code.schedule_steps(args, [None] * 4000) == 100


def test_presets_are_defaults_and_the_paper_preset_needs_weights(capsys):
    cpu = train_code.get_args([])
    assert cpu.preset == "cpu" and cpu.max_steps == 3000 and cpu.sft_steps == 2000 and cpu.n_embd == 128
    assert cpu.data == "synthetic" and cpu.eval_problems == 200 and cpu.bpe_merges == 512  # a learned BPE
    assert train_code.get_args(["--data", "stdlib"]).bpe_merges == 0  # bytes
    assert train_code.get_args(["--objective", "sft"]).sft_steps == 0
    paper = train_code.get_args(["--preset", "paper", "--init-from", "DIR"])
    assert paper.lr == 5e-6 and paper.seq_len == 2048 and paper.sft_steps == 0 and paper.bpe_merges == 0
    assert paper.lr_epochs == 3 and paper.beta2 == 0.999 and cpu.lr_epochs == 0 and cpu.beta2 == 0.95
    with pytest.raises(SystemExit):
        train_code.get_args(["--preset", "paper"])
    assert "give --init-from DIR" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root (it refuses otherwise)")
def test_synthetic_task_fine_tunes_a_qwen_checkpoint(tmp_path, capsys, monkeypatch):
    """--init-from a Qwen2-layout checkpoint with its own BPE tokenizer, on the default generated
    problems: rows are tokenized with that tokenizer and padded to its block size (8, where the tiny
    preset says 16), the run trains, saves a checkpoint that loads, and solves held-out problems
    through the sandbox."""
    blocks = []
    rows = train_code.synthetic_rows
    monkeypatch.setattr(train_code, "synthetic_rows", lambda *a: blocks.append(a[-1]) or rows(*a))
    transformers = pytest.importorskip("transformers")
    from test_fastdllm import build_hf_tokenizer
    from checkpoint import from_pretrained
    tok, tok_dir = build_hf_tokenizer(tmp_path)
    c = transformers.Qwen2Config(vocab_size=tok.get_vocab_size() + 3, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=1024, tie_word_embeddings=True)
    d = tmp_path / "qwen"
    transformers.Qwen2ForCausalLM(c).save_pretrained(str(d))
    cfg = json.load(open(d / "config.json"))
    json.dump(cfg | {"bd_size": 8, "mask_token_id": tok.get_vocab_size() - 1}, open(d / "config.json", "w"))
    for f in ("tokenizer.json", "added_tokens.json"):
        shutil.copy(os.path.join(tok_dir, f), d / f)
    (d / "modeling.py").write_text("# the checkpoint's remote code\n")
    r = train_code.main(["--preset", "tiny", "--init-from", str(d), "--max-steps", "2", "--train-problems", "40",
                         "--eval-problems", "2", "--samples", "1",
                         "--out-dir", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert r["steps"] == 2 and 0 <= r["pass@1"] <= 1 and "held-out problems: pass@1" in out
    assert blocks == [8, 8]  # training and held-out rows
    m = from_pretrained(str(tmp_path / "o" / "hf"))
    assert m.cfg.vocab_size == c.vocab_size and m.relay is not None
    assert (tmp_path / "o" / "hf" / "modeling.py").read_text() == "# the checkpoint's remote code\n"  # with the export


def test_one_rollout_buffer_per_process_is_advanced_at_every_micro_step(tmp_path):
    """--buffers process (the authors' way, the paper preset's default): one buffer per process
    serves every accumulation chunk, so its trajectories move at every micro-step and training
    differs from one buffer per chunk; a checkpoint resumes only with the same choice."""
    common = ["--objective", "relay", "--max-steps", "2", "--batch-size", "4", "--micro-batch", "2"]
    runs = {b: run_main(common + ["--buffers", b, "--out-dir", str(tmp_path / b)]) for b in ("chunk", "process")}
    ck = {b: torch.load(tmp_path / b / "ckpt.pt", weights_only=False) for b in runs}
    assert [len(ck[b]["ranks"][0]["bufs"]) for b in ("chunk", "process")] == [2, 1]
    # the one buffer took 2 x K reveal steps per optimizer step, chunk 0's buffer K: their masks differ
    mask_id = {b: load_tokenizer(str(tmp_path / b / "hf")).mask_id for b in runs}
    masked = {b: int((ck[b]["ranks"][0]["bufs"][0]["x"] == mask_id[b]).sum()) for b in runs}
    assert masked["process"] < masked["chunk"]
    assert any(not torch.equal(ck["chunk"]["model"][k], ck["process"]["model"][k]) for k in ck["chunk"]["model"])
    assert train_code.get_args(["--preset", "paper", "--init-from", "D"]).buffers == "process"
    with pytest.raises(ValueError, match=r"another setup: flags \{'buffers': \('chunk', 'process'\)\}"):
        run_main(common + ["--buffers", "chunk", "--max-steps", "3", "--resume", "--out-dir", str(tmp_path / "process")])


def test_chat_rows_are_padded_to_the_next_block_multiple_only(tmp_path):
    """A row of a whole number of blocks gets no padding block; one token more gets one block's worth."""
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ok"}]})
                 + "\n")
    tok = byte_tokenizer()
    n = len(tok.encode("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"))
    for bd, want in ((1, n), (n, n), (n - 1, 2 * (n - 1)), (n + 1, n + 1)):
        (ids, sup), = code_data.read_chat_jsonl(str(p), tok, 4096, bd)[0]
        assert len(ids) == len(sup) == want, bd


def test_micro_steps_average_their_gradients():
    """Two micro-steps on identical chunks give the gradient of one: the loss is the mean over chunks, as one
    big batch (a sum would double it; AdamW hides the scale, clipping and weight decay do not)."""
    args = train_code.get_args(["--preset", "tiny", "--objective", "sft", "--batch-size", "4", "--micro-batch", "2",
                                "--clip", "1e9"])
    d, tok = train_code.Dist(False, 0, 1, "cpu"), train_code.get_tokenizer(args)
    train_data, val_data, _ = train_code.load_data(args, tok, d)
    args.schedule = train_code.schedule_steps(args, train_data)
    grads = []
    for chunks in ([0], [0, 0]):  # one chunk; the same chunk twice (same rows, same noise)
        torch.manual_seed(0)
        raw = train_code.build_model(args, tok, train_code.model_config(args, tok))
        opt = torch.optim.AdamW(raw.parameters(), lr=0.0)
        opt.step = lambda: grads.append([p.grad.clone() for p in raw.parameters()])
        streams, _, gens, bufs = train_code.chunk_states(args, d, chunks, train_data, val_data, raw.cfg, tok)
        train_code.train_step(args, d, 0, raw, raw, opt, streams, gens, bufs, contextlib.nullcontext())
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
