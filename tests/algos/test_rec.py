"""REC family (docs/algorithms.md): clip masks, weights, regularisers and equivalences."""

import math

import pytest
import torch

from offpolicy.algos import ADVANTAGES, AGGREGATIONS, POLICY_LOSSES, LossInputs

RHO = torch.tensor([0.3, 0.7, 1.0, 1.3, 3.5], dtype=torch.float64)


def close(a, b, atol=1e-6):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=atol, rtol=0)


def grad_coeffs(loss_name, adv, rho=RHO, **params):
    """d(sum of per-token loss)/d logp at logp = log(rho), behav = old = 0."""
    logp = rho.log().expand(len(adv), -1).clone().requires_grad_(True)
    zeros = torch.zeros_like(logp)
    inputs = LossInputs(adv=torch.tensor(adv, dtype=torch.float64), mask=torch.ones_like(logp),
                        old_logp=zeros, behav_logp=zeros)
    POLICY_LOSSES[loss_name](logp, inputs, **params).loss_BT.sum().backward()
    return logp.grad


@pytest.mark.parametrize("clip_mode,expected", [
    ("one_side", [[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]]),
    ("two_side", [[0, 0, 1, 0, 0], [0, 0, 1, 0, 0]]),
    ("ring", [[1, 0, 1, 0, 0], [0, 0, 1, 0, 1]]),
    ("none", [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]),
])
def test_clip_masks_hand(clip_mode, expected):
    # NoIS: gradient = -A * m, so m = -grad / A with A = +1 (row 0) and A = -1 (row 1)
    g = grad_coeffs("rec", [1.0, -1.0], clip_mode=clip_mode, weight="none")
    m = -g / torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    close(m, torch.tensor(expected, dtype=torch.float64))


def test_one_side_is_matches_ppo_clip_hand():
    # REC-OneSide-IS coefficient = -A * rho * 1[kept]; PPO-clip's gradient wrt logp is the same
    g_rec = grad_coeffs("rec", [1.0, -1.0], clip_mode="one_side", weight="importance_sampling")
    g_ppo = grad_coeffs("ppo_clip", [1.0, -1.0], ratio_to="behav")
    kept = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.float64)
    close(g_rec, -torch.tensor([[1.0], [-1.0]], dtype=torch.float64) * RHO * kept)
    close(g_ppo, g_rec)


def test_one_side_is_matches_ppo_clip_random():
    gen = torch.Generator().manual_seed(3)
    B, T = 6, 9
    logp = (-torch.rand(B, T, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    behav = logp.detach() + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=gen) > 0.2).long()
    grads = []
    for name, params in [("rec", {"clip_mode": "one_side", "weight": "importance_sampling"}),
                         ("ppo_clip", {"ratio_to": "behav"})]:
        out = POLICY_LOSSES[name](logp, LossInputs(adv, mask, behav_logp=behav), **params)
        grads.append(torch.autograd.grad(AGGREGATIONS["token_mean"](out.loss_BT, mask), logp)[0])
    close(grads[0], grads[1], atol=1e-12)


def test_no_clip_no_weight_equals_reinforce_whatever_behav():
    gen = torch.Generator().manual_seed(4)
    logp = (-torch.rand(3, 5, generator=gen, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(3, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 1]])
    expected = -AGGREGATIONS["token_mean"](adv[:, None] * logp, mask)
    for behav in [None, torch.randn(3, 5, generator=gen, dtype=torch.float64) * 50]:
        out = POLICY_LOSSES["rec"](logp, LossInputs(adv, mask, behav_logp=behav), clip_mode="none", weight="none")
        close(AGGREGATIONS["token_mean"](out.loss_BT, mask), expected.detach(), atol=1e-12)
        ref = POLICY_LOSSES["reinforce"](logp, LossInputs(adv, mask, behav_logp=behav))
        close(out.loss_BT, ref.loss_BT.detach(), atol=1e-12)


