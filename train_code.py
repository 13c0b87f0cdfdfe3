"""
train_code.py — a block-diffusion code model: Fast-dLLM v2's SFT and Relay fine-tuning
(PAPER.md §3 and §5), from a tiny model on the Python standard library up to Fast-dLLM v2 weights.

    python train_code.py                                    # CPU: tiny model, stdlib source, Relay, ~10 min
    python train_code.py --objective sft                    # Fast-dLLM v2's block-diffusion SFT instead
    torchrun --standalone --nproc_per_node=2 train_code.py  # the same with 2 processes (gloo on CPU)
    torchrun --standalone --nproc_per_node=8 train_code.py --preset paper \\
        --init-from Fast_dLLM_v2_1.5B --data chat.jsonl     # the paper's Relay fine-tuning

Objectives:
  sft       the doubled sequence [x_t ‖ x_0] (length 2L, positions 0..L-1 twice, block_mask(doubled=True)),
            per-block noise t ~ U(0,1), mask prob (1-1e-3)t + 1e-3 on supervised tokens only, plus the
            complementary copy, CE with the token shift, mean over masked supervised tokens.
  rollout / relay_sg / relay
            relay.py's K-step rollout on a per-process rollout buffer, in the same doubled layout with x_t
            = the buffer's canvas, the block reveal rule (> --threshold plus the argmax of every block),
            relay at MASK positions only, zero-initialised relay norm.

Data: without --data, Python source from this interpreter's standard library, tokenized with a
byte-level tiktoken encoding (256 bytes + ChatML + mask tokens; nothing downloaded), split by file
into train and held-out; every token after the first is supervised. With --data FILE.jsonl, chat
rows {"messages": [{"role": ..., "content": ...}, ...]} in ChatML with the assistant turns
supervised. The global batch is cut into world x accumulation chunks; chunk c = micro * world + rank
always gets the same rows and noise, so 1 process with accumulation equals N processes without.

The last stdout line is one JSON object (objective, steps, train/val loss, tokens/s, seconds).
"""
import argparse
import json
import math
import os
import shutil
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from code_data import Rows, held_out_signatures, load_stdlib, read_chat_jsonl
from model import (ModelConfig, Transformer, block_mask, byte_tokenizer, from_pretrained, load_state,
                   load_tokenizer, save_byte_tokenizer, save_pretrained)
from relay import OBJECTIVES as _RELAY_OBJECTIVES, RelayChannel, RolloutBuffer, rollout_loss
from sampler import generate, pick_device, reveal_threshold_blocks, shift_right

