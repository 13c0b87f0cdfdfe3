"""The KV-cached block sampler (NOTES.md §6) against its uncached oracle, batch vs alone, NFE
accounting, no MASK left, and the per-block relay reset."""
import pytest
import torch

import sampler
from model import StaticKVCache, random_model
from sampler import BlockGraphs, generate, left_pad

PROMPTS = [[1, 2, 3], list(range(1, 17)), list(range(5, 30)), list(range(10, 18)) * 3, [7] * 8]
KW = dict(max_new_tokens=37, threshold=0.2, sub_block=4, stop_ids=[])


@pytest.fixture
def llm(tiny_llm):
    torch.nn.init.normal_(tiny_llm.relay.norm.weight)  # a live relay (zero-init would inject nothing)
    with torch.no_grad():
        tiny_llm.lm_head.weight.mul_(40)  # sharper predictions: several reveals per step, some stops
    return tiny_llm


@pytest.mark.parametrize("use_relay", [True, False])
def test_cached_equals_uncached_and_batch_equals_alone(llm, use_relay):
    cached, st_c = generate(llm, PROMPTS, use_relay=use_relay, **KW)
    uncached, st_u = generate(llm, PROMPTS, use_cache=False, use_relay=use_relay, **KW)
    assert cached == uncached
    assert st_c["nfe"] == st_u["nfe"]
    assert st_c["forward_tokens"] < st_u["forward_tokens"]
    alone = [generate(llm, [p], use_relay=use_relay, **KW)[0][0] for p in PROMPTS]
    assert cached == alone
    assert all(len(o) == KW["max_new_tokens"] for o in cached)  # no stop ids: exactly max_new_tokens
    assert any(nfe < KW["max_new_tokens"] for nfe in st_c["nfe"])  # the threshold revealed > 1 token per step


@pytest.mark.parametrize("use_relay", [True, False])
def test_static_cache_equals_the_dynamic_cache(llm, use_relay):
    """The one-shape path (StaticKVCache: writes at a device offset, attends to every key under a
    mask; CUDA graphs replay it) gives the same tokens and counts, also when rows stop and leave."""
    free, _ = generate(llm, PROMPTS, use_relay=use_relay, **KW)
    kw = {**KW, "stop_ids": [free[1][5]]}  # rows stop at different blocks
    for k in (KW, kw):
        dyn, st_d = generate(llm, PROMPTS, use_relay=use_relay, **k)
        sta, st_s = generate(llm, PROMPTS, use_relay=use_relay, static=True, **k)
        assert sta == dyn and st_s["nfe"] == st_d["nfe"] and st_s["nfe_ref"] == st_d["nfe_ref"]
        assert st_s["forward_calls"] == st_d["forward_calls"]
    assert [len(o) for o in sta] != [len(o) for o in free]  # some row did stop early
    with pytest.raises(ValueError, match="static=True"):
        generate(llm, PROMPTS, use_cache=False, static=True, **KW)


