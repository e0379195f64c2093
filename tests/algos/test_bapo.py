"""BAPO (docs/algorithms.md): contributions, both bound searches, and the PPO-clip limit."""

import pytest
import torch

from offpolicy.algos import POLICY_LOSSES, LossInputs, bapo_bounds
from offpolicy.algos.bapo import bapo_contributions, bapo_search_path

F64 = torch.float64
RATIO = torch.tensor([0.9, 1.1, 1.5, 2.5, 0.5, 0.7, 0.95, 1.05, 1.3, 0.65], dtype=F64)[None]
ADV = torch.tensor([1.0] * 4 + [-1.0] * 6, dtype=F64)[None]
MASK = torch.ones_like(RATIO)


def close(a, b, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), atol=atol, rtol=0)


def test_contributions_hand():
    # pos = .9 + 1.1 + 1.2 + 1.2 = 4.4; neg = .6 + .7 + .95 + 1.05 + 1.3 + .65 = 5.25
    pos, neg = bapo_contributions(RATIO, ADV, MASK, 0.6, 1.2)
    close(pos, 4.4)
    close(neg, 5.25)
    _, _, frac = bapo_bounds(RATIO, ADV, MASK, rho0=0.4)
    close(frac, 4.4 / 9.65)  # 0.456


def test_paper_search_no_change():
    c_low, c_high, _ = bapo_bounds(RATIO, ADV, MASK, rho0=0.4)
    close(c_low, 0.6)
    close(c_high, 1.2)


def test_paper_search_raises_upper_bound():
    # frac(1.2 + 0.05k) = (4.4 + 0.1k) / (9.65 + 0.1k): k = 4 -> 0.4776 < 0.48, k = 5 -> 4.9/10.15 = 0.4828
    c_low, c_high, frac = bapo_bounds(RATIO, ADV, MASK, rho0=0.48)
    close(c_high, 1.45)
    close(c_low, 0.6)
    close(frac, 4.9 / 10.15)


def test_code_search_hand():
    # target pos/neg >= 1 (rho0 = 0.5). Raising c_low to 0.9 makes neg = 6.0; raising c_high to 2.5 gives
    # pos = 6.0 but pos/(neg + 1e-8) < 1, and nothing grows past rho 2.5, so the search ends at (0.9, 3.0).
    c_low, c_high, _ = bapo_bounds(RATIO, ADV, MASK, rho0=0.5, low_range=(0.6, 0.9), high_range=(1.2, 3.0),
                                   step_low=0.05, step_high=0.05, search="code")
    close(c_low, 0.9)
    close(c_high, 3.0)


def test_code_search_stops_early():
    # with only positive tokens the target holds at once
    c_low, c_high, frac = bapo_bounds(RATIO[:, :4], ADV[:, :4], MASK[:, :4], rho0=0.5, search="code")
    close(c_low, 0.6)
    close(c_high, 1.2)
    close(frac, 1.0)


def test_paper_path_raises_lower_after_upper_is_exhausted():
    path = bapo_search_path((0.6, 0.64), (1.2, 1.3), 0.02, 0.05, "paper")
    expected = [(0.6, 1.2), (0.6, 1.25), (0.6, 1.3), (0.62, 1.3), (0.64, 1.3)]
    close(torch.tensor(path), torch.tensor(expected), atol=1e-12)
    assert bapo_search_path((0.8, 0.8), (1.2, 1.2), 0.02, 0.05, "paper") == [(0.8, 1.2)]


def test_degenerate_ranges_equal_ppo_clip():
    gen = torch.Generator().manual_seed(11)
    B, T = 5, 7
    logp = (-torch.rand(B, T, generator=gen, dtype=F64) * 2).requires_grad_(True)
    old = logp.detach() + 0.4 * torch.randn(B, T, generator=gen, dtype=F64)
    inputs = LossInputs(torch.randn(B, generator=gen, dtype=F64), (torch.rand(B, T, generator=gen) > 0.2).long(),
                        old_logp=old)
    eps = 0.2
    for search in ["paper", "code"]:
        bapo = POLICY_LOSSES["bapo"](logp, inputs, low_range=(1 - eps, 1 - eps), high_range=(1 + eps, 1 + eps),
                                     search=search)
        ppo = POLICY_LOSSES["ppo_clip"](logp, inputs, eps_low=eps, eps_high=eps)
        close(bapo.loss_BT.detach(), ppo.loss_BT.detach(), atol=1e-12)
        g1 = torch.autograd.grad(bapo.loss_BT.sum(), logp)[0]
        g2 = torch.autograd.grad(ppo.loss_BT.sum(), logp)[0]
        close(g1, g2, atol=1e-12)
        close(bapo.stats["bapo_c_low"], 0.8)
        close(bapo.stats["bapo_c_high"], 1.2)


def test_bapo_loss_uses_searched_bounds():
    logp = RATIO.log().clone().requires_grad_(True)
    out = POLICY_LOSSES["bapo"](logp, LossInputs(ADV, MASK, old_logp=torch.zeros_like(RATIO)), rho0=0.48)
    close(out.stats["bapo_c_high"], 1.45)
    # A = +1 rho 1.5 and 2.5 clipped at 1.45; A = -1 rho 0.5 clipped at 0.6
    close(out.loss_BT[0, :4], [-0.9, -1.1, -1.45, -1.45])
    close(out.loss_BT[0, 4:], [0.6, 0.7, 0.95, 1.05, 1.3, 0.65])


def test_bad_search():
    with pytest.raises(ValueError, match="search"):
        bapo_bounds(RATIO, ADV, MASK, search="greedy")
