"""Masked positions never affect any value, stat or gradient, for every policy loss (and with junk there:
huge numbers, inf and nan in logp, every denominator and token-level advantages)."""

import pytest
import torch

from offpolicy.algos import AGGREGATIONS, POLICY_LOSSES, LossInputs

F64 = torch.float64
CASES = [
    ("reinforce", {}), ("sft", {}), ("opmd_legacy", {}),
    ("ppo_clip", {}), ("ppo_clip", {"dual_clip": 3.0, "ratio_to": "behav"}),
    ("rec", {}), ("rec", {"clip_mode": "ring", "weight": "importance_sampling", "regularizer": "k2"}),
    ("rec", {"clip_mode": "two_side", "weight": "advantage", "regularizer": "forward_kl"}),
    ("gspo", {}), ("cispo", {}), ("decoupled_ppo", {}), ("decoupled_ppo", {"level": "sequence", "mode": "mask"}),
    ("bapo", {}), ("bapo", {"search": "code"}), ("mix_ppg", {}), ("sil", {"cov_lb": -1.0}),
]


def make(seed, junk):
    gen = torch.Generator().manual_seed(seed)
    B, T = 4, 6
    lengths = torch.tensor([6, 3, 1, 4])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    mask[1, 0] = 0  # a hole inside a response (tool output)
    base = {k: -torch.rand(B, T, generator=gen, dtype=F64) * 2 for k in ["logp", "old", "behav", "ref", "center"]}
    adv = torch.randn(B, T, generator=gen, dtype=F64)
    if junk:
        bad = torch.tensor([1e4, -1e30, float("inf"), float("-inf"), float("nan"), 3.0], dtype=F64)
        fill = bad[torch.randint(0, len(bad), (B, T), generator=gen)]
        base = {k: torch.where(mask.bool(), v, fill.roll(i, 1)) for i, (k, v) in enumerate(base.items())}
        adv = torch.where(mask.bool(), adv, fill.flip(0))
    logp = base.pop("logp").clone().requires_grad_(True)
    inputs = LossInputs(adv, mask, old_logp=base["old"], behav_logp=base["behav"], ref_logp=base["ref"],
                        center_logp=base["center"])
    return logp, inputs


@pytest.mark.parametrize("name,params", CASES)
def test_masked_positions_are_inert(name, params):
    results = []
    for junk in (False, True):
        logp, inputs = make(0, junk)
        if name == "sil":
            params = {**params, "generator": torch.Generator().manual_seed(1)}
        out = POLICY_LOSSES[name](logp, inputs, **params)
        loss = AGGREGATIONS["token_mean"](out.loss_BT, inputs.mask)
        (grad,) = torch.autograd.grad(loss, logp)
        results.append((out, grad, inputs.mask.bool()))
    (clean, g_clean, m), (dirty, g_dirty, _) = results
    assert (dirty.loss_BT[~m] == 0).all() and (g_dirty[~m] == 0).all()
    assert torch.isfinite(dirty.loss_BT).all() and torch.isfinite(g_dirty).all()
    torch.testing.assert_close(dirty.loss_BT, clean.loss_BT, atol=0, rtol=0)
    torch.testing.assert_close(g_dirty, g_clean, atol=0, rtol=0)
    assert clean.stats.keys() == dirty.stats.keys()
    for key in clean.stats:
        torch.testing.assert_close(dirty.stats[key], clean.stats[key], atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("name,params", CASES)
def test_broadcast_adv_equals_token_adv(name, params):
    logp, inputs = make(2, False)
    adv_B = inputs.adv[:, 0]
    if name == "sil":
        params = {**params, "generator": torch.Generator().manual_seed(1)}
    a = POLICY_LOSSES[name](logp, inputs._replace(adv=adv_B), **params).loss_BT
    if name == "sil":
        params = {**params, "generator": torch.Generator().manual_seed(1)}
    b = POLICY_LOSSES[name](logp, inputs._replace(adv=adv_B[:, None].expand(-1, 6)), **params).loss_BT
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_empty_mask_stats_are_finite():
    logp, inputs = make(3, False)
    inputs = inputs._replace(mask=torch.zeros_like(inputs.mask))
    for name, params in CASES:
        out = POLICY_LOSSES[name](logp, inputs, **params)
        assert (out.loss_BT == 0).all()
        assert all(torch.isfinite(v) for v in out.stats.values()), name


@pytest.mark.parametrize("name,params", CASES)
def test_extreme_ratios_on_the_mask_stay_finite(name, params):
    # log-ratios of +-200 on real tokens: exp would overflow to inf and give 0 * inf = nan gradients
    logp = torch.tensor([[-1.0, -1.0, -1.0, -1.0]], dtype=torch.float32, requires_grad=True)
    denom = torch.tensor([[-201.0, 199.0, -1.0, -201.0]])
    inputs = LossInputs(torch.tensor([[1.0, -1.0, 0.5, -1.0]]), torch.ones(1, 4), old_logp=denom, behav_logp=denom,
                        ref_logp=denom, center_logp=denom)
    out = POLICY_LOSSES[name](logp, inputs, **params)
    (grad,) = torch.autograd.grad(out.loss_BT.sum(), logp)
    assert torch.isfinite(out.loss_BT).all() and torch.isfinite(grad).all()