OBJECTIVES = ("sft",) + _RELAY_OBJECTIVES[1:]  # sft, rollout, relay_sg, relay
PRESETS = {  # any flag given explicitly wins
    "cpu": dict(n_layer=4, n_embd=128, n_head=4, n_kv_head=2, n_ffn=384, bd_size=32, seq_len=256,
                batch_size=16, micro_batch=0, lr=2e-3, max_steps=300, dtype="float32",
                eval_every=50, ckpt_every=50),
    "paper": dict(sft_steps=0, lr=5e-6, batch_size=64, micro_batch=2, max_steps=200, seq_len=2048, dtype="bfloat16",
                  eval_every=50, ckpt_every=50),
    "tiny": dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, n_ffn=64, bd_size=16, seq_len=64,
                 batch_size=4, micro_batch=2, lr=3e-3, max_steps=4, sft_steps=0, dtype="float32", eval_every=2,
                 ckpt_every=2),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objective", choices=OBJECTIVES, default="relay")
    p.add_argument("--preset", choices=["auto", *PRESETS], default="auto", help="auto: cpu, or paper with --init-from")
    p.add_argument("--K", type=int, default=2, help="rollout forwards per micro-step (truncated BPTT window)")
    p.add_argument("--threshold", type=float, default=0.85, help="block reveal threshold (rollout and sampling)")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--sft-steps", type=int, help="rollout objectives: train the first N steps with sft, then "
                   "switch (Relay fine-tunes an SFT-trained model; from scratch its buffer starts slowly). "
                   "Default: 2/3 of --max-steps with the cpu preset, else 0")
    p.add_argument("--time-limit", type=float, default=0.0, help="stop after this many minutes (0 = none)")
    p.add_argument("--stop-after", type=int, default=0, help="stop (with a checkpoint) after this many steps "
                   "of this invocation; --resume continues (0 = run to --max-steps)")
    p.add_argument("--batch-size", type=int, help="global rows per optimizer step")
    p.add_argument("--micro-batch", type=int, help="rows per process per forward (and rollout buffer size); "
                   "0 = batch size / processes, no accumulation")
    p.add_argument("--seq-len", type=int, help="tokens per row (a multiple of the block size)")
    p.add_argument("--lr", type=float, help="peak learning rate (cosine to 10%% after 3%% warmup)")
    p.add_argument("--warmup-frac", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-embd", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--n-kv-head", type=int)
    p.add_argument("--n-ffn", type=int)
    p.add_argument("--bd-size", type=int, help="diffusion block size (from scratch; --init-from uses its config)")
    p.add_argument("--init-from", default="", help="a Fast-dLLM v2 / Qwen2 checkpoint directory")
    p.add_argument("--data", default="", help="chat JSONL; default: the Python standard library's source")
    p.add_argument("--val-every-n", type=int, default=50, help="JSONL: every n-th row is held out")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="autocast dtype (weights stay fp32)")
    p.add_argument("--fsdp", action="store_true", help="shard parameters, grads and optimizer (fully_shard)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing of every block")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches per validation")
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--samples", type=int, default=3, help="held-out signatures to complete at the end")
    p.add_argument("--out-dir", default="out/code")
    p.add_argument("--data-dir", default="data", help="cache of the tokenized standard library")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    preset = args.preset if args.preset != "auto" else ("paper" if args.init_from else "cpu")
    args.preset = preset
    for k, v in PRESETS[preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    for k in ("n_layer", "n_embd", "n_head", "n_kv_head", "n_ffn", "bd_size"):
        if getattr(args, k) is None:
            setattr(args, k, PRESETS["cpu"][k])
    if args.sft_steps is None:
        args.sft_steps = 2 * args.max_steps // 3 if preset == "cpu" and args.objective != "sft" else 0
    if args.max_steps < 1 or args.K < 1 or args.micro_batch < 0:
        p.error("need --max-steps >= 1, --K >= 1, --micro-batch >= 0")
    if args.preset == "paper" and not args.init_from:
        p.error("--preset paper fine-tunes pretrained weights: give --init-from DIR")
    return args


# ---------------------------------------------------------------------------------------------
# the two losses in the doubled layout [x_t ‖ x_0]

def doubled(model, xt, x0, bd, masked, relay=None):
    """Forward of [x_t ‖ x_0] (B, 2L) -> logits (N, V) for the tokens at `masked` (B, L) and the noisy
    half's relay state. THE token shift (as sampler.shift_right): token i is read from position i-1
    (token 0 from position 0), and the relay state is shifted the same way."""
    B, L = xt.shape
    pos = torch.arange(L, device=xt.device).repeat(2)
    if relay is not None:
        relay = torch.cat([relay, torch.zeros_like(relay)], 1)
    rows, cols = masked.nonzero(as_tuple=True)  # row-major, the order of tensor[masked]
    logits, h = model(torch.cat([xt, x0], 1), pos=pos, attn_mask=block_mask(L, bd, doubled=True, device=xt.device),
                      relay=relay, out=slice(0, L), head=(rows, (cols - 1).clamp(min=0)))
    return logits, shift_right(h)


def sft_masks(fixed, gen, bd):
    """Per block t ~ U(0,1); mask supervised tokens with prob (1-1e-3)t + 1e-3; then the complementary
    copy, so every supervised token is masked in exactly one of the two. (B, L) -> (2B, L) bool."""
    B, L = fixed.shape
    t = torch.rand(B, L // bd, 1, generator=gen, device=fixed.device).expand(B, L // bd, bd).reshape(B, L)
    m = (torch.rand(B, L, generator=gen, device=fixed.device) < (1 - 1e-3) * t + 1e-3) & ~fixed
    return torch.cat([m, ~m & ~fixed])


def sft_loss(model, x0, fixed, gen, bd, mask_id):
    """Fast-dLLM v2 SFT: CE (token shift) over the masked supervised tokens of both copies."""
    masks = sft_masks(fixed, gen, bd)  # (2B, L)
    x0d = torch.cat([x0, x0])
    logits, _ = doubled(model, torch.where(masks, mask_id, x0d), x0d, bd, masks)
    return F.cross_entropy(logits.float(), x0d[masks])


def relay_step_loss(model, buf, args, mask_id):
    """relay.py's K-step rollout on the LLM: the doubled layout with x_t = the buffer's canvas."""
    bd = args.bd_size

    def forward(x, h, masked):
        return doubled(model, x, buf.x0, bd, masked, relay=h)

    return rollout_loss(model, buf, args.K, args.objective,
                        lambda conf, masked: reveal_threshold_blocks(conf, masked, args.threshold, bd),
                        forward=forward)


# ---------------------------------------------------------------------------------------------
# helpers

def lr_at(step, args):
    warm = max(1, math.ceil(args.warmup_frac * args.max_steps))
    if step < warm:
        return args.lr * (step + 1) / warm
    frac = (step - warm) / max(1, args.max_steps - warm)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))  # cosine to 10%


