"""
train_code.py — a block-diffusion code model: Fast-dLLM v2's SFT and Relay fine-tuning (arXiv
2605.22967; NOTES.md §2, §5), from a tiny model on generated coding problems up to Fast-dLLM v2
weights on GPUs.

    python train_code.py                                    # CPU: tiny model, generated problems, Relay
    python train_code.py --objective sft --out-dir out/sft  # Fast-dLLM v2's block-diffusion SFT instead
    torchrun --standalone --nproc_per_node=2 train_code.py  # the same with 2 processes (gloo on CPU)
    torchrun --standalone --nproc_per_node=8 train_code.py --preset paper \\
        --init-from Fast_dLLM_v2_1.5B --data chat.jsonl     # the paper's Relay fine-tuning

Objectives (relay.py):
  sft       Fast-dLLM v2's SFT: the doubled sequence [x_t ‖ x_0], per-block noise on supervised tokens
            plus the complementary copy, CE with the token shift.
  rollout / relay_sg / relay
            the K-step rollout on a rollout buffer per accumulation chunk (--buffers process: one per
            process, the authors' way), in the same doubled layout with x_t =
            the buffer's canvas, the block reveal rule (> --threshold plus the argmax of every block),
            relay at MASK positions only, zero-initialised relay norm. The first --sft-frac of the
            steps are SFT (a warm start), so an sft and a relay run take the same number of steps.

Data (code_data.py): by default code_tasks.py's generated instruction -> code problems (the signature
and docstring as context, the body supervised); the run ends by solving --eval-problems held-out
problems (unseen parameter values and pairs) through eval_code.py's sandbox: pass@1, NFE, tokens/s and
--samples examples. --data stdlib: the Python standard library's source, byte-level tokens, split by
file. --data FILE.jsonl: chat rows in ChatML with the assistant turns supervised. The global batch is
cut into world x accumulation chunks; chunk c = micro * world + rank always gets the same rows and
noise, so 1 process with accumulation equals N processes without.

Presets set the flags' defaults before parsing (`--help` shows them): cpu (default), paper, tiny (tests).
The last stdout line is one JSON object (objective, steps, train/val loss, training tokens/s, pass@1, NFE,
generated tokens/s, seconds).
"""
import gc
import glob
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from tqdm import tqdm

from checkpoint import (check_tokenizer, config_diff, from_pretrained, load_checkpoint, load_state, read_config,
                        save_checkpoint, save_pretrained)
from code_data import (Rows, data_digest, held_out_signatures, load_stdlib, read_chat_jsonl, synthetic_problems,
                       synthetic_rows, synthetic_tokenizer)
from model import QWEN2, SHAPES, ModelConfig, Transformer, device_flag, pick_device, shape_problem
from relay import RELAY_OBJECTIVES, RolloutBuffer, add_relay, reveal_threshold_blocks, rollout_loss, sft_loss
from runs import (InputError, Refused, StopOnInterrupt, argparser, claim_out_dir, given_flags, how_to_continue,
                  nonneg_float, nonneg_int, positive_float, positive_int, run_cli, seed_int, stop_reason, unit_float)
from eval_code import evaluate, with_check
from sandbox import run_sandboxed
from sampler import generate
from tokenizer import byte_tokenizer, load_tokenizer, save_tokenizer

OBJECTIVES = ("sft", "rollout", "relay_sg", "relay")
TINY = SHAPES["tiny"]  # the cpu preset's model: Qwen2.5-shaped, 0.88M parameters with its BPE
PRESETS = {  # flag defaults per preset; "cpu" is what the add_argument defaults below already say
    "cpu": {},
    "paper": dict(sft_frac=0.0, lr=5e-6, batch_size=64, micro_batch=2, max_steps=200, seq_len=2048,
                  dtype="bfloat16", lr_epochs=3.0, beta2=0.999, buffers="process"),  # the authors' launcher:
    # 3-epoch cosine, HF AdamW, one rollout buffer per process
    "tiny": dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, n_ffn=64, bd_size=16, seq_len=384, batch_size=4,
                 micro_batch=2, lr=3e-3, max_steps=4, sft_frac=0.0, eval_every=2, ckpt_every=2, train_problems=200,
                 eval_problems=0),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json")


