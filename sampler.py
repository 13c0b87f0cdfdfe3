"""
sampler.py — decoding only: the fixed-canvas sampler of the Sudoku model and the KV-cached block
decoding of Fast-dLLM v2 (arXiv 2509.26328), both carrying the relay state between denoising
forwards (arXiv 2605.22967; NOTES.md §1, §4, §6).

    python sampler.py --random-init tiny --bench --bench-lengths 64 256   # tok/s per mode (~30 s on 2 cores)
    python sampler.py --checkpoint DIR --chat --prompt "Write a function that reverses a list."

(The command line decodes LLMs; a Sudoku checkpoint is evaluated by `train_sudoku.py --eval-only`
and solves one puzzle with `train_sudoku.py --solve`, both through sample_mdm.)

- sample_mdm: a fixed-length canvas (Sudoku). Greedy argmax, the confidence-mass reveal rule, at most
  `max_steps` loop steps, then one final forward fills every cell still masked.
- generate: block decoding in named stages: left_pad -> prefill -> per block (denoise_step until the
  block is complete -> commit_block) -> rows that are done retire. A step's device work (forward,
  reveal, flags) is block_step, free of host syncs: on the static cache, one CUDA graph. An uncached
  path recomputes the whole prefix every forward: the oracle the cached path must equal token for token.

NFE = one call of the model's forward that denoises. Sudoku, per puzzle: the forwards it took part
in (finished rows leave the batch); `nfe_batch` is the authors' count, loop steps + 1 for the final
fill (the slowest puzzle + 1; we skip the final fill when nothing is left, so actual forward calls
can be one fewer). LLM, per row: denoising forwards in which the row still had a masked position in
the block, until nothing before its first stop token is masked; prefill and commit forwards are not NFE.
`nfe_ref` is the reference sampler's count (the paper's tables): forwards until a denoising step
reveals a stop token, although positions before it may still be masked (the forwards that fill them
are run but not counted there). A stop made by a prefill or commit forward does not end that count,
but it ends the row, whose count stops there too; the reference would decode on and count further.
"""
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass

import torch

from checkpoint import load_pretrained, save_pretrained
from model import (SHAPES, KVCache, StaticKVCache, block_mask, device_flag, pick_device, random_model, rows_forward,
                   shift_right)
from relay import predict, reveal_confidence_mass, reveal_threshold_blocks
from runs import InputError, argparser, kernel_ms, positive_int, run_cli, seed_int, unit_float
from tokenizer import save_byte_tokenizer


# ---------------------------------------------------------------------------------------------
# Sudoku: a fixed canvas (NOTES.md §4)

CPU_ROWS = 32  # rows per piece of a CPU forward (model.rows_forward): no activations are kept, smaller pays


@torch.no_grad()
def sample_mdm(model, x, *, tau=0.15, max_steps=64, use_relay=True):
    """x (B, T) canvas with MASK at unknown positions; known positions are never changed.
    Returns (tokens (B, T), stats); stats["revealed_at"] (B, T) is the 1-based forward at which each
    cell was revealed (0 = given)."""
    t0 = time.time()
    mask_id = model.cfg.mask_id
    x = x.clone()
    B, T = x.shape
    h = torch.zeros(B, T, model.cfg.n_embd, device=x.device) if use_relay and model.relay else None
    nfe = torch.zeros(B, dtype=torch.long, device=x.device)
    revealed_at = torch.zeros(B, T, dtype=torch.long, device=x.device)
    steps = calls = fwd_tokens = 0
    for step in range(max_steps + 1):  # the last iteration is the final fill
        # 1) the rows that still have masks take part; solved rows have left the batch
        rows = (x == mask_id).any(1).nonzero().squeeze(1)
        if len(rows) == 0:
            break
        xa = x[rows]
        # 2) one denoising forward with the relay state of the previous one
        logits, h_out = rows_forward(model, xa, None if h is None else h[rows], rows=CPU_ROWS)  # (B', T, V), (B', T, D)
        nfe[rows] += 1
        calls += 1
        fwd_tokens += xa.numel()
        # 3) commit the argmax where the reveal rule says so (everything at the final fill)
        pred, conf = predict(logits, mask_id)
        masked = xa == mask_id
        reveal = masked if step == max_steps else reveal_confidence_mass(conf, masked, tau)
        x[rows] = torch.where(reveal, pred, xa)
        revealed_at[rows] = torch.where(reveal, nfe[rows, None], revealed_at[rows])
        # 4) carry h: the next forward of these rows adds LayerNorm(h) to its embeddings
        if h is not None:
            h[rows] = h_out.float()
        steps = min(step + 1, max_steps)
    stats = {"nfe": nfe, "nfe_batch": steps + 1, "forward_calls": calls, "revealed_at": revealed_at,
             "forward_tokens": fwd_tokens, "seconds": time.time() - t0}
    return x, stats


# ---------------------------------------------------------------------------------------------
# Fast-dLLM v2 block decoding with a KV cache and relay carry (NOTES.md §6)

SUB_BLOCK = 8  # Fast-dLLM v2's sub-block: a block is decoded in sub-blocks of 8, strictly in order


