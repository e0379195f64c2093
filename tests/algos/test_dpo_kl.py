"""DPO and KL estimators (docs/algorithms.md): hand values."""

import math

import pytest
import torch

from offpolicy.algos import KL_ESTIMATORS, dpo_loss, entropy_from_logits

F64 = torch.float64


def close(a, b, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), atol=atol, rtol=0)


def nll(z):
    return math.log1p(math.exp(-z))  # -log sigmoid(z)


DC = torch.tensor([[0.5, -0.2, 0.1, 0.0]], dtype=F64)
DR = torch.tensor([[-0.3, 0.4, -0.1, 0.0]], dtype=F64)
WC = torch.tensor([[1.0, 2.5, 1.0, 0.0]], dtype=F64)
WR = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=F64)
ONES = torch.ones(1, 4)
ZERO = torch.zeros(1, 4, dtype=F64)


def test_dpo_sequence_hand():
    # Delta_c = .5 - .5 + .1 = 0.1, Delta_r = -.3 + .4 - .1 = 0 -> -log sigmoid(0.1 * 0.1) = 0.6882
    out = dpo_loss(DC, DR, ZERO, ZERO, ONES, ONES, beta=0.1, chosen_weights_BT=WC, rejected_weights_BT=WR)
    close(out.loss, nll(0.01))
    close(out.loss, 0.6882, atol=1e-4)


def test_dpo_per_position_hand():
    # z_t = 0.1 * (w_c d_c - w_r d_r) = [0.08, -0.09, 0.02, 0]; mean of -log sigmoid over 4 positions = 0.6924
    out = dpo_loss(DC, DR, ZERO, ZERO, ONES, ONES, beta=0.1, reduction="per_position",
                   chosen_weights_BT=WC, rejected_weights_BT=WR)
    close(out.loss, sum(nll(z) for z in [0.08, -0.09, 0.02, 0.0]) / 4)
    close(out.loss, 0.6924, atol=1e-4)


def test_dpo_at_init_log2_and_gradient():
    # policy = reference: every term is log 2, gradient per term -beta * w / 2
    pc = torch.tensor([[-1.0, -2.0, -0.5]], dtype=F64, requires_grad=True)
    pr = torch.tensor([[-0.3, -0.7, -1.1]], dtype=F64, requires_grad=True)
    w = torch.tensor([[1.0, 2.0, 0.5]], dtype=F64)
    for reduction, scale in [("sequence_sum", 1.0), ("per_position", 1 / 3)]:
        out = dpo_loss(pc, pr, pc.detach(), pr.detach(), torch.ones(1, 3), torch.ones(1, 3), beta=0.1,
                       reduction=reduction, chosen_weights_BT=w)
        close(out.loss, math.log(2))
        gc, gr = torch.autograd.grad(out.loss, (pc, pr))
        close(gc, -0.1 * w / 2 * scale)
        close(gr, 0.1 * torch.ones(1, 3) / 2 * scale)


def test_dpo_label_smoothing_and_batch_mean():
    pc = torch.tensor([[1.0], [0.0]], dtype=F64)
    zeros = torch.zeros(2, 1, dtype=F64)
    out = dpo_loss(pc, zeros, zeros, zeros, torch.ones(2, 1), torch.ones(2, 1), beta=1.0, label_smoothing=0.2)
    # pair 1: z = 1 -> 0.8 * nll(1) + 0.2 * nll(-1); pair 2: z = 0 -> log 2; mean over pairs
    close(out.loss, (0.8 * nll(1.0) + 0.2 * nll(-1.0) + math.log(2)) / 2)
    close(out.stats["accuracy"], 0.5)


def test_dpo_masked_junk():
    pc = torch.tensor([[-1.0, float("nan")]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[-1.5, float("inf")]], dtype=F64)
    mask = torch.tensor([[1, 0]])
    out = dpo_loss(pc, ZERO[:, :2], ref, ZERO[:, :2], mask, torch.ones(1, 2), beta=1.0)
    close(out.loss, nll(0.5))
    (g,) = torch.autograd.grad(out.loss, pc)
    assert torch.isfinite(g).all() and g[0, 1] == 0
    with pytest.raises(ValueError, match="reduction"):
        dpo_loss(DC, DR, ZERO, ZERO, ONES, ONES, reduction="mean")


def test_kl_estimators_hand():
    logp = torch.tensor([0.0, -1.0, -30.0], dtype=F64)
    ref = torch.tensor([0.0, -1.5, 0.0], dtype=F64)
    d = [0.0, 0.5, -30.0]
    close(KL_ESTIMATORS["k1"](logp, ref), d)
    close(KL_ESTIMATORS["k2"](logp, ref), [0.5 * x * x for x in d])
    k3 = [math.exp(-x) - 1 + x for x in d]  # [0, e^-0.5 - 0.5, e^30 - 31]
    close(KL_ESTIMATORS["k3"](logp, ref)[:2], k3[:2])
    close(KL_ESTIMATORS["low_var_kl"](logp, ref), [k3[0], k3[1], 10.0])


def test_entropy_from_logits():
    # uniform over 4 -> log 4; one-hot-ish (logits [0, -inf]) -> 0
    close(entropy_from_logits(torch.zeros(1, 1, 4, dtype=F64)), [[math.log(4)]])
    p = torch.tensor([0.7, 0.2, 0.1], dtype=F64)
    close(entropy_from_logits(p.log()[None, None] + 3.0), [[-(p * p.log()).sum()]])
    # a banned token (logit -inf) contributes 0: two equal logits left -> log 2
    close(entropy_from_logits(torch.tensor([[[0.0, 0.0, -math.inf]]], dtype=F64)), [[math.log(2)]])