def get_args(argv=None):
    pre = argparser(None, add_help=False)
    pre.add_argument("--preset", choices=list(PRESETS), default="cpu")
    preset = pre.parse_known_args(argv)[0].preset
    p = argparser(__doc__, show_defaults=True)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu", help="flag defaults: cpu, paper or tiny")
    # the method
    p.add_argument("--objective", choices=OBJECTIVES, default="relay", help="training objective")
    p.add_argument("--K", type=positive_int, default=2, help="rollout forwards per micro-step (truncated BPTT window)")
    p.add_argument("--threshold", type=unit_float, default=0.85, help="block reveal threshold (rollout and sampling)")
    p.add_argument("--sft-frac", type=unit_float, default=2 / 3, help="rollout objectives: train this fraction of "
                   "--max-steps with sft first (Relay fine-tunes an SFT-trained model; from scratch its buffer "
                   "starts slowly)")
    # optimisation
    p.add_argument("--max-steps", type=positive_int, default=3000, help="optimizer steps")
    p.add_argument("--time-limit", type=nonneg_float, default=0.0, help="stop after this many minutes (0 = none)")
    p.add_argument("--stop-after", type=nonneg_int, default=0, help="pause after this many steps of this invocation: a "
                   "checkpoint, no export or evaluation; --resume continues (0 = run to --max-steps)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="global rows per optimizer step")
    p.add_argument("--micro-batch", type=nonneg_int, default=0, help="rows per process per forward (and rollout buffer "
                   "size); 0 = batch size / processes, no accumulation")
    p.add_argument("--buffers", choices=("chunk", "process"), default="chunk", help="rollout buffers: one per "
                   "accumulation chunk (any split of a global batch over processes trains the same) or one per "
                   "process, advanced at every micro-step, as the authors do (then the split changes training)")
    p.add_argument("--seq-len", type=positive_int, default=384, help="tokens per row (a multiple of the block size)")
    p.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate (cosine to 10%% after warmup)")
    p.add_argument("--warmup-frac", type=unit_float, default=0.03, help="linear warmup, fraction of the schedule")
    p.add_argument("--lr-epochs", type=nonneg_float, default=0.0, help="the warmup + cosine schedule spans this many "
                   "epochs of the training data, however many steps run (the authors: 3); 0 = --max-steps")
    p.add_argument("--beta2", type=unit_float, default=0.95, help="AdamW's second-moment decay (HF's default 0.999)")
    p.add_argument("--weight-decay", type=nonneg_float, default=0.0, help="AdamW weight decay (not on biases/norms)")
    p.add_argument("--clip", type=positive_float, default=1.0, help="gradient norm clip")
    # model: --init-from a checkpoint, or a Qwen2.5-shaped model from scratch
    p.add_argument("--init-from", default="", help="a Fast-dLLM v2 / Qwen2 checkpoint directory")
    p.add_argument("--n-layer", type=positive_int, default=TINY["n_layer"], help="from scratch: Transformer blocks")
    p.add_argument("--n-embd", type=positive_int, default=TINY["n_embd"], help="from scratch: model width")
    p.add_argument("--n-head", type=positive_int, default=TINY["n_head"], help="from scratch: query heads")
    p.add_argument("--n-kv-head", type=positive_int, default=TINY["n_kv_head"], help="from scratch: key/value heads")
    p.add_argument("--n-ffn", type=positive_int, default=TINY["n_ffn"], help="from scratch: SwiGLU hidden width")
    p.add_argument("--bd-size", type=positive_int, default=QWEN2["bd_size"],
                   help="from scratch: diffusion block size (--init-from uses its config's)")
    # data, systems, files
    p.add_argument("--data", default="synthetic", help="synthetic (code_tasks.py's generated problems), stdlib "
                   "(the Python standard library's source) or a chat JSONL file")
    p.add_argument("--bpe-merges", type=nonneg_int, default=None, help="from scratch on synthetic data: learn up "
                   "to this many byte-level BPE merges from the training problems (fewer once no pair occurs twice: "
                   "463 of 512 on the default problems; 0 = the byte tokenizer); default 512 there, bytes for stdlib "
                   "and JSONL")
    p.add_argument("--train-problems", type=positive_int, default=20000, help="synthetic: training problems")
    p.add_argument("--eval-problems", type=nonneg_int, default=200, help="synthetic: held-out problems solved "
                   "through the sandbox at the end (pass@1); 0 = none")
    p.add_argument("--val-every-n", type=positive_int, default=50, help="JSONL: every n-th row is held out")
    p.add_argument("--device", type=device_flag, default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="autocast dtype (weights stay fp32)")
    p.add_argument("--fsdp", action="store_true", help="shard parameters, grads and optimizer (fully_shard)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing of every block")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--eval-every", type=positive_int, default=50, help="steps between validations")
    p.add_argument("--eval-batches", type=positive_int, default=4, help="held-out batches per validation")
    p.add_argument("--ckpt-every", type=positive_int, default=50, help="steps between checkpoints")
    p.add_argument("--samples", type=nonneg_int, default=3, help="held-out problems (or stdlib signatures) to "
                   "print with their completion at the end")
    p.add_argument("--unsafe-no-isolation", action="store_true", help="--eval-problems without the sandbox's "
                   "isolation (where it cannot be set up: not root, not Linux)")
    p.add_argument("--out-dir", default="out/code", help="checkpoint and the exported hf/ directory")
    p.add_argument("--data-dir", default="data", help="cache of the tokenized standard library")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
    p.add_argument("--overwrite", action="store_true", help="start a new run even though OUT_DIR/ckpt.pt exists "
                   "(it is replaced at the first checkpoint)")
    p.add_argument("--seed", type=seed_int, default=1337, help="model init, data order, noise")
    p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    check_args(p, args, given_flags(p, argv, vars(args)))
    args.sft_steps = 0 if args.objective == "sft" else round(args.sft_frac * args.max_steps)  # derived
    if args.objective != "sft" and args.sft_steps >= args.max_steps:
        p.error(f"--sft-frac {args.sft_frac:g} of --max-steps {args.max_steps} is every step: a {args.objective} run "
                f"would train no {args.objective} step")
    if args.bpe_merges is None:  # derived: a learned vocabulary only from scratch on generated problems
        args.bpe_merges = 512 if args.data == "synthetic" and not args.init_from else 0
    return args


SHAPE_FLAGS = ("n_layer", "n_embd", "n_head", "n_kv_head", "n_ffn", "bd_size")  # a model from scratch


def check_args(p, args, given):
    """What the types of single flags cannot see: flags that must agree. A usage error before any work.
    given: the flags the command line set (not defaults or a preset's)."""
    if args.preset == "paper" and not args.init_from:
        p.error("--preset paper fine-tunes pretrained weights: give --init-from DIR")
    if args.resume and args.overwrite:
        p.error("--resume continues OUT_DIR/ckpt.pt and --overwrite replaces it: give one")
    if args.fsdp and "RANK" not in os.environ:
        p.error("--fsdp shards the model over torchrun's processes: launch with torchrun --nproc_per_node N")
    if args.beta2 >= 1:
        p.error(f"--beta2 {args.beta2:g}: AdamW needs a decay below 1")
    if args.val_every_n < 2:
        p.error(f"--val-every-n {args.val_every_n} holds out every row, leaving none to train on: need >= 2")
    if args.data not in ("synthetic", "stdlib") and not os.path.exists(args.data):  # a keyword's typo, or a path
        p.error(f"--data {args.data}: no such file (or synthetic, stdlib)")  # (a pipe is fine: <(zcat chat.jsonl.gz))
    if os.path.isdir(args.data):
        p.error(f"--data {args.data} is a directory: give a chat JSONL file")
    if args.micro_batch and (args.micro_batch > args.batch_size or args.batch_size % args.micro_batch):
        p.error(f"--batch-size {args.batch_size} is not a multiple of --micro-batch {args.micro_batch}")
    if args.bpe_merges and (args.init_from or args.data != "synthetic"):
        p.error(f"--bpe-merges {args.bpe_merges}: a vocabulary is learned only from scratch on --data synthetic "
                f"(a checkpoint brings its own tokenizer; stdlib and JSONL use bytes)")
    own = os.path.realpath(os.path.join(args.out_dir, "hf"))
    if args.init_from and os.path.commonpath([os.path.realpath(args.init_from), own]) == own:
        p.error(f"--init-from {args.init_from} is this run's own export (--out-dir {args.out_dir}): it would be "
                f"written over while it is read; give another --out-dir")
    if args.init_from and (shape := [f"--{k.replace('_', '-')}" for k in SHAPE_FLAGS if k in given]):
        p.error(f"{' '.join(shape)}: the model comes from --init-from {args.init_from} (its config.json)")
    if args.init_from:  # the shape and the block size come from the checkpoint's config.json
        return
    if problem := shape_problem(args.n_embd, args.n_head, args.n_kv_head):
        p.error(f"--n-embd {args.n_embd} / --n-head {args.n_head} / --n-kv-head {args.n_kv_head}: {problem}")
    if args.seq_len % args.bd_size:
        p.error(f"--seq-len {args.seq_len} is not a multiple of --bd-size {args.bd_size}")


# ---------------------------------------------------------------------------------------------
# processes, data, model

@dataclass
class Dist:
    """Where this process runs: torchrun's env vars (DDP / FSDP), or a single process."""
    ddp: bool
    rank: int
    world: int
    device: str

    @property
    def master(self):
        return self.rank == 0

    def log(self, msg):
        if self.master:
            tqdm.write(msg)  # prints above the progress bar instead of through it


def setup_distributed(args):
    if "RANK" not in os.environ:
        return Dist(False, 0, 1, pick_device(args.device))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    dist.init_process_group("nccl" if cuda else "gloo")  # gloo: CPU DDP, testable on a laptop
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    return Dist(True, rank, world, device)


def claim(args, d):
    """Rank 0 claims OUT_DIR (model.claim_out_dir: a lock, and no new run over a checkpoint); its
    error is raised on every rank, so no rank is left waiting at a collective."""
    err = None
    if d.master:
        try:
            claim_out_dir(args.out_dir, args.resume, args.overwrite, also=("hf",))  # nor its export
        except (OSError, RuntimeError) as e:
            err = e
    if d.ddp:
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err is not None:
        raise err


def my_chunks(args, d):
    """This process's chunks of the global batch. The global batch is world x accum chunks of
    --micro-batch rows; this process owns chunks rank, rank + world, ..., so any split of the same
    global batch over processes sees the same rows and noise."""
    args.micro_batch = args.micro_batch or args.batch_size // d.world  # 0 = no gradient accumulation
    if args.micro_batch < 1 or args.batch_size % (d.world * args.micro_batch):
        raise InputError(f"--batch-size {args.batch_size} is not a multiple of world size {d.world} x "
                         f"--micro-batch {args.micro_batch}")
    return [m * d.world + d.rank for m in range(args.batch_size // (d.world * args.micro_batch))]


def get_tokenizer(args):
    """The checkpoint's tokenizer; from scratch, bytes or (synthetic data) BPE learned from the problems."""
    if args.init_from:
        read_config(args.init_from)  # a missing or wrong directory is named as such, before its tokenizer is asked for
        tok = load_tokenizer(args.init_from)
        if tok.mask_id is None:
            raise InputError(f"{args.init_from}: the tokenizer has no mask token |<MASK>|")
        return tok
    return synthetic_tokenizer(args.train_problems, args.bpe_merges) if args.bpe_merges else byte_tokenizer()


VAL_PROBLEMS = 200  # synthetic: the held-out problems of the validation loss, whatever --eval-problems solves


def load_data(args, tok, d):
    """-> (training data, held-out data, held-out text for the samples)."""
    if args.data == "synthetic":  # train and held-out problems never share (family, parameters)
        train = synthetic_rows(synthetic_problems("train", args.train_problems), tok, args.seq_len, args.bd_size)
        val = synthetic_rows(synthetic_problems("test", VAL_PROBLEMS), tok, args.seq_len, args.bd_size)
        d.log(f"data: code_tasks.py, {len(train)} training problems, {len(val)} held-out problems, "
              f"{tok.n_vocab} token ids ({len(tok.merges)} BPE merges)")
        return train, val, ""
    if args.data != "stdlib":
        rows, numbers = read_chat_jsonl(args.data, tok, args.seq_len, args.bd_size, log=d.log)
        held = [k % args.val_every_n == 0 for k in numbers]  # by the row's place in the file, whatever is dropped
        train = [r for r, h in zip(rows, held) if not h]
        val = [r for r, h in zip(rows, held) if h]
        if not val:  # NOTE: a training row as the held-out set would report a memorised loss as val loss
            fits = [n for n in range(2, max(numbers) + 1) if any(k % n == 0 for k in numbers)][:5]
            raise InputError(f"{args.data}: the {len(rows)} usable rows (rows {numbers[:10]} of the file) and "
                             f"--val-every-n {args.val_every_n} hold out none (held-out rows never train): "
                             + (f"give one that divides a row's place, e.g. {fits}" if fits else "too few rows"))
        if not train:
            raise InputError(f"{args.data}: its {len(rows)} usable rows (rows {numbers[:10]} of the file) are all held "
                             f"out by --val-every-n {args.val_every_n}: none is left to train on")
        d.log(f"data: {args.data}: {len(train)} training rows, {len(val)} held out")
        return train, val, ""
    corpus = load_stdlib(tok, args.data_dir)
    d.log(f"data: standard library, {len(corpus['train']) / 1e6:.1f}M training tokens, "
          f"{len(corpus['val']) / 1e6:.2f}M held out ({len(corpus['val_files'])} files)")
    return corpus["train"], corpus["val"], tok.decode(corpus["val"][:200_000].tolist(), skip_special=True)


def model_config(args, tok):
    """The model the flags describe, before any weight is read (a resume is checked against it first):
    --init-from's config.json, with a relay for the relay objectives, or a Qwen2.5 shape from scratch.
    --init-from sets the block size (the rows are padded to it)."""
    relay = args.objective in RELAY_OBJECTIVES
    if args.init_from:
        cfg, hf_cfg = read_config(args.init_from)
        cfg.relay = cfg.relay or relay  # what add_relay does to the loaded model
        args.bd_size = cfg.bd_size
        if (limit := hf_cfg.get("max_position_embeddings")) and args.seq_len > limit:  # the export keeps the limit
            raise InputError(f"--seq-len {args.seq_len} is past {args.init_from}'s max_position_embeddings ({limit})")
    else:
        cfg = ModelConfig(**{**QWEN2, "vocab_size": tok.n_vocab, "n_layer": args.n_layer, "n_head": args.n_head,
                             "n_kv_head": args.n_kv_head, "n_embd": args.n_embd, "n_ffn": args.n_ffn,
                             "mask_id": tok.mask_id, "bd_size": args.bd_size, "relay": relay})
    if args.seq_len % args.bd_size:
        raise InputError(f"--seq-len {args.seq_len} is not a multiple of the block size {args.bd_size}")
    return cfg


def build_model(args, tok, cfg):
    """Fast-dLLM v2 weights (+ a zero-init relay for the relay objectives), or a Qwen2.5-shaped model
    from scratch, as model_config says. fp32 on the CPU; moved to the device by the caller."""
    if args.init_from:
        model = from_pretrained(args.init_from, device="cpu", dtype=torch.float32)
        check_tokenizer(model, tok, args.init_from)
        if cfg.relay:
            add_relay(model)
    else:
        model = Transformer(cfg)
    model.grad_ckpt = args.grad_ckpt
    return model


def wrap_model(args, raw, d):
    """FSDP (fully_shard, in place) or DDP around the model; returns what the loop calls."""
    if args.fsdp:
        for layer in raw.layers:
            fully_shard(layer)
        fully_shard(raw)
        return raw
    if d.ddp:  # NOTE: an sft phase leaves the relay unused, which DDP must be told about
        return torch.nn.parallel.DistributedDataParallel(
            raw, device_ids=[int(d.device.split(":")[1])] if d.device.startswith("cuda") else None,
            find_unused_parameters=raw.relay is not None and (args.sft_steps > 0 or args.objective == "sft"))
    return raw


# ---------------------------------------------------------------------------------------------
# checkpoints: one file with the gathered model and optimizer and every process's data state

def gather_state(args, raw, opt, with_optimizer=True):
    """Full (unsharded) model and optimizer state. With FSDP a collective: every rank must call it."""
    if not args.fsdp:
        return raw.state_dict(), opt.state_dict() if with_optimizer else None
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(raw, options=opts),
            get_optimizer_state_dict(raw, opt, options=opts) if with_optimizer else None)


def save(args, d, path, step, raw, opt, streams, gens, bufs, trained):
    """Every rank's data position, noise generators and rollout buffers, plus the gathered weights, and
    the run's training figures so far (`trained`, which a resumed run adds to). -> its seconds (not
    training time)."""
    t0 = time.time()
    mine = {"streams": [s.state() for s in streams], "gens": [g.get_state() for g in gens],
            "bufs": [b.state_dict() for b in bufs], "torch_rng": torch.get_rng_state()}
    ranks = [None] * d.world
    if d.ddp:
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    msd, osd = gather_state(args, raw, opt)
    if d.master:
        save_checkpoint({"model": msd, "optimizer": osd, "step": step, "config": raw.config_dict(),
                         "args": vars(args), "world": d.world, "ranks": ranks, "kind": "code",
                         "objective": args.objective, "trained": trained}, path)
        if args.overwrite and os.path.isdir(hf := os.path.join(args.out_dir, "hf")):  # the replaced run's export
            shutil.rmtree(hf)  # goes with its checkpoint: OUT_DIR never pairs this run with another's model
            d.log(f"--overwrite: removed {hf}, the export of the run this one replaces")
    if d.ddp:
        dist.barrier()
    return time.time() - t0


DATA_FLAGS = ("batch_size", "micro_batch", "seq_len", "seed", "data", "train_problems", "val_every_n", "bpe_merges",
              "data_digest", "tokenizer_digest",  # the rows themselves and their tokenizer: a file may change
              "beta2", "weight_decay")  # (the optimizer's state brings its own: another value would be ignored)


# what a resume may change without a note (the rest is compared above, or logged when it differs)
RUN_FLAGS = {"resume", "overwrite", "max_steps", "stop_after", "time_limit", "eval_every", "ckpt_every", "device",
             "compile", "samples", "out_dir", "data_dir", "unsafe_no_isolation", "eval_batches", "eval_problems",
             "fsdp", "sft_steps", "schedule", *DATA_FLAGS}


def check_resume(args, d, path, cfg):
    """Load OUT_DIR's checkpoint and refuse, before the weights or the data are read, one that this
    run would not continue: another model, data flags, world size, objective, buffers. -> the checkpoint."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path} (check --out-dir)")
    ck = load_checkpoint(path, kind="code")
    theirs = {"buffers": "chunk", **ck["args"], "world": ck["world"]}  # older checkpoints lack some flags
    ours = {**vars(args), "world": d.world}
    # the flags that deal the rows and draw the noise: another value would not continue this run's data (a
    # file's rows are compared by their digest once read, in resume(), so a moved or renamed file is fine)
    same_run = [k for k in (*DATA_FLAGS, "world", "objective", "buffers") if k != "data_digest"
                and not (k == "data" and args.data not in ("synthetic", "stdlib"))]
    diff = config_diff(cfg, ck)
    other = {k: (ours[k], theirs[k]) for k in same_run if k in theirs and theirs[k] != ours[k]}
    if diff or other:
        parts = ([f"config {diff}"] if diff else []) + ([f"flags {other}"] if other else [])
        raise InputError(f"{path} was trained with another setup: {', '.join(parts)} (ours, theirs)")
    if args.fsdp and not theirs.get("fsdp"):
        raise InputError(f"{path} was saved without --fsdp: its optimizer state is keyed by parameter index, which a "
                         f"sharded resume cannot place; resume without --fsdp")
    if changed := {k: (v, theirs[k]) for k, v in ours.items() if k not in RUN_FLAGS and k in theirs and v != theirs[k]}:
        d.log(f"resuming with other flags than the run so far: {changed} (ours, theirs)")
    if args.data not in ("synthetic", "stdlib") and "data_digest" not in ck["args"]:
        raise InputError(f"{path} was written before held-out chat rows were chosen by their place in the file: "
                         f"this code may hold out other rows and train on its validation rows; start a new run")
    if args.max_steps < ck["step"]:
        raise InputError(f"--max-steps {args.max_steps}: {path} is at step {ck['step']} already")
    return ck


def resume(args, d, ck, path, raw, opt, streams, gens, bufs):
    """Restore save()'s state `ck` (check_resume'd) into the live objects (FSDP: scattered into the
    shards); returns the step."""
    if ck["args"].get("data_digest", args.data_digest) != args.data_digest:
        raise InputError(f"{path} was trained with another setup: flags {{'data_digest': ({args.data_digest!r}, "
                         f"{ck['args']['data_digest']!r})}} (ours, theirs): the training rows have changed")
    if ck["args"].get("schedule", args.schedule) != args.schedule:
        d.log(f"lr schedule: {args.schedule} steps now, {ck['args']['schedule']} so far (--max-steps or --lr-epochs "
              f"changed): the cosine continues on the new horizon")
    theirs = ck["args"].get("sft_steps", args.sft_steps)
    if ck["step"] >= theirs and theirs != args.sft_steps:  # a warm start that has ended stays ended
        d.log(f"sft warm start: ended at step {theirs} of this run, which stays (--max-steps {args.max_steps} x "
              f"--sft-frac {args.sft_frac:g} would move it to {args.sft_steps})")
        args.sft_steps = theirs
    if args.fsdp:
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(raw, ck["model"], options=opts)
        set_optimizer_state_dict(raw, opt, ck["optimizer"], options=opts)
    else:
        load_state(raw, ck["model"], path)
        opt.load_state_dict(ck["optimizer"])
    mine = ck["ranks"][d.rank]
    if any("epoch" not in v for v in mine["streams"]):
        raise InputError(f"{path} was written before rows were drawn in epochs: its data position cannot be restored")
    for s, v in zip(streams, mine["streams"]):
        s.load_state(v)
    for g, v in zip(gens, mine["gens"]):
        g.set_state(v)
    for b, v in zip(bufs, mine["bufs"]):
        b.load_state_dict(v)
    torch.set_rng_state(mine["torch_rng"])
    d.log(f"resumed from {path} at step {ck['step']}")
    return ck["step"]


def export(args, d, raw, tok):
    """OUT_DIR/hf: the trained model in the Fast-dLLM v2 layout (rank 0), with its tokenizer; in the
    --init-from config's dtype (bf16 for Fast-dLLM v2, sharded past 5 GB), from scratch in fp32.
    Returns (directory, the exported model on rank 0 or None); samples after training use that model
    as trained (fp32 weights), not the file."""
    hf_dir, model = os.path.join(args.out_dir, "hf"), raw
    if args.fsdp:  # every rank takes part in the gather; rank 0 builds an unsharded copy
        full, _ = gather_state(args, raw, None, with_optimizer=False)
        if d.master:  # on the meta device, then the gathered tensors themselves: no second copy, no init
            with torch.device("meta"):
                model = Transformer(ModelConfig(**raw.config_dict()))
            load_state(model, full, "the gathered FSDP state", assign=True)
            model.hf_config = getattr(raw, "hf_config", None)
    if not d.master:
        return hf_dir, None
    save_pretrained(model, hf_dir)
    if not args.init_from:
        save_tokenizer(tok, hf_dir)
    else:  # its tokenizer, and the remote code its config's auto_map names (modeling.py, ...:
        # what transformers' trust_remote_code loads), next to the weights
        for f in TOKENIZER_FILES + tuple(sorted(glob.glob("*.py", root_dir=args.init_from))):
            if os.path.isfile(os.path.join(args.init_from, f)):
                shutil.copy(os.path.join(args.init_from, f), os.path.join(hf_dir, f))
    return hf_dir, model


# ---------------------------------------------------------------------------------------------
# the loop's pieces

def schedule_steps(args, train_data):
    """The schedule's length: --max-steps, or --lr-epochs epochs of the data (rows, or windows of a
    token stream) at --batch-size rows a step. The authors stop at step 200 of a ~2.8k-step schedule."""
    if not args.lr_epochs:
        return args.max_steps
    rows = len(train_data) if isinstance(train_data, list) else len(train_data) // args.seq_len
    return max(1, math.ceil(args.lr_epochs * rows / args.batch_size))


def lr_at(step, args):
    """Linear warmup over --warmup-frac of the schedule (args.schedule steps), then cosine to 10% of --lr."""
    warm = max(1, math.ceil(args.warmup_frac * args.schedule))
    if step < warm:
        return args.lr * (step + 1) / warm
    frac = min(1.0, (step - warm) / max(1, args.schedule - warm))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def validate(model, val_rows, args, ctx):
    """Held-out SFT loss with fixed rows and noise: one scale for every objective (no relay)."""
    model.eval()
    gen = torch.Generator(device=val_rows.device).manual_seed(args.seed + 1)
    val_rows.rewind()
    losses = []
    for _ in range(args.eval_batches):
        x0, fixed = val_rows(args.micro_batch)
        with ctx:
            losses.append(sft_loss(model, x0, fixed, gen).item())
    model.train()
    return float(np.mean(losses))


def train_step(args, d, step, model, fwd_model, opt, streams, gens, bufs, ctx):
    """One optimizer step over this process's accumulation chunks; returns (mean loss, lr, grad norm)."""
    # 1) learning rate, and the phase: the sft warm start, then the objective
    lr = lr_at(step, args)
    for g in opt.param_groups:
        g["lr"] = lr
    objective = "sft" if step < args.sft_steps else args.objective
    if step == args.sft_steps and objective != "sft" and step:
        d.log(f"step {step}: sft warm start done, switching to {objective}")
    reveal = partial(reveal_threshold_blocks, threshold=args.threshold, bd_size=args.bd_size)
    total = torch.zeros((), device=d.device)
    for i in range(len(streams)):
        # 2) micro-step i on chunk i; DDP syncs gradients only on the last one
        last = i == len(streams) - 1
        with nullcontext() if (not d.ddp or args.fsdp or last) else model.no_sync():
            with ctx:
                if objective == "sft":
                    x0, fixed = streams[i](args.micro_batch)  # (b, L) tokens, (b, L) prompt/padding mask
                    loss = sft_loss(fwd_model, x0, fixed, gens[i])
                else:  # finished trajectories take fresh rows; K forwards of [canvas ‖ x0]
                    buf = bufs[i % len(bufs)]  # --buffers process: one buffer, advanced at every micro-step
                    buf.refill(streams[i])
                    loss = rollout_loss(fwd_model, buf, args.K, args.objective, reveal, doubled=True)
            (loss / len(streams)).backward()  # gradients of the mean over chunks, as one big batch
        total += loss.detach() / len(streams)
    # 3) clip, step; the logged loss is averaged over the processes
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)  # FSDP: over all shards
    opt.step()
    opt.zero_grad(set_to_none=True)
    if d.ddp:  # gloo has no AVG
        dist.all_reduce(total)
        total /= d.world
    return total.item(), lr, float(gnorm)


