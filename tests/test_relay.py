import dataclasses

import pytest
import torch
import torch.nn.functional as F

from model import Transformer
from relay import RolloutBuffer, mlm_loss, rollout_loss
from relay import predict, reveal_confidence_mass

REVEAL = lambda conf, masked: reveal_confidence_mass(conf, masked, 0.3)


def test_predict_never_picks_mask_and_keeps_the_full_softmax():
    """conf = p[x] under the softmax over the whole vocabulary (the reference sampler's number, and
    training's), also when MASK is excluded from the argmax."""
    logits = torch.tensor([[2.0, 0.0, 0.0, 1.9], [1.0, 0.0, 0.0, 5.0]])
    p = logits.softmax(-1)
    pred, conf = predict(logits, mask_id=3)
    assert pred.tolist() == [0, 0] and torch.allclose(conf, p[:, 0])  # 0.46, not 0.79 renormalised
    pred, conf = predict(logits)  # training: MASK may be the argmax
    assert pred.tolist() == [0, 3] and torch.allclose(conf, p.max(-1).values)


def rows(n, T=81, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(1, 10, (n, T), generator=g)
    fixed = torch.rand(n, T, generator=g) < 0.3
    return x0, fixed


class Spy(torch.nn.Module):
    """Wraps the model; scales the relay state written by forward number `at` by a scalar s
    (value 1, so nothing changes numerically) to see whether the loss gradient reaches it via h."""

    def __init__(self, model, at):
        super().__init__()
        self.model, self.at, self.calls = model, at, 0
        self.s = torch.ones((), requires_grad=True)
        self.cfg = model.cfg

    def forward(self, x, relay=None):
        logits, h = self.model(x, relay=relay)
        self.calls += 1
        return logits, (h * self.s if self.calls == self.at else h)


def make(tiny_cfg, objective, B=4):
    torch.manual_seed(0)
    m = Transformer(dataclasses.replace(tiny_cfg, relay=objective != "rollout"))
    buf = RolloutBuffer(B, 81, 32, 0, "cpu")
    buf.refill(lambda n: rows(n))
    return m, buf


def test_relay_gradient_inside_window_and_truncated_across_steps(tiny_cfg):
    m, buf = make(tiny_cfg, "relay")
    spy = Spy(m, at=1)
    rollout_loss(spy, buf, 2, "relay", REVEAL).backward()
    assert spy.s.grad is not None and spy.s.grad.abs() > 0  # L_2 reaches forward 1 through h
    # the state written back into the buffer is detached: the next optimizer step cannot reach it
    spy = Spy(m, at=2)
    rollout_loss(spy, buf, 2, "relay", REVEAL)  # forward 2 writes the buffer state
    rollout_loss(m, buf, 2, "relay", REVEAL).backward()
    assert spy.s.grad is None
    assert not buf.h.requires_grad and buf.h.abs().sum() > 0


def test_relay_sg_blocks_gradient_inside_window(tiny_cfg):
    m, buf = make(tiny_cfg, "relay_sg")
    spy = Spy(m, at=1)
    loss = rollout_loss(spy, buf, 2, "relay_sg", REVEAL)
    loss.backward()
    assert spy.s.grad is None
    assert m.relay.norm.weight.grad.abs().sum() > 0  # the relay is still used and trained


def test_one_rollout_step_is_the_masked_ce_with_teacher_forcing(tiny_cfg):
    """K = 1 (the sum over K steps is checked against a hand-written loop in test_method.py)."""
    m, buf = make(tiny_cfg, "rollout")
    x_before = buf.x.clone()
    loss = rollout_loss(m, buf, 1, "rollout", REVEAL)
    logits, _ = m(x_before)
    masked = x_before == 0
    torch.testing.assert_close(loss, F.cross_entropy(logits[masked], buf.x0[masked]))
    revealed = (x_before == 0) & (buf.x != 0)
    assert revealed.any(1).all()  # every row advanced by at least one cell
    assert (buf.x[revealed] == buf.x0[revealed]).all()  # the ground truth, not the prediction
    assert (buf.x[~masked] == x_before[~masked]).all()


def test_cpu_pieces_train_as_the_whole_batch(tiny_cfg, monkeypatch):
    """model.rows_forward runs a CPU training forward in pieces of rows (here 2, 2, 1 of 5): the rollout
    and MLM losses, the buffer's new state and every gradient are the whole batch's."""
    import model
    out = {}
    for rows_ in (1000, 2):
        monkeypatch.setattr(model, "CPU_ROWS", rows_)
        m, buf = make(tiny_cfg, "relay", B=5)
        sizes = []
        m.register_forward_hook(lambda mod, args, o: sizes.append(len(args[0])))
        g = torch.Generator().manual_seed(0)
        loss = rollout_loss(m, buf, 2, "relay", REVEAL) + mlm_loss(m, buf.x0, buf.fixed, g)
        loss.backward()
        assert sizes == ([5] * 3 if rows_ == 1000 else [2, 2, 1] * 3)  # two rollout forwards, one MLM
        out[rows_] = [loss.detach(), buf.x.clone(), buf.h.clone()] + [p.grad.clone() for p in m.parameters()]
    torch.testing.assert_close(out[2], out[1000], rtol=1e-5, atol=1e-6)


def test_buffer_refills_only_finished_slots(tiny_cfg):
    buf = RolloutBuffer(3, 81, 32, 0, "cpu")
    assert buf.refill(lambda n: rows(n, seed=1)) == 3  # cold start fills every slot
    x0, fixed = rows(3, seed=1)
    assert (buf.x == torch.where(fixed, x0, 0)).all() and (buf.h == 0).all()
    buf.x[1] = buf.x0[1]  # slot 1 finished
    buf.h[:] = 1.0
    before = buf.x.clone()
    got = []
    assert buf.refill(lambda n: got.append(n) or rows(n, seed=2)) == 1 and got == [1]
    nx0, nfixed = rows(1, seed=2)
    assert (buf.x0[1] == nx0[0]).all() and (buf.fixed[1] == nfixed[0]).all()
    assert (buf.x[1] == torch.where(nfixed[0], nx0[0], 0)).all()  # free cells fully masked
    assert (buf.h[1] == 0).all() and (buf.h[[0, 2]] == 1).all()
    assert (buf.x[[0, 2]] == before[[0, 2]]).all()


def test_replace_finished_takes_the_row_of_its_own_slot(tiny_cfg):
    """The sync-free refill: a full batch is offered, finished slots take their own row, the rest
    keep their trajectory (canvas, target, clues and h) untouched."""
    buf = RolloutBuffer(3, 81, 32, 0, "cpu")
    assert buf.replace_finished(*rows(3, seed=1)).item() == 3  # cold start: every slot
    buf.x[1] = buf.x0[1]  # slot 1 finished
    buf.h[:] = 1.0
    before = {k: getattr(buf, k).clone() for k in ("x0", "x", "fixed", "h")}
    nx0, nfixed = rows(3, seed=2)
    assert buf.replace_finished(nx0, nfixed).item() == 1
    assert (buf.x0[1] == nx0[1]).all() and (buf.fixed[1] == nfixed[1]).all()
    assert (buf.x[1] == torch.where(nfixed[1], nx0[1], 0)).all() and (buf.h[1] == 0).all()
    for k, v in before.items():
        assert (getattr(buf, k)[[0, 2]] == v[[0, 2]]).all(), k


def test_the_rollout_objective_keeps_no_relay_state(tiny_cfg):
    """D = 0: an empty h, nothing in the checkpoint; a buffer saved with unused zeros (older runs)
    still loads, while a real mismatch still fails."""
    m = Transformer(dataclasses.replace(tiny_cfg, relay=False))
    buf = RolloutBuffer(3, 81, 0, 0, "cpu")
    buf.refill(lambda n: rows(n))
    buf.replace_finished(*rows(3, seed=1))
    rollout_loss(m, buf, 2, "rollout", REVEAL).backward()
    assert buf.h.numel() == 0 and buf.state_dict()["h"].numel() == 0
    older = RolloutBuffer(3, 81, 32, 0, "cpu")
    older.refill(lambda n: rows(n, seed=3))
    buf.load_state_dict(older.state_dict())
    assert (buf.x == older.x).all() and buf.h.numel() == 0
    with pytest.raises(ValueError, match="rollout buffer x0: checkpoint has \\(2, 81\\), this run expects \\(3, 81\\)"):
        buf.load_state_dict(RolloutBuffer(2, 81, 32, 0, "cpu").state_dict())


def test_mlm_loss_never_masks_fixed_positions(tiny_cfg):
    torch.manual_seed(0)
    m = Transformer(tiny_cfg)
    x0, fixed = rows(8)
    seen = []
    orig = m.forward
    m.forward = lambda xt, **kw: seen.append(xt) or orig(xt, **kw)
    loss = mlm_loss(m, x0, fixed, torch.Generator().manual_seed(0))
    xt = seen[0]
    assert (xt[fixed] == x0[fixed]).all() and (xt == 0).any()
    masked = xt == 0
    logits, _ = orig(xt)
    torch.testing.assert_close(loss, F.cross_entropy(logits[masked], x0[masked]))


def test_losses_with_nothing_masked_are_zero_and_backpropagate(tiny_cfg):
    m, buf = make(tiny_cfg, "relay")
    x0, fixed = rows(3)
    loss = mlm_loss(m, x0, torch.ones_like(fixed), torch.Generator().manual_seed(0))  # every cell a clue
    loss.backward()
    assert loss.item() == 0.0 and m.embed_tokens.weight.grad is not None
    buf.x.copy_(buf.x0)  # every slot solved: nothing left to predict
    loss = rollout_loss(m, buf, 2, "relay", REVEAL)
    assert torch.is_tensor(loss) and loss.item() == 0.0
    loss.backward()


def test_training_threshold_is_redrawn_at_every_call():
    from relay import reveal_jittered_mass
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(4, 81, generator=g)
    masked = torch.rand(4, 81, generator=g) < 0.7
    gen, ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    taus = []
    for _ in range(3):  # each call draws tau ~ max(0, N(0.3, 0.1)) from gen, in order
        tau = max(0.0, 0.3 + 0.1 * torch.randn((), generator=ref).item())
        taus.append(tau)
        got = reveal_jittered_mass(conf, masked, 0.3, gen)
        assert torch.equal(got, reveal_confidence_mass(conf, masked, tau))
    assert len(set(taus)) == 3


def test_no_dropout_on_the_embeddings_and_the_relay(tiny_cfg):
    """With no blocks, the only place dropout could act is the embedding + relay sum: train == eval."""
    m = Transformer(dataclasses.replace(tiny_cfg, n_layer=0, dropout=0.5, relay=True))
    idx, h = torch.randint(0, 10, (2, 81)), torch.randn(2, 81, 32)
    train_out = m.train()(idx, relay=h)[0]
    torch.testing.assert_close(train_out, m.eval()(idx, relay=h)[0])
