"""The pairwise DPO / IPO policy loss (offpolicy.algos.preference): hand values, layout, gradient."""

import math

import pytest
import torch

from offpolicy.algos import POLICY_LOSSES, LossInputs, reads_of


def _run(logp, ref, mask, **kw):
    logp = torch.tensor(logp, requires_grad=True)
    out = POLICY_LOSSES["dpo"](logp, LossInputs(adv=torch.zeros(len(mask)), mask=torch.tensor(mask, dtype=torch.float),
                                                ref_logp=torch.tensor(ref)), **kw)
    loss = out.loss_BT.sum() / len(mask)  # seq_mean_token_sum over the rows = the mean over pairs
    return loss, out.stats, logp


def test_dpo_hand_value_and_gradient():
    # pair: chosen row delta (0.5, 0.3) sums to 0.8, rejected row 0 -> z = 0.1 * 0.8 = 0.08
    # -log sigmoid(0.08) = 0.653947; d loss / d logp_chosen_t = -beta * sigmoid(-0.08) = -0.048001 per token
    loss, stats, logp = _run([[-1.0, -2.0], [-1.5, -7.0]], [[-1.5, -2.3], [-1.5, 0.0]], [[1, 1], [1, 0]], beta=0.1)
    assert loss.item() == pytest.approx(0.653947, abs=1e-6)
    loss.backward()
    g = -0.1 / (1 + math.exp(0.08))
    torch.testing.assert_close(logp.grad, torch.tensor([[g, g], [-g, 0.0]]), atol=1e-6, rtol=0)
    assert stats["preference_accuracy"].item() == 1.0
    assert stats["reward_margin"].item() == pytest.approx(0.08, abs=1e-6)
    assert stats["logp_chosen"].item() == pytest.approx(-3.0) and stats["logp_rejected"].item() == pytest.approx(-1.5)


def test_rpo_nll_term_hand_value_and_gradient():
    # the pair of the DPO test, chosen logp (-1, -2): NLL per token = 1.5; loss = 0.653947 + 0.5 * 1.5
    # gradient on the chosen tokens: the DPO part -0.048001 plus 0.5 * (-1/2) per token
    loss, stats, logp = _run([[-1.0, -2.0], [-1.5, -7.0]], [[-1.5, -2.3], [-1.5, 0.0]], [[1, 1], [1, 0]], beta=0.1,
                             nll_coef=0.5)
    assert loss.item() == pytest.approx(0.653947 + 0.75, abs=1e-6)
    assert stats["nll_chosen"].item() == pytest.approx(1.5)
    loss.backward()
    g = -0.1 / (1 + math.exp(0.08))
    torch.testing.assert_close(logp.grad, torch.tensor([[g - 0.25, g - 0.25], [-g, 0.0]]), atol=1e-6, rtol=0)


def test_ipo_hand_value_and_log2_at_the_reference():
    # chosen delta (0.5, 0.1): mean 0.3; rejected (-0.3): mean -0.3 -> h = 0.6; (0.6 - 1/(2*0.1))^2 = 19.36
    loss, _, _ = _run([[0.5, 0.1], [-0.3, 9.0]], [[0.0, 0.0], [0.0, 0.0]], [[1, 1], [1, 0]], beta=0.1, loss_type="ipo")
    assert loss.item() == pytest.approx(19.36, abs=1e-5)
    same, _, _ = _run([[-1.0, -2.0], [-0.5, -3.0]] * 2, [[-1.0, -2.0], [-0.5, -3.0]] * 2, [[1, 1], [1, 1]] * 2)
    assert same.item() == pytest.approx(math.log(2), abs=1e-7)  # every pair at the reference: log 2


def test_declares_ref_logp_and_refuses_an_odd_batch():
    assert reads_of("policy_loss", "dpo") == {"ref_logp"}
    with pytest.raises(ValueError, match="even number of rows"):
        _run([[0.0]] * 3, [[0.0]] * 3, [[1]] * 3)


def test_ipo_refuses_label_smoothing_rather_than_ignoring_it():
    # label smoothing is a term of the sigmoid (cDPO) loss; IPO's squared loss has none, and the value was dropped
    with pytest.raises(ValueError, match="label_smoothing=0.1.*loss_type='sigmoid'"):
        _run([[-1.0], [-1.0]], [[-1.0], [-1.0]], [[1], [1]], loss_type="ipo", label_smoothing=0.1)