@dataclass
class Decode:
    """The state of one generate() call. The tensors hold the rows still in the batch (B' of the B
    prompts) on a shared batch layout of T positions; rows that are done leave them together
    (retire). Blocks sit on absolute bd_size boundaries of the batch layout."""
    x: torch.Tensor  # (B', T) canvas: left padding, prompt, generated tokens, MASK
    valid: torch.Tensor  # (B', T) bool, False = left padding (seen by no real token)
    pos: torch.Tensor  # (B', T) each row's own RoPE positions
    ids: torch.Tensor  # (B',) the row's index in the caller's list of prompts
    start: torch.Tensor  # (B',) batch position of the row's first generated token
    end: torch.Tensor  # (B',) just past its last allowed one
    nfe: torch.Tensor  # (B',) denoising forwards in which the row had something to decode
    nfe_ref: torch.Tensor  # (B',) the reference's count: nfe up to the denoising step that reveals a stop
    ref_done: torch.Tensor  # (B',) bool: a denoising step has revealed a stop token (the reference stops there)
    done: torch.Tensor  # (B',) bool: finished and written out; decodes nothing more while it waits to leave
    h: torch.Tensor = None  # (B', bd_size, D) the block's last denoising forward's relay state, by position
    #                         (block_step shifts it to be by token, as the forward reads it)
    cache: KVCache = None  # committed blocks' keys/values; None = the uncached oracle
    bd_size: int = 32
    rule: object = None  # reveal_block(logits, xb, todo) with this call's threshold, sub-block and stops
    mask_id: int = -1
    padded: bool = False  # some row is left-padded: attention masks hide the padding
    stops: torch.Tensor = None  # stop token ids
    out: list = None  # per prompt: generated ids, filled in as rows retire
    nfe_out: list = None  # per prompt: NFE
    nfe_ref_out: list = None  # per prompt: the reference's NFE
    counts: dict = None  # forward calls by kind, and tokens through the model
    step: object = None  # StaticKVCache: block_step over tensors (compiled, CUDA-graphed on CUDA)
    blk: tuple = None  # StaticKVCache: the current block's (q0, pos, mask, live), see block_inputs

    ROWS = ("x", "valid", "pos", "ids", "start", "end", "nfe", "nfe_ref", "ref_done", "done")

    def keep(self, rows):
        """Only `rows` (indices into the current B') stay."""
        for k in self.ROWS:
            setattr(self, k, getattr(self, k)[rows])
        self.h = self.h[rows] if self.h is not None else None
        self.blk = None
        if self.cache is not None:
            self.cache.keep(rows)


def block_sizes(model, bd_size=None, sub_block=None):
    """The block and sub-block sizes of a decode: the block defaults to the model's, the sub-block to
    gcd(8, block), Fast-dLLM v2's 8 when 8 divides the block. -> (bd_size, sub_block)"""
    bd_size = bd_size or model.cfg.bd_size
    return bd_size, sub_block or math.gcd(SUB_BLOCK, bd_size)


