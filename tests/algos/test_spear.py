"""SPEAR (docs/algorithms.md): schedules, tool reward, recalibration, replay size, Clip-Cov and sil."""

import math

import pytest
import torch

from offpolicy.algos import (POLICY_LOSSES, LossInputs, clip_cov_mask, recalibrate_advantages, replay_ready,
                             replay_sample_size, sil_weight, tool_call_reward, tool_call_reward_weight)

F64 = torch.float64
STEPS = [0, 50, 100, 150, 200, 250]
C = math.sqrt(2) / 4  # 0.5 * cos(pi/4)


def close(a, b, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), atol=atol, rtol=0)


def test_tool_weight_hand():
    # 0.5 (1 + cos(pi t / 200)): [1, .5 + C, .5, .5 - C, 0, 0] = [1, .8536, .5, .1464, 0, 0]
    close([tool_call_reward_weight(t, 200) for t in STEPS], [1, 0.5 + C, 0.5, 0.5 - C, 0, 0])
    close([tool_call_reward_weight(t, 200) for t in STEPS], [1, 0.8536, 0.5, 0.1464, 0, 0], atol=1e-4)


def test_sil_weight_hand():
    # 0.5 (1 - cos(pi t / 200)): [0, .1464, .5, .8536, 1, 1]
    close([sil_weight(t, 200) for t in STEPS], [0, 0.5 - C, 0.5, 0.5 + C, 1, 1])


def test_tool_call_reward_hand():
    # 0.1 * 3 * 0.85355 = 0.2561; calls beyond 10 do not count
    close(tool_call_reward(3, 50, 200), 0.3 * (0.5 + C))
    close(tool_call_reward(3, 50, 200), 0.2561, atol=1e-4)
    close(tool_call_reward(25, 0, 200), 1.0)


def test_recalibrate_hand():
    # sorted history [.1, .2, .5, .5, .6, .8] -> P50 = 0.5; A = R - 0.5
    adv = recalibrate_advantages(torch.tensor([1, 0.6, 0.5, 0.3], dtype=F64), [0.2, 0.5, 0.5, 0.8, 0.1, 0.6])
    close(adv, [0.5, 0.1, 0.0, -0.2])
    assert (adv > 0).tolist() == [True, True, False, False]
    # odd-length history uses the middle value; std option divides by the history's std
    close(recalibrate_advantages(torch.tensor([1.0], dtype=F64), [0.1, 0.9, 0.3]), [0.7])
    hist = torch.tensor([0.0, 1.0], dtype=F64)  # median 0.5, unbiased std sqrt(0.5)
    close(recalibrate_advantages(torch.tensor([1.0], dtype=F64), hist, std_normalize=True),
          [0.5 / (math.sqrt(0.5) + 1e-6)])
    close(recalibrate_advantages(torch.tensor([1.0], dtype=F64), []), [1.0])


def test_replay_sample_size_hand():
    assert replay_sample_size(37, 32) == 32  # 2^5 = 32
    assert replay_sample_size(20, 32) == 16  # 2^4
    assert replay_sample_size(1, 32) == 1
    assert replay_sample_size(0, 32) == 0
    assert replay_sample_size(64, 32) == 32
    assert replay_ready(49, 32) and not replay_ready(48, 32)  # > 1.5 * 32 = 48


ADV = torch.tensor([[2.0, 2.0, -2.0, -2.0]], dtype=F64)
LOGP = torch.tensor([[0.0, -4.0, 0.0, -4.0]], dtype=F64)
# centred: A - 0 = [2, 2, -2, -2], logp - (-2) = [2, -2, 2, -2] -> cov = [4, -4, -4, 4]; in (1, 5): tokens 0, 3


def test_clip_cov_mask_hand():
    none = torch.zeros_like(ADV, dtype=torch.bool)
    ones = torch.ones_like(ADV)
    both = clip_cov_mask(LOGP, ADV, ones, none, cov_ratio=0.5)  # floor(0.5 * 4) = 2 tokens
    assert both.tolist() == [[True, False, False, True]]
    seen = set()
    for s in range(20):
        one = clip_cov_mask(LOGP, ADV, ones, none, cov_ratio=0.25, generator=torch.Generator().manual_seed(s))
        assert one.sum() == 1 and not (one & ~both).any()
        seen.add(tuple(one[0].tolist()))
    assert len(seen) == 2  # random choice between the two candidates
    clipped = torch.tensor([[True, False, False, False]])
    assert clip_cov_mask(LOGP, ADV, ones, clipped, cov_ratio=0.5).tolist() == [[False, False, False, True]]
    # at least one token is chosen even for a tiny ratio (max(floor(r n), 1))
    assert clip_cov_mask(LOGP, ADV, ones, none, cov_ratio=1e-4).sum() == 1


def test_sil_zeroes_cov_tokens_and_matches_ppo_elsewhere():
    logp = LOGP.clone().requires_grad_(True)
    behav = LOGP.clone()  # ratio 1: nothing clipped
    inputs = LossInputs(ADV, torch.ones_like(ADV), behav_logp=behav)
    out = POLICY_LOSSES["sil"](logp, inputs, cov_ratio=0.5)
    # ppo value at ratio 1 is -A; tokens 0 and 3 are removed by Clip-Cov
    close(out.loss_BT, [[0.0, -2.0, 2.0, 0.0]])
    close(torch.autograd.grad(out.loss_BT.sum(), logp)[0], [[0.0, -2.0, 2.0, 0.0]])
    close(out.stats["clip_cov_frac"], 0.5)
    # with an empty cov window sil is PPO-clip against behav_logp
    gen = torch.Generator().manual_seed(1)
    lp = -torch.rand(3, 4, generator=gen, dtype=F64)
    inp = LossInputs(torch.randn(3, generator=gen, dtype=F64), torch.ones(3, 4),
                     behav_logp=lp + 0.3 * torch.randn(3, 4, generator=gen, dtype=F64))
    close(POLICY_LOSSES["sil"](lp, inp, cov_lb=1e9, cov_ub=1e9).loss_BT,
          POLICY_LOSSES["ppo_clip"](lp, inp, ratio_to="behav").loss_BT, atol=1e-12)


def test_sil_reproducible_with_generator():
    gen = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 50, generator=gen, dtype=F64) * 5
    inp = LossInputs(torch.randn(4, generator=gen, dtype=F64), torch.ones(4, 50), behav_logp=lp)
    a = POLICY_LOSSES["sil"](lp, inp, cov_lb=0.0, generator=torch.Generator().manual_seed(9)).loss_BT
    b = POLICY_LOSSES["sil"](lp, inp, cov_lb=0.0, generator=torch.Generator().manual_seed(9)).loss_BT
    assert torch.equal(a, b)


def test_sil_needs_behav():
    with pytest.raises(ValueError, match="behav_logp"):
        POLICY_LOSSES["sil"](LOGP, LossInputs(ADV, torch.ones_like(ADV), old_logp=LOGP))