def complete_signatures(args, model, tok, val_text, ctx, device):
    """Complete held-out function signatures with the block sampler; print them with their NFE."""
    samples = []
    model = model.to(device).eval()
    for sig in held_out_signatures(val_text, args.samples):
        with ctx:
            out, st = generate(model, [tok.encode(sig)], max_new_tokens=96, threshold=args.threshold,
                               stop_ids=[tok.added["<|endoftext|>"]])
        samples.append({"prompt": sig, "completion": tok.decode(out[0], skip_special=True), "nfe": st["nfe"][0],
                        "new_tokens": st["new_tokens"][0]})
        print(f"--- held-out signature (NFE {st['nfe'][0]} for {st['new_tokens'][0]} tokens)\n{sig}"
              f"{samples[-1]['completion']}")
    return samples


def solve_held_out(args, model, tok, ctx, device):
    """pass@1 of the trained model on --eval-problems held-out synthetic problems (eval_code.py's
    sandbox, the --base layout it trained on); prints the result and --samples examples."""
    model = model.to(device).eval()
    problems = [with_check(r) for r in synthetic_problems("test", args.eval_problems)]  # held out, like the val rows
    with ctx:
        res, rows = evaluate(model, tok, problems, threshold=args.threshold, base=True, batch=32,
                             max_new_tokens=192, allow_unisolated=args.unsafe_no_isolation)
    for p, r in list(zip(problems, rows))[:args.samples]:
        print(f"--- {p['task_id']} ({p['family']}): {'passed' if r['passed'] else r['status']}, NFE {r['nfe']} "
              f"for {r['new_tokens']} tokens\n{p['prompt']}{r['code']}")
    print(f"held-out problems: pass@1 {100 * res['pass@1']:.1f}% of {res['n']} ({res['distinct']} distinct), "
          f"NFE {res['nfe']:.1f} per problem, "
          f"{res['tokens_per_s']:.0f} generated tokens/s (threshold {args.threshold})")
    return res


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    d = setup_distributed(args)
    result = train(args, d)
    if d.ddp:  # DDP's reducer and FSDP's sharded weights hold the process group: with them still alive
        torch.compiler.reset()  # (--compile's caches, reference cycles), up to 1 run in 12 aborted or hung
        gc.collect()  # at exit under gloo (RESULTS, Tests). No barrier: the last collective was the export,
        dist.destroy_process_group()  # and rank 0 may evaluate for long after it
    d.log(json.dumps({k: v for k, v in result.items() if k != "losses"}))
    return result