def check_generate_args(model, prompts, max_new_tokens, bd_size, sub_block):
    mask_id = model.cfg.mask_id
    if bd_size <= 0 or sub_block <= 0 or bd_size % sub_block:
        raise InputError(f"block size {bd_size} must be a positive multiple of the sub-block size {sub_block}")
    if mask_id < 0:
        raise InputError("the model has no mask token (config.json mask_token_id, or |<MASK>| in its tokenizer)")
    if max_new_tokens < 1 or not prompts or min(map(len, prompts)) == 0:
        raise InputError(f"need prompts of at least one token and max_new_tokens >= 1, got "
                         f"{'no prompts' if not prompts else f'prompts of {min(map(len, prompts))}+ tokens'} and "
                         f"{max_new_tokens}")
    if any(mask_id in p for p in prompts):
        raise InputError(f"a prompt contains the mask token id {mask_id}")
    limit = (getattr(model, "hf_config", None) or {}).get("max_position_embeddings")
    if limit and bd_size > limit:
        raise InputError(f"block size {bd_size} is past the checkpoint's max_position_embeddings ({limit})")
    if limit and max(map(len, prompts)) + max_new_tokens > limit:
        raise InputError(f"prompt ({max(map(len, prompts))} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"checkpoint's max_position_embeddings ({limit})")


def left_pad(prompts, max_new_tokens, bd_size, mask_id, pad_id, device):
    """Lay the prompts out so that every row's generation starts in the same batch block G: a row
    is left-padded by whole blocks, keeps its own RoPE positions, and its padding is hidden from
    attention. So a row produces exactly what it produces alone. Returns (Decode, G)."""
    B = len(prompts)
    L = torch.tensor([len(p) for p in prompts], device=device)
    G = int(L.max() // bd_size)  # the block that holds the end of the longest prompt
    pad = (G - L // bd_size) * bd_size  # (B,) left padding in whole blocks
    start = pad + L
    end = start + max_new_tokens
    T = int((end.max() + bd_size - 1) // bd_size * bd_size)
    ar = torch.arange(T, device=device)
    x = torch.full((B, T), mask_id, device=device)
    x[ar[None] < pad[:, None]] = pad_id
    for r, p in enumerate(prompts):
        x[r, pad[r]:start[r]] = torch.tensor(p, device=device)
    st = Decode(x=x, valid=ar[None] >= pad[:, None], pos=(ar[None] - pad[:, None]).clamp(min=0),
                ids=torch.arange(B, device=device), start=start, end=end,
                nfe=torch.zeros(B, dtype=torch.long, device=device), nfe_ref=torch.zeros(B, dtype=torch.long,
                device=device), ref_done=torch.zeros(B, dtype=torch.bool, device=device),
                done=torch.zeros(B, dtype=torch.bool, device=device), bd_size=bd_size,
                mask_id=mask_id, padded=bool((pad > 0).any()), out=[None] * B, nfe_out=[0] * B, nfe_ref_out=[0] * B,
                counts={"prefill": 0, "denoise": 0, "commit": 0, "tokens": 0})
    return st, G


def reveal_block(logits, xb, todo, threshold, sub_block, mask_id, stops):
    """The block reveal rule (NOTES.md §6). logits (B', bd, V) of the block's positions, xb (B', bd)
    its tokens, todo (B', bd) the masked positions each row may decode. Each row decodes its first
    sub-block that still has masks: it reveals the positions there with confidence > threshold, plus
    the most confident one (first on ties). -> (xb with the reveals, (B',) a stop token was revealed)."""
    pred, conf = predict(shift_right(logits), mask_id)  # (B', bd) per token
    B, bd = todo.shape
    ar = torch.arange(bd, device=xb.device)[None]
    sub = todo.view(B, bd // sub_block, sub_block).any(-1).float().argmax(-1, keepdim=True)  # (B', 1)
    cand = todo & (ar // sub_block == sub)  # the masked positions of the current sub-block
    reveal = reveal_threshold_blocks(conf, cand, threshold, sub_block)  # training's rule, on those only
    is_stop = (pred[..., None] == stops).any(-1)  # not torch.isin: with many stops it sorts and syncs
    return torch.where(reveal, pred, xb), (reveal & is_stop).any(1)


def block_step(forward, rule, xb, h, live, mask_id):
    """One denoising forward of a block and its reveal, on the device and without a host sync, so
    that the static cache captures the whole step in one CUDA graph. forward(relay) -> (logits, h)
    of the block; rule(logits, xb, todo): reveal_block with the call's settings; xb (B', bd) the
    block's tokens; h (B', bd, D) the last forward's relay state by position, or None; live (B', bd)
    the positions each row may still decode. Returns, each (B', ...): xb after the reveal, h, rows
    that had something to decode (NFE), rows that revealed a stop, rows with something left to
    decode, and the prediction of the block's last logit (the commit's next token)."""
    todo = (xb == mask_id) & live
    logits, h = forward(None if h is None else shift_right(h))  # h by position -> h by token
    xb, stop = rule(logits, xb, todo)
    return xb, h, todo.any(1), stop, ((xb == mask_id) & live).any(1), predict(logits[:, -1], mask_id)[0]


def block_forward(model, st, q0, q1, relay=None, commit=False):
    """The active rows' logits and h at batch positions [q0, q1). Cached: the input is [q0, q1)
    against the committed cache. Uncached (the oracle): the input is [0, q1), everything recomputed.
    relay (B', q1 - q0, D) or None; commit=True writes this input's K/V into the cache."""
    k0 = q0 if st.cache is not None else 0
    st.counts["tokens"] += len(st.x) * (q1 - k0)
    if isinstance(st.cache, StaticKVCache):  # only its prefill comes here, eagerly: one length of its own
        logits, h = model(st.x[:, q0:q1], pos=st.pos[:, q0:q1], attn_mask=static_mask(st, q0, q1), relay=relay,
                          kv_cache=st.cache)
        st.cache.advance(q1 - q0)
        return logits, h
    one_block = (q1 - k0 <= st.bd_size) and st.bd_size == model.cfg.bd_size  # the model's default mask: all True
    m = None if one_block else block_mask(q1, st.bd_size, q0=k0, device=st.x.device)  # (q1 - k0, q1)
    if st.padded:
        m = (True if m is None else m) & padding_mask(st, k0, q1, q1)
    if relay is not None and st.cache is None:  # the recomputed prefix gets no relay
        relay = torch.cat([relay.new_zeros(len(st.x), q0, relay.shape[-1]), relay], 1)
    logits, h = model(st.x[:, k0:q1], pos=st.pos[:, k0:q1], attn_mask=m, relay=relay, kv_cache=st.cache,
                      commit=commit)
    return logits[:, q0 - k0:], h[:, q0 - k0:]  # (B', q1 - q0, V), (B', q1 - q0, D)


def static_mask(st, q0, q1):
    """A StaticKVCache forward of [q0, q1) attends to all T keys of the batch layout: the mask hides
    the keys from q1 on (not written yet, or left by an earlier forward) and the padding."""
    m = torch.zeros(q1 - q0, st.x.shape[1], dtype=torch.bool, device=st.x.device)
    m[:, :q1] = block_mask(q1, st.bd_size, q0=q0, device=st.x.device)
    return m & padding_mask(st, q0, q1, st.x.shape[1])  # (B', 1, q1 - q0, T)


def padding_mask(st, q0, q1, S):
    """(B', 1, q1 - q0, S) bool: the queries [q0, q1) may attend to the keys [0, S) unless a key is
    left padding; padding is seen by no real token (a pad query sees every key, so no row is empty)."""
    return st.valid[:, None, None, :S] | ~st.valid[:, None, q0:q1, None]


def block_inputs(st, q0, q1):
    """The static block step's inputs that change only with the block and the rows: positions, mask,
    and the positions each row may still decode. Built once per block (and again when rows finish or
    leave), so the step launches nothing for them and a graph replay copies them once."""
    if st.blk is None or st.blk[0] != q0:
        st.blk = (q0, st.pos[:, q0:q1], static_mask(st, q0, q1), live_positions(st, q0, q1))
    return st.blk[1:]


def live_positions(st, q0, q1):
    """(B', q1 - q0) bool: the positions of block [q0, q1) each row may still decode (before its end,
    and the row not done)."""
    return (torch.arange(q0, q1, device=st.x.device)[None] < st.end[:, None]) & ~st.done[:, None]


def run_block(model, st, q0, q1, h, commit=False):
    """block_step on block [q0, q1) in this call's mode. StaticKVCache: st.step, every call one shape
    (a CUDA graph on CUDA). Otherwise the forward of block_forward. commit=True: this forward's K/V
    join the cache (the block is complete, so nothing is revealed)."""
    if st.step is not None:
        pos, mask, live = block_inputs(st, q0, q1)
        st.counts["tokens"] += len(st.x) * (q1 - q0)
        out = st.step(st.x[:, q0:q1], pos, mask, h, live)
        if commit:
            st.cache.advance(q1 - q0)
        return out
    forward = lambda relay: block_forward(model, st, q0, q1, relay=relay, commit=commit)  # noqa: E731
    return block_step(forward, st.rule, st.x[:, q0:q1], h, live_positions(st, q0, q1), st.mask_id)


GRAPH_DEVICES = ("cuda",)  # device types whose static block steps are replayed as CUDA graphs


class BlockGraphs:
    """CUDA graphs of the static cache's block step, one per (rows, relay given or not): a call copies
    its inputs into the graph's own tensors and replays it, one launch for the forward and the reveal
    instead of hundreds of kernels. Captured on first use, and again after rows leave (the cache's
    buffers change). An input that is the same tensor object as at the graph's last call is not copied
    again (block_inputs). NOTE: the outputs are the graphs' own tensors, which the next replay of any
    of these graphs may overwrite (they share a memory pool): use or copy them before that.
    captures, capture_s: graphs captured and the wall time spent on them (warm-up included)."""

    def __init__(self, fn, cache):
        self.fn, self.cache, self.graphs, self.k = fn, cache, {}, None
        self.captures, self.capture_s = 0, 0.0

    def __call__(self, *args):
        if self.cache.k is not self.k:  # new cache buffers: the graphs hold the old ones
            # NOTE: a new memory pool too; capturing into the pool of destroyed graphs fails an assert
            self.graphs, self.k, self.pool = {}, self.cache.k, torch.cuda.graph_pool_handle()
        key = (len(args[0]), tuple(t is None for t in args))
        if key not in self.graphs:
            self.graphs[key] = self.capture(args)
        graph, inputs, last, outputs = self.graphs[key]
        for buf, t, seen in zip(inputs, args, last):
            if t is not None and t is not seen:
                buf.copy_(t)
        last[:] = args
        graph.replay()
        return outputs

    def capture(self, args):
        t0 = time.time()
        inputs = [t.clone() if t is not None else None for t in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (allocations, lazy initialisation)
            for _ in range(2):
                self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self.fn(*inputs)
        torch.cuda.current_stream().synchronize()
        self.captures, self.capture_s = self.captures + 1, self.capture_s + time.time() - t0
        return graph, inputs, list(args), outputs


def retire(st, left=None):
    """A row is done when nothing up to its first stop token (or its last allowed position) is
    masked: its output is written out and it decodes nothing more. Done rows leave the batch (and
    the cache) at once; on a StaticKVCache only once half of the batch is done, because every new
    batch size means new CUDA graphs: at most log2(B) + 1 sizes per call instead of up to B.
    left (B',) bool: rows with something left in the current block. This is a decoding step's one
    host sync; it returns whether a row that is not done has something left."""
    ar = torch.arange(st.x.shape[1], device=st.x.device)
    gen = (ar[None] >= st.start[:, None]) & (ar[None] < st.end[:, None])  # (B', T) generated positions
    is_stop = torch.isin(st.x, st.stops) & gen
    stop_at = torch.where(is_stop.any(1), is_stop.float().argmax(1), st.end - 1)  # last position kept
    done = ~((st.x == st.mask_id) & gen & (ar[None] <= stop_at[:, None])).any(1)
    new, done, left = torch.stack([done & ~st.done, done, done if left is None else left]).tolist()
    for r in (r for r, n in enumerate(new) if n):
        st.out[st.ids[r]] = st.x[r, st.start[r]:stop_at[r] + 1].tolist()
        st.nfe_out[st.ids[r]] = int(st.nfe[r])
        st.nfe_ref_out[st.ids[r]] = int(st.nfe_ref[r])
    if any(new):
        st.done, st.blk = torch.tensor(done, device=st.x.device), None  # fewer live positions
        n_live = done.count(False)
        if n_live <= len(done) // 2 or not isinstance(st.cache, StaticKVCache):
            st.keep(torch.tensor([r for r, d in enumerate(done) if not d], dtype=torch.long, device=st.x.device))
    return any(lf and not d for lf, d in zip(left, done))


def prefill(model, st, G):
    """Run the complete blocks of the prompts (batch blocks 0..G-1) once and cache them. A prompt
    that ends on a block boundary gets its first token from the prefill's last logit."""
    if G == 0:
        return
    logits, _ = block_forward(model, st, 0, G * st.bd_size, commit=True)
    st.counts["prefill"] += 1
    first = (st.start == G * st.bd_size) & (st.start < st.end)
    st.x[first, G * st.bd_size] = predict(logits[first, -1], st.mask_id)[0]
    retire(st)


def denoise_step(model, st, q0, q1, relay_on):
    """One denoising forward of block [q0, q1) and its reveal (block_step), then the bookkeeping.
    Returns whether some row has something left to decode in this block."""
    xb, h, stepping, stop, left, _ = run_block(model, st, q0, q1, st.h)
    st.counts["denoise"] += 1
    st.x[:, q0:q1] = xb
    st.nfe += stepping
    st.nfe_ref += stepping & ~st.ref_done  # the reference counts until a denoising step reveals a stop
    st.ref_done |= stop
    st.h = h.clone() if relay_on else None  # a copy: a CUDA graph's output is overwritten by its next replay
    return retire(st, left)


def commit_block(model, st, q0, q1):
    """The block is complete: one more forward writes its K/V into the cache, and its last
    (unshifted) logit becomes the first token of the next block."""
    *_, nxt = run_block(model, st, q0, q1, None, commit=True)
    st.counts["commit"] += 1
    if q1 < st.x.shape[1]:
        st.x[:, q1] = torch.where(q1 < st.end, nxt, st.x[:, q1])
    retire(st)


@torch.no_grad()
def generate(model, prompts, *, max_new_tokens=256, threshold=0.85, bd_size=None, sub_block=None,
             stop_ids=(), use_cache=True, use_relay=True, pad_id=0, static=False, compile=False, graphs=True):
    """Block decoding of a batch of prompts (lists of token ids) -> (list of generated id lists, stats).
    A row stops after its first stop token once nothing before it is masked (the stop is included),
    or after max_new_tokens; every row produces exactly what it produces alone. use_cache=False
    recomputes the whole prefix every forward: the oracle. static=True: a StaticKVCache, every
    one-block step (forward and reveal) one shape, replayed as a CUDA graph on CUDA (the same tokens).
    compile=True (with static): that step is torch.compile'd first, so the graph replays fused
    kernels, not one or more per elementwise op (the first call compiles for a minute).
    graphs=False: static without CUDA graphs, the graphs' oracle at the same shapes. bd_size defaults
    to the model's; sub_block to gcd(8, bd_size): Fast-dLLM v2's 8 when 8 divides the block."""
    t0 = time.time()
    dev = next(model.parameters()).device
    bd_size, sub_block = block_sizes(model, bd_size, sub_block)  # one name for the block size, everywhere
    # 1) argument checks, and the batch layout: rows left-padded so generation starts in block G
    check_generate_args(model, prompts, max_new_tokens, bd_size, sub_block)
    st, G = left_pad(prompts, max_new_tokens, bd_size, model.cfg.mask_id, pad_id, dev)
    st.stops = torch.tensor(list(stop_ids), device=dev, dtype=torch.long)
    st.rule = lambda logits, xb, todo: reveal_block(logits, xb, todo, threshold, sub_block, st.mask_id, st.stops)
    if static and not use_cache:
        raise ValueError("static=True is a way of caching: it needs use_cache=True")
    if compile and not static:
        raise ValueError("compile=True compiles the static cache's one-block step: it needs static=True")
    fwd = model
    if static:  # buffers allocated up front: neither a graph nor a compiled step may allocate them
        st.cache = StaticKVCache(model.cfg.n_layer, st.x.shape[1])
        kv_dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else \
            next(model.parameters()).dtype  # the dtype of the keys and values the forward makes
        st.cache.allocate(len(prompts), model.cfg.n_kv_head, model.cfg.head_dim, kv_dtype, dev)
        if compile:  # the forward and the reveal rule apart (RoPE breaks the graph); symbolic lengths
            fwd, st.rule = torch.compile(model, dynamic=True), torch.compile(st.rule, dynamic=True)
        step = lambda xb, pos, mask, h, live: block_step(  # noqa: E731
            lambda relay: fwd(xb, pos=pos, attn_mask=mask, relay=relay, kv_cache=st.cache), st.rule, xb, h, live,
            st.mask_id)
        st.step = BlockGraphs(step, st.cache) if graphs and dev.type in GRAPH_DEVICES else step
    elif use_cache:
        st.cache = KVCache(model.cfg.n_layer, st.x.shape[1])
    relay_on = use_relay and model.relay is not None
    # 2) prefill: the prompts' complete blocks go into the cache
    prefill(model, st, G)
    for b in range(G, st.x.shape[1] // bd_size):  # the generation blocks, left to right
        if len(st.x) == 0:  # every row stopped
            break
        q0, q1 = b * bd_size, (b + 1) * bd_size
        # 3) denoise the block, sub-block by sub-block (one NFE per step); the relay carry starts empty
        # in every block. A row that is not done has a masked position in this block (unless blocks
        # are one token, which the prefill or commit fills), so the first step has work; afterwards
        # retire says whether any is left. Every step reveals at least one position of each row with
        # work, so bd_size steps always finish a block: more would mean a broken reveal rule, and an
        # error beats an endless loop.
        st.h, left = None, bd_size > 1
        for _ in range(bd_size):
            if not left:
                break
            left = denoise_step(model, st, q0, q1, relay_on)
        if left:
            raise RuntimeError(f"block {b} still has masked positions after {bd_size} denoising steps: "
                               "the reveal rule revealed nothing in some step")
        # 4) commit it: cache its K/V and predict the first token of the next block
        if len(st.x) > 0:
            commit_block(model, st, q0, q1)
    if dev.type == "cuda":  # the clock stops when the device is done, not when the launches are
        torch.cuda.synchronize(dev)
    secs = time.time() - t0
    n, graphs = st.counts, st.step if isinstance(st.step, BlockGraphs) else None
    return st.out, {"nfe": st.nfe_out, "nfe_ref": st.nfe_ref_out, "new_tokens": [len(o) for o in st.out],
                    "forward_calls": n["prefill"] + n["denoise"] + n["commit"], "denoise_calls": n["denoise"],
                    "prefill_calls": n["prefill"], "commit_calls": n["commit"], "forward_tokens": n["tokens"],
                    "seconds": secs, "tokens_per_s": sum(map(len, st.out)) / max(secs, 1e-9),
                    "graph_captures": graphs.captures if graphs else 0,  # CUDA graphs, and the seconds in `seconds`
                    "graph_capture_s": graphs.capture_s if graphs else 0.0}  # spent capturing them


# ---------------------------------------------------------------------------------------------
# command line

BENCH_PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Implement binary search over a sorted list and explain its complexity.",
    "Write a function that parses a CSV line with quoted fields.",
]


MODES = {"static": dict(static=True), "compiled": dict(static=True, compile=True), "cached": dict(),
         "uncached": dict(use_cache=False),  # --bench-modes; uncached is the oracle
         "static_eager": dict(static=True, graphs=False)}  # the graphs' oracle: the same shapes, no graphs


def first_diff(outs, oracle):
    """Where the first row whose tokens differ from the oracle's departs from them: (row, position),
    or None when all are equal. In bf16 a near tie flips: how far decoding ran alike tells a flip
    from a broken cache."""
    for r, (a, b) in enumerate(zip(outs, oracle)):
        if a != b:
            return r, next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return None


def profile_decode(model, ids, gen_kw, cuda, mode, n=128):
    """One decode of n tokens in this mode under torch.profiler: the ops that cost most, and per forward
    the wall time against the device's busy time (kernels only). Busy far below wall: the forward
    waits for the host (bookkeeping, syncs, capture), and a faster graph would not show."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        _, st = generate(model, [ids], **{**gen_kw, **MODES[mode], "max_new_tokens": n})
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=50), file=sys.stderr)
    return {"mode": mode, "max_new_tokens": n, "forwards": st["forward_calls"], "wall_ms_per_forward": 1e3 * st["seconds"] /
            st["forward_calls"], "kernel_ms_per_forward": kernel_ms(prof) / st["forward_calls"] if cuda else None}


def bench(model, tok, args, gen_kw):
    """Per new-token length, one prompt at a time over BENCH_PROMPTS after a warm-up: tokens/s,
    forwards/s and ms per forward of each --bench-modes mode -- static (StaticKVCache; CUDA graphs
    on CUDA), compiled (the same, its forward torch.compile'd), cached (KVCache) and uncached (the
    oracle) -- whether their tokens equal the oracle's, and how much of a forward's time went into
    capturing CUDA graphs (once per generate() call and batch size); prompts under one and two
    blocks against the oracle. Then --bench-batch rows: B prompts at once in the fastest mode timed,
    and whether each row's tokens are its batch-1 tokens. Random weights reveal about one token per forward, real
    ones several: tokens/s and forwards/s say different things."""
    rows, cuda = [], args.device.startswith("cuda")
    modes = {m: MODES[m] for m in args.bench_modes}

    def run(prompts, n, mode):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        out, st = generate(model, prompts, **{**gen_kw, **modes[mode], "max_new_tokens": n})
        return out, {"tokens_per_s": sum(st["new_tokens"]) / st["seconds"], "forwards_per_s": st["forward_calls"] /
                     st["seconds"], "ms_per_forward": 1e3 * st["seconds"] / st["forward_calls"], "seconds": st["seconds"],
                     "new_tokens": sum(st["new_tokens"]), "nfe": sum(st["nfe"]) / len(prompts), "forwards": st["forward_calls"],
                     "capture_s": st["graph_capture_s"],
                     "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None}

    chats = [tok.encode(tok.chat(p)) for p in BENCH_PROMPTS[:args.bench_prompts]]
    # the fastest path timed: the profile and the batches use it
    fast = next(m for m in ("compiled", "static", "static_eager", "cached", "uncached") if m in modes)
    for mode in modes:  # warm-up: kernels, allocator, compilation (graphs are captured per generate() call, timed)
        sizes = (1, 2) if mode == fast and args.bench_batch else (1,)  # batch 1 compiles apart from > 1
        for B in sizes:
            generate(model, [chats[0]] * B, **{**gen_kw, **modes[mode], "max_new_tokens": 8})
    for n in args.bench_lengths:
        res = {m: [run([ids], n, m) for ids in chats] for m in modes}  # per mode: [(out, stats)] per prompt
        row = {"max_new_tokens": n, "batch": 1}
        for m, runs in res.items():
            secs, fwds = sum(r[1]["seconds"] for r in runs), sum(r[1]["forwards"] for r in runs)
            row[m] = {"tokens_per_s": sum(r[1]["new_tokens"] for r in runs) / secs, "ms_per_forward": 1e3 * secs / fwds,
                      "same_tokens": [r[0] for r in runs] == [r[0] for r in res["uncached"]],
                      "first_diff": first_diff([r[0] for r in runs], [r[0] for r in res["uncached"]]),
                      "nfe": sum(r[1]["nfe"] for r in runs) / len(runs), "peak_gib": runs[-1][1]["peak_gib"],
                      "capture_ms_per_forward": 1e3 * sum(r[1]["capture_s"] for r in runs) / fwds}  # in ms_per_forward
        row.update({f"{m}_vs_uncached": row[m]["tokens_per_s"] / row["uncached"]["tokens_per_s"]
                    for m in modes if m != "uncached"})
        if "static" in res and "static_eager" in res:
            # the same shapes with and without graphs: equal tokens mean the graphs replay right, and a
            # difference from the oracle comes from kernels that change with shape
            row["graphs_same_tokens"] = [r[0] for r in res["static"]] == [r[0] for r in res["static_eager"]]
        rows.append(row)
        print(f"{n:>6} new tokens, batch 1 | " + " | ".join(
            f"{m} {row[m]['tokens_per_s']:8.1f} tok/s {row[m]['ms_per_forward']:6.2f} ms/fwd"
            + (f" (capture {c:.2f})" if (c := row[m]["capture_ms_per_forward"]) else "") for m in modes)
            + " | same tokens " + (", ".join(f"{m}: no, (row, token) {row[m]['first_diff']}" for m in modes
                                            if row[m]["first_diff"]) or "True")
            + (f" | graphs = static_eager: {row['graphs_same_tokens']}" if "graphs_same_tokens" in row else ""),
            flush=True)
    # the graph path's other ways in, against the oracle: a prompt under one block (no prefill), and
    # one of one to two blocks (a one-block prefill, then the graph)
    text, same = tok.encode("def add(a, b):\n    return a + b\n" * 3), {}
    for n in (12, 40):
        outs = [generate(model, [text[:n]], **{**gen_kw, **modes[m], "max_new_tokens": 64})[0]
                for m in (fast, "uncached")]
        same[n] = outs[0] == outs[1]
    rows.append({"short_prompts_same_tokens": same})
    print(f"prompts of {' and '.join(map(str, same))} tokens, {fast} = uncached: {list(same.values())}", flush=True)
    alone = [r[0][0] for r in res[fast]]  # the last length's batch-1 tokens of each prompt
    for B in args.bench_batch:
        prompts = [chats[i % len(chats)] for i in range(B)]
        out, st = run(prompts, args.bench_lengths[-1], fast)
        diff = first_diff(out, [alone[i % len(chats)] for i in range(B)])  # in bf16 kernels may change with B
        rows.append({"max_new_tokens": args.bench_lengths[-1], "batch": B, fast: st, "first_diff_from_alone": diff})
        print(f"{args.bench_lengths[-1]:>6} new tokens, batch {B} | {fast} {st['tokens_per_s']:8.1f} tok/s "
              f"{st['forwards_per_s']:7.1f} fwd/s {st['ms_per_forward']:6.2f} ms/fwd | tokens as alone: "
              f"{'yes' if diff is None else f'no, (row, token) {diff}'}", flush=True)
    if args.bench_profile:  # last, and a diagnostic: a profiler that fails does not cost the measurements above
        try:
            pr = profile_decode(model, chats[0], gen_kw, cuda, fast)
        except Exception as e:  # NOTE: on CUDA the profiler traces graph capture, which no CPU test covers
            traceback.print_exc()
            rows.append({"profile": {"error": repr(e)}})
        else:
            rows.append({"profile": pr})
            print(f"profile, {fast}, {pr['max_new_tokens']} new tokens: {pr['wall_ms_per_forward']:.2f} ms a forward, "
                  f"kernels {pr['kernel_ms_per_forward']} ms", flush=True)
    return rows


def get_args(argv=None):
    p = argparser(__doc__)
    p.add_argument("--checkpoint", help="a Fast-dLLM v2 / Qwen2 checkpoint directory (train_code.py: OUT_DIR/hf)")
    p.add_argument("--random-init", choices=list(SHAPES), help="random weights of this shape, byte tokenizer")
    p.add_argument("--prompt", help="text to continue (see --chat)")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a ChatML user turn, after Qwen2.5's "
                   "default system turn (as its chat template does)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="tokens to generate at most")
    p.add_argument("--threshold", type=unit_float, default=0.85, help="reveal confidence threshold (strict)")
    p.add_argument("--bd-size", type=positive_int, help="diffusion block size (default: the checkpoint's bd_size)")
    p.add_argument("--sub-block", type=positive_int, help="sub-block size: decoded strictly in order (default: "
                   "gcd(8, block size): Fast-dLLM v2's 8 when it divides the block)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every forward (oracle)")
    p.add_argument("--no-relay", action="store_true", help="do not carry the relay state")
    p.add_argument("--static", action="store_true", help="one-shape cache, CUDA graphs on CUDA (the same tokens)")
    p.add_argument("--compile", action="store_true",
                   help="with --static: torch.compile the block step first (fused kernels; compiles for a minute)")
    p.add_argument("--device", type=device_flag, default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights dtype; auto = bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--seed", type=seed_int, default=0, help="random-init weights (decoding is greedy)")
    p.add_argument("--bench", action="store_true", help="static / cached / uncached decoding speed, JSON line last")
    p.add_argument("--bench-lengths", type=positive_int, nargs="+", default=[64, 256, 1024], help="--bench: new tokens")
    p.add_argument("--bench-prompts", type=positive_int, default=len(BENCH_PROMPTS),
                   help=f"--bench: time batch 1 on the first N of the {len(BENCH_PROMPTS)} prompts")
    p.add_argument("--bench-modes", nargs="+", choices=list(MODES), default=["static", "cached", "uncached"],
                   help="--bench: decoding modes to time; compiled = static with the block forward torch.compile'd "
                        "(a minute of compilation on a GPU, in the warm-up); static_eager = static without CUDA graphs")
    p.add_argument("--bench-profile", action="store_true",
                   help="--bench: profile one static (or compiled) decode of 128 tokens: kernel vs wall time per forward")
    p.add_argument("--bench-batch", type=positive_int, nargs="*", default=[8, 32],
                   help="--bench: static (or compiled) decoding of this many prompts at once (at the last length)")
    p.add_argument("--save", help="with --random-init: write the model and tokenizer as a checkpoint directory")
    args = p.parse_args(argv)
    args.device = pick_device(args.device)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.compile and (not args.static or args.no_cache):
        p.error("--compile compiles the static cache's block forward: give --static (and not --no-cache)")
    if "uncached" not in args.bench_modes:
        p.error("--bench-modes: uncached is the oracle the others are compared with: include it")
    if args.bench_prompts > len(BENCH_PROMPTS):
        p.error(f"--bench-prompts {args.bench_prompts}: there are {len(BENCH_PROMPTS)} prompts")
    if (args.checkpoint is None) == (args.random_init is None):
        p.error("give exactly one of --checkpoint and --random-init")
    if args.bd_size and args.sub_block and args.bd_size % args.sub_block:
        p.error(f"--bd-size {args.bd_size} is not a multiple of --sub-block {args.sub_block}")
    given = lambda *keys: [f"--{k.replace('_', '-')}" for k in keys if getattr(args, k) not in (None, False)]
    if len(given("prompt", "prompt_file")) == 2:
        p.error("--prompt and --prompt-file: give one")
    if args.static and args.no_cache:
        p.error("--static is a kind of cache: it goes with no --no-cache")
    if args.bench and (clash := given("prompt", "prompt_file", "chat", "static", "no_cache", "save")):
        p.error(f"{' '.join(clash)}: --bench decodes its own prompts in the modes of --bench-modes")
    if args.save and (args.checkpoint or given("prompt", "prompt_file")):
        p.error("--save writes a --random-init model and stops: it goes with neither --checkpoint nor a prompt")
    if args.prompt is not None:
        try:
            args.prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes that are not UTF-8 reach argv as surrogates
            p.error(f"--prompt: not UTF-8 text (character {e.start})")
    return args, p


def main(argv=None):
    args, p = get_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.random_init:
        model, tok = random_model(args.random_init, args.device, dtype, args.seed)
        if args.save:
            if os.path.isdir(args.save) and os.listdir(args.save):  # never over a trained checkpoint
                raise FileExistsError(f"{args.save} exists and is not empty: --save writes a new directory")
            save_pretrained(model, args.save)
            save_byte_tokenizer(args.save)
            print(f"saved a random {args.random_init} checkpoint to {args.save}")
            return
    else:
        model, tok = load_pretrained(args.checkpoint, device=args.device, dtype=dtype)
    bd, sub = block_sizes(model, args.bd_size, args.sub_block)
    if bd % sub:
        p.error(f"--sub-block {sub} does not divide the block size {bd}")
    gen_kw = dict(threshold=args.threshold, bd_size=args.bd_size, sub_block=args.sub_block, stop_ids=tok.stop_ids,
                  use_relay=not args.no_relay,  # any pad id works: no real token attends to padding
                  pad_id=tok.stop_ids[-1] if tok.stop_ids else 0)
    print(f"model: {model.num_params() / 1e6:.1f}M parameters, bd_size {model.cfg.bd_size}, relay "
          f"{model.relay is not None}, {args.device} {args.dtype}", file=sys.stderr)
    if args.bench:
        rows = bench(model, tok, args, gen_kw)
        print(json.dumps({"bench": rows, "device": args.device, "dtype": args.dtype, "torch": torch.__version__,
                          "model": args.random_init or args.checkpoint}))
        return
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8", newline="") as f:  # "\r\n" stays two tokens' worth
            try:
                args.prompt = f.read()
            except UnicodeDecodeError as e:
                p.error(f"--prompt-file {args.prompt_file}: not UTF-8 text (byte {e.start}: {e.reason})")
    if args.prompt is None:
        p.error("give --prompt or --prompt-file (or --bench)")
    ids = tok.encode(tok.chat(args.prompt) if args.chat else args.prompt)
    out, st = generate(model, [ids], max_new_tokens=args.max_new_tokens, use_cache=not args.no_cache,
                       static=args.static and not args.no_cache, compile=args.compile, **gen_kw)
    print(tok.decode(out[0], skip_special=True))
    print(json.dumps({"tokens": out[0], "prompt_tokens": len(ids), **st}))


if __name__ == "__main__":
    run_cli(main)