def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(model, val_rows, args, mask_id, ctx):
    """Held-out SFT loss with fixed rows and noise (comparable across objectives; no relay)."""
    model.eval()
    gen = torch.Generator(device=val_rows.device).manual_seed(args.seed + 1)
    val_rows.rng = np.random.default_rng([args.seed, 10 ** 6])
    losses = []
    for _ in range(args.eval_batches):
        x0, fixed = val_rows(args.micro_batch)
        with ctx:
            losses.append(sft_loss(model, x0, fixed, gen, args.bd_size, mask_id).item())
    model.train()
    return float(np.mean(losses))


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    ddp = "RANK" in os.environ
    if ddp:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
        device = f"cuda:{local}" if cuda else "cpu"
        if cuda:
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, pick_device(args.device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    if args.micro_batch == 0:
        args.micro_batch = args.batch_size // world
    if args.micro_batch < 1 or args.batch_size % (world * args.micro_batch):
        raise ValueError(f"--batch-size {args.batch_size} is not a multiple of world size {world} x "
                         f"--micro-batch {args.micro_batch}")
    accum = args.batch_size // (world * args.micro_batch)
    log(json.dumps({"args": vars(args), "world": world, "accum": accum, "device": device}))
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    ctx = torch.autocast(device.split(":")[0], dtype=dtype) if dtype != torch.float32 else nullcontext()
    os.makedirs(args.out_dir, exist_ok=True)
    t_start = time.time()

    # tokenizer, data
    tok = load_tokenizer(args.init_from) if args.init_from else byte_tokenizer()
    if tok.mask_id is None:
        raise ValueError(f"{args.init_from}: the tokenizer has no mask token |<MASK>|")
    if args.data:
        rows = read_chat_jsonl(args.data, tok, args.seq_len, args.bd_size)
        train_data = [r for i, r in enumerate(rows) if i % args.val_every_n != args.val_every_n - 1]
        val_data = [r for i, r in enumerate(rows) if i % args.val_every_n == args.val_every_n - 1] or rows[:1]
        val_text = ""
        log(f"data: {args.data}: {len(train_data)} training rows, {len(val_data)} held out")
    else:
        corpus = load_stdlib(tok, args.data_dir)
        train_data, val_data = corpus["train"], corpus["val"]
        val_text = tok.decode(val_data[:200_000].tolist(), skip_special=True)
        log(f"data: standard library, {len(train_data) / 1e6:.1f}M training tokens, {len(val_data) / 1e6:.2f}M "
            f"held out ({len(corpus['val_files'])} files)")

    # model
    relay_obj = args.objective in ("relay_sg", "relay")
    if args.init_from:
        model = from_pretrained(args.init_from, device="cpu", dtype=torch.float32)
        args.bd_size = model.cfg.bd_size
        if relay_obj and model.relay is None:  # add the relay channel, zero-initialised (PAPER.md §2)
            model.cfg.relay = True
            model.relay = RelayChannel(model.cfg.n_embd, model.cfg.relay_eps, True, True)
    else:
        cfg = ModelConfig(vocab_size=tok.n_vocab, n_layer=args.n_layer, n_head=args.n_head, n_kv_head=args.n_kv_head,
                          n_embd=args.n_embd, n_ffn=args.n_ffn, rope_theta=1e6, norm_eps=1e-6, qkv_bias=True,
                          tie_embeddings=True, mask_id=tok.mask_id, bd_size=args.bd_size, relay=relay_obj,
                          relay_masked_only=True, relay_after_norm=True, relay_zero_init=True, relay_eps=1e-6)
        model = Transformer(cfg)
    if args.seq_len % args.bd_size:
        raise ValueError(f"--seq-len {args.seq_len} is not a multiple of the block size {args.bd_size}")
    mask_id = model.cfg.mask_id
    model.grad_ckpt = args.grad_ckpt
    model = model.to(device).train()
    raw = model
    log(f"model: {raw.num_params() / 1e6:.2f}M parameters, objective {args.objective}, bd_size {args.bd_size}, "
        f"{world} process(es) x {args.micro_batch} rows x {accum} micro-steps, {device} {args.dtype}")
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in raw.layers:
            fully_shard(layer)
        fully_shard(raw)
    elif ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None,
            find_unused_parameters=raw.relay is not None and (args.objective == "sft" or args.sft_steps > 0))
    fwd_model = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(raw.param_groups(args.weight_decay), lr=args.lr, betas=(0.9, 0.95),
                            fused=device.startswith("cuda"))

    chunks = [m * world + rank for m in range(accum)]  # this process's chunks of the global batch
    pad_id = tok.added["<|endoftext|>"]
    streams = [Rows(train_data, args.seq_len, args.seed, c, pad_id, device) for c in chunks]
    val_rows = Rows(val_data, args.seq_len, args.seed, 10 ** 6, pad_id, device)
    gens = [torch.Generator(device=device).manual_seed(args.seed * 1000 + c) for c in chunks]
    bufs = [RolloutBuffer(args.micro_batch, args.seq_len, raw.cfg.n_embd, mask_id, device)
            for _ in chunks] if args.objective != "sft" else []

    step = 0
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")

    def state():  # this process's share of the training state (data position, noise, buffers)
        return {"streams": [s.rng.bit_generator.state for s in streams], "gens": [g.get_state() for g in gens],
                "bufs": [b.state_dict() for b in bufs], "torch_rng": torch.get_rng_state()}

    def full_state(with_optimizer=True):  # FSDP: gathers the shards (a collective: every rank calls it)
        if not args.fsdp:
            return raw.state_dict(), opt.state_dict() if with_optimizer else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, \
            get_optimizer_state_dict
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(raw, options=opts),
                get_optimizer_state_dict(raw, opt, options=opts) if with_optimizer else None)

    def checkpoint():
        states = [None] * world
        if ddp:
            dist.all_gather_object(states, state())
        else:
            states = [state()]
        msd, osd = full_state()
        if master:
            save_atomic({"model": msd, "optimizer": osd, "step": step, "config": raw.config_dict(),
                         "args": vars(args), "world": world, "ranks": states}, ckpt_path)
        if ddp:
            dist.barrier()

    if args.resume:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path} (check --out-dir)")
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        diff = {k: (v, ck["config"].get(k)) for k, v in raw.config_dict().items() if ck["config"].get(k) != v}
        if diff or ck["world"] != world or ck["args"]["objective"] != args.objective:
            raise ValueError(f"{ckpt_path} was trained with another setup: config {diff} (ours, theirs), world "
                             f"{ck['world']} vs {world}, objective {ck['args']['objective']} vs {args.objective}")
        if args.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, \
                set_optimizer_state_dict
            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(raw, ck["model"], options=opts)
            set_optimizer_state_dict(raw, opt, ck["optimizer"], options=opts)
        else:
            load_state(raw, ck["model"], ckpt_path)
            opt.load_state_dict(ck["optimizer"])
        st = ck["ranks"][rank]
        for s, v in zip(streams, st["streams"]):
            s.rng.bit_generator.state = v
        for g, v in zip(gens, st["gens"]):
            g.set_state(v)
        for b, v in zip(bufs, st["bufs"]):
            b.load_state_dict(v)
        torch.set_rng_state(st["torch_rng"])
        step = ck["step"]
        log(f"resumed from {ckpt_path} at step {step}")

    # training loop
    bar = tqdm(total=args.max_steps, initial=step, desc=args.objective, disable=not master, dynamic_ncols=True)
    t0, tokens, losses, vals, step0 = time.time(), 0, [], [], step
    while step < args.max_steps:
        if args.stop_after and step - step0 >= args.stop_after:
            break
        if args.time_limit and time.time() - t0 > 60 * args.time_limit:
            log(f"--time-limit {args.time_limit} min reached at step {step}")
            break
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        objective = "sft" if step < args.sft_steps or args.objective == "sft" else args.objective
        if step == args.sft_steps and objective != "sft" and step:
            log(f"step {step}: sft warm start done, switching to {objective}")
        total = torch.zeros((), device=device)
        for i in range(accum):
            sync = nullcontext() if (not ddp or args.fsdp or i == accum - 1) else model.no_sync()
            with sync:
                with ctx:
                    if objective == "sft":
                        x0, fixed = streams[i](args.micro_batch)
                        loss = sft_loss(fwd_model, x0, fixed, gens[i], args.bd_size, mask_id)
                    else:
                        bufs[i].refill(streams[i])
                        loss = relay_step_loss(fwd_model, bufs[i], args, mask_id)
                (loss / accum).backward()
            total += loss.detach() / accum
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += args.batch_size * args.seq_len
        if ddp:  # for the log only (gloo has no AVG)
            dist.all_reduce(total)
            total /= world
        losses.append(total.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.1e}", gnorm=f"{float(gnorm):.2f}")
        if step % args.eval_every == 0 or step == args.max_steps:
            vals.append({"step": step, "val_loss": evaluate(raw, val_rows, args, mask_id, ctx)})
            if master:
                tqdm.write(f"step {step}: train loss {np.mean(losses[-20:]):.4f}, val loss "
                           f"{vals[-1]['val_loss']:.4f}, {tokens / (time.time() - t0):.0f} tokens/s")
        if step % args.ckpt_every == 0 or step == args.max_steps:
            checkpoint()
    bar.close()
    train_seconds = time.time() - t0
    if not vals or vals[-1]["step"] != step:
        vals.append({"step": step, "val_loss": evaluate(raw, val_rows, args, mask_id, ctx)})
        checkpoint()

    hf_dir = os.path.join(args.out_dir, "hf")
    export = raw
    if args.fsdp:  # rank 0 writes an unsharded copy
        full, _ = full_state(with_optimizer=False)
        if master:
            export = Transformer(ModelConfig(**raw.config_dict()))
            load_state(export, full, "the gathered FSDP state")
            export.hf_config = getattr(raw, "hf_config", None)
    if master:
        save_pretrained(export, hf_dir)
        if not args.init_from:
            save_byte_tokenizer(hf_dir)
        for f in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json",
                  "vocab.json", "merges.txt", "generation_config.json"):
            if args.init_from and os.path.exists(os.path.join(args.init_from, f)):
                shutil.copy(os.path.join(args.init_from, f), os.path.join(hf_dir, f))

    samples = []
    if master and args.samples and val_text:
        raw = export.to(device).eval()
        for sig in held_out_signatures(val_text, args.samples):
            with ctx:
                out, st = generate(raw, [tok.encode(sig)], max_new_tokens=96, threshold=args.threshold,
                                   stop_ids=[pad_id])
            samples.append({"prompt": sig, "completion": tok.decode(out[0], skip_special=True), "nfe": st["nfe"][0],
                            "new_tokens": st["new_tokens"][0]})
            print(f"--- held-out signature (NFE {st['nfe'][0]} for {st['new_tokens'][0]} tokens)\n{sig}"
                  f"{samples[-1]['completion']}")
    result = {"objective": args.objective, "sft_steps": min(args.sft_steps, step), "steps": step, "train_loss": float(np.mean(losses[-20:])) if losses else None,
              "val_loss": vals[-1]["val_loss"], "val_curve": vals, "tokens_per_s": tokens / max(train_seconds, 1e-9),
              "train_seconds": train_seconds, "seconds": time.time() - t_start, "world": world,
              "samples": [{k: s[k] for k in ("nfe", "new_tokens")} for s in samples], "hf_dir": hf_dir}
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    if master:
        print(json.dumps(result))
    return {**result, "losses": losses}


if __name__ == "__main__":
    main()
