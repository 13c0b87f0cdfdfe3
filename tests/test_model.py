import dataclasses

import pytest
import torch

from model import Transformer, load_state
from model import RelayChannel


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
    same logits, relay state and gradients as the eager model, relay given or not."""
    torch.manual_seed(0)
    m = Transformer(dataclasses.replace(tiny_cfg, relay=True))
    fast = torch.compile(m)
    idx = torch.randint(0, 10, (3, 81))
    relay = torch.randn(3, 81, tiny_cfg.n_embd)
    out = {}
    for name, model in (("eager", m), ("compiled", fast)):
        logits, h = model(idx)
        logits2, h2 = model(idx, relay=h)
        (logits2.square().mean() + h2.mean()).backward()
        out[name] = [logits, h, logits2, h2], [p.grad.clone() for p in m.parameters()]
        m.zero_grad()
    torch.testing.assert_close(out["compiled"], out["eager"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast(idx, relay=relay), m(idx, relay=relay), rtol=1e-4, atol=1e-5)