def check_sandbox(args):
    """The held-out problems run model code in the sandbox at the end: a machine where it cannot run is named
    before training, not after it."""
    try:
        run_sandboxed("pass\n", allow_unisolated=args.unsafe_no_isolation)
    except Refused as e:
        raise Refused(f"--eval-problems {args.eval_problems} runs model code in a sandbox: {e}. Or train "
                      f"with --eval-problems 0 and score later: sudo python eval_code.py ...") from None


def chunk_states(args, d, chunks, train_data, val_data, cfg, tok):
    """This process's row streams and noise generators, one per chunk and seeded by the chunk's number (a chunk
    draws the same rows and noise on any number of processes); the held-out rows; the rollout buffers: one per
    chunk (--buffers chunk) or one for the process (the authors' way), none for SFT."""
    pad_id = tok.added["<|endoftext|>"]
    bucket = len(train_data) // 10 if args.data == "synthetic" else 0  # similar lengths in a batch (code_data.Rows)
    n_chunks = args.batch_size // args.micro_batch  # all processes' chunks: each takes its share of every epoch
    streams = [Rows(train_data, args.seq_len, args.seed, c, pad_id, d.device, bucket, n_chunks, args.micro_batch)
               for c in chunks]
    val_rows = Rows(val_data, args.seq_len, args.seed, 10 ** 6, pad_id, d.device)
    gens = [torch.Generator(device=d.device).manual_seed(args.seed * 1000 + c) for c in chunks]
    n_bufs = (len(chunks) if args.buffers == "chunk" else 1) if args.objective != "sft" else 0
    D = cfg.n_embd if args.objective in RELAY_OBJECTIVES else 0  # the rollout objective carries no relay state
    bufs = [RolloutBuffer(args.micro_batch, args.seq_len, D, cfg.mask_id, d.device) for _ in range(n_bufs)]
    return streams, val_rows, gens, bufs


