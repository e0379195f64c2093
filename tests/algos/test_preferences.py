"""IPO, the Bradley-Terry reward-model loss and online-DPO pair rules (docs/algorithms.md §8b): hand values."""

import pytest
import torch

from offpolicy.algos import PAIR_BUILDERS, all_pairs, best_vs_worst, bradley_terry_loss, ipo_loss

F64 = torch.float64


def close(a, b, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), atol=atol, rtol=0)


# ---------------------------------------------------------------------------- IPO


def ipo_of(h, beta=0.1):
    """One pair whose per-token-mean log-ratio difference is ``h``: chosen tokens [h, h] (mean h), rejected 0."""
    pc = torch.tensor([[h, h]], dtype=F64)
    zero = torch.zeros(1, 2, dtype=F64)
    return ipo_loss(pc, zero, zero, zero, torch.ones(1, 2), torch.ones(1, 2), beta=beta)


@pytest.mark.parametrize("h, expected", [(0.5, 20.25), (5.0, 0.0), (-1.0, 36.0)])
def test_ipo_hand(h, expected):
    # beta = 0.1: target 1/(2 beta) = 5; (0.5 - 5)^2 = 20.25, (5 - 5)^2 = 0, (-1 - 5)^2 = 36
    close(ipo_of(h).loss, expected)


def test_ipo_uses_per_token_means_over_each_mask():
    # chosen deltas [1, 3, junk] with mask [1, 1, 0] -> mean 2; rejected [0.5, junk, junk] mask [1, 0, 0] -> 0.5
    # h = 1.5 -> (1.5 - 5)^2 = 12.25; stats: implicit rewards beta * mean = 0.2 and 0.05, accuracy 1
    pc = torch.tensor([[1.0, 3.0, 99.0]], dtype=F64)
    pr = torch.tensor([[0.5, -99.0, 7.0]], dtype=F64)
    zero = torch.zeros(1, 3, dtype=F64)
    out = ipo_loss(pc, pr, zero, zero, torch.tensor([[1, 1, 0]]), torch.tensor([[1, 0, 0]]), beta=0.1)
    close(out.loss, 12.25)
    close(out.stats["reward_chosen"], 0.2)
    close(out.stats["reward_rejected"], 0.05)
    close(out.stats["accuracy"], 1.0)


def test_ipo_gradient_and_batch_mean():
    # two pairs, h = 0.5 and -1 (one token each): loss = (20.25 + 36) / 2 = 28.125;
    # d loss / d logp_c = 2 (h - 5) / 2 = [-4.5, -6]
    pc = torch.tensor([[0.5], [-1.0]], dtype=F64, requires_grad=True)
    zero = torch.zeros(2, 1, dtype=F64)
    out = ipo_loss(pc, zero, zero, zero, torch.ones(2, 1), torch.ones(2, 1), beta=0.1)
    close(out.loss, 28.125)
    (g,) = torch.autograd.grad(out.loss, pc)
    close(g, [[-4.5], [-6.0]])
    close(out.stats["accuracy"], 0.5)


# ---------------------------------------------------------------------------- Bradley-Terry

RC = torch.tensor([1.0, 0.2], dtype=F64)
RR = torch.tensor([0.5, 0.7], dtype=F64)


def test_bradley_terry_hand():
    # r_c - r_r = [0.5, -0.5]: -log sigmoid(0.5) = 0.474077, -log sigmoid(-0.5) = 0.974077, mean 0.724077
    close(bradley_terry_loss(RC, RR).loss, 0.724077)
    close(bradley_terry_loss(RC[:1], RR[:1]).loss, 0.474077)
    close(bradley_terry_loss(RC[1:], RR[1:]).loss, 0.974077)


def test_bradley_terry_centering_and_margin():
    # c = 0.01: + 0.01 * mean([1.5^2, 0.9^2]) = 0.01 * 1.53 = 0.0153 -> 0.739377
    close(bradley_terry_loss(RC, RR, center_coef=0.01).loss, 0.739377)
    # m = [0.5, 0]: z = [0, -0.5] -> [log 2 = 0.693147, 0.974077], mean 0.833612
    close(bradley_terry_loss(RC, RR, margin_B=torch.tensor([0.5, 0.0])).loss, 0.833612)


def test_bradley_terry_gradient_and_stats():
    # per pair d l / d r_c = -(1 - sigmoid(r_c - r_r)) = [-0.377541, -0.622459]; the mean over 2 pairs halves it
    rc = RC.clone().requires_grad_(True)
    rr = RR.clone().requires_grad_(True)
    out = bradley_terry_loss(rc, rr)
    gc, gr = torch.autograd.grad(out.loss * 2, (rc, rr))
    close(gc, [-0.377541, -0.622459])
    close(gr, [0.377541, 0.622459])
    close(out.stats["accuracy"], 0.5)  # 1.0 > 0.5 yes, 0.2 > 0.7 no
    close(out.stats["reward_margin"], 0.0)
    close(out.stats["reward_chosen"], 0.6)
    close(out.stats["reward_rejected"], 0.6)


# ---------------------------------------------------------------------------- online DPO pairs


def test_best_vs_worst_hand():
    assert best_vs_worst([0.0, 1.0, 0.5, 0.0]) == [(1, 0)]  # worst tie 0 vs 3: the first index wins
    assert best_vs_worst([1.0, 0.0, 1.0, 0.0]) == [(0, 1)]  # both ties: first best, first worst
    assert best_vs_worst([0.3, 0.3, 0.3]) == []  # max == min: no pair
    assert best_vs_worst([1.0]) == []
    assert best_vs_worst([None, 0.2, float("nan"), 0.9]) == [(3, 1)]  # faulted samples take no part


def test_all_pairs_hand():
    # 0/1 rewards: median of [1,0,1,0,0] is 0 -> above {0, 2}, below {} : no pair (ties at the median drop)
    assert all_pairs([1.0, 0.0, 1.0, 0.0, 0.0]) == []
    # even group [1, 0, 1, 0]: median 0.5 -> every correct x every incorrect
    assert all_pairs([1.0, 0.0, 1.0, 0.0]) == [(0, 1), (0, 3), (2, 1), (2, 3)]
    # [0.9, 0.1, 0.5, 0.7, 0.2]: median 0.5 -> above {0, 3}, below {1, 4}; index 2 sits at the median
    assert all_pairs([0.9, 0.1, 0.5, 0.7, 0.2]) == [(0, 1), (0, 4), (3, 1), (3, 4)]
    assert all_pairs([0.4, 0.4]) == []
    assert all_pairs([1.0, None, 0.0]) == [(0, 2)]  # median of the finite [1, 0] is 0.5
    assert set(PAIR_BUILDERS) == {"best_vs_worst", "all_pairs"}


def test_pair_rules_agree_on_a_two_sample_group():
    for rewards in ([0.0, 1.0], [2.5, -1.0]):
        assert best_vs_worst(rewards) == all_pairs(rewards)
