"""
bench/throughput.py — training throughput per objective, sampler and generator speed, for the
Sudoku preset of the current device.

    python bench/throughput.py                 # CPU preset
    python bench/throughput.py --steps 50 --preset paper --device cuda

Training: puzzle-rows per second through train_sudoku.train_step (mlm: one forward+backward of the
batch; rollout objectives: K forwards of the buffer; clip, AdamW and EMA included), timed after
warm-up, with device sync. Flags it does not know go to train_sudoku (--preset, --compile, ...).
Sampler: puzzles per second of sample_mdm at tau 0.15 with a freshly initialised model is not
meaningful (it reveals one cell per step), so pass --checkpoint for a trained one.
Generator: puzzles per second of sudoku.py's plain stream (tiers 0 and 1 as they come) and of each
tier on its own; the hard tier (2) only with --n-gen-hard N (minutes: its islands climb first).
Prints one JSON line last.
"""
import json
import os
import sys
import time
from contextlib import nullcontext

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import sudoku  # noqa: E402
import train_sudoku as ts  # noqa: E402
from checkpoint import load_model  # noqa: E402
from relay import OBJECTIVES  # noqa: E402
from runs import argparser, cpu_name, kernel_ms, nonneg_int, positive_int  # noqa: E402
from sampler import sample_mdm  # noqa: E402

p = argparser(__doc__)
p.add_argument("--steps", type=positive_int, default=20, help="timed optimizer steps per objective")
p.add_argument("--warmup-steps", type=nonneg_int, default=3, help="untimed steps first")
p.add_argument("--checkpoint", default="", help="trained checkpoint for the sampler timing")
p.add_argument("--n-gen-hard", type=nonneg_int, default=0, help="hard-tier puzzles to time (0: skip; one island per "
               "training seed, ~5 puzzles/s per process)")
p.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES), help="objectives to time")
p.add_argument("--profile", action="store_true", help="print where 5 steps of relay spend their time (torch.profiler)")
p.add_argument("--n-gen", type=positive_int, default=200, help="puzzles to generate for the generator timing "
               "(the training steps draw their rows from them)")
args, rest = p.parse_known_args()
ts.get_args([*rest, "--objective", args.objectives[0]])  # train_sudoku's flags: a bad one stops here, before any work
trained = load_model(args.checkpoint, kind="sudoku")[0] if args.checkpoint else None  # before the training timings


PEAK_BF16 = 989e12  # dense bf16 FLOP/s of an H100 SXM or H200 (NVIDIA's data sheets)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def processor():
    """The CPU's model name (and the GPU's, when there is one): numbers mean little without it."""
    return cpu_name(), torch.cuda.get_device_name() if torch.cuda.is_available() else None


out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
out["cpu"], out["gpu"] = processor()
t0 = time.time()
gen_data = sudoku.generate(99, args.n_gen, desc="generator")  # the training speed does not depend on the puzzles
out["train_data"] = f"{args.n_gen} generated puzzles (--data is not read)"
out["generator_puzzles_per_s"] = args.n_gen / (time.time() - t0)
for tier, n in ((0, args.n_gen), (1, args.n_gen), (2, args.n_gen_hard)):
    if n:
        t0 = time.time()
        sudoku.generate_tier(tier, 98, n)
        out[f"generator_puzzles_per_s_tier{tier}"] = n / (time.time() - t0)
out["generator_processes"] = min(os.cpu_count() or 1, 8)  # generate()'s default; the hard tier: one per island
for obj in args.objectives:  # the trainer's own step (loss, clip, AdamW, EMA), so this is what a run gets
    a = ts.get_args([*rest, "--objective", obj, "--mlm-frac", "0"])
    ctx = torch.autocast(a.device.split(":")[0], dtype=torch.bfloat16) if a.dtype == "bfloat16" else nullcontext()
    model, ema, opt, buf, stream, gen = ts.training_objects(a, gen_data)
    train_model = torch.compile(model, mode=a.compile) if a.compile else model
    for i in range(args.warmup_steps + args.steps):
        if i == args.warmup_steps:
            sync(a.device)
            t = time.time()
        loss, _ = ts.train_step(a, i, train_model, model, ema, opt, buf, stream, gen, ctx)
    loss.item()  # waits for the last step
    out[f"train_rows_per_s_{obj}"] = rows_per_s = a.batch_size * args.steps / (time.time() - t)  # before any profile
    if args.profile and obj == "relay":
        try:  # NOTE: a profiler failure must not cost the speeds measured (one GPU call runs this)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if out["gpu"] else [])
            with profile(activities=acts) as prof:
                for i in range(5):
                    loss, _ = ts.train_step(a, i, train_model, model, ema, opt, buf, stream, gen, ctx)
                loss.item()
            key = "self_cuda_time_total" if out["gpu"] else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
            if out["gpu"]:  # busy well under the step time: the GPU waits for the host (launches, Python)
                out["relay_gpu_busy_ms_per_step"] = kernel_ms(prof) / 5
                out["relay_step_ms"] = 1e3 * a.batch_size / rows_per_s
        except Exception as e:
            print(f"--profile failed ({type(e).__name__}: {e}); the speeds above stand", file=sys.stderr)
    if out["gpu"]:  # model FLOPs: 6 per weight and token, plus attention's, per forward of a row (K for rollouts)
        cfg = model.cfg
        matmul = 6 * (model.num_params() - cfg.vocab_size * cfg.n_embd) + 12 * cfg.n_layer * 81 * cfg.n_embd
        flops = matmul * 81 * (1 if obj == "mlm" else a.K)
        out[f"mfu_bf16_{obj}"] = rows_per_s * flops / PEAK_BF16
    out["device"], out["preset"], out["batch_size"], out["compile"] = a.device, a.preset, a.batch_size, a.compile
    out["dtype"] = a.dtype
if trained is not None:  # decoding as train_sudoku evaluates: the same --dtype (autocast)
    model = trained.to(out["device"])
    x = torch.from_numpy(gen_data["question"]).long().to(out["device"])
    with ctx:
        sample_mdm(model, x[:16])
        sync(out["device"])
        t = time.time()
        res, st = sample_mdm(model, x)
        sync(out["device"])
    out["sampler_puzzles_per_s"] = len(x) / (time.time() - t)
    out["sampler_nfe"] = float(st["nfe"].float().mean())
    out["sampler_exact_match_generated"] = float((res.cpu().numpy() == gen_data["answer"]).all(1).mean())
for k, v in out.items():
    print(f"{k:>32}: {v:.1f}" if isinstance(v, float) else f"{k:>32}: {v}")
print(json.dumps(out))
