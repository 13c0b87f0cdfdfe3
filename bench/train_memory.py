"""
bench/train_memory.py — peak memory and step time of Fast-dLLM v2 SFT against Relay (K = 2) at the
same per-device batch and sequence length (arXiv 2605.22967, NOTES.md §5: Relay 20.1 GiB vs SFT 21.2 GiB at 1.5B,
seq 2048, per-device batch 2).

    python bench/train_memory.py                                       # CPU: the tiny shape
    python bench/train_memory.py --shape 1.5b --batch 2 --seq-len 2048 # GPU, bf16 autocast

Each objective runs in a fresh process (so peaks do not mix): random weights of the shape, fp32
master weights + AdamW, bf16 autocast on CUDA, random token rows with a 64-token prompt. Two
warm-up steps, then --steps timed steps (synchronised). Peak = torch.cuda.max_memory_allocated on
CUDA, the process's max RSS on CPU. The table and one JSON line are printed last.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from functools import partial  # noqa: E402

from model import SHAPES, device_flag, pick_device, random_model  # noqa: E402
from runs import argparser, positive_int, run_cli  # noqa: E402
from relay import RolloutBuffer, reveal_threshold_blocks, rollout_loss, sft_loss  # noqa: E402


def one(args):
    device = pick_device(args.device)
    cuda = device.startswith("cuda")
    model, _ = random_model(args.shape, device, torch.float32, 0, n_layer=args.layers)
    model.train()
    model.grad_ckpt = args.grad_ckpt
    cfg = model.cfg
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    gen = torch.Generator(device=device).manual_seed(0)

    def rows(n):
        x0 = torch.randint(0, min(cfg.vocab_size, 256), (n, args.seq_len), device=device, generator=gen)
        fixed = torch.zeros_like(x0, dtype=torch.bool)
        fixed[:, :64] = True
        return x0, fixed

    buf = RolloutBuffer(args.batch, args.seq_len, cfg.n_embd, cfg.mask_id, device)
    reveal = partial(reveal_threshold_blocks, threshold=0.85, bd_size=cfg.bd_size)
    times = []
    for i in range(2 + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.time()
        with ctx:
            if args.only == "sft":
                x0, fixed = rows(args.batch)
                loss = sft_loss(model, x0, fixed, gen)
            else:
                buf.refill(rows)
                loss = rollout_loss(model, buf, 2, args.only, reveal, doubled=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.time() - t)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** (30 if sys.platform == "darwin" else 20)  # B / KiB
    print(json.dumps({"objective": args.only, "peak_gib": peak, "step_s": sum(times) / len(times),
                      "params_m": model.num_params() / 1e6, "device": torch.cuda.get_device_name() if cuda else "cpu"}))


def main():
    p = argparser(__doc__)
    p.add_argument("--shape", choices=list(SHAPES), default="tiny", help="random Qwen2.5 shape (model.SHAPES)")
    p.add_argument("--batch", type=positive_int, default=2, help="rows per device")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    p.add_argument("--steps", type=positive_int, default=3, help="timed steps after 2 warm-up steps")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing of every block")
    p.add_argument("--layers", type=positive_int, default=None, help="only this many blocks of the shape (a CPU estimate of a "
                   "large shape: memory at two depths gives the per-block and the fixed part)")
    p.add_argument("--device", type=device_flag, default="auto", help="auto (cuda > mps > cpu), cpu, cuda")
    p.add_argument("--only", choices=["sft", "relay"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.seq_len <= 64:
        p.error(f"--seq-len {args.seq_len}: the first 64 tokens of a row are its prompt, so a longer row is needed "
                "for any loss")
    if args.only:
        return one(args)
    res = []
    for obj in ("sft", "relay"):
        cmd = [sys.executable, __file__, "--only", obj] + sys.argv[1:]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{obj} failed:\n{r.stderr[-3000:]}")
        res.append(json.loads(r.stdout.strip().splitlines()[-1]))
    layers = f" ({args.layers} layers)" if args.layers else ""
    print(f"shape {args.shape}{layers}, batch {args.batch}/device, seq {args.seq_len}, grad ckpt {args.grad_ckpt}, "
          f"{res[0]['device']}, torch {torch.__version__}")
    for r in res:
        print(f"{r['objective']:>6}: peak {r['peak_gib']:7.2f} GiB, {r['step_s']:.3f} s/step")
    print(json.dumps({"shape": args.shape, "layers": args.layers, "batch": args.batch, "seq_len": args.seq_len,
                      "grad_ckpt": args.grad_ckpt, "results": res, "torch": torch.__version__}))


if __name__ == "__main__":
    run_cli(main)
