"""Advantage estimators: hand-computed values (docs/algorithms.md) and properties."""

import math

import pytest
import torch

from offpolicy.algos import ADVANTAGES, LossInputs, resolve_preset
from offpolicy.algos.advantages import red_drop_keep


def T(*v):
    return torch.tensor(v, dtype=torch.float64)


def close(a, b, atol=1e-6):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=atol, rtol=0)


G4 = torch.tensor([7, 7, 7, 7])


def test_group_mean_hand():
    # r = [1,0,0,0], mean 0.25 -> [0.75, -0.25, -0.25, -0.25]
    close(ADVANTAGES["group_mean"](T(1, 0, 0, 0), G4), T(0.75, -0.25, -0.25, -0.25))


def test_grpo_population_std_hand():
    # population std = sqrt((0.75^2 + 3*0.25^2)/4) = sqrt(0.1875) = 0.4330
    std = math.sqrt(0.1875)
    expected = T(0.75, -0.25, -0.25, -0.25) / (std + 1e-6)  # ~ [1.732, -0.577, ...]
    close(ADVANTAGES["grpo"](T(1, 0, 0, 0), G4, unbiased_std=False), expected)
    close(expected, T(math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3)), atol=1e-5)


def test_grpo_unbiased_std_hand():
    # unbiased std = sqrt(0.75/3) = 0.5 -> [0.75, -0.25, ...] / 0.500001 = [1.5, -0.5, -0.5, -0.5]
    expected = T(0.75, -0.25, -0.25, -0.25) / (0.5 + 1e-6)
    close(ADVANTAGES["grpo"](T(1, 0, 0, 0), G4), expected)
    close(ADVANTAGES["grpo"](T(1, 0, 0, 0), G4), T(1.5, -0.5, -0.5, -0.5), atol=1e-5)


def test_rloo_hand():
    # A_1 = 1 - mean(0,0,0) = 1; A_2 = 0 - mean(1,0,0) = -1/3
    close(ADVANTAGES["rloo"](T(1, 0, 0, 0), G4), T(1, -1 / 3, -1 / 3, -1 / 3))


def test_opmd_baseline_hand():
    # mean baseline: same as group_mean
    close(ADVANTAGES["opmd_baseline"](T(1, 0, 0, 0), G4), T(0.75, -0.25, -0.25, -0.25))
    # logavgexp, tau = 0.5: b = 0.5 * log((e^2 + 3)/4)
    b = 0.5 * math.log((math.exp(2.0) + 3) / 4)
    got = ADVANTAGES["opmd_baseline"](T(1, 0, 0, 0), G4, baseline="logavgexp", tau=0.5)
    close(got, T(1 - b, -b, -b, -b))


def test_asymre_hand():
    # baseline = 0.25 + (-0.1) = 0.15 -> [0.85, -0.15, -0.15, -0.15]
    close(ADVANTAGES["asymre"](T(1, 0, 0, 0), G4), T(0.85, -0.15, -0.15, -0.15))


def test_red_drop_hand():
    # r = [1,0,0,0,0,0,1,0]: mean 0.25, 2 positives, 6 negatives -> drop 4 negatives.
    # kept = {1, 1, 0, 0}: mean 0.5 -> kept A = +-0.5, dropped A = 0.
    r = T(1, 0, 0, 0, 0, 0, 1, 0)
    g = torch.full((8,), 3)
    adv = ADVANTAGES["group_mean"](r, g, drop="balance", generator=torch.Generator().manual_seed(0))
    assert adv[0] == 0.5 and adv[6] == 0.5
    neg = adv[r == 0]
    assert (neg == 0).sum() == 4 and (neg == -0.5).sum() == 2
    # grpo on kept: unbiased std of [1,1,0,0] = sqrt(1/3): A = +-0.5 / (sqrt(1/3) + 1e-6)
    adv = ADVANTAGES["grpo"](r, g, drop="balance", generator=torch.Generator().manual_seed(0))
    close(adv[0], 0.5 / (math.sqrt(1 / 3) + 1e-6))
    assert (adv == 0).sum() == 4


def test_red_drop_reproducible_and_random():
    r = torch.tensor([1.0] + [0.0] * 9, dtype=torch.float64)
    g = torch.zeros(10, dtype=torch.long)
    keeps = {tuple(red_drop_keep(r, g, torch.Generator().manual_seed(s)).tolist()) for s in range(20)}
    assert all(sum(k) == 2 and k[0] for k in keeps)  # one positive, one kept negative
    assert len(keeps) > 3  # the kept negative is chosen at random
    a = red_drop_keep(r, g, torch.Generator().manual_seed(5))
    assert torch.equal(a, red_drop_keep(r, g, torch.Generator().manual_seed(5)))