def train(args, d):
    """The whole run on this process: its model, optimizer and data live and die in this call."""
    # 1) this process's chunks, tokenizer, data
    chunks = my_chunks(args, d)
    d.log(json.dumps({"args": vars(args), "world": d.world, "accum": len(chunks), "device": d.device}))
    torch.manual_seed(args.seed)  # the same on every rank: identical initial weights
    # bf16 autocast: matmuls in bf16, weights and optimizer state stay fp32
    ctx = torch.autocast(d.device.split(":")[0], dtype=torch.bfloat16) if args.dtype == "bfloat16" else nullcontext()
    claim(args, d)  # before any work: never two runs in one OUT_DIR, never a new run over a checkpoint
    t_start = time.time()
    tok = get_tokenizer(args)
    args.tokenizer_digest = tok.digest()  # a resume must see the same tokenizer, and (below) the same rows
    cfg = model_config(args, tok)  # before the data: --init-from sets the block size the rows are padded to
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    ck = check_resume(args, d, ckpt_path, cfg) if args.resume else None
    raw = build_model(args, tok, cfg)
    train_data, val_data, val_text = load_data(args, tok, d)
    args.data_digest = data_digest(train_data)
    args.schedule = schedule_steps(args, train_data)
    if args.schedule != args.max_steps:
        d.log(f"lr schedule: {args.schedule} steps ({args.lr_epochs:g} epochs), training stops at {args.max_steps}")
    if d.master and args.data == "synthetic" and args.eval_problems:  # fail now, not after training
        check_sandbox(args)
    # 2) model, wrapper, optimizer; per chunk: a row stream, a noise generator, a rollout buffer
    raw = raw.to(d.device).train()
    d.log(f"model: {raw.num_params() / 1e6:.2f}M parameters, objective {args.objective}, bd_size {args.bd_size}, "
          f"{d.world} process(es) x {args.micro_batch} rows x {len(chunks)} micro-steps, {d.device} {args.dtype}")
    model = wrap_model(args, raw, d)  # what backward/no_sync go through; raw = the unwrapped weights
    fwd_model = torch.compile(model) if args.compile else model  # what the losses call
    opt = torch.optim.AdamW(raw.param_groups(args.weight_decay), lr=args.lr, betas=(0.9, args.beta2),
                            fused=d.device.startswith("cuda"))
    streams, val_rows, gens, bufs = chunk_states(args, d, chunks, train_data, val_data, raw.cfg, tok)
    # 3) resume
    step = resume(args, d, ck, ckpt_path, raw, opt, streams, gens, bufs) if ck else 0
    before = (ck or {}).get("trained") or {}  # the training figures of the invocations this one continues
    ck = None  # (weights and optimizer state: gigabytes of host memory for a real model)
    trained = lambda: training_figures(args, before, losses, vals, time.time() - t0 - t_off, step - step0)
    checkpoint = lambda: save(  # a collective under DDP/FSDP: every rank calls it
        args, d, ckpt_path, step, raw, opt, streams, gens, bufs, trained())

    # 4) the training loop
    bar = tqdm(total=args.max_steps, initial=step, desc=args.objective, disable=not d.master, dynamic_ncols=True)
    t0, step0, losses, vals, t_off = time.time(), step, [], [], 0.0  # t_off: validation and checkpoint seconds
    saved = step if args.resume else None  # the step of the last checkpoint
    # Ctrl-C stops at a step with a checkpoint in one process (ranks would have to agree on the step: a sync)
    stop = None
    with StopOnInterrupt() if d.world == 1 else nullcontext(False) as interrupted:
        while step < args.max_steps:
            # a) a budget of this invocation ends the loop; the checkpoint after it makes --resume exact
            if stop := stop_reason(args, interrupted, time.time() - t0, step - step0):
                d.log(f"stopping at step {step}: {stop}")
                break
            # b) one optimizer step over all of this process's chunks
            loss, lr, gnorm = train_step(args, d, step, model, fwd_model, opt, streams, gens, bufs, ctx)
            step += 1
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.1e}", gnorm=f"{gnorm:.2f}")
            if step % args.eval_every == 0 or step == args.max_steps:  # c) held-out SFT loss
                t1 = time.time()
                vals.append({"step": step, "val_loss": validate(raw, val_rows, args, ctx)})
                t_off += time.time() - t1
                d.log(f"step {step}: train loss {np.mean(losses[-20:]):.4f}, val loss {vals[-1]['val_loss']:.4f}, "
                      f"{(step - step0) * args.batch_size * args.seq_len / (time.time() - t0 - t_off):.0f} tokens/s")
            if step % args.ckpt_every == 0 or step == args.max_steps:  # d) checkpoint (atomic)
                t_off += checkpoint()
                saved = step
    bar.close()
    curve = trained()["val_curve"]
    if not curve or curve[-1]["step"] != step:  # stopped early: validate (not training time) and save where we are
        t1 = time.time()
        vals.append({"step": step, "val_loss": validate(raw, val_rows, args, ctx)})
        t_off += time.time() - t1
    if saved != step:
        t_off += checkpoint()
    if interrupted:
        StopOnInterrupt.exit(step, ckpt_path, args.overwrite)
    # the training figures span every invocation of the run; rows/s is the training speed (no validation)
    run = trained()
    result = {"objective": args.objective, "sft_steps": min(args.sft_steps, step), "steps": step,
              "val_loss": run["val_curve"][-1]["val_loss"], **run, "world": d.world}
    if stop == "--stop-after":  # a pause: no export, no evaluation of a half-trained model
        d.log(f"paused at step {step}: {ckpt_path} saved; {how_to_continue(args.overwrite)}")
        return {**result, "seconds": time.time() - t_start, "losses": losses}
    # 5) finish: export in the Fast-dLLM v2 layout, complete held-out signatures, solve held-out problems
    return {**finish(args, d, raw, tok, val_text, ctx, result), "seconds": time.time() - t_start, "losses": losses}


