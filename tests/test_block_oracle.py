"""The block sampler (NOTES.md §6) against an independent oracle written from the specification alone.

tests/test_block_sampler.py compares the sampler's cached, uncached and static modes with one another; they
share block_step, reveal_block and the commit code, so a bug there is invisible to it. The oracle here shares
none of it: no KV cache, no left padding, no sampler helper. Every forward is the model's plain forward over the
whole sequence so far (prompt + committed blocks + the current block) under a block-causal mask built here; the
relay is injected by a hook on the token embeddings; the shift, the sub-block reveal rule, the commit, the stop
rule and the NFE count are written out per prompt, one position at a time. Each prompt is decoded alone, so a
batch must give every row what the oracle gives it.

The models are float64 (cached and recomputed forwards then agree to ~1e-16, so a confidence never crosses the
threshold or a tie differently) with large random weights, so that the tokens depend on their position and
context rather than repeating one token: tiny random models at the usual 0.02 init mostly produce periodic
tokens, which hides a position off by one. One model's head is sharp enough to give float32 confidences of
exactly 1.0 (ties and the strict threshold at 1.0 matter there), one is the usual near-periodic one.
"""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from model import QWEN2, ModelConfig, RMSNorm, Transformer, random_model
from sampler import generate

MODELS = {  # name: (std of every Linear weight and bias, embedding std, lm_head scale)
    "varied": (0.5, 1.0, 2.0),  # tokens vary by position, several reveals per step at low thresholds
    "saturated": (0.5, 1.0, 20.0),  # float32 confidences of exactly 1.0: first index on ties, strict > 1.0
    "periodic": (0.02, 0.02, 40.0),  # conftest's tiny_llm scaled as test_block_sampler.py does
}


def make_model(name, seed=0):
    lin_std, embed_std, head_scale = MODELS[name]
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**QWEN2, "vocab_size": 64, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32,
                         "n_ffn": 64, "tie_embeddings": False, "mask_id": 63, "bd_size": 8, "relay": True,
                         "embed_std": embed_std})
    model = Transformer(cfg)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0, lin_std)
                if mod.bias is not None:
                    mod.bias.normal_(0, lin_std)
            if isinstance(mod, RMSNorm):  # not all ones: LayerNorm(RMSNorm(h)) would equal LayerNorm(h)
                mod.weight.normal_(1.0, 0.5)
        model.lm_head.weight.mul_(head_scale)
        model.relay.norm.weight.normal_()  # a live relay: neither zero (a no-op) nor constant
        model.relay.norm.bias.normal_()
    return model.double().eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These forwards are tiny: a second thread only adds overhead, and on a loaded machine a lot of it
    (the module takes ~10x as long with 2 threads when the cores are busy)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return make_model(request.param)


# ---------------------------------------------------------------------------------------------
# the oracle

def block_causal(n, bd):
    """(n, n) bool, True = may attend: position i sees position j iff j's block is not after i's."""
    blk = torch.arange(n) // bd
    return blk[:, None] >= blk[None, :]


def full_forward(model, seq, bd, inject=None):
    """Logits (n, V) of the 1-D sequence seq at positions 0..n-1, block-causal, and the relay state (n, D): the
    output of the final RMSNorm, which the head reads (NOTES.md §1). inject (n, D) or None: added to the token
    embeddings at the MASK positions (the relay)."""
    normed = []
    hooks = [model.norm.register_forward_hook(lambda mod, args, out: normed.append(out[0]))]
    if inject is not None:
        is_mask = (seq == model.cfg.mask_id)[None, :, None]
        hooks.append(model.embed_tokens.register_forward_hook(
            lambda mod, args, out: torch.where(is_mask, out + inject[None].to(out.dtype), out)))
    try:
        logits, _ = model(seq[None], pos=torch.arange(len(seq)), attn_mask=block_causal(len(seq), bd))
    finally:
        for hook in hooks:
            hook.remove()
    return logits[0], normed[0]


def greedy(logits, mask_id):
    """Argmax over every token but MASK, and its probability under the softmax over all tokens."""
    p = logits.float().softmax(-1)
    p[..., mask_id] = -1.0
    conf, tok = p.max(-1)
    return tok, conf


