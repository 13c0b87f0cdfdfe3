import dataclasses

import pytest
import torch

from checkpoint import load_state
from model import RelayChannel, Transformer


def test_shapes_and_gqa(tiny_cfg):
    torch.manual_seed(0)
    m = Transformer(tiny_cfg)
    idx = torch.randint(0, 10, (3, 81))
    logits, h = m(idx)
    assert logits.shape == (3, 81, 10) and h.shape == (3, 81, 32)
    # GQA with 2 kv heads equals full MHA with each kv head repeated for its 2 query heads
    full = Transformer(dataclasses.replace(tiny_cfg, n_kv_head=4))
    sd = m.state_dict()
    for i in range(2):
        for n in ("k_proj", "v_proj"):
            w = sd[f"layers.{i}.self_attn.{n}.weight"].view(2, 8, 32)
            sd[f"layers.{i}.self_attn.{n}.weight"] = w.repeat_interleave(2, 0).reshape(32, 32)
    full.load_state_dict(sd)
    torch.testing.assert_close(full(idx)[0], logits)


def test_bidirectional(tiny_cfg):
    m = Transformer(tiny_cfg).eval()
    idx = torch.randint(1, 10, (1, 20))
    idx2 = idx.clone()
    idx2[0, -1] = idx[0, -1] % 9 + 1  # change the last token: the first position must see it
    assert not torch.allclose(m(idx)[0][0, 0], m(idx2)[0][0, 0])


def test_tied_embeddings(tiny_cfg):
    m = Transformer(dataclasses.replace(tiny_cfg, tie_embeddings=True))
    assert m.lm_head is None and "lm_head.weight" not in m.state_dict()
    logits, h = m(torch.randint(0, 10, (2, 9)))
    torch.testing.assert_close(logits, m.norm(h) @ m.embed_tokens.weight.T)


def test_readout_before_or_after_final_norm(tiny_cfg):
    torch.manual_seed(0)
    pre = Transformer(tiny_cfg)
    post = Transformer(dataclasses.replace(tiny_cfg, relay_after_norm=True))
    post.load_state_dict(pre.state_dict())
    idx = torch.randint(0, 10, (2, 9))
    _, h_pre = pre(idx)
    _, h_post = post(idx)
    torch.testing.assert_close(h_post, pre.norm(h_pre))


def test_relay_off_equals_plain_model(tiny_cfg):
    torch.manual_seed(0)
    plain = Transformer(tiny_cfg)
    withr = Transformer(dataclasses.replace(tiny_cfg, relay=True))
    sd = plain.state_dict()
    sd.update({k: v for k, v in withr.state_dict().items() if k.startswith("relay.")})
    withr.load_state_dict(sd)
    idx = torch.randint(0, 10, (2, 81))
    torch.testing.assert_close(withr(idx)[0], plain(idx)[0])  # relay=None injects nothing
    # with a state, the output changes
    assert not torch.allclose(withr(idx, relay=torch.randn(2, 81, 32))[0], plain(idx)[0])
    # zero-init masked-only relay (LLM fine-tuning) starts exactly as the plain model for any h
    z = Transformer(dataclasses.replace(tiny_cfg, relay=True, relay_masked_only=True, relay_zero_init=True))
    sd.update({k: v for k, v in z.state_dict().items() if k.startswith("relay.")})
    z.load_state_dict(sd)
    torch.testing.assert_close(z(idx, relay=torch.randn(2, 81, 32))[0], plain(idx)[0])
    with pytest.raises(ValueError, match="without a relay"):
        plain(idx, relay=torch.randn(2, 81, 32))


def test_relay_channel_masked_only():
    r = RelayChannel(8, 1e-5, masked_only=True, zero_init=False)
    e, h = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    is_mask = torch.tensor([[True, False, True, False]])
    out = r(e, h, is_mask)
    torch.testing.assert_close(out[0, 1], e[0, 1])
    torch.testing.assert_close(out[0, 0], e[0, 0] + torch.nn.functional.layer_norm(h[0, 0], (8,)))
    full = RelayChannel(8, 1e-5, masked_only=False, zero_init=False)(e, h, is_mask)
    torch.testing.assert_close(full, e + torch.nn.functional.layer_norm(h, (8,)))


