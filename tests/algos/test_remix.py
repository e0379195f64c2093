"""ReMix (docs/algorithms.md): KL-Convex schedule and Mix-PPG clip window."""

import math

import pytest
import torch

from offpolicy.algos import KL_ESTIMATORS, POLICY_LOSSES, LossInputs, kl_convex, kl_convex_lambda

F64 = torch.float64


def close(a, b, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), atol=atol, rtol=0)


@pytest.mark.parametrize("step,lam", [(0, 1.0), (50, 1.0), (51, 0.9), (60, 0.9), (61, 0.8), (85, 0.6),
                                      (90, 0.6), (91, 0.5), (500, 0.5)])
def test_kl_convex_lambda_hand(step, lam):
    # lambda = max(1 - 0.1 * ceil(max(t - 50, 0) / 10), 0.5)
    assert kl_convex_lambda(step) == pytest.approx(lam, abs=1e-12)


def test_kl_convex_mix():
    # step 61: lambda 0.8 -> 0.8 * 2 + 0.2 * 7 = 3.0
    close(kl_convex(torch.tensor([2.0], dtype=F64), torch.tensor([7.0], dtype=F64), 61), [3.0])


def test_mix_ppg_window_hand():
    # c = pi_k / pi_{k-i} = 1.3, eps 0.2 -> window [1.1, 1.5] on r = pi_theta / pi_{k-i}
    r = torch.tensor([[1.0, 1.2, 1.6], [1.0, 1.2, 1.6]], dtype=F64)
    logp = r.log().clone().requires_grad_(True)
    behav = torch.zeros_like(r)
    center = torch.full_like(r, math.log(1.3))
    out = POLICY_LOSSES["mix_ppg"](logp, LossInputs(torch.tensor([1.0, -1.0], dtype=F64), torch.ones_like(r),
                                                     behav_logp=behav, center_logp=center))
    # A = +1: -min(r, clip(r, 1.1, 1.5)) = -[1.0, 1.2, 1.5]; A = -1: max(r, clip) = [1.1, 1.2, 1.6]
    close(out.loss_BT, [[-1.0, -1.2, -1.5], [1.1, 1.2, 1.6]])
    close(torch.autograd.grad(out.loss_BT.sum(), logp)[0], [[-1.0, -1.2, 0.0], [0.0, 1.2, 1.6]])
    close(out.stats["center_mean"], 1.3)


def test_mix_ppg_fresh_data_is_ppo():
    gen = torch.Generator().manual_seed(2)
    logp = -torch.rand(4, 5, generator=gen, dtype=F64)
    old = logp + 0.3 * torch.randn(4, 5, generator=gen, dtype=F64)
    adv = torch.randn(4, generator=gen, dtype=F64)
    mask = torch.ones(4, 5)
    mix = POLICY_LOSSES["mix_ppg"](logp, LossInputs(adv, mask, behav_logp=old, center_logp=old))
    ppo = POLICY_LOSSES["ppo_clip"](logp, LossInputs(adv, mask, old_logp=old))
    close(mix.loss_BT, ppo.loss_BT, atol=1e-12)
    assert mix.stats["center_is_one"] == 1


def test_reduces_to_ppo_with_kl_to_base():
    # p = 0, m = 1, lambda = 1 (step <= 50): loss = PPO + beta * KL(pi || pi_base), the previous policy unused
    gen = torch.Generator().manual_seed(3)
    logp, base, prev = (-torch.rand(2, 3, generator=gen, dtype=F64) for _ in range(3))
    kl = kl_convex(KL_ESTIMATORS["k3"](logp, base), KL_ESTIMATORS["k3"](logp, prev), step=10)
    close(kl, KL_ESTIMATORS["k3"](logp, base), atol=1e-15)


def test_mix_ppg_needs_center():
    with pytest.raises(ValueError, match="'mix_ppg'.*center_logp"):
        POLICY_LOSSES["mix_ppg"](torch.zeros(1, 2), LossInputs(torch.ones(1), torch.ones(1, 2),
                                                               behav_logp=torch.zeros(1, 2)))
    # without center_logp, old_logp (pi_k) centres the window
    logp, old, behav = torch.zeros(1, 2), torch.full((1, 2), 0.3), torch.zeros(1, 2)
    a = POLICY_LOSSES["mix_ppg"](logp, LossInputs(torch.ones(1), torch.ones(1, 2), old_logp=old, behav_logp=behav))
    b = POLICY_LOSSES["mix_ppg"](logp, LossInputs(torch.ones(1), torch.ones(1, 2), behav_logp=behav, center_logp=old))
    assert torch.equal(a.loss_BT, b.loss_BT)
