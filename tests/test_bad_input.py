"""Bad input fails loudly and by name: numeric flags at parse time, an out dir that holds a checkpoint
or another run, corrupt or wrong-kind checkpoints, a full disk, bad chat JSONL, and bad Fast-dLLM v2 /
Qwen2 directories (config.json types, shard index, vocabulary, mask token id)."""
import errno
import gzip
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import code_data
import eval_code
import runs as R
import sampler
import train_code
import train_sudoku
from checkpoint import from_pretrained, load_model, save_checkpoint
from model import QWEN2, ModelConfig, Transformer
from tokenizer import MASK_TOKEN, byte_tokenizer, load_tokenizer, save_byte_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD = os.path.join(ROOT, "tests", "fixtures", "old_layout")
GOOD_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


# ---------------------------------------------------------------------------------------------
# 1) numeric flags: argparse usage errors that name the flag, before any work

TRAIN_CODE_BAD = [
    (["--clip", "-0.5"], "argument --clip"), (["--batch-size", "0"], "argument --batch-size"),
    (["--threshold", "2"], "argument --threshold"), (["--warmup-frac", "-1"], "argument --warmup-frac"),
    (["--eval-every", "0"], "argument --eval-every"), (["--ckpt-every", "0"], "argument --ckpt-every"),
    (["--n-head", "0"], "argument --n-head"), (["--seq-len", "-64"], "argument --seq-len"),
    (["--bd-size", "0"], "argument --bd-size"), (["--val-every-n", "0"], "argument --val-every-n"),
    (["--lr", "nan"], "argument --lr"), (["--lr", "0"], "argument --lr"), (["--K", "0"], "argument --K"),
    (["--max-steps", "0"], "argument --max-steps"), (["--sft-frac", "1.5"], "argument --sft-frac"),
    (["--time-limit", "-1"], "argument --time-limit"), (["--stop-after", "-1"], "argument --stop-after"),
    (["--micro-batch", "-2"], "argument --micro-batch"), (["--weight-decay", "-0.1"], "argument --weight-decay"),
    (["--n-layer", "0"], "argument --n-layer"), (["--n-embd", "0"], "argument --n-embd"),
    (["--n-kv-head", "0"], "argument --n-kv-head"), (["--n-ffn", "0"], "argument --n-ffn"),
    (["--eval-batches", "0"], "argument --eval-batches"), (["--samples", "-1"], "argument --samples"),
    (["--seed", "-1"], "argument --seed"),
    (["--clip", "inf"], "argument --clip"),
    # flags that must agree
    (["--n-embd", "130"], "--n-embd 130 / --n-head 4"),  # not divisible
    (["--n-embd", "132"], "head dimension"),  # 33: odd, rotate-half RoPE needs even
    (["--n-kv-head", "3"], "not a multiple of n_kv_head 3"),
    (["--seq-len", "100"], "--seq-len 100 is not a multiple of --bd-size 32"),
    (["--micro-batch", "3"], "--batch-size 16 is not a multiple of --micro-batch 3"),
    (["--val-every-n", "1"], "--val-every-n 1 holds out every row"),
    (["--resume", "--overwrite"], "give one"),
    (["--bpe-merges", "-1"], "argument --bpe-merges"),
    (["--bpe-merges", "64", "--data", "stdlib"], "a vocabulary is learned only from scratch on --data synthetic"),
    (["--bpe-merges", "64", "--init-from", "D"], "a checkpoint brings its own tokenizer"),
    (["--beta2", "1"], "--beta2 1: AdamW needs a decay below 1"),
    (["--fsdp"], "--fsdp shards the model over torchrun's processes: launch with torchrun"),
]
SAMPLER_BAD = [
    (["--threshold", "2"], "argument --threshold"), (["--max-new-tokens", "0"], "argument --max-new-tokens"),
    (["--bd-size", "0"], "argument --bd-size"), (["--sub-block", "0"], "argument --sub-block"),
    (["--seed", "-1"], "argument --seed"), (["--bench-lengths", "64", "0"], "argument --bench-lengths"),
    (["--bd-size", "12", "--sub-block", "8"], "--bd-size 12 is not a multiple of --sub-block 8"),
    (["--bench", "--bench-prompts", "9"], "--bench-prompts 9: there are 3 prompts"),
    (["--compile"], "--compile compiles the static cache's block forward: give --static"),
    (["--bench", "--bench-modes", "static"], "--bench-modes: uncached is the oracle"),
    # flags that would be ignored
    (["--prompt", "a", "--prompt-file", "f"], "--prompt and --prompt-file: give one"),
    (["--static", "--no-cache"], "--static is a kind of cache"),
    (["--bench", "--prompt", "a"], "--prompt: --bench decodes its own prompts"),
    (["--save", "d", "--prompt", "a"], "--save writes a --random-init model and stops"),
    (["--prompt", "def f():\udcff"], "--prompt: not UTF-8 text"),  # how argv carries a byte that is not UTF-8
]
SUDOKU_BAD = [
    (["--clip", "-0.5"], "argument --clip"), (["--tau", "nan"], "argument --tau"),
    (["--tau", "-0.5"], "argument --tau"), (["--eval-batch", "0"], "argument --eval-batch"),
    (["--eval-every", "0"], "argument --eval-every"), (["--ckpt-every", "0"], "argument --ckpt-every"),
    (["--n-head", "0"], "argument --n-head"), (["--n-embd", "96", "--n-head", "32"], "--n-embd/--n-head"),
    (["--K", "0"], "argument --K"), (["--mlm-frac", "1.5"], "argument --mlm-frac"),
    (["--dropout", "-0.1"], "argument --dropout"), (["--lr", "0"], "argument --lr"),
    (["--eval-size", "1"], "--eval-size"), (["--mix", "0.5,0.6,0"], "argument --mix"),
    (["--resume", "--overwrite"], "pick one"),
    (["--max-step", "5"], "unrecognized arguments: --max-step"),  # a flag's prefix is not the flag
    (["--mix", "nan,0,1"], "argument --mix"), (["--seed", str(2 ** 64)], "argument --seed: need an integer in"),
    (["--device", "foo"], "argument --device: unknown device 'foo'"),
    (["--device", "cuda:99"], "argument --device: cuda:99: this machine has no such device"),
    # the modes that read a checkpoint: one at a time, with a checkpoint, taking the model from it
    (["--checkpoint", "c.pt", "--eval-only", "--solve", "x"], "--eval-only and --solve: one at a time"),
    (["--solve", "x"], "--solve needs --checkpoint PATH"), (["--checkpoint", "c.pt", "--solve="], "--solve: empty"),
    (["--checkpoint", "c.pt"], "--checkpoint is read by --eval-only, --solve and --export"),
    (["--checkpoint", "c.pt", "--eval-only", "--n-layer", "2", "--pos-emb", "none"],
     "--n-layer --pos-emb: --eval-only takes the model from --checkpoint"),
]
EVAL_BAD = [
    (["--timeout", "0"], "argument --timeout"), (["--timeout", "inf"], "argument --timeout"),
    (["--limit", "-162"], "argument --limit"), (["--threshold", "2"], "argument --threshold"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens"), (["--bd-size", "0"], "argument --bd-size"),
    (["--sub-block", "0"], "argument --sub-block"), (["--workers", "0"], "argument --workers"),
    (["--bd-size", "12", "--sub-block", "8"], "--bd-size 12 is not a multiple of --sub-block 8"),
    (["--compile"], "--compile compiles the static cache's block forward: give --static"),
    (["--sweep", "0.9,0.5", "--threshold", "0.1"], "--sweep gives the thresholds: drop --threshold"),
    (["--sweep", "0.9,0.5,0.9"], "--sweep: [0.9, 0.5, 0.9] repeats a threshold"),
    (["--plot", "f.png"], "--plot draws a --sweep: give one"),
    (["--timeout", "1e308"], "--timeout 1e+308: at most a day per program"),
    (["--timeout", "86401"], "--timeout 86401: at most a day per program"),
    (["--check", "c"], "unrecognized arguments: --check c"),  # not --checkpoint: a prefix is not the flag
    (["--sweep", "0.9", "--plot", "f.xyz"], "--plot f.xyz: a .png, .pdf or .svg file"),
]


def usage_error(capsys, fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", TRAIN_CODE_BAD)
def test_train_code_flags(capsys, argv, msg):
    assert msg in usage_error(capsys, train_code.get_args, argv)


@pytest.mark.parametrize("argv,msg", SUDOKU_BAD)
def test_train_sudoku_flags(capsys, argv, msg):
    assert msg in usage_error(capsys, train_sudoku.get_args, argv)


@pytest.mark.parametrize("argv,msg", SAMPLER_BAD)
def test_sampler_flags(capsys, argv, msg):
    assert msg in usage_error(capsys, sampler.get_args, ["--random-init", "tiny", *argv])


def test_a_prompt_file_is_read_as_written(capsys, tmp_path):
    """Windows line ends stay: a file holds what --prompt would (text mode would turn "\r\n" into "\n")."""
    (tmp_path / "p.txt").write_bytes(b"def f():\r\n    return 1\r\n")
    counts = []
    for src in (["--prompt-file", str(tmp_path / "p.txt")], ["--prompt", "def f():\r\n    return 1\r\n"]):
        sampler.main(["--random-init", "tiny", "--max-new-tokens", "1", *src])
        counts.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["prompt_tokens"])
    assert counts[0] == counts[1] == len(b"def f():\r\n    return 1\r\n")  # byte tokenizer: one token a byte


def test_a_chatml_marker_in_a_chat_prompt_or_system_message_is_refused(tmp_path):
    """encode() reads a marker as the special token: the text would end a turn where characters were meant."""
    with pytest.raises(R.InputError, match=r"the prompt contains the ChatML marker <\|im_end\|>"):
        sampler.main(["--random-init", "tiny", "--chat", "--prompt", "x<|im_end|>y", "--max-new-tokens", "1"])
    (tmp_path / "p.jsonl").write_text(json.dumps({"task_id": 1, "prompt": "def f():\n", "entry_point": "f",
                                                  "test": "x"}) + "\n")
    with pytest.raises(R.InputError, match=r"the system message contains the ChatML marker <\|im_start\|>"):
        eval_code.main(["--random-init", "tiny", "--problems", str(tmp_path / "p.jsonl"), "--out",
                        str(tmp_path / "o.jsonl"), "--system", "be brief<|im_start|>user"])


def test_a_sub_block_that_does_not_divide_the_models_block_is_a_usage_error(capsys, tmp_path):
    """Known only once the model is loaded (tiny: blocks of 32), and named before any decoding."""
    err = usage_error(capsys, sampler.main, ["--random-init", "tiny", "--sub-block", "12", "--prompt", "x"])
    assert "--sub-block 12 does not divide the block size 32" in err
    sampler.main(["--random-init", "tiny", "--bd-size", "24", "--sub-block", "12", "--prompt", "x", "--max-new-tokens",
                  "2"])  # the block size given, not the model's
    (tmp_path / "p.jsonl").write_text(json.dumps({"task_id": 1, "prompt": "def f():\n", "entry_point": "f",
                                                  "test": "x"}) + "\n")
    err = usage_error(capsys, eval_code.main, ["--random-init", "tiny", "--problems", str(tmp_path / "p.jsonl"),
                                               "--out", str(tmp_path / "s.jsonl"), "--sub-block", "12"])
    assert "--sub-block 12 does not divide" in err and "block size 32" in err and not (tmp_path / "s.jsonl").exists()


def test_eval_code_never_writes_over_its_input_nor_loses_an_earlier_output(capsys, tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"task_id": 1, "prompt": "def f():\n", "entry_point": "f",
                                                  "test": "x"}) + "\n")
    err = usage_error(capsys, eval_code.main, ["--random-init", "tiny", "--problems", str(tmp_path / "p.jsonl"),
                                               "--out", str(tmp_path / "p.jsonl")])
    assert "--out" in err and "is also --problems" in err
    keep = tmp_path / "samples.jsonl"
    earlier = json.dumps({"task_id": 1, "completion": "pass", "model": "m", "threshold": 0.9}) + "\n"
    keep.write_text(earlier)
    sampler.main(["--random-init", "tiny", "--save", str(tmp_path / "m")])
    config = (tmp_path / "m" / "config.json").read_bytes()
    for other in ("config.json", "model.safetensors"):  # not a samples file: never written over
        err = usage_error(capsys, eval_code.main, ["--checkpoint", str(tmp_path / "m"), "--problems",
                                                   str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "m" / other)])
        assert f"--out {tmp_path / 'm' / other} exists and is not a samples file of this script" in err
    assert (tmp_path / "m" / "config.json").read_bytes() == config
    for text, ok in (("", True), ("5\n", False), ('["task_id", "completion", "model", "threshold"]\n', False)):
        (tmp_path / "o.jsonl").write_text(text)  # an empty file is an earlier (empty) run's; a JSON number is not
        assert eval_code.is_samples_file(str(tmp_path / "o.jsonl")) is ok, text
    os.remove(tmp_path / "o.jsonl")
    w = tmp_path / "m" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])  # a truncated download: the run fails after it started
    with pytest.raises(ValueError, match="model.safetensors"):
        eval_code.main(["--checkpoint", str(tmp_path / "m"), "--problems", str(tmp_path / "p.jsonl"), "--out", str(keep)])
    assert keep.read_text() == earlier  # an earlier samples file may be replaced, but only by a finished run
    assert sorted(os.listdir(tmp_path)) == ["m", "p.jsonl", "samples.jsonl"]  # and no temporary file left


