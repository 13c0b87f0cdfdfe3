"""The method against hand-written oracles (NOTES.md §2, §3, §5, §6): rollout_loss for K = 2 and 3 on
the Sudoku path and on the doubled [x_t ‖ x_0] LLM path, both reveal rules on hand-made
confidences, the token shift in forward_doubled and in the block sampler, and the per-block SFT
noise. Every oracle is a plain loop written here, not a call of the function it checks."""
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import relay
import sampler
from model import ModelConfig, Transformer, block_mask, forward_doubled
from relay import RolloutBuffer, rollout_loss
from sampler import generate

OBJECTIVES = ("rollout", "relay_sg", "relay")


def shift(t):
    """The token shift written out (NOTES.md §5): s[:, j] = t[:, j - 1], s[:, 0] = t[:, 0]."""
    return torch.cat([t[:, :1], t[:, :-1]], 1)


def doubled_by_hand(model, xt, x0, h):
    """The [x_t ‖ x_0] forward from its definition: 2L tokens at positions 0..L-1 twice, the doubled
    block mask, relay on the noisy half only. Returns the noisy half's per-token logits (B, L, V)
    and relay state (B, L, D), both shifted."""
    B, L = xt.shape
    h2 = None if h is None else torch.cat([h, torch.zeros_like(h)], 1)
    logits, hid = model(torch.cat([xt, x0], 1), pos=torch.arange(L).repeat(2),
                        attn_mask=block_mask(L, model.cfg.bd_size, doubled=True), relay=h2)
    return shift(logits[:, :L]), shift(hid[:, :L])


def oracle(model, x0, fixed, x, h, K, objective, reveal, doubled):
    """rollout_loss as a plain loop. Returns (loss, final canvas, final h, per-step records)."""
    mask_id = model.cfg.mask_id
    h = h.clone() if objective != "rollout" else None
    loss, steps = torch.zeros(()), []
    for _ in range(K):
        masked = (x == mask_id) & ~fixed  # recomputed at every step
        if doubled:
            logits, h_out = doubled_by_hand(model, x, x0, h)
        else:
            logits, h_out = model(x, relay=h)
        if masked.any():
            loss = loss + F.cross_entropy(logits[masked], x0[masked])
        conf = torch.zeros(x.shape)
        conf[masked] = logits[masked].detach().softmax(-1).max(-1).values  # MASK included
        rev = reveal(conf, masked)
        steps.append(dict(masked=masked, conf=conf, pred=logits.detach().argmax(-1), rev=rev, h=h_out.detach()))
        x = torch.where(rev, x0, x)  # the ground truth, never the prediction
        if objective != "rollout":
            h = h_out if objective == "relay" else h_out.detach()
    return loss, x, h, steps


def fill(buf, x0, fixed, x, h):
    for name, t in dict(x0=x0, fixed=fixed, x=x, h=h).items():
        getattr(buf, name).copy_(t)
    return buf


def check_against_oracle(model, buf, K, objective, reveal, doubled, powered=True):
    x0, fixed, x, h = (t.clone() for t in (buf.x0, buf.fixed, buf.x, buf.h))
    seen = []

    def spy(conf, masked):
        seen.append((conf.clone(), masked.clone()))
        return reveal(conf, masked)

    model.zero_grad(set_to_none=True)
    loss = rollout_loss(model, buf, K, objective, spy, doubled=doubled)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    want_loss, want_x, want_h, steps = oracle(model, x0, fixed, x, h, K, objective, reveal, doubled)
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if powered:  # the setup can tell the mistakes apart, else this test would prove nothing
        s1, s2 = steps[0], steps[1]
        assert not torch.equal(s1["masked"], s2["masked"])  # step 1 revealed something
        assert (s2["pred"][s2["rev"]] != x0[s2["rev"]]).any()  # argmax != truth where step 2 reveals
        assert not torch.allclose(s1["h"], steps[-1]["h"])  # step 1's h is not step K's
        if objective != "rollout":
            assert want["relay.norm.weight"].abs().sum() > 0  # the relay takes part
    # reveal is called once per step, with the positions masked at that step and their confidences
    # (LLM rows: rollout_loss runs only the columns up to the last block with a free position, w)
    w = relay.used_width(fixed, model.cfg.bd_size) if doubled else x.shape[1]  # past w: padding, h never read
    assert len(seen) == K
    for (conf, masked), s in zip(seen, steps):
        assert conf.shape == masked.shape == x0[:, :w].shape and masked.dtype == torch.bool
        assert torch.equal(masked, s["masked"][:, :w]) and not s["masked"][:, w:].any()
        torch.testing.assert_close(conf[masked], s["conf"][:, :w][masked])
    torch.testing.assert_close(loss, want_loss)  # L_1 + ... + L_K
    assert torch.equal(buf.x, want_x)
    torch.testing.assert_close(buf.h[:, :w], h[:, :w] if objective == "rollout" else want_h[:, :w].detach())
    assert not buf.h.requires_grad
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)