def test_red_weight_effective_advantages_hand():
    # w = exp(A / 1): 0.75 * e^0.75 = 1.5878, -0.25 * e^-0.25 = -0.1947; gradient = -w * A
    g = grad_coeffs("rec", [0.75, -0.25], rho=torch.ones(1, dtype=torch.float64), clip_mode="none",
                    weight="advantage")
    close(-g[:, 0], torch.tensor([0.75 * math.exp(0.75), -0.25 * math.exp(-0.25)], dtype=torch.float64))
    close(-g[:, 0], torch.tensor([1.5878, -0.1947], dtype=torch.float64), atol=1e-4)


def test_equal_rewards_only_regulariser_gradient():
    # A = 0 (equal rewards): the pg term vanishes; forward_kl grad = -c, k2 grad = 2c(logp - behav)
    adv = ADVANTAGES["group_mean"](torch.full((2,), 0.5, dtype=torch.float64), torch.tensor([0, 0]))
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], dtype=torch.float64, requires_grad=True)
    behav = torch.tensor([[-1.5, -2.0], [-0.2, -0.1]], dtype=torch.float64)
    inputs = LossInputs(adv, torch.ones(2, 2), behav_logp=behav)
    for clip in ["one_side", "two_side", "ring", "none"]:
        out = POLICY_LOSSES["rec"](logp, inputs, clip_mode=clip, weight="importance_sampling")
        assert torch.autograd.grad(out.loss_BT.sum(), logp)[0].abs().max() == 0
    out = POLICY_LOSSES["rec"](logp, inputs, clip_mode="none", regularizer="forward_kl", reg_coef=0.1)
    close(torch.autograd.grad(out.loss_BT.sum(), logp)[0], torch.full((2, 2), -0.1, dtype=torch.float64))
    out = POLICY_LOSSES["rec"](logp, inputs, clip_mode="none", regularizer="k2", reg_coef=0.1)
    # value 0.1 * (logp - behav)^2: [[0.1*0.25, 0], [0.1*0.09, 0]]
    close(out.loss_BT, torch.tensor([[0.025, 0.0], [0.009, 0.0]], dtype=torch.float64), atol=1e-12)
    close(torch.autograd.grad(out.loss_BT.sum(), logp)[0], 0.2 * (logp - behav).detach())


def test_asymre_equals_rec_with_shifted_advantage():
    gen = torch.Generator().manual_seed(5)
    r = torch.rand(8, generator=gen, dtype=torch.float64)
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    logp = (-torch.rand(8, 4, generator=gen, dtype=torch.float64)).requires_grad_(True)
    mask = (torch.rand(8, 4, generator=gen) > 0.3).long()
    a = ADVANTAGES["group_mean"](r, g)
    reg = POLICY_LOSSES["rec"](logp, LossInputs(a, mask), clip_mode="none", regularizer="forward_kl", reg_coef=0.1)
    shifted = POLICY_LOSSES["rec"](logp, LossInputs(a + 0.1, mask), clip_mode="none")
    via_adv = POLICY_LOSSES["reinforce"](logp, LossInputs(ADVANTAGES["asymre"](r, g, shift=-0.1), mask))
    close(reg.loss_BT, shifted.loss_BT.detach(), atol=1e-12)
    close(reg.loss_BT, via_adv.loss_BT.detach(), atol=1e-12)


def test_rec_stats_and_missing_behav():
    logp = RHO.log()[None].clone()
    out = POLICY_LOSSES["rec"](logp, LossInputs(torch.ones(1), torch.ones(1, 5), behav_logp=torch.zeros(1, 5)))
    # one_side, A = +1: rho 1.3 and 3.5 are dropped (2 of 5)
    close(out.stats["clip_frac"], 0.4)
    close(out.stats["clip_high_frac"], 0.4)
    close(out.stats["ratio_max"], 3.5)
    assert out.stats["ratio_is_one"] == 0
    with pytest.raises(ValueError, match="'rec'.*LossInputs.behav_logp"):
        POLICY_LOSSES["rec"](logp, LossInputs(torch.ones(1), torch.ones(1, 5)))


def test_rec_bad_option():
    with pytest.raises(ValueError, match="clip_mode"):
        POLICY_LOSSES["rec"](torch.zeros(1, 2), LossInputs(torch.ones(1), torch.ones(1, 2),
                                                           behav_logp=torch.zeros(1, 2)), clip_mode="one-side")
