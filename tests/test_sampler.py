import dataclasses

import torch

from model import Transformer
from relay import reveal_confidence_mass
from sampler import sample_mdm


def test_reveal_rule_on_hand_made_confidences():
    conf = torch.tensor([[0.99, 0.95, 0.50, 0.97, 0.999]])
    masked = torch.tensor([[True, True, True, True, False]])
    # uncertainties 0.01, 0.05, 0.5, 0.03 -> sorted cumsum 0.01, 0.04, 0.09, 0.59
    assert reveal_confidence_mass(conf, masked, 0.15).tolist() == [[True, True, False, True, False]]
    assert reveal_confidence_mass(conf, masked, 0.05).tolist() == [[True, False, False, True, False]]
    # nothing under the threshold: the single most confident masked cell, never an unmasked one
    assert reveal_confidence_mass(conf, masked, 0.0).tolist() == [[True, False, False, False, False]]
    assert reveal_confidence_mass(conf, masked, 10.0).tolist() == [[True, True, True, True, False]]
    # a row with nothing masked reveals nothing
    assert not reveal_confidence_mass(conf, torch.zeros_like(masked), 0.15).any()


def canvas(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 10, (B, 81), generator=g)
    x[torch.rand(B, 81, generator=g) < 0.6] = 0
    return x


class Counter(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m, self.cfg, self.relay, self.calls, self.rows = m, m.cfg, m.relay, 0, torch.zeros(0)
        self.seen = []

    def forward(self, x, relay=None):
        self.calls += 1
        self.seen.append(x.clone())
        return self.m(x, relay=relay)


def test_sampler_keeps_clues_fills_everything_and_counts_nfe(tiny_cfg):
    for relay in (False, True):
        torch.manual_seed(0)
        m = Counter(Transformer(dataclasses.replace(tiny_cfg, relay=relay)).eval())
        x = canvas()
        out, st = sample_mdm(m, x, tau=0.15)
        assert (out[x != 0] == x[x != 0]).all()  # clues untouched
        assert (out != 0).all()  # no MASK left
        assert st["forward_calls"] == m.calls
        assert int(st["nfe"].sum()) == sum(len(s) for s in m.seen)  # rows in every forward
        # per puzzle: the forwards in which that puzzle still had masks
        still = [(s == 0).any(1).sum() for s in m.seen]
        assert all(int(v) == len(s) for v, s in zip(still, m.seen))
        assert st["nfe_batch"] == int(st["nfe"].max()) + 1  # authors' count: slowest + final fill


def test_final_fill_after_max_steps(tiny_cfg):
    m = Counter(Transformer(tiny_cfg).eval())
    x = canvas()
    out, st = sample_mdm(m, x, tau=0.0, max_steps=3)  # tau 0: one cell per step
    assert (out != 0).all() and (out[x != 0] == x[x != 0]).all()
    assert st["nfe"].tolist() == [4] * 6 and m.calls == 4 and st["nfe_batch"] == 4


def test_batched_rows_match_single_rows(tiny_cfg):
    torch.manual_seed(0)
    m = Transformer(dataclasses.replace(tiny_cfg, relay=True)).eval()
    x = canvas(4)
    out, st = sample_mdm(m, x)
    for i in range(4):
        o, s = sample_mdm(m, x[i:i + 1])
        assert (o[0] == out[i]).all() and s["nfe"][0] == st["nfe"][i]


def test_cpu_pieces_decode_what_one_forward_does(tiny_cfg, monkeypatch):
    """rows_forward splits a CPU forward into pieces of CPU_ROWS rows (small temporaries): the same tokens,
    NFE and forward count as the whole batch in one forward."""
    import sampler
    torch.manual_seed(0)
    m = Counter(Transformer(dataclasses.replace(tiny_cfg, relay=True)).eval())
    x = canvas(5)
    whole, st = sample_mdm(m, x)
    assert len(m.seen[0]) == 5
    m.seen.clear()
    monkeypatch.setattr(sampler, "CPU_ROWS", 2)
    out, st2 = sample_mdm(m, x)
    assert [len(s) for s in m.seen[:3]] == [2, 2, 1]  # the first forward, in pieces
    assert torch.equal(out, whole) and torch.equal(st2["nfe"], st["nfe"])
    assert st2["forward_calls"] == st["forward_calls"] and torch.equal(st2["revealed_at"], st["revealed_at"])


def test_revealed_at_records_the_step_of_each_cell(tiny_cfg):
    torch.manual_seed(0)
    m = Transformer(dataclasses.replace(tiny_cfg, relay=True)).eval()
    x = canvas()
    out, st = sample_mdm(m, x, tau=0.15)
    when = st["revealed_at"]
    assert ((when == 0) == (x != 0)).all()  # clues were given, every blank was revealed at some step
    assert torch.equal(when.max(1).values, st["nfe"])  # a row's last reveal is its last forward
    _, st2 = sample_mdm(m, x, tau=0.0, max_steps=2)  # one cell per loop step: the final fill is needed
    assert st2["revealed_at"].max() == 3  # two loop steps, then the final fill


def test_the_first_sudoku_step_gets_the_relay_of_a_zero_state(tiny_cfg):
    """h_0 = 0 goes through the relay channel's LayerNorm like every later state: its bias is added at step 1
    too (relay=None would skip it, and step 1 would see another input than in training)."""
    torch.manual_seed(0)
    m = Transformer(dataclasses.replace(tiny_cfg, relay=True)).eval()
    torch.nn.init.constant_(m.relay.norm.bias, 2.0)  # LN(0) = its bias: nonzero
    x = torch.randint(1, 10, (3, 81))
    x[:, ::2] = 0  # MASK
    out, _ = sample_mdm(m, x, max_steps=0)  # the final fill only: one forward
    with torch.no_grad():
        p = m(x, relay=torch.zeros(3, 81, 32))[0].softmax(-1)
    p[..., 0] = 0  # never MASK
    assert torch.equal(out, torch.where(x == 0, p.argmax(-1), x))