def sudoku_model(scale):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=10, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_ffn=64, mask_id=0,
                                relay=True))
    with torch.no_grad():
        m.lm_head.weight.mul_(scale)  # sharper predictions: several cells pass the confidence-mass rule
    return m


def sudoku_buffer(seed, B=3, T=81, D=32):
    """A warm buffer: some free cells already revealed, a nonzero h, and slot 2 one cell from solved
    (it finishes at step 1 while the others go on)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(1, 10, (B, T), generator=g)
    fixed = torch.rand(B, T, generator=g) < 0.3
    x = torch.where(fixed | (torch.rand(B, T, generator=g) < 0.3), x0, 0)
    last = (~fixed[2]).nonzero()[0, 0]
    x[2] = x0[2]
    x[2, last] = 0
    return fill(RolloutBuffer(B, T, D, 0, "cpu"), x0, fixed, x, torch.randn(B, T, D, generator=g))


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_rollout_loss_matches_a_hand_loop_sudoku(K, objective):
    m = sudoku_model(scale=30.0)
    check_against_oracle(m, sudoku_buffer(K), K, objective, partial(relay.reveal_confidence_mass, tau=0.3),
                         doubled=False)


def test_rollout_step_with_nothing_masked_adds_zero():
    """Every slot is one cell from solved: step 1 solves them all, step 2 predicts nothing."""
    m = sudoku_model(scale=30.0)
    buf = sudoku_buffer(0)
    for r in range(3):
        free = (~buf.fixed[r]).nonzero()[:, 0]
        buf.x[r] = buf.x0[r]
        buf.x[r, free[r]] = 0
    check_against_oracle(m, buf, 2, "relay", partial(relay.reveal_confidence_mass, tau=0.3), doubled=False,
                         powered=False)
    assert (buf.x == buf.x0).all()


@pytest.fixture
def live_llm(tiny_llm):
    torch.nn.init.normal_(tiny_llm.relay.norm.weight)  # zero-init would make the relay an exact no-op
    torch.nn.init.normal_(tiny_llm.relay.norm.bias, std=0.1)
    with torch.no_grad():
        tiny_llm.lm_head.weight.mul_(40)  # sharper predictions: some confidences pass the threshold
    return tiny_llm


def llm_buffer(seed, B=2, L=32, D=32, mask_id=63, ends=(32, 32)):
    """ends: where each row's padding (fixed) starts; rows ending before the last block are cut off."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 63, (B, L), generator=g)
    fixed = (torch.arange(L)[None] < torch.tensor([[3], [10]])) | (torch.arange(L)[None] >= torch.tensor(ends)[:, None])
    x = torch.where(fixed | (torch.rand(B, L, generator=g) < 0.2), x0, mask_id)
    return fill(RolloutBuffer(B, L, D, mask_id, "cpu"), x0, fixed, x, torch.randn(B, L, D, generator=g))


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_rollout_loss_matches_a_hand_loop_doubled_llm(live_llm, K, objective):
    reveal = partial(relay.reveal_threshold_blocks, threshold=0.5, bd_size=8)
    check_against_oracle(live_llm, llm_buffer(K), K, objective, reveal, doubled=True)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_rollout_loss_cuts_padding_blocks_exactly(live_llm, objective):
    """Rows padded from 13 and 21: rollout_loss runs 24 of 32 columns (used_width), the full-width
    hand loop all 32; the loss, canvas and gradients agree."""
    buf = llm_buffer(5, ends=(13, 21))
    assert relay.used_width(buf.fixed, 8) == 24
    reveal = partial(relay.reveal_threshold_blocks, threshold=0.5, bd_size=8)
    check_against_oracle(live_llm, buf, 2, objective, reveal, doubled=True)


