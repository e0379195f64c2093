"""Regulariser family (docs/algorithms.md, "Recipe settings beyond the three functions"): hand values."""

import pytest
import torch

from offpolicy.algos import REGULARIZERS, LossInputs, bind, reads_of


def _inputs(mask, **kw):
    return LossInputs(adv=torch.zeros(len(mask)), mask=torch.tensor(mask, dtype=torch.float32), **kw)


def test_kl_ref_hand_values_and_masked_junk():
    logp = torch.tensor([[-1.0, -2.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, float("nan")]])  # junk on the masked position
    inputs = _inputs([[1, 1, 0]], ref_logp=ref)
    out = REGULARIZERS["kl_ref"](logp, inputs, coef=0.5, estimator="k1")
    # k1 = logp - ref = [0.5, 0, -]; times 0.5 -> [0.25, 0, 0]; token mean of the KL = 0.25
    torch.testing.assert_close(out.loss_BT, torch.tensor([[0.25, 0.0, 0.0]]), atol=1e-7, rtol=0)
    assert out.stats["kl_ref"].item() == pytest.approx(0.25, abs=1e-7)
    out.loss_BT.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.5, 0.5, 0.0]]), atol=1e-7, rtol=0)
    k2 = REGULARIZERS["kl_ref"](logp, inputs, coef=0.5, estimator="k2")  # 0.5 * 0.5**2 / 2 = 0.0625
    assert k2.loss_BT[0, 0].item() == pytest.approx(0.0625, abs=1e-7)


def test_kl_convex_mixes_base_and_previous_policy_by_lambda():
    # lambda(61) = 1 - 0.1 * ceil(11 / 10) = 0.8; KL to base 2, to pi_{k-1} 7: 0.8 * 2 + 0.2 * 7 = 3.0
    logp = torch.tensor([[0.0]])
    kw = dict(ref_logp=torch.tensor([[-2.0]]), prev_logp=torch.tensor([[-7.0]]))
    out = REGULARIZERS["kl_convex"](logp, _inputs([[1]], step=61, **kw), coef=1.0, estimator="k1")
    assert out.loss_BT.item() == pytest.approx(3.0, abs=1e-6)
    assert out.stats["kl_convex_lambda"].item() == pytest.approx(0.8) and out.stats["kl_prev"].item() == 7.0
    # up to step 50 lambda = 1: pi_{k-1} is not read (it may be absent)
    early = REGULARIZERS["kl_convex"](logp, _inputs([[1]], step=50, ref_logp=kw["ref_logp"]), coef=0.5,
                                      estimator="k1")
    assert early.loss_BT.item() == pytest.approx(1.0) and early.stats["kl_prev"].item() == 0.0
    with pytest.raises(ValueError, match="prev_logp"):
        REGULARIZERS["kl_convex"](logp, _inputs([[1]], step=61, ref_logp=kw["ref_logp"]), coef=1.0)


def test_entropy_bonus_forward_kl_and_k2():
    ent = torch.tensor([[0.5, 1.0]])
    out = REGULARIZERS["entropy_bonus"](torch.zeros(1, 2), _inputs([[1, 0]], entropy=ent), coef=0.1)
    torch.testing.assert_close(out.loss_BT, torch.tensor([[-0.05, 0.0]]), atol=1e-7, rtol=0)
    logp = torch.tensor([[-1.0, -3.0]], requires_grad=True)
    fkl = REGULARIZERS["forward_kl"](logp, _inputs([[1, 1]]), coef=0.1)
    torch.testing.assert_close(fkl.loss_BT, torch.tensor([[0.1, 0.3]]), atol=1e-7, rtol=0)
    k2 = REGULARIZERS["k2"](logp, _inputs([[1, 0]], behav_logp=torch.tensor([[-1.5, 0.0]])), coef=0.1)
    # 0.1 * (-1 - (-1.5))**2 = 0.025, gradient 2 * 0.1 * 0.5 = 0.1
    k2.loss_BT.sum().backward()
    assert k2.loss_BT[0, 0].item() == pytest.approx(0.025, abs=1e-7) and logp.grad[0, 0].item() == pytest.approx(0.1)
    assert logp.grad[0, 1].item() == 0.0


def test_regularizers_declare_what_they_read():
    assert reads_of("regularizer", "kl_ref") == {"ref_logp"}
    assert reads_of("regularizer", "kl_convex") == {"ref_logp", "prev_logp"}
    assert reads_of("regularizer", "entropy_bonus") == {"entropy"}
    assert reads_of("regularizer", "k2") == {"behav_logp"} and reads_of("regularizer", "forward_kl") == set()
    bind("regularizer", "kl_convex", {"coef": 0.1, "start": 10})
    with pytest.raises(ValueError, match="unknown parameter 'beta'"):
        bind("regularizer", "kl_ref", {"beta": 0.1})