def training_figures(args, before, losses, vals, secs, steps):
    """The run's training figures: this invocation's `steps` in `secs` (validation and saves left out) added
    to `before`, the figures of the invocations it continues (their checkpoint's "trained")."""
    secs, timed = before.get("train_seconds", 0.0) + secs, before.get("timed_steps", 0) + steps
    return {"train_loss": float(np.mean(losses[-20:])) if losses else before.get("train_loss"),
            "val_curve": before.get("val_curve", []) + vals, "train_seconds": secs, "timed_steps": timed,
            "tokens_per_s": timed * args.batch_size * args.seq_len / max(secs, 1e-9)}


def finish(args, d, raw, tok, val_text, ctx, result):
    """The end of a finished (or timed-out) run: export the weights in the Fast-dLLM v2 layout, complete
    held-out signatures, solve held-out problems in the sandbox (master rank) -> the result with them."""
    hf_dir, exported = export(args, d, raw, tok)
    samples = complete_signatures(args, exported, tok, val_text, ctx, d.device) \
        if d.master and args.samples and val_text else []
    solved = solve_held_out(args, exported, tok, ctx, d.device) \
        if d.master and args.data == "synthetic" and args.eval_problems else None
    return {**result, "hf_dir": hf_dir, "samples": [{k: s[k] for k in ("nfe", "new_tokens")} for s in samples],
            **({"pass@1": solved["pass@1"], "nfe": solved["nfe"], "gen_tokens_per_s": solved["tokens_per_s"]}
               if solved else {})}


if __name__ == "__main__":
    run_cli(main)