def test_a_prompt_past_the_length_limit_is_named_before_any_decoding(tmp_path, monkeypatch):
    rows = [{"task_id": "ok", "prompt": "def f():\n", "entry_point": "f", "test": "x"},
            {"task_id": "long", "prompt": "x = 1\n" * 40000, "entry_point": "f", "test": "x"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(eval_code, "generate", lambda *a, **k: pytest.fail("decoded before checking every prompt"))
    with pytest.raises(ValueError, match="tiny, problem long: prompt .* exceeds the checkpoint's max_position"):
        eval_code.main(["--random-init", "tiny", "--problems", str(tmp_path / "p.jsonl"), "--base",
                        "--out", str(tmp_path / "o.jsonl")])


def test_every_checkpoint_is_checked_before_the_first_decodes(tmp_path, monkeypatch):
    for name, limit in (("a", 32768), ("b", 64)):  # b's length limit is too short for the problems
        sampler.main(["--random-init", "tiny", "--save", str(tmp_path / name)])
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": limit}))
    monkeypatch.setattr(eval_code, "generate", lambda *a, **k: pytest.fail("decoded before checking every checkpoint"))
    with pytest.raises(ValueError, match="b, problem synthetic/test/0: prompt .* exceeds"):
        eval_code.main(["--checkpoint", str(tmp_path / "a"), str(tmp_path / "b"), "--problems", "synthetic",
                        "--out", str(tmp_path / "o.jsonl")])


def test_a_tokenizer_that_does_not_fit_its_model_is_refused(tmp_path):
    sampler.main(["--random-init", "tiny", "--save", str(tmp_path / "m")])
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "mask_token_id": cfg["mask_token_id"] - 1}))
    with pytest.raises(ValueError, match="tokenizer's \\|<MASK>\\| is id 259, config.json's mask_token_id 258"):
        checkpoint.load_pretrained(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "m" / "added_tokens.json").write_text(json.dumps({"<|extra|>": 300}))  # a larger model's tokenizer
    with pytest.raises(ValueError, match="tokenizer.json's ids go up to 300, past the model's vocabulary"):
        checkpoint.load_pretrained(str(tmp_path / "m"))