def test_strict_load_names_the_problem(tiny_cfg):
    m = Transformer(tiny_cfg)
    sd = m.state_dict()
    bad = dict(sd)
    del bad["norm.weight"]
    bad["extra.weight"] = torch.zeros(1)
    bad["lm_head.weight"] = torch.zeros(11, 32)
    with pytest.raises(ValueError) as e:
        load_state(m, bad, "ckpt.pt")
    msg = str(e.value)
    assert "ckpt.pt" in msg and "norm.weight" in msg and "extra.weight" in msg and "lm_head.weight" in msg
    load_state(m, sd, "ok")  # the untampered state loads


def test_compiled_equals_eager(tiny_cfg):
    """torch.compile (as --compile runs the training forward, RoPE outside the graph) computes the
    same logits, relay state and gradients as the eager model, relay given or not, with dropout on:
    the compiled graph draws the same CPU masks in the same order and its backward uses the masks
    of its forward (the mask op is never recomputed there)."""
    torch.manual_seed(0)
    m = Transformer(dataclasses.replace(tiny_cfg, relay=True, dropout=0.3))
    fast = torch.compile(m)
    idx = torch.randint(0, 10, (3, 81))
    relay = torch.randn(3, 81, tiny_cfg.n_embd)
    out = {}
    for name, model in (("eager", m), ("compiled", fast)):
        torch.manual_seed(1)
        logits, h = model(idx)
        logits2, h2 = model(idx, relay=h)
        (logits2.square().mean() + h2.mean()).backward()
        out[name] = [logits, h, logits2, h2], [p.grad.clone() for p in m.parameters()]
        m.zero_grad()
    torch.testing.assert_close(out["compiled"], out["eager"], rtol=1e-4, atol=1e-5)
    assert not torch.equal(m(idx)[0], m(idx)[0])  # dropout was on
    m.eval()
    torch.testing.assert_close(fast(idx, relay=relay), m(idx, relay=relay), rtol=1e-4, atol=1e-5)


def test_cpu_dropout_keeps_each_element_at_the_rate_and_the_mean():
    """model.dropout (random bits instead of torch's Bernoulli sampler on the CPU): every element,
    whichever of the four 16-bit lanes of a 64-bit draw it comes from, is kept with probability 1 - p
    and scaled so the mean is unchanged; the gradient flows through kept elements only; eval mode and
    p = 0 are the identity; the mask follows torch's seed."""
    from model import dropout
    x = torch.ones(4_000_000)
    torch.manual_seed(0)
    y = dropout(x, 0.1)
    kept = (y != 0).view(-1, 4).float().mean(0)  # per lane: 1M draws, sd 3e-4
    torch.testing.assert_close(kept, torch.full((4,), 0.9), atol=2e-3, rtol=0)
    assert set(y.unique().tolist()) == {0.0, torch.tensor(65536 / (65536 - round(0.1 * 65536))).item()}
    torch.testing.assert_close(y.mean(), torch.tensor(1.0), atol=2e-3, rtol=0)
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.1), y)
    xb = torch.randn(5, 7, dtype=torch.bfloat16, requires_grad=True)
    yb = dropout(xb, 0.5)
    yb.float().sum().backward()
    assert yb.dtype == torch.bfloat16 and torch.equal(xb.grad != 0, yb != 0)
    assert torch.equal(dropout(xb, 0.5, training=False), xb) and torch.equal(dropout(xb, 0.0), xb)


def test_written_out_attention_equals_sdpa(tiny_cfg):
    """The attention that CPU training with dropout runs (model.attention_math) equals SDPA without
    dropout, with and without a block mask; and a model whose dropout rounds to no dropped element
    trains on it (train mode, grouped-query heads) with the logits of eval mode."""
    import torch.nn.functional as F
    from model import attention_math, block_mask
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 12, 8) for _ in range(3))
    for mask in (None, block_mask(12, 4)):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(attention_math(q, k, v, mask), want)
        got = attention_math(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
        torch.testing.assert_close(got.float(), want, atol=0.03, rtol=0.03)
    m = Transformer(dataclasses.replace(tiny_cfg, dropout=1e-6, bd_size=8))  # round(1e-6 * 2^16) = 0 dropped
    idx = torch.randint(0, 10, (3, 24))
    train = m.train()(idx)[0]
    torch.testing.assert_close(train, m.eval()(idx)[0])


def test_eval_mode_has_no_dropout(tiny_cfg):
    m = Transformer(dataclasses.replace(tiny_cfg, dropout=0.5))
    idx = torch.randint(0, 10, (2, 81))
    m.train()
    assert not torch.equal(m(idx)[0], m(idx)[0])  # dropout is there to switch off
    m.eval()
    assert torch.equal(m(idx)[0], m(idx)[0])