@torch.no_grad()
def oracle(model, prompt, *, max_new_tokens, threshold, bd, sub=None, stops=(), relay=True):
    """Decode one prompt from the specification. Returns (tokens, nfe, nfe_ref, events); events lists
    ("prefill" | "commit", position, token) and ("step", block start, [(position, token) revealed])."""
    mask_id, stops, sub = model.cfg.mask_id, set(stops), sub or math.gcd(8, bd)
    L = len(prompt)
    end = L + max_new_tokens  # generated positions: [L, end)
    x = torch.full((-(-end // bd) * bd,), mask_id)
    x[:L] = torch.tensor(prompt)
    nfe, nfe_ref, events = 0, None, []

    def cut():  # the generated tokens up to the first stop (or all of them)
        gen = x[L:end].tolist()
        return gen[:next((i + 1 for i, t in enumerate(gen) if t in stops), len(gen))]

    def finished():
        return mask_id not in cut()

    if L % bd == 0:  # the prompt ends on a block boundary: the prefill's last logit is the first token
        logits, _ = full_forward(model, x[:L], bd)
        x[L] = greedy(logits[-1], mask_id)[0]
        events.append(("prefill", L, int(x[L])))
    for q0 in range(L // bd * bd, len(x), bd):
        if finished():
            break
        q1 = q0 + bd
        assert x[q0] != mask_id and not (x[:q0] == mask_id).any()  # so position q0's shifted logit is never read
        h_prev = None  # the relay starts empty in every block
        while not finished() and (x[q0:min(q1, end)] == mask_id).any():
            inject = None
            if relay and model.relay is not None and h_prev is not None:
                carried = torch.zeros_like(h_prev)
                carried[q0 + 1:q1] = h_prev[q0:q1 - 1]  # the state of position j - 1 goes to token j
                ln = model.relay.norm
                inject = F.layer_norm(carried, carried.shape[-1:], ln.weight, ln.bias, ln.eps)
                inject[:q0 + 1] = 0  # the block's MASK positions only (position q0 is never MASK)
            logits, h_prev = full_forward(model, x[:q1].clone(), bd, inject)
            nfe += 1
            # token j is read from position j - 1 (for q0 = 0, position 0 is a prompt token: never read)
            tok, conf = greedy(logits[max(q0 - 1, 0):q1 - 1] if q0 else torch.cat([logits[:1], logits[:q1 - 1]]),
                               mask_id)
            masked = [q0 + j < end and x[q0 + j] == mask_id for j in range(bd)]
            s = next(i for i in range(0, bd, sub) if any(masked[i:i + sub]))  # the current sub-block
            cand = [j for j in range(s, s + sub) if masked[j]]
            best = max(cand, key=lambda j: (float(conf[j]), -j))  # the most confident, first on ties
            shown = [j for j in cand if float(conf[j]) > threshold or j == best]
            for j in shown:
                x[q0 + j] = tok[j]
            if nfe_ref is None and any(int(tok[j]) in stops for j in shown):
                nfe_ref = nfe  # the reference stops counting at the step that reveals a stop
            events.append(("step", q0, [(q0 + j, int(tok[j])) for j in shown]))
        if finished():
            break
        logits, _ = full_forward(model, x[:q1].clone(), bd)  # the commit: its last logit starts the next block
        if q1 < end:
            x[q1] = greedy(logits[-1], mask_id)[0]
            events.append(("commit", q1, int(x[q1])))
    assert finished()
    return cut(), nfe, nfe if nfe_ref is None else nfe_ref, events


def check(model, prompts, stops=(), **kw):
    """generate(prompts) equals the oracle on every row alone, tokens and both NFE counts."""
    out, st = generate(model, prompts, stop_ids=stops, **kw)
    want = [oracle(model, p, max_new_tokens=kw["max_new_tokens"], threshold=kw.get("threshold", 0.85),
                   bd=kw.get("bd_size") or model.cfg.bd_size, sub=kw.get("sub_block"), stops=stops,
                   relay=kw.get("use_relay", True)) for p in prompts]
    for r, (o, nfe, nfe_ref, _) in enumerate(want):
        assert (out[r], st["nfe"][r], st["nfe_ref"][r]) == (o, nfe, nfe_ref), (r, len(prompts[r]), stops, kw)
    return want


# ---------------------------------------------------------------------------------------------
# the tests

@pytest.mark.parametrize("bd, sub", [(8, 4), (16, None), (4, 2)])
def test_generate_equals_the_oracle(model, bd, sub):
    """Mixed prompt lengths in one batch (under, at and over the block size, exact multiples), thresholds
    0 / 0.5 / 0.9 / 1, relay on and off, no stop, one stop and two stops taken from the tokens produced."""
    rng = random.Random(bd)
    lengths = [1, 3, bd - 1, bd, bd + 1, 2 * bd, 2 * bd + 3, 3 * bd - 1]
    outs, steps = [], []
    for threshold in (0.0, 0.5, 0.9, 1.0):
        for use_relay in (True, False):
            prompts = [[rng.randrange(63) for _ in range(n)] for n in rng.sample(lengths, 4)]
            kw = dict(max_new_tokens=rng.choice([1, bd, 2 * bd + 3, 29]), threshold=threshold, bd_size=bd,
                      sub_block=sub, use_relay=use_relay)
            free = check(model, prompts, **kw)
            made = [t for o, *_ in free for t in o]
            for stops in ([rng.choice(made)], [rng.choice(made), rng.choice(made)]):
                check(model, prompts, stops, **kw)
            outs += [o for o, *_ in free]
            steps += [e for *_, ev in free for e in ev if e[0] == "step"]
    # the cases are not degenerate: tokens vary along a row, and with a low threshold steps reveal several
    assert max(len(set(o)) for o in outs) >= 8
    assert any(len(e[2]) > 1 for e in steps) and any(len(e[2]) == 1 for e in steps)


def test_the_relay_and_the_threshold_change_the_tokens():
    """The oracle's cases above would also pass with a dead relay or a threshold that is never applied."""
    m = make_model("varied")
    rng = random.Random(3)
    prompts = [[rng.randrange(63) for _ in range(n)] for n in (3, 8, 13)]
    kw = dict(max_new_tokens=24, threshold=0.5)
    base = generate(m, prompts, **kw)[0]
    assert base != generate(m, prompts, **{**kw, "use_relay": False})[0]
    assert base != generate(m, prompts, **{**kw, "threshold": 0.9})[0]
    check(m, prompts, **kw)


def test_a_stop_made_by_the_prefill_or_a_commit_ends_the_row():
    """A stop token that a prefill or commit forward writes (the first token of a block) ends the row there:
    nothing after it is decoded or counted (a fix over the reference, which decodes the next block)."""
    m = make_model("varied")
    rng = random.Random(0)
    seen = {"prefill": 0, "commit": 0}
    for n in (8, 16, 5, 13, 21, 8, 16, 24):
        prompt = [rng.randrange(63) for _ in range(n)]
        kw = dict(max_new_tokens=30, threshold=0.5)
        free, *_, events = oracle(m, prompt, max_new_tokens=30, threshold=0.5, bd=8)
        for kind, q, t in (e for e in events if e[0] != "step"):
            if t not in free[:q - n]:  # the first time this token appears: it becomes the first stop
                o = check(m, [prompt, [1, 2, 3]], [t], **kw)[0][0]  # batched with a short prompt
                assert len(o) == q - n + 1 and o[-1] == t
                seen[kind] += 1
                break
    assert seen["prefill"] and seen["commit"]


@pytest.mark.parametrize("mode", [dict(use_cache=False), dict(static=True)])
def test_other_modes_equal_the_oracle(mode):
    m = make_model("saturated")
    rng = random.Random(1)
    prompts = [[rng.randrange(63) for _ in range(n)] for n in (2, 8, 11, 16, 23)]
    kw = dict(max_new_tokens=26, threshold=1.0, sub_block=4)
    free = generate(m, prompts, **kw)[0]
    for stops in ([], [free[2][9]]):
        out, st = generate(m, prompts, stop_ids=stops, **mode, **kw)
        want = [oracle(m, p, max_new_tokens=26, threshold=1.0, bd=8, sub=4, stops=stops) for p in prompts]
        assert out == [w[0] for w in want] and st["nfe"] == [w[1] for w in want]


def test_a_32_token_block_model_equals_the_oracle():
    """The default shape's block size (32) and default sub-block (8), on a one-layer tied-embedding model."""
    m, _ = random_model("tiny", n_layer=1, seed=0)
    m = m.double()
    with torch.no_grad():  # large weights (the head is the embedding): tokens that vary, several reveals a step
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0, 0.2)
            if isinstance(mod, RMSNorm):
                mod.weight.normal_(1.0, 0.5)
        m.embed_tokens.weight.normal_(0, 1.0)
        m.relay.norm.bias.normal_()
    rng = random.Random(2)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (5, 32, 40, 64)]
    for threshold in (0.5, 0.9):
        want = check(m, prompts, max_new_tokens=45, threshold=threshold)
        assert max(len(set(o)) for o, *_ in want) >= 8