def test_red_drop_no_surplus_is_identity():
    r, g = T(1, 1, 0, 0.5), torch.tensor([0, 0, 0, 0])
    close(ADVANTAGES["group_mean"](r, g, drop="balance"), ADVANTAGES["group_mean"](r, g))


@pytest.mark.parametrize("name", ["group_mean", "grpo", "rloo", "opmd_baseline", "asymre"])
def test_shift_invariance_and_arbitrary_labels(name):
    gen = torch.Generator().manual_seed(0)
    r = torch.rand(12, generator=gen, dtype=torch.float64)
    g = torch.tensor([42, -3, 42, 9, -3, 42, 9, 9, -3, 42, 1000, 9])  # unsorted, non-contiguous
    shift = torch.tensor([0.0, 5.0, 0.0, -2.0, 5.0, 0.0, -2.0, -2.0, 5.0, 0.0, 0.0, -2.0], dtype=torch.float64)
    base = ADVANTAGES[name](r, g)
    # a different constant per group (the group of one at label 1000 is left unshifted: its baseline is 0)
    close(ADVANTAGES[name](r + shift, g), base)
    # relabelling groups does not change anything
    relabel = {42: 0, -3: 1, 9: 2, 1000: 3}
    g2 = torch.tensor([relabel[int(x)] for x in g])
    close(ADVANTAGES[name](r, g2), base)


def test_groups_are_independent():
    r = T(1, 0, 3, 5, 0, 2)
    g = torch.tensor([1, 1, 2, 2, 1, 2])
    out = ADVANTAGES["group_mean"](r, g)
    close(out, T(1 - 1 / 3, -1 / 3, 3 - 10 / 3, 5 - 10 / 3, -1 / 3, 2 - 10 / 3))


@pytest.mark.parametrize("name,params", [("group_mean", {}), ("grpo", {}), ("grpo", {"unbiased_std": False}),
                                         ("rloo", {}), ("opmd_baseline", {"baseline": "logavgexp"}),
                                         ("asymre", {}), ("group_mean", {"drop": "balance"}),
                                         ("grpo", {"drop": "balance"})])
def test_group_of_one(name, params):
    # singleton groups: baseline 0, std 1 -> finite, equal to r (asymre: r - shift; grpo: r / (1 + 1e-6))
    r = T(0.3, -2.0, 1.0, 0.0)
    g = torch.tensor([0, 1, 2, 2])
    adv = ADVANTAGES[name](r, g, **params)
    assert torch.isfinite(adv).all()
    scale = 1 / (1 + 1e-6) if name == "grpo" else 1.0
    offset = 0.1 if name == "asymre" else 0.0
    close(adv[:2], (r[:2] + offset) * scale)


def test_equal_rewards_give_zero():
    for name in ["group_mean", "grpo", "rloo", "opmd_baseline"]:
        close(ADVANTAGES[name](T(0.7, 0.7, 0.7), torch.tensor([4, 4, 4])), T(0, 0, 0))


def test_bad_drop_value():
    with pytest.raises(ValueError, match="drop"):
        ADVANTAGES["group_mean"](T(1, 0), torch.tensor([0, 0]), drop="balanced")


def test_red_drop_samples_stay_in_token_denominator():
    # RED-Drop zeroes A but keeps the mask: token_mean divides by all 8 * 2 tokens, not the 4 kept samples'
    gen = torch.Generator().manual_seed(0)
    adv_fn, loss_fn, agg_fn = resolve_preset("red_drop", advantage_params={"generator": gen})
    adv = adv_fn(T(1, 0, 0, 0, 0, 0, 1, 0), torch.zeros(8, dtype=torch.long))
    logp = torch.full((8, 2), -1.0, dtype=torch.float64)
    mask = torch.ones(8, 2)
    loss = agg_fn(loss_fn(logp, LossInputs(adv, mask)).loss_BT, mask)
    # -A * logp summed = 2 * sum(A) = 2 * (0.5 + 0.5 - 0.5 - 0.5) = 0; with |A|: 2 * 4 * 0.5 / 16 tokens
    loss_abs = agg_fn(loss_fn(logp, LossInputs(adv.abs(), mask)).loss_BT, mask)
    close(loss, torch.tensor(0.0, dtype=torch.float64))
    close(loss_abs, torch.tensor(4 * 0.5 * 2 / 16, dtype=torch.float64))