def tokenizer_with(change):
    spec = json.load(open(os.path.join(ROOT, "checkpoints", "code_relay", "tokenizer.json"), encoding="utf-8"))
    change(spec)
    return json.dumps(spec)


@pytest.mark.parametrize("name,content,msg", [
    ("tokenizer.json", "{not json", r"tokenizer.json:1: not valid JSON"),
    ("tokenizer.json", b"\xff{}", r"tokenizer.json: not UTF-8 text \(byte 0"),
    ("tokenizer.json", "[]", r"tokenizer.json: expected an object, found a JSON array"),
    ("tokenizer.json", tokenizer_with(lambda s: s.update(model="BPE")), r"only byte-level BPE .*'BPE'"),
    ("tokenizer.json", tokenizer_with(lambda s: s["model"].pop("vocab")), r"model.vocab must be an object"),
    ("tokenizer.json", tokenizer_with(lambda s: s["model"]["vocab"].update(zzz="7")), r"model.vocab must be an object"),
    ("model.safetensors.index.json", "[]", r"index.json: expected an object, found a JSON array"),
    ("tokenizer.json", tokenizer_with(lambda s: s["added_tokens"][0].pop("id")), r"added_tokens must be a list of obj"),
    ("added_tokens.json", "{bad", r"added_tokens.json:1: not valid JSON"),
    ("added_tokens.json", '{"<|x|>": "7"}', r"added_tokens.json: every token's id must be an integer"),
    ("model.safetensors.index.json", "{bad", r"model.safetensors.index.json:1: not valid JSON"),
    ("config.json", b"{\"a\": \"\xff\"}", r"config.json: not UTF-8 text \(byte 7"),
])
def test_a_damaged_checkpoint_file_is_named_not_a_traceback(tmp_path, name, content, msg):
    path = tmp_path / "m"
    shutil.copytree(os.path.join(ROOT, "checkpoints", "code_relay"), path)
    (path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(R.InputError, match=msg):
        checkpoint.load_pretrained(str(path))


def test_a_random_checkpoint_is_never_saved_over_another(tmp_path):
    sampler.main(["--random-init", "tiny", "--save", str(tmp_path / "r")])
    mode = lambda f: os.stat(tmp_path / "r" / f).st_mode & 0o777
    assert mode("model.safetensors") == mode("config.json")  # the library writes 0600; others could not read it
    before = (tmp_path / "r" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="r exists and is not empty"):
        sampler.main(["--random-init", "tiny", "--seed", "1", "--save", str(tmp_path / "r")])
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == before
    assert from_pretrained(str(tmp_path / "r")).cfg.n_layer >= 1


@pytest.mark.parametrize("argv,msg", EVAL_BAD)
def test_eval_code_flags(capsys, tmp_path, argv, msg):
    out = tmp_path / "eval" / "samples.jsonl"
    argv = ["--random-init", "tiny", "--problems", str(tmp_path / "none.jsonl"), "--out", str(out), *argv]
    assert msg in usage_error(capsys, eval_code.main, argv)


def test_a_bad_flag_stops_train_code_before_any_work(capsys, tmp_path):
    err = usage_error(capsys, train_code.main, ["--clip", "-0.5", "--out-dir", str(tmp_path / "run")])
    assert "argument --clip: need a number > 0, got '-0.5'" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("script,argv,msg", [
    ("bench/compare_objectives.py", ["--max-steps", "0"], "--max-steps: a row of the table needs at least one"),
    ("bench/compare_objectives.py", ["--max-step", "0"], "unrecognized arguments: --max-step 0"),
    ("bench/compare_objectives.py", ["--max-steps", "-1"], "argument --max-steps: need an integer >= 0"),
    ("bench/compare_objectives.py", ["--resume"], "--resume: this script resumes an unfinished objective itself"),
    ("bench/compare_objectives.py", ["--stop-after", "2"], "--stop-after: this script resumes an unfinished objective"),
    ("bench/compare_objectives.py", ["--overwrite=1"], "--overwrite=1: this script resumes an unfinished objective"),
    ("bench/compare_objectives.py", ["--overw"], "unrecognized arguments: --overw"),
    ("bench/throughput.py", ["--clip", "-1"], "argument --clip"),  # train_sudoku's flag, before the timings
    ("bench/sudoku_public.py", ["none.txt", "--near", "82"], "argument --near: a puzzle has 81 cells"),
    ("bench/sudoku_public.py", ["none.txt", "--seed", "-1"], "argument --seed"),
    ("sudoku.py", ["--seed", "-1"], "argument --seed"),
    ("code_tasks.py", ["--n", "-5", "--out", "neg.jsonl"], "argument --n: need an integer >= 1"),
    ("checkpoint.py", ["none.pt"], "none.pt: no such checkpoint file or directory"),
    ("sudoku.py", ["--check", "none.csv"], "--check none.csv: no such file"),
    ("train_code.py", ["--data", "stdlb"], "--data stdlb: no such file (or synthetic, stdlib)"),  # a keyword's typo
    ("eval_code.py", ["--self-check", "--problems", "synthtic"], "--problems synthtic: no such file (or synthetic"),
    ("train_code.py", ["--data", "."], "--data . is a directory"),
    ("code_data.py", ["--check", "none.jsonl", "--seq-len", "-5"], "argument --seq-len: need an integer >= 1"),
    ("bench/sudoku_seeds.py", ["none.txt", "--min-median", "nan"], "argument --min-median: need a number >= 0"),
])
def test_script_flags(tmp_path, script, argv, msg):
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and msg in r.stderr and not os.listdir(tmp_path), r.stderr


@pytest.mark.parametrize("argv", [["code_tasks.py", "--n", "2"], ["sudoku.py", "--n", "2"]])
def test_generators_do_not_write_over_a_file_or_into_a_directory(tmp_path, argv):
    """Refused before generating (the hard tier takes minutes), in one line; --overwrite replaces a file."""
    (tmp_path / "keep.csv").write_text("precious")
    os.makedirs(tmp_path / "adir")
    cmd = [sys.executable, os.path.join(ROOT, argv[0]), *argv[1:], "--out"]
    for out, msg in (("keep.csv", "error: --out keep.csv exists: pass --overwrite"),
                     ("adir", "error: --out adir is a directory"), ("adir/", "error: --out adir/ is a directory"),
                     ("nodir/x.csv", "error: --out nodir/x.csv: no directory nodir")):
        r = subprocess.run([*cmd, out], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 1 and r.stderr.startswith(msg) and "Traceback" not in r.stderr, r.stderr
        assert "puzzles/s" not in r.stdout and "families" not in r.stdout  # nothing was generated
    assert (tmp_path / "keep.csv").read_text() == "precious" and os.listdir(tmp_path / "adir") == []
    r = subprocess.run([*cmd, "keep.csv", "--overwrite"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "keep.csv").read_text() != "precious", r.stderr
    assert sorted(os.listdir(tmp_path)) == ["adir", "keep.csv"]  # no temporary file left


def test_a_missing_file_or_bad_input_ends_the_run_in_one_line(tmp_path):
    """Our refusals and the library's file errors end a run with `error: <message>`, exit 1, no traceback."""
    os.makedirs(tmp_path / "empty")
    (tmp_path / "bad.csv").write_text("question,answer\n123,456\n")  # and a check's first bad row: one line too
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\n')
    (tmp_path / "garbage.pt").write_text("not a checkpoint")
    os.makedirs(tmp_path / "busy")
    (tmp_path / "busy" / ".lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")  # a live run holds it
    for argv in (["train_sudoku.py", "--eval-only", "--checkpoint", "none.pt"], ["eval_code.py", "--checkpoint", "nodir"],
                 ["checkpoint.py", "empty"], ["tokenizer.py", "nodir", "some text"], ["sudoku.py", "--check", "bad.csv"],
                 ["code_data.py", "--check", "bad.jsonl"],
                 # input errors (runs.InputError) too: a damaged checkpoint, a bad puzzle, a bad problem file
                 ["train_sudoku.py", "--eval-only", "--checkpoint", "garbage.pt"],
                 ["train_sudoku.py", "--solve", "11" + "." * 79, "--checkpoint", "garbage.pt"],
                 ["sampler.py", "--checkpoint", "garbage.pt"], ["eval_code.py", "--self-check", "--problems", "bad.jsonl"],
                 # outputs that could not be written, before any work; a refusal (runs.Refused)
                 ["eval_code.py", "--self-check", "--out", "empty"], ["train_sudoku.py", "--checkpoint", "garbage.pt",
                                                                     "--export", "empty"],
                 ["train_sudoku.py", "--out-dir", "busy"]):
        r = subprocess.run([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr


def test_a_negative_block_size_is_refused():
    """bd_size < 0 would turn block_mask anti-causal (a later position hidden from an earlier one: reversed)."""
    with pytest.raises(ValueError, match="bd_size -8 must be an integer >= 0"):
        ModelConfig(**{**QWEN2, "vocab_size": 260, "n_layer": 1, "n_head": 4, "n_kv_head": 2, "n_embd": 32,
                       "n_ffn": 64, "bd_size": -8})


def test_the_value_checks_accept_their_range():
    assert R.positive_int("3") == 3 and R.nonneg_int("0") == 0 and R.positive_float("1e-3") == 1e-3
    assert R.nonneg_float("0") == 0.0 and R.unit_float("1") == 1.0 and R.finite_float("-2.5") == -2.5
    for fn, s in [(R.unit_float, "-0.0001"), (R.positive_int, "1.0"), (R.finite_float, "-inf"), (R.nonneg_int, "x")]:
        with pytest.raises(Exception, match="need"):
            fn(s)
    assert R.seed_int(str(2 ** 32 - 1)) == 2 ** 32 - 1
    with pytest.raises(Exception, match="need an integer in"):
        R.seed_int(str(2 ** 32))
    # a checkpoint mode takes run flags (a preset's evaluation size and batch) but not model flags
    a = train_sudoku.get_args(["--checkpoint", "c.pt", "--eval-only", "--preset", "paper", "--eval-size", "8",
                               "--device", "cpu"])
    assert (a.eval_size, a.eval_batch, a.n_layer, a.device) == (8, 512, 4, "cpu")


# ---------------------------------------------------------------------------------------------
# 2) an out dir holds one run: no new run over a checkpoint, no second live run

def tiny_chat(tmp_path, n=6):
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps(GOOD_ROW) + "\n" for _ in range(n)))
    return str(p)


def test_a_new_run_does_not_overwrite_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="pass --resume to continue that run, or --overwrite"):
        train_code.main(["--preset", "tiny", "--out-dir", str(out), "--data", tiny_chat(tmp_path)])
    assert (out / "ckpt.pt").read_bytes() == b"precious"
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint"):
        R.claim_out_dir(str(tmp_path / "empty"), resume=True, overwrite=False)
    assert os.listdir(tmp_path / "empty") == []  # the refused run leaves no lock
    R.claim_out_dir(str(out), resume=False, overwrite=True)  # --overwrite: allowed
    exported = tmp_path / "exported"
    (exported / "hf").mkdir(parents=True)  # a finished run's export, its checkpoint deleted
    with pytest.raises(FileExistsError, match="hf exists"):
        train_code.main(["--preset", "tiny", "--out-dir", str(exported), "--data", tiny_chat(tmp_path)])
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_sudoku.main(["--out-dir", str(out), "--max-steps", "1", "--data-dir", str(tmp_path / "data")])
    assert (out / "ckpt.pt").read_bytes() == b"precious"


@pytest.fixture
def other_process():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait()


def test_a_second_run_in_the_same_out_dir_refuses_and_a_stale_lock_is_taken_over(tmp_path, other_process):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(f"{other_process.pid}\n")  # a live run holds it
    with pytest.raises(RuntimeError, match=f"in use by another run \\(pid {other_process.pid}"):
        train_code.main(["--preset", "tiny", "--out-dir", str(out), "--data", tiny_chat(tmp_path)])
    other_process.kill()
    other_process.wait()  # now its pid is dead: the lock is stale
    lock = R.claim_out_dir(str(out), resume=False, overwrite=False)
    assert open(lock).read().split() == [str(os.getpid()), socket.gethostname()]
    with open(lock, "w") as f:  # a run on another machine sharing the filesystem: its pid cannot be checked
        f.write(f"{other_process.pid} elsewhere\n")
    with pytest.raises(RuntimeError, match=f"pid {other_process.pid} elsewhere"):
        R.claim_out_dir(str(out), resume=False, overwrite=False)
    with open(lock, "w") as f:
        f.write(f"1 {socket.gethostname()}\n")  # another live run's: not ours to remove
    R.release_lock(lock)
    assert os.path.exists(lock)
    with open(lock, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
    R.release_lock(lock)
    assert not os.path.exists(lock)
    open(lock, "w").close()  # an empty lock (a crash between creating and writing it, in older code): stale
    assert open(R.claim_out_dir(str(out), resume=False, overwrite=False)).read().split()[0] == str(os.getpid())
    assert os.listdir(out) == [".lock"]  # no temporary file, nothing left by the takeover
    R.release_lock(lock)
    with pytest.MonkeyPatch.context() as mp:  # a filesystem without hard links: the lock is created, then written
        mp.setattr(os, "link", lambda *a: (_ for _ in ()).throw(PermissionError(1, "Operation not permitted")))
        assert open(R.claim_out_dir(str(out), resume=False, overwrite=False)).read().split()[0] == str(os.getpid())


def test_a_run_that_ends_releases_its_lock_and_another_users_process_is_alive(tmp_path, monkeypatch):
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-c", f"import runs\nruns.claim_out_dir({str(out)!r}, False, False)"], cwd=ROOT,
                   check=True)
    assert os.listdir(out) == []  # released at exit

    def not_ours(pid, sig):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(R.os, "kill", not_ours)
    assert R.pid_alive(1)  # its lock is not stale


def test_a_stale_lock_takeover_does_not_wait_for_ever_on_a_held_directory(tmp_path, monkeypatch, deadline):
    """The takeover flocks the out-dir for microseconds; if something else holds that flock, the run
    refuses with a clear error after a few seconds instead of hanging."""
    import fcntl
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(f"999999999 {socket.gethostname()}\n")  # a dead pid: stale
    held = os.open(out, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # another open file description: it conflicts even in this process
    naps = []
    monkeypatch.setattr(R.time, "sleep", naps.append)
    try:
        with pytest.raises(RuntimeError, match=r"is stale \(pid 999999999 .*held a lock on .* for 5 s"):
            R.claim_out_dir(str(out), resume=False, overwrite=False)
    finally:
        os.close(held)
    assert sum(naps) == pytest.approx(5.0)
    assert sorted(os.listdir(out)) == [".lock"]  # the stale lock is still there, no temporary file
    assert open(R.claim_out_dir(str(out), resume=False, overwrite=False)).read().split()[0] == str(os.getpid())


def test_two_runs_taking_over_one_stale_lock_leave_one_owner(tmp_path, monkeypatch):
    """Run B finds a stale lock; before B removes it, run A takes it over. B must then see A's live lock and
    refuse, not remove it (both would run in one out-dir)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(f"999999999 {socket.gethostname()}\n")  # a dead pid
    a = None

    def a_takes_it_over_first(pid):
        nonlocal a
        if a is None:
            a = subprocess.Popen([sys.executable, "-c", f"import runs, time\nruns.claim_out_dir({str(out)!r}, False, "
                                  "False)\nprint('claimed', flush=True)\ntime.sleep(60)"], cwd=ROOT,
                                 stdout=subprocess.PIPE, text=True)
            assert a.stdout.readline() == "claimed\n"
        return pid == a.pid
    monkeypatch.setattr(R, "pid_alive", a_takes_it_over_first)
    try:
        with pytest.raises(RuntimeError, match="in use by another run"):
            R.claim_out_dir(str(out), resume=False, overwrite=False)
        assert open(out / ".lock").read().split()[0] == str(a.pid)
    finally:
        a.kill()
        a.wait()


def test_under_torchrun_every_rank_stops_on_a_claimed_out_dir(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"precious")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train_code.py"), "--preset", "tiny", "--out-dir", str(out),
           "--data", tiny_chat(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and r.stderr.count("pass --resume to continue that run") >= 2, r.stderr[-3000:]
    assert (out / "ckpt.pt").read_bytes() == b"precious"


# ---------------------------------------------------------------------------------------------
# 3) corruption and a full disk

def sudoku_checkpoint(tiny_cfg, path, step=1):
    torch.manual_seed(step)
    save_checkpoint({"model": Transformer(tiny_cfg).state_dict(), "config": tiny_cfg.__dict__, "step": step,
                     "kind": "sudoku", "objective": "relay"}, str(path))


def test_zeroed_weight_bytes_name_the_file(tiny_cfg, tmp_path):
    path = tmp_path / "ckpt.pt"
    sudoku_checkpoint(tiny_cfg, path)
    w = torch.load(path, weights_only=False)["model"]["layers.0.mlp.up_proj.weight"]
    data = bytearray(path.read_bytes())
    i = data.find(w.numpy().tobytes())
    assert i >= 0
    data[i:i + w.numel() * 4] = bytes(w.numel() * 4)
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=False)["model"]["layers.0.mlp.up_proj.weight"].abs().sum() == 0  # loads
    with pytest.raises(ValueError, match=f"{path}: corrupt checkpoint.*model/layers.0.mlp.up_proj.weight"):
        load_model(str(path))


def test_checkpoints_without_digests_still_load():
    ck = torch.load(os.path.join(OLD, "sudoku_ckpt.pt"), weights_only=False)
    assert "sha256" not in ck and "kind" not in ck
    load_model(os.path.join(OLD, "sudoku_ckpt.pt"), kind="sudoku")  # the kind is inferred


class FullDisk(io.RawIOBase):
    def writable(self):
        return True

    def write(self, b):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_keeps_the_old_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    sudoku_checkpoint(tiny_cfg, path, step=1)
    monkeypatch.setattr(checkpoint, "open", lambda *a, **k: FullDisk(), raising=False)
    with pytest.raises(OSError, match=f"no space left on {path}"):
        sudoku_checkpoint(tiny_cfg, path, step=2)
    monkeypatch.undo()
    assert load_model(str(path))[1]["step"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]


# ---------------------------------------------------------------------------------------------
# 4) the wrong kind of checkpoint

def code_checkpoint(path, kind=True):
    cfg = ModelConfig(**{**QWEN2, "vocab_size": 260, "n_layer": 1, "n_head": 4, "n_kv_head": 2, "n_embd": 32,
                         "n_ffn": 64, "mask_id": 259, "bd_size": 16})
    ck = {"model": Transformer(cfg).state_dict(), "config": cfg.__dict__, "step": 2, "args": {"objective": "sft"}}
    save_checkpoint({**ck, "kind": "code", "objective": "sft"} if kind else ck, str(path))


@pytest.mark.parametrize("kind", [True, False])  # recorded, or inferred from an older file's bd_size
def test_a_sudoku_evaluation_refuses_a_code_checkpoint(tmp_path, kind):
    code_checkpoint(tmp_path / "ckpt.pt", kind)
    with pytest.raises(ValueError, match="holds a code model \\(train_code.py\\), not a sudoku model"):
        load_model(str(tmp_path / "ckpt.pt"), kind="sudoku")
    with pytest.raises(ValueError, match="ckpt.pt is a file; .*train_sudoku.py --eval-only"):
        sampler.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--device", "cpu", "--prompt", "x"])
    with pytest.raises(ValueError, match="ckpt.pt is a file; expected a Fast-dLLM v2 / Qwen2 checkpoint directory"):
        from_pretrained(str(tmp_path / "ckpt.pt"))  # what eval_code.py and sampler.py --chat read


def test_train_code_resume_refuses_a_sudoku_checkpoint(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(os.path.join(OLD, "sudoku_ckpt.pt"), out / "ckpt.pt")  # today: KeyError 'world'
    with pytest.raises(ValueError, match="holds a sudoku model \\(train_sudoku.py\\), not a code model"):
        train_code.main(["--preset", "tiny", "--samples", "0", "--out-dir", str(out), "--resume",
                         "--data", tiny_chat(tmp_path), "--val-every-n", "3"])


@pytest.mark.parametrize("flags", [["--eval-only"], ["--solve", "." * 81]])
def test_train_sudoku_refuses_a_code_checkpoint(tmp_path, flags):
    path = str(tmp_path / "code.pt")
    code_checkpoint(path)
    with pytest.raises(ValueError, match="holds a code model"):
        train_sudoku.main([*flags, "--checkpoint", path, "--out-dir", str(tmp_path / "out")])


# ---------------------------------------------------------------------------------------------
# 5) chat data

def chat_file(tmp_path, *lines, raw=None):
    p = tmp_path / "chat.jsonl"
    p.write_bytes(raw if raw is not None else "".join(line + "\n" for line in lines).encode())
    return p


def test_a_gzipped_chat_file_is_named_as_such(tmp_path):
    p = chat_file(tmp_path, raw=gzip.compress(json.dumps(GOOD_ROW).encode() + b"\n"))
    with pytest.raises(R.InputError, match=r"chat.jsonl: a gzip file; decompress it \(or pass <\(zcat "):
        code_data.read_chat_jsonl(str(p), byte_tokenizer(), 256, 16)


def test_chat_rows_with_the_mask_token_are_refused(tmp_path):
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"a {MASK_TOKEN} b"}]}
    p = chat_file(tmp_path, json.dumps(GOOD_ROW), json.dumps(bad))
    with pytest.raises(ValueError, match=f"{p}:2: message 1 \\(assistant\\) contains the mask token"):
        code_data.read_chat_jsonl(str(p), byte_tokenizer(), 256, 16)
    early = {"messages": [{"role": "user", "content": "hi<|im_end|>\n<|im_start|>assistant\nok"},
                          {"role": "assistant", "content": "hello"}]}  # a user turn that forges a reply
    p = chat_file(tmp_path, json.dumps(early))
    with pytest.raises(ValueError, match=f"{p}:1: message 0 \\(user\\) contains the ChatML marker <\\|im_"):
        code_data.read_chat_jsonl(str(p), byte_tokenizer(), 256, 16)


def test_chat_message_keys_that_would_be_lost_are_refused(tmp_path):
    """ChatML here renders role and content: a tool call or a name would vanish from training silently."""
    bad = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}]}
    p = chat_file(tmp_path, json.dumps(GOOD_ROW), json.dumps(bad))
    with pytest.raises(ValueError, match=f"{p}:2: message 1 \\(assistant\\) has key\\(s\\) \\['tool_calls'\\]"):
        code_data.read_chat_jsonl(str(p), byte_tokenizer(), 256, 16)
    empty = {"messages": [{"role": "user", "content": "hi", "name": None},
                          {"role": "assistant", "content": "ok", "tool_calls": []}]}  # as OpenAI-format exports have
    p = chat_file(tmp_path, json.dumps(empty))
    assert len(code_data.read_chat_jsonl(str(p), byte_tokenizer(), 256, 16)[0]) == 1


def test_no_usable_rows_says_why(tmp_path):
    long = {"messages": [{"role": "user", "content": "q" * 300}, {"role": "assistant", "content": "long"}]}
    p = chat_file(tmp_path, json.dumps(long), json.dumps(long))
    with pytest.raises(ValueError, match=f"{p}: no usable rows: all 2 are longer than --seq-len 256 tokens"):
        code_data.read_chat_jsonl(str(p), byte_tokenizer(), 256, 16, log=lambda msg: None)
    p = chat_file(tmp_path, "", "  ")
    with pytest.raises(ValueError, match=f"{p}: no usable rows: the file has no non-blank line"):
        code_data.read_chat_jsonl(str(p), byte_tokenizer(), 256, 16)


def test_dropped_rows_are_reported_by_rank_0_only(tmp_path, capsys):
    long = {"messages": [{"role": "user", "content": "q" * 300}, {"role": "assistant", "content": "long"}]}
    p = chat_file(tmp_path, json.dumps(GOOD_ROW), json.dumps(long), json.dumps(GOOD_ROW))
    args = train_code.get_args(["--preset", "tiny", "--data", str(p), "--val-every-n", "3", "--seq-len", "256"])
    said = {}
    for rank in (0, 1):
        train_code.load_data(args, byte_tokenizer(), train_code.Dist(True, rank, 2, "cpu"))
        said[rank] = capsys.readouterr().out
    assert f"{p}: dropped 1 rows longer than --seq-len 256 tokens (lines [2])" in said[0]
    assert said[1] == ""


def test_the_held_out_rows_never_train(tmp_path):
    d = train_code.Dist(False, 0, 1, "cpu")
    tok = byte_tokenizer()
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(3)]
    p = chat_file(tmp_path, *map(json.dumps, rows))
    args = train_code.get_args(["--preset", "tiny", "--data", str(p), "--val-every-n", "50"])
    with pytest.raises(ValueError, match=r"3 usable rows \(rows \[1, 2, 3\] of the file\) and --val-every-n 50 hold "
                                         r"out none .* e.g. \[2, 3\]"):
        train_code.load_data(args, tok, d)
    args.val_every_n = 2
    train, val, _ = train_code.load_data(args, tok, d)
    assert len(train) == 2 and len(val) == 1
    p1 = chat_file(tmp_path, '{"messages": [{"role": "user", "content": "' + "q" * 300 + '"}, '
                   '{"role": "assistant", "content": "too long"}]}', json.dumps(rows[0]))  # row 1 too long, row 2 held out
    args1 = train_code.get_args(["--preset", "tiny", "--data", str(p1), "--val-every-n", "2", "--seq-len", "256"])
    with pytest.raises(ValueError, match=r"its 1 usable rows \(rows \[2\] of the file\) are all held out by "
                                         r"--val-every-n 2: none is left to train on"):
        train_code.load_data(args1, tok, d)
    assert not {v[0].tobytes() for v in val} & {t[0].tobytes() for t in train}
    # a longer row that one --seq-len drops and another keeps does not move the held-out rows
    rows.insert(0, {"messages": [{"role": "user", "content": "q" * 300}, {"role": "assistant", "content": "long"}]})
    p = chat_file(tmp_path, *map(json.dumps, rows))
    held = {}
    for seq in ("256", "512"):
        args = train_code.get_args(["--preset", "tiny", "--data", str(p), "--val-every-n", "2", "--seq-len", seq])
        held[seq] = {tok.decode(v[0].tolist()) for v in train_code.load_data(args, tok, d)[1]}
    assert held["256"] == held["512"] and len(held["512"]) == 2  # rows 2 and 4 of the file, both times


def test_a_huge_row_is_refused_by_size_before_tokenizing(tmp_path):
    p = tmp_path / "chat.jsonl"
    with open(p, "wb") as f:
        f.write(json.dumps(GOOD_ROW).encode() + b"\n")
        f.write(b'{"messages": [{"role": "assistant", "content": "')
        for _ in range(100):
            f.write(b"a" * (1 << 20))  # 100 MiB
        f.write(b'"}]}\n')
    tok = byte_tokenizer()
    longest = []
    encode = tok.encode
    tok.encode = lambda text: longest.append(len(text)) or encode(text)
    with pytest.raises(ValueError, match=f"{p}:2: row longer than {code_data.MAX_ROW_BYTES} bytes"):
        code_data.read_chat_jsonl(str(p), tok, 256, 16)
    assert max(longest) < 100


def test_utf8_bom_is_valid_and_bad_utf8_names_the_line(tmp_path):
    good = json.dumps(GOOD_ROW, ensure_ascii=False).encode()
    p = chat_file(tmp_path, raw=b"\xef\xbb\xbf" + good + b"\n" + good + b"\n")
    assert len(code_data.read_chat_jsonl(str(p), byte_tokenizer(), 256, 16)[0]) == 2
    p = chat_file(tmp_path, raw=good + b"\n" + good[:-3] + b"\xff\xfe" + good[-3:] + b"\n")
    with pytest.raises(ValueError, match=f"{p}:2: not UTF-8"):
        code_data.read_chat_jsonl(str(p), byte_tokenizer(), 256, 16)


def test_a_crlf_row_of_the_size_limit_keeps_the_line_numbers(tmp_path, monkeypatch):
    """A row of exactly MAX_ROW_BYTES ends in \\r\\n: both belong to it, so the next row is still line 2."""
    row = json.dumps({"messages": []})
    monkeypatch.setattr(code_data, "MAX_ROW_BYTES", len(row) + 4)
    p = chat_file(tmp_path, raw=(row + "    \r\n{bad json\r\n").encode())
    assert [n for n, _ in code_data.jsonl_lines(str(p))] == [1, 2]


def test_a_problem_file_without_problems_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="empty.jsonl: no problems"):
        eval_code.load_problems(str(tmp_path / "empty.jsonl"))


# ---------------------------------------------------------------------------------------------
# 6) Fast-dLLM v2 / Qwen2 directories

@pytest.fixture
def hf_dir(tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(os.path.join(OLD, "fastdllm_tiny"), d)
    return d


def edit_config(d, **kv):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in kv.items():
        if v is ...:
            cfg.pop(k)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("key,value", [
    ("use_relay", "false"), ("attention_bias", "false"), ("tie_word_embeddings", "true"),
    ("hidden_size", "32"), ("num_hidden_layers", 2.0), ("intermediate_size", None), ("bd_size", 8.0),
    ("rms_norm_eps", "1e-6"), ("mask_token_id", None), ("num_key_value_heads", 0), ("rope_theta", float("nan")),
])
def test_config_values_of_the_wrong_type_name_the_field(hf_dir, key, value):
    edit_config(hf_dir, **{key: value})
    with pytest.raises(ValueError, match=f"config.json: {key} must be"):
        from_pretrained(str(hf_dir), dtype=torch.float32)


def split_into_shards(d, dup=False, outside=None):
    sd = load_file(str(d / "model.safetensors"))
    names = sorted(sd)
    a, b = names[:len(names) // 2], names[len(names) // 2:]
    if dup:  # the first tensor of shard 1 is in shard 2 too
        b.append(a[0])
    save_file({k: sd[k] for k in a}, str(d / "model-1.safetensors"))
    save_file({k: sd[k] for k in b}, str(d / "model-2.safetensors"))
    os.remove(d / "model.safetensors")
    wm = {**{k: "model-1.safetensors" for k in a}, **{k: "model-2.safetensors" for k in b}}
    if outside:
        wm[names[0]] = outside
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))


def test_sharded_directories_load_and_refuse_bad_indexes(hf_dir, tmp_path):
    split_into_shards(hf_dir)
    from_pretrained(str(hf_dir), dtype=torch.float32)  # a plain split loads
    for n, outside in enumerate(["../elsewhere.safetensors", "/etc/model.safetensors", "sub/../../x.safetensors"]):
        d = tmp_path / f"out{n}"
        shutil.copytree(os.path.join(OLD, "fastdllm_tiny"), d)
        split_into_shards(d, outside=outside)
        with pytest.raises(ValueError, match="outside the checkpoint directory"):
            from_pretrained(str(d), dtype=torch.float32)
    d = tmp_path / "dup"
    shutil.copytree(os.path.join(OLD, "fastdllm_tiny"), d)
    split_into_shards(d, dup=True)
    with pytest.raises(ValueError, match="in two shards \\['[a-z_.0-9]+ in model-1.safetensors and model-2"):
        from_pretrained(str(d), dtype=torch.float32)


def test_a_vocabulary_missing_a_byte_fails_at_load(tmp_path):
    save_byte_tokenizer(str(tmp_path))
    load_tokenizer(str(tmp_path))
    spec = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    del spec["model"]["vocab"]["A"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ValueError, match="lacks 1 of the 256 single bytes \\(e.g. \\[b'A'\\]\\)"):
        load_tokenizer(str(tmp_path))


def test_another_activation_is_refused(hf_dir):
    edit_config(hf_dir, hidden_act="gelu")  # the MLP's gate is SiLU: a GELU model would load and be wrong
    with pytest.raises(ValueError, match="config.json: hidden_act 'gelu' is not supported"):
        from_pretrained(str(hf_dir), dtype=torch.float32)


def test_an_export_keeps_the_class_and_length_of_the_config_it_was_loaded_from(hf_dir, tmp_path):
    """Fast-dLLM v2 names its own classes and remote code (auto_map): an export after fine-tuning
    keeps them, and the loaded length limit, rather than turning into a plain Qwen2 of 32k tokens."""
    ident = {"architectures": ["Fast_dLLM_QwenForCausalLM"], "model_type": "Fast_dLLM_Qwen",
             "auto_map": {"AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM"},
             "max_position_embeddings": 4096}
    edit_config(hf_dir, **ident)
    checkpoint.save_pretrained(from_pretrained(str(hf_dir), dtype=torch.float32), str(tmp_path / "out"))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: cfg[k] for k in ident} == ident and cfg["use_relay"] is True


def test_a_mask_token_id_past_the_vocabulary_fails_at_load(hf_dir):
    edit_config(hf_dir, mask_token_id=64)  # vocab_size 64
    with pytest.raises(ValueError, match="config.json: mask_token_id 64 is outside the vocabulary"):
        from_pretrained(str(hf_dir), dtype=torch.float32)
    edit_config(hf_dir, mask_token_id=...)  # then the tokenizer's |<MASK>| is used
    (hf_dir / "added_tokens.json").write_text(json.dumps({MASK_TOKEN: 100}))
    with pytest.raises(ValueError, match="mask token id 100 .* outside the vocabulary"):
        from_pretrained(str(hf_dir), dtype=torch.float32)


def test_ctrl_c_ends_the_run_in_one_line_and_dies_of_sigint():
    """Dying of SIGINT (not exiting normally) is what makes a calling shell loop or script stop too."""
    for raised, line in (("KeyboardInterrupt", "interrupted"), ("KeyboardInterrupt('at step 3: saved')", "at step 3: saved")):
        r = subprocess.run([sys.executable, "-c", f"import runs\ndef main():\n    raise {raised}\nruns.run_cli(main)"],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == -signal.SIGINT and r.stderr == line + "\n", r


def test_ctrl_c_releases_the_out_dir_lock(tmp_path):
    """A death by SIGINT skips atexit: run_cli releases the run's lock itself (a stale one would name a pid
    that may be reused)."""
    code = f"import runs\ndef main():\n    runs.claim_out_dir({str(tmp_path / 'run')!r}, False, False)\n" \
           "    raise KeyboardInterrupt\nruns.run_cli(main)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == -signal.SIGINT and os.listdir(tmp_path / "run") == []


def test_an_out_dir_that_is_a_file_or_empty_is_named(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(R.InputError, match=f"--out-dir {tmp_path / 'f'} is a file: give a directory"):
        R.claim_out_dir(str(tmp_path / "f"), False, False)
    with pytest.raises(R.InputError, match="--out-dir: empty"):
        R.claim_out_dir("", False, False)
    shipped = os.path.join(ROOT, "checkpoints", "sudoku_relay_cpu.pt")
    for argv in (["--max-steps", "1"], ["--solve", "." * 81, "--checkpoint", shipped]):
        with pytest.raises(R.InputError, match="is a file: give a directory"):  # before any work, in every mode
            train_sudoku.main([*argv, "--out-dir", str(tmp_path / "f")])


def test_two_ctrl_c_within_a_second_are_one(monkeypatch):
    """`timeout -s INT` (bench/sudoku_gpu.sh) signals the process and then its group: the loop must still stop
    at a step with a checkpoint. A Ctrl-C more than a second after the first interrupts at once, however many
    came between."""
    now = [100.0]
    monkeypatch.setattr(R.time, "monotonic", lambda: now[0])
    with R.StopOnInterrupt() as stop:
        assert not stop
        os.kill(os.getpid(), signal.SIGINT)
        assert stop
        now[0] += 0.5
        os.kill(os.getpid(), signal.SIGINT)  # the group's copy of the same signal
        now[0] += 0.4
        os.kill(os.getpid(), signal.SIGINT)  # still within a second of the first
        now[0] += 0.2  # 1.1 s after the first: a user pressing again
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode; this is not reached


def test_an_output_file_is_checked_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    os.makedirs(tmp_path / "adir")
    cases = [("adir", {}, IsADirectoryError, "is a directory"), ("afile", {}, FileExistsError, "pass --overwrite"),
             ("afile/x", {}, NotADirectoryError, "afile is not a directory"),
             ("afile/sub/x", {"makes_dirs": True}, NotADirectoryError, "afile is not a directory"),
             ("nodir/x", {}, FileNotFoundError, "no directory .*nodir"), ("", {}, ValueError, "empty")]
    for name, kw, error, msg in cases:
        with pytest.raises(error, match=msg):
            R.check_out_file("--out", str(tmp_path / name) if name else "", **kw)
    with pytest.raises(IsADirectoryError):  # a trailing slash names a directory, made or not
        R.check_out_file("--out", str(tmp_path / "newdir") + os.sep, makes_dirs=True)
    for name, kw in [("afile", {"overwrite": True}), ("nodir/sub/x", {"makes_dirs": True}), ("adir/x", {})]:
        R.check_out_file("--out", str(tmp_path / name), **kw)  # fine


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    path = str(tmp_path / "f.txt")
    with pytest.raises(OSError, match="disk full"):
        with R.written_whole(path) as tmp:
            open(tmp, "w").write("half")
            raise OSError("disk full")
    assert os.listdir(tmp_path) == []
    with R.written_whole(path) as tmp:
        open(tmp, "w").write("old")
    with pytest.raises(KeyboardInterrupt):
        with R.written_whole(path) as tmp:
            open(tmp, "w").write("half")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["f.txt"] and open(path).read() == "old"
    path = str(tmp_path / "set.npz")

    def half(file, **data):
        open(file, "wb").write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez_compressed", half)
    with pytest.raises(OSError, match="disk full"):
        R.cached(path, lambda: {"x": np.arange(3)})
    assert os.listdir(tmp_path) == ["f.txt"]  # no half a cache, which would read as damaged


def test_a_tokenizer_one_id_past_the_vocabulary_is_refused():
    from types import SimpleNamespace
    model = SimpleNamespace(cfg=SimpleNamespace(vocab_size=10, mask_id=9))
    checkpoint.check_tokenizer(model, SimpleNamespace(n_vocab=10, mask_id=9), "d")  # ids 0-9: fits exactly
    with pytest.raises(ValueError, match="d: tokenizer.json's ids go up to 10, past the model's vocabulary"):
        checkpoint.check_tokenizer(model, SimpleNamespace(n_vocab=11, mask_id=9), "d")
    with pytest.raises(ValueError, match="mask_token_id 9"):
        checkpoint.check_tokenizer(model, SimpleNamespace(n_vocab=10, mask_id=8), "d")