def test_static_batch_keeps_done_rows_until_half_are_done(llm):
    """Each batch size is a new CUDA graph, so on a StaticKVCache done rows wait (decoding nothing)
    until half of the batch is done; the dynamic cache drops them at once. Same tokens and counts."""
    free, _ = generate(llm, PROMPTS, **KW)
    gradual = False  # some run where the dynamic batch shrinks by less than half
    for stop in list(dict.fromkeys(free[0] + free[1]))[:10]:
        kw = {**KW, "max_new_tokens": 60, "stop_ids": [stop]}
        sizes, res = {}, {}
        for static in (False, True):
            seen = []
            hook = llm.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
            out, st = generate(llm, PROMPTS, static=static, **kw)
            hook.remove()
            sizes[static] = [n for i, n in enumerate(seen) if i == 0 or n != seen[i - 1]]  # batch sizes in order
            res[static] = (out, st["nfe"], st["nfe_ref"], st["forward_calls"])
        assert res[True] == res[False]
        assert all(b <= a // 2 for a, b in zip(sizes[True], sizes[True][1:]))
        gradual |= any(b > a // 2 for a, b in zip(sizes[False], sizes[False][1:]))
    assert gradual


def test_compiled_static_decoding_equals_the_dynamic_cache(llm):
    """static=True, compile=True: the one-block forward and the reveal rule torch.compile'd (on CUDA
    then captured in one graph):
    the same tokens and counts, rows stopping, batch > 1, relay on; no recompile per block."""
    import torch._dynamo as dynamo
    free, _ = generate(llm, PROMPTS, **KW)
    kw = {**KW, "stop_ids": [free[1][5]]}
    dynamo.utils.counters.clear()
    for k in (KW, kw):
        dyn, st_d = generate(llm, PROMPTS, **k)
        com, st_c = generate(llm, PROMPTS, static=True, compile=True, **k)
        assert com == dyn and st_c["nfe"] == st_d["nfe"] and st_c["forward_calls"] == st_d["forward_calls"]
    # the forward, relay or not, in two pieces (RoPE runs eagerly), and the reveal rule: 5, not one per block
    assert dynamo.utils.counters["stats"]["unique_graphs"] <= 5
    with pytest.raises(ValueError, match="compile=True"):
        generate(llm, PROMPTS, compile=True, **KW)


def test_relay_changes_the_generation(llm):
    assert generate(llm, PROMPTS, **KW)[0] != generate(llm, PROMPTS, use_relay=False, **KW)[0]


def test_nfe_counts_denoising_forwards_and_no_mask_left(llm):
    calls = []
    hook = llm.register_forward_hook(lambda m, args, kw, out: calls.append(kw), with_kwargs=True)
    out, st = generate(llm, [PROMPTS[2]], **KW)
    hook.remove()
    denoise = [c for c in calls if not c["commit"]]
    assert st["nfe"] == [len(denoise)] == [st["denoise_calls"]]
    assert len(calls) == st["forward_calls"] == st["denoise_calls"] + st["prefill_calls"] + st["commit_calls"]
    assert st["prefill_calls"] == 1  # a 25-token prompt has 3 complete blocks of 8
    assert llm.cfg.mask_id not in out[0]


def test_no_output_ends_in_a_mask_and_the_length_limit_is_inclusive(llm):
    for n in range(1, 17):  # without stops a row is done only when its last position is filled too
        out, _ = generate(llm, PROMPTS, **{**KW, "max_new_tokens": n, "threshold": 0.99})
        assert all(len(o) == n and llm.cfg.mask_id not in o for o in out), (n, out)
    llm.hf_config = {"max_position_embeddings": 40}  # positions 0-39: 8 prompt + 32 new tokens fit exactly
    assert len(generate(llm, [[1] * 8], **{**KW, "max_new_tokens": 32})[0][0]) == 32


def test_positions_past_the_last_new_token_are_never_decoded(llm, monkeypatch):
    canvases, real = [], sampler.retire

    def record(st, left=None):
        canvases.append((st.x.clone(), st.end.clone()))
        return real(st, left)
    monkeypatch.setattr(sampler, "retire", record)
    # threshold 0 reveals a whole sub-block at once: a position past the end shares a step with the last one
    out, _ = generate(llm, PROMPTS, **{**KW, "max_new_tokens": 10, "threshold": 0.0})
    assert all(len(o) == 10 for o in out) and len(canvases) > 3
    for x, end in canvases:
        assert (x[torch.arange(x.shape[1])[None] >= end[:, None]] == llm.cfg.mask_id).all()


def test_cached_equals_uncached_at_another_block_size(llm):
    for bd in (4, 16):  # one unpadded prompt: padding happens to build the right mask
        for p in PROMPTS[:2]:
            kw = {**KW, "bd_size": bd, "max_new_tokens": 20}
            assert generate(llm, [p], **kw)[0] == generate(llm, [p], use_cache=False, **kw)[0], (bd, p)


def test_the_prefill_gives_the_first_token_and_a_stop_there_ends_the_row(tiny_llm):
    def first_token_5(module, args, kwargs, out):
        if kwargs.get("commit") and args[0].shape[1] == 16:  # the prefill of the 16-token prompt
            logits = out[0].clone()
            logits[:, -1, 5] += 100.0
            return logits, out[1]
    hook = tiny_llm.register_forward_hook(first_token_5, with_kwargs=True)
    kw = dict(max_new_tokens=13, threshold=0.2, sub_block=4)
    try:
        out, _ = generate(tiny_llm, [PROMPTS[1]], **kw)
        stopped, st = generate(tiny_llm, [PROMPTS[1]], stop_ids=[5], **kw)
    finally:
        hook.remove()
    assert out[0][0] == 5
    assert stopped == [[5]] and st["nfe"] == [0] and st["denoise_calls"] == 0


def test_a_row_that_leaves_takes_its_relay_state_with_it():
    st, _ = left_pad([[1], [2], [3]], 4, 8, 63, 0, "cpu")
    st.h = torch.randn(3, 8, 32)
    h = st.h.clone()
    st.keep(torch.tensor([0, 2]))
    assert torch.equal(st.h, h[[0, 2]]) and st.ids.tolist() == [0, 2]


def test_relay_carry_resets_every_block(llm):
    """First denoising forward of each block injects nothing; later ones inject the previous state."""
    calls = []
    hook = llm.register_forward_hook(lambda m, args, kw, out: calls.append((args[0].shape[1], kw)), with_kwargs=True)
    generate(llm, [PROMPTS[0]], **KW)
    hook.remove()
    kinds = []
    for T, kw in calls:
        if kw["commit"]:
            assert kw["relay"] is None
            kinds.append("C")
        else:
            kinds.append("R" if kw["relay"] is not None else "N")
    blocks = "".join(kinds).split("C")
    assert len(blocks) >= 3
    for blk in blocks:
        if blk:
            assert blk[0] == "N" and set(blk[1:]) <= {"R"}, kinds


def test_stop_token_ends_a_row_and_rows_leave_the_batch(llm):
    free, _ = generate(llm, PROMPTS, **KW)
    stop = free[1][5]  # a token row 1 produces: make it the stop token
    out, st = generate(llm, PROMPTS, **{**KW, "stop_ids": [stop]})
    first = free[1].index(stop)
    assert out[1] == free[1][:first + 1]
    for o, f in zip(out, free):  # every row is its free run cut at its first stop
        assert o == (f[:f.index(stop) + 1] if stop in f else f)
    assert out == generate(llm, PROMPTS, use_cache=False, **{**KW, "stop_ids": [stop]})[0]


@pytest.mark.parametrize("broken", ["reveals nothing", "predicts MASK"])
def test_a_reveal_rule_that_makes_no_progress_is_an_error_not_an_endless_loop(llm, monkeypatch, broken, deadline):
    """A block of bd_size positions takes at most bd_size steps, each revealing at least one position
    per row with work; a rule that breaks this must fail, not hang the caller (or the test suite)."""
    real = sampler.reveal_block
    if broken == "reveals nothing":
        monkeypatch.setattr(sampler, "reveal_block", lambda logits, xb, todo, *a: (xb, real(logits, xb, todo, *a)[1]))
    else:
        monkeypatch.setattr(sampler, "predict", lambda logits, mask_id: (
            torch.full(logits.shape[:-1], mask_id, device=logits.device), logits.softmax(-1).amax(-1)))
    with pytest.raises(RuntimeError, match=r"block \d+ still has masked positions after 8 denoising steps"):
        generate(llm, PROMPTS, **KW)


def test_bad_arguments(llm):
    with pytest.raises(ValueError, match="mask token"):
        generate(llm, [[1, 63, 2]], **KW)
    with pytest.raises(ValueError, match="multiple"):
        generate(llm, [[1]], **{**KW, "sub_block": 3})
    with pytest.raises(ValueError, match="prompts of at least one token"):
        generate(llm, [[]], **KW)
    llm.hf_config = {"max_position_embeddings": 40}
    with pytest.raises(ValueError, match=r"prompt \(8 tokens\) \+ max_new_tokens \(37\) exceeds"):
        generate(llm, [[1] * 8], **KW)
    with pytest.raises(ValueError, match="block size 64 is past the checkpoint's max_position_embeddings"):
        generate(llm, [[1]], **{**KW, "max_new_tokens": 4, "bd_size": 64})  # its one block would be 64 long
    assert random_model("tiny")[0].hf_config["max_position_embeddings"] == 32768  # as a saved one says


def test_the_default_sub_block_divides_any_block_size(llm):
    """Fast-dLLM v2's sub-block is 8; a block of 4 or 12 (a model trained so) decodes in sub-blocks of 4."""
    kw = {k: v for k, v in KW.items() if k != "sub_block"}
    for bd in (4, 12):
        assert generate(llm, PROMPTS, bd_size=bd, **kw)[0] == generate(llm, PROMPTS, bd_size=bd, sub_block=4, **kw)[0]
    assert generate(llm, PROMPTS, bd_size=16, **kw)[0] == generate(llm, PROMPTS, bd_size=16, sub_block=8, **kw)[0]


def test_reference_nfe_stops_at_the_denoising_step_that_reveals_a_stop(llm):
    """nfe_ref (the paper's count) = denoising forwards up to the one whose reveal put a stop token on the
    canvas, counted here from the recorded forwards; nfe (ours) goes on until nothing before the stop is
    masked. Without stop ids the two are equal."""
    kw = {**KW, "threshold": 0.5}
    assert generate(llm, PROMPTS, **kw)[1]["nfe_ref"] == generate(llm, PROMPTS, **kw)[1]["nfe"]
    stop = 60  # row 4 reveals it while a position before it is still masked
    calls = []
    hook = llm.register_forward_hook(lambda m, args, kw, out: calls.append((kw["commit"], args[0][0, -8:].clone())),
                                     with_kwargs=True)
    out, st = generate(llm, [PROMPTS[4]], **{**kw, "stop_ids": [stop]})
    hook.remove()
    count = 0
    for (commit, idx), (_, after) in zip(calls[1:], calls[2:] + [(None, None)]):  # calls[0]: the prefill
        if commit:
            continue
        count += 1
        if after is not None and ((idx == 63) & (after == stop)).any():  # this step revealed the stop
            break
    assert st["nfe_ref"] == [count] and count < st["nfe"][0]  # here the two counts differ
    several = generate(llm, PROMPTS, **{**kw, "stop_ids": [stop]})[1]
    assert all(r <= n for r, n in zip(several["nfe_ref"], several["nfe"]))
    assert several["nfe_ref"][4] == count  # batched == alone


def test_bench_reports_equal_tokens_for_every_mode(capsys, monkeypatch):
    """sampler.py --bench (the GPU check's first step) runs static, cached and uncached decoding
    and compares each with the oracle; in fp32 on the CPU all three must agree. The profile, a diagnostic,
    runs last: a profiler that fails leaves the measurements in the JSON line."""
    import json

    def broken(*a, **k):
        raise RuntimeError("profiler broke")

    monkeypatch.setattr(sampler, "profile_decode", broken)
    sampler.main(["--random-init", "tiny", "--bench", "--bench-lengths", "40", "--bench-prompts", "2",
                  "--bench-batch", "3", "--bench-modes", "static", "static_eager", "cached", "uncached",
                  "--bench-profile"])
    out, err = capsys.readouterr()
    rows = json.loads(out.strip().splitlines()[-1])["bench"]
    assert rows[-1] == {"profile": {"error": "RuntimeError('profiler broke')"}} and "profiler broke" in err
    assert rows[1]["short_prompts_same_tokens"] == {"12": True, "40": True}
    rows = [r for r in rows if "batch" in r]
    assert [(r["max_new_tokens"], r["batch"]) for r in rows] == [(40, 1), (40, 3)]
    assert rows[0]["graphs_same_tokens"] is True
    for m in ("static", "static_eager", "cached", "uncached"):
        assert rows[0][m]["same_tokens"] and rows[0][m]["first_diff"] is None
        assert rows[0][m]["nfe"] > 0
    assert rows[1]["static"]["new_tokens"] == 3 * 40 and rows[1]["first_diff_from_alone"] is None


def test_the_commit_forward_gives_the_next_blocks_first_token(tiny_llm):
    """commit_block: the completed block's last (unshifted) logit is the next block's first token. Tiny random
    models often predict one token at a block's last two positions, so equal-token tests miss a shifted read:
    a hook makes token 5 win only at the commit forward's last position."""
    seen = []

    def hook(module, args, kwargs, out):
        if kwargs.get("commit"):
            logits = out[0].clone()
            logits[:, -1, 5] += 100.0
            seen.append(logits.shape)
            return logits, out[1]

    handle = tiny_llm.register_forward_hook(hook, with_kwargs=True)
    try:
        out, _ = generate(tiny_llm, [[1, 2, 3]], max_new_tokens=13, threshold=0.2, sub_block=4)
    finally:
        handle.remove()
    assert seen and out[0][5] == 5  # new token 5 = position 8, the first of block 1 (bd_size 8)


class FakeGraph:
    """CUDA-graph semantics on the CPU, to test BlockGraphs here: the capture records every op with
    its tensors; a replay runs the ops again on those same tensors and writes each result into the
    tensor the capture produced (fixed addresses, as on a GPU), so whatever a call does not copy into
    the graph's inputs is stale. A host sync or host data inside the capture raises, as on CUDA."""

    def __init__(self):
        self.ops, self.pool = [], None

    def __del__(self):
        if self.pool is not None:
            self.pool["graphs"] -= 1

    def replay(self):
        for func, args, kwargs, out in self.ops:
            new = func(*args, **kwargs)
            for o, n in zip(*(x if isinstance(x, (tuple, list)) else (x,) for x in (out, new))):
                if isinstance(o, torch.Tensor) and o is not n:
                    o.copy_(n)


def fake_cuda_graphs(monkeypatch):
    from contextlib import contextmanager, nullcontext
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self, graph):
            super().__init__()
            self.graph = graph

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # a host read (sync) or a tensor made from host data (a copy from the host): CUDA refuses both
            assert func.__name__.split(".")[0] not in ("_local_scalar_dense", "is_nonzero", "nonzero", "lift_fresh"), \
                f"host sync or host data inside a graph capture: {func}"
            out = func(*args, **(kwargs or {}))
            self.graph.ops.append((func, args, kwargs or {}, out))
            return out

    @contextmanager
    def graph(g, pool=None):
        # as CUDA's allocator: a pool whose graphs were all destroyed cannot take a new capture
        assert pool["graphs"] > 0 or not pool["used"], "capture into the pool of destroyed graphs"
        g.pool, pool["graphs"], pool["used"] = pool, pool["graphs"] + 1, True
        with Record(g):
            yield

    class Stream:
        def wait_stream(self, other):
            pass

        def synchronize(self):
            pass

    captures = []
    monkeypatch.setattr(sampler, "GRAPH_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: {"graphs": 0, "used": False})
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: captures.append(1) or FakeGraph())  # no reference kept
    monkeypatch.setattr(torch.cuda, "graph", graph)
    return captures


def test_block_graphs_drop_the_graphs_over_a_caches_old_buffers(monkeypatch):
    captures = fake_cuda_graphs(monkeypatch)
    cache = StaticKVCache(1, 4)
    cache.allocate(2, 1, 2, torch.float32, "cpu")
    graphs = BlockGraphs(lambda x: x * 2, cache)
    assert torch.equal(graphs(torch.ones(2, 3)), torch.full((2, 3), 2.0))
    cache.keep(torch.tensor([1]))  # a row left: new cache buffers
    assert torch.equal(graphs(torch.ones(1, 3)), torch.full((1, 3), 2.0))
    assert len(captures) == 2 and len(graphs.graphs) == 1  # the graph over the old buffers is gone


@pytest.mark.parametrize("use_relay", [True, False])
def test_graphed_block_steps_equal_the_dynamic_cache(llm, monkeypatch, use_relay):
    """BlockGraphs on the CPU with fake CUDA graphs (FakeGraph): each step replays a recorded
    forward-and-reveal on the graph's own tensors. Same tokens and counts as the dynamic cache, with
    rows stopping and leaving; a graph per (rows, relay or not), captured again only when rows leave."""
    kw = {**KW, "max_new_tokens": 60}
    free, _ = generate(llm, PROMPTS, use_relay=use_relay, **kw)
    for stop in dict.fromkeys(free[0]):  # a stop that ends all rows but one early
        dyn, st_d = generate(llm, PROMPTS, use_relay=use_relay, **{**kw, "stop_ids": [stop]})
        lens = sorted(map(len, dyn))
        if lens[-2] < 60 == lens[-1]:
            break
    assert lens[-2] < 60 == lens[-1]
    captures = fake_cuda_graphs(monkeypatch)
    gra, st_g = generate(llm, PROMPTS, use_relay=use_relay, static=True, **{**kw, "stop_ids": [stop]})
    assert gra == dyn and (st_g["nfe"], st_g["nfe_ref"]) == (st_d["nfe"], st_d["nfe_ref"])
    # all five rows, then at most three (rows leave once half are done), then one: relay or not each
    assert 2 <= len(captures) <= (2 if use_relay else 1) * 3
    assert st_g["denoise_calls"] + st_g["commit_calls"] > 4 * len(captures)  # most steps are replays
    assert st_g["graph_captures"] == len(captures) and st_g["graph_capture_s"] > 0


def test_one_token_blocks_need_no_denoising_forward(llm):
    """bd_size 1: the prefill or the commit fills each block's only position, so no block has
    anything to denoise: no denoising forward runs, and none is counted."""
    for static in (False, True):
        out, st = generate(llm, PROMPTS, **{**KW, "bd_size": 1, "sub_block": 1, "max_new_tokens": 5}, static=static)
        assert all(len(o) == 5 for o in out) and st["denoise_calls"] == 0 and st["nfe"] == [0] * len(PROMPTS)


def test_static_cache_under_autocast(llm):
    """Under bf16 autocast the keys and values are bf16 while the weights are fp32: the static cache
    is allocated in the dtype the forward makes, and decodes as the dynamic cache does."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dyn, _ = generate(llm, PROMPTS, **KW)
        sta, _ = generate(llm, PROMPTS, static=True, **KW)
    assert sta == dyn


def test_attention_takes_sdpa_output_in_a_fused_kernel_layout(llm, monkeypatch):
    """CUDA's fused SDPA kernels return a transposed (B, T, H, hd) buffer, not a contiguous (B, H, T, hd) one; the
    masked GQA paths of decoding (a short block against the cache) must take either. The same on the CPU here."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    fused_layout = lambda *a, **k: sdpa(*a, **k).transpose(1, 2).contiguous().transpose(1, 2)
    want = generate(llm, PROMPTS, use_cache=False, **KW)[0]
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", fused_layout)
    for kw in (dict(), dict(static=True)):
        assert generate(llm, PROMPTS, **kw, **KW)[0] == want