def test_sft_loss_cuts_padding_blocks_exactly(live_llm):
    """sft_loss on rows padded from 13 and 21 (cut at 24) equals the full-width loss written out: the
    same noise (drawn at full width), [x_t ‖ x_0] over all 32 columns."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 63, (2, 32), generator=g)
    fixed = (torch.arange(32)[None] < 3) | (torch.arange(32)[None] >= torch.tensor([[13], [21]]))
    live_llm.zero_grad(set_to_none=True)
    got = relay.sft_loss(live_llm, x0, fixed, torch.Generator().manual_seed(7))
    got.backward()
    got_grads = {n: p.grad.clone() for n, p in live_llm.named_parameters() if p.grad is not None}
    live_llm.zero_grad(set_to_none=True)
    masks = relay.sft_masks(fixed, torch.Generator().manual_seed(7), 8)  # (4, 32)
    xx = torch.cat([x0, x0])
    logits, _ = doubled_by_hand(live_llm, torch.where(masks, 63, xx), xx, None)
    want = F.cross_entropy(logits[masks], xx[masks])
    want.backward()
    torch.testing.assert_close(got, want)
    for n, p in live_llm.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got_grads[n], p.grad, msg=n)


def test_forward_doubled_against_the_definition(live_llm):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, 63, (2, 24), generator=g)
    masked = torch.rand(2, 24, generator=g) < 0.5
    masked[:, 0] = False
    xt = torch.where(masked, 63, x0)
    h = torch.randn(2, 24, 32, generator=g)
    logits, h_out = forward_doubled(live_llm, xt, x0, masked, relay=h)
    want_logits, want_h = doubled_by_hand(live_llm, xt, x0, h)
    torch.testing.assert_close(logits, want_logits[masked])
    torch.testing.assert_close(h_out, want_h)
    assert not torch.allclose(want_h, shift(want_h))  # the shift is visible in h


def test_block_reveal_rule_on_hand_made_confidences():
    """Three blocks of 4 per row: threshold 0.5 (strict), plus the best masked position of every
    block that still has masks, even where another block holds the row's best."""
    T, F_ = True, False
    conf = torch.tensor([[0.9, 0.2, 0.6, 0.3, 0.1, 0.45, 0.2, 0.3, 0.99, 0.99, 0.99, 0.99],
                         [0.7, 0.8, 0.95, 0.1, 0.99, 0.3, 0.1, 0.2, 0.5, 0.55, 0.3, 0.2]])
    masked = torch.tensor([[F_, T, T, T, T, T, T, T, F_, F_, F_, F_],
                           [T, T, F_, F_, F_, T, F_, T, T, T, T, T]])
    want = [[F_, F_, T, F_, F_, T, F_, F_, F_, F_, F_, F_],  # block 1: nothing > 0.5, its best (0.45)
            [T, T, F_, F_, F_, T, F_, F_, F_, T, F_, F_]]  # block 2: 0.5 is not > 0.5
    assert relay.reveal_threshold_blocks(conf, masked, 0.5, 4).tolist() == want
    assert not relay.reveal_threshold_blocks(conf, torch.zeros_like(masked), 0.5, 4).any()


def test_confidence_mass_rule_is_per_row():
    conf = torch.tensor([[0.99, 0.95, 0.50, 0.97], [0.6, 0.7, 0.98, 0.2]])
    masked = torch.tensor([[True, True, True, True], [True, True, False, True]])
    # row 0: cumsum 0.01, 0.04, 0.09, 0.59; row 1: uncertainties 0.4, 0.3, 0.8 -> only its best
    want = [[True, True, False, True], [False, True, False, False]]
    assert relay.reveal_confidence_mass(conf, masked, 0.15).tolist() == want
    # strictly below tau: uncertainties 0.25 then 0.5 (exact in binary), tau 0.5
    assert relay.reveal_confidence_mass(torch.tensor([[0.75, 0.75]]), torch.ones(1, 2, dtype=torch.bool),
                                        0.5).tolist() == [[True, False]]


def test_decoding_reveal_rule_is_strict_and_falls_back_to_the_best():
    """sampler.reveal_block on hand-made logits (position j is predicted from the logits at j - 1; token 3 is
    MASK): > threshold is strict, and a sub-block where nothing passes still reveals its first most confident
    position, else decoding would never end."""
    NEG, none = -1e9, torch.tensor([], dtype=torch.long)
    logits = torch.tensor([[[0.0, 0, 0, 0], [0, 0, NEG, NEG], [math.log(9), 0, NEG, NEG], [0, 0, 0, 0]]])
    xb = torch.tensor([[1, 3, 3, 3]])  # confidences of positions 1, 2, 3: 0.25, exactly 0.5, 0.9
    out, _ = sampler.reveal_block(logits, xb, xb == 3, 0.5, 4, 3, none)
    assert out.tolist() == [[1, 3, 3, 0]]
    xb = torch.tensor([[1, 2, 1, 2, 3, 3, 3, 3]])  # the first sub-block is done; nothing passes 0.5 in the second
    out, _ = sampler.reveal_block(torch.zeros(1, 8, 4), xb, xb == 3, 0.5, 4, 3, none)
    assert out.tolist() == [[1, 2, 1, 2, 0, 3, 3, 3]]


def test_sft_noise_level_varies_between_blocks_of_a_row():
    """Per-block t: the mask rate of the blocks of one row spreads like U(0, 1) (std ~0.29); one t per
    row would leave only binomial noise (std <= 0.5 / sqrt(64))."""
    fixed = torch.zeros(6, 8 * 64, dtype=torch.bool)
    masks = relay.sft_masks(fixed, torch.Generator().manual_seed(0), 64)
    rate = masks[:6].view(6, 8, 64).float().mean(-1)  # (rows, blocks)
    assert rate.std(1).min() > 0.12, rate
    assert torch.equal(masks[6:], ~masks[:6])


@pytest.mark.parametrize("use_cache", [True, False])
def test_block_sampler_reads_shifted_logits_and_relay(live_llm, use_cache):
    """Record every forward of generate() and replay each denoising step by hand: the relay state
    handed in is the previous step's h shifted by one token, and the tokens revealed are the argmaxes
    of the shifted logits (MASK never; confidence over the whole vocabulary), > threshold plus the best,
    in the first sub-block with masks."""
    bd, sub, thr, mask_id = 8, 4, 0.9, 63
    calls = []

    def hook(mod, args, kw, out):
        calls.append(dict(idx=args[0][:, -bd:].clone(), relay=None if kw["relay"] is None else kw["relay"][:, -bd:],
                          commit=kw["commit"], logits=out[0][:, -bd:].detach(), h=out[1][:, -bd:].detach()))

    handle = live_llm.register_forward_hook(hook, with_kwargs=True)
    generate(live_llm, [list(range(1, 12))], max_new_tokens=29, threshold=thr, sub_block=sub, stop_ids=[],
             use_cache=use_cache)  # 11 + 29 = 40: every masked position of a block is to be decoded
    handle.remove()

    def step(idx, logits):
        p = logits.float().softmax(-1)  # conf = p[x] over the whole vocabulary, as the reference
        p[..., mask_id] = 0.0  # ... but MASK is never the prediction
        conf, pred = p.max(-1)
        todo = idx == mask_id
        first = todo.view(-1, bd // sub, sub).any(-1).float().argmax(-1)  # (B,) first sub-block with masks
        cand = todo & ((torch.arange(bd) // sub)[None] == first[:, None])
        rev = cand & (conf > thr)
        rev[torch.arange(len(idx)), torch.where(cand, conf, -1.0).argmax(-1)] = True
        return torch.where(rev, pred, idx)

    checked = differs = several = carried = 0
    prev = None  # the previous denoising forward of the current block
    for i, c in enumerate(calls[1:], 1):  # calls[0] is the prefill
        if c["commit"]:
            prev = None
            continue
        if prev is None:
            assert c["relay"] is None  # the first denoising forward of a block injects nothing
        else:
            assert torch.equal(c["relay"], shift(prev["h"]))
            carried += not torch.equal(c["relay"], prev["h"])
        if i + 1 < len(calls):  # the next forward (denoise or commit) shows the canvas after this step
            after = step(c["idx"], shift(c["logits"]))
            assert torch.equal(calls[i + 1]["idx"], after)
            checked += 1
            several += int((after != c["idx"]).sum()) > 1
            differs += not torch.equal(step(c["idx"], c["logits"]), step(c["idx"], shift(c["logits"])))
        prev = c
    # power: an unshifted read of the logits or of h would change what this test sees
    assert checked >= 10 and differs >= 1 and several >= 1 and carried >= 1


def test_chunked_head_ce_equals_full_logits_in_fp32():
    """model.HeadCE, 3 rows at a time, against cross_entropy on the full (N, V) logits: the same CE, the
    same confidence (max softmax, MASK included), the same gradients for z and W."""
    from model import HeadCE
    g = torch.Generator().manual_seed(0)
    z = torch.randn(10, 16, generator=g, requires_grad=True)
    W = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (10,), generator=g)
    w = torch.rand(10, generator=g)  # a weighted sum: every row's gradient scale differs
    ce, conf = HeadCE.apply(z, W, t, 3)
    (ce * w).sum().backward()
    got = z.grad.clone(), W.grad.clone()
    z.grad = W.grad = None
    logits = z @ W.T
    want = F.cross_entropy(logits, t, reduction="none")
    (want * w).sum().backward()
    torch.testing.assert_close(ce, want)
    torch.testing.assert_close(conf, logits.detach().softmax(-1).max(-1).values)
    torch.testing.assert_close(got[0], z.grad)
    torch.testing.assert_close(got[1], W.grad)
    assert not conf.requires_grad  # the confidence has no gradient: a loss on it fails loudly
    with pytest.raises(RuntimeError, match="does not require grad"):
        conf.sum().backward()
