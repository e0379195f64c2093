"""OPA-DPO token weights (docs/algorithms.md §8): a revised span's weights from a token diff, and the
pipeline's pairwise ``dpo`` loss reading them (hand values; the §8 check numbers)."""

import math

import pytest
import torch

from offpolicy.algos import POLICY_LOSSES, LossInputs
from offpolicy.data.experience import Experience, collate
from offpolicy.pipeline.opa_dpo import span_weights

F64 = torch.float64


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_revised_span_weights_on_the_bundled_tokens():
    from offpolicy.rollout.model import BUNDLED, load_tokenizer

    tok = load_tokenizer(BUNDLED)
    # 44+29: the slipped "63" revised to "73": the tens digit is the revised span, the units and EOS are kept
    wc, wr = span_weights(_ids(tok, "63"), _ids(tok, "73"), chosen_weight=2.5, rejected_weight=2.0)
    assert (wc, wr) == ([2.5, 1.0, 1.0], [2.0, 1.0, 1.0])
    # "-522" -> "-53": "22" replaced by "3"; both sides' changed tokens weigh, '-', '5', EOS stay 1
    wc, wr = span_weights(_ids(tok, "-522"), _ids(tok, "-53"), chosen_weight=2.5, rejected_weight=2.5)
    assert (wc, wr) == ([1.0, 1.0, 2.5, 1.0], [1.0, 1.0, 2.5, 2.5, 1.0])
    # an inserted token weighs in y_rev only; a removed one in y_gen only; no revision, no weight
    assert span_weights([5, 2], [1, 5, 2], chosen_weight=2.5, rejected_weight=2.5) == ([2.5, 1.0, 1.0], [1.0, 1.0])
    assert span_weights([9, 5, 2], [5, 2], chosen_weight=2.5, rejected_weight=2.5) == ([1.0, 1.0], [2.5, 1.0, 1.0])
    assert span_weights([5, 2], [5, 2], chosen_weight=2.5, rejected_weight=2.5) == ([1.0, 1.0], [1.0, 1.0])


def test_pipeline_dpo_loss_reads_token_weights_hand_value():
    # the §8 check: Delta_c = [.5, -.2, .1, 0], Delta_r = [-.3, .4, -.1, 0], w_c = [1, 2.5, 1, 0],
    # w_r = [1, 1, 1, 0], beta = 0.1: weighted Delta_c = .5 - .5 + .1 = 0.1, Delta_r = 0
    # -> -log sigmoid(0.01) = ln 2 - 0.01/2 + 0.01^2/8 = 0.688160 (§8: 0.6882); unweighted: -log sigmoid(0.04) = 0.673347
    logp = torch.tensor([[0.5, -0.2, 0.1, 0.0], [-0.3, 0.4, -0.1, 0.0]], dtype=F64, requires_grad=True)
    w = torch.tensor([[1.0, 2.5, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]], dtype=F64)
    inputs = LossInputs(adv=torch.zeros(2), mask=torch.ones(2, 4), ref_logp=torch.zeros(2, 4, dtype=F64), weights=w)
    out = POLICY_LOSSES["dpo"](logp, inputs, beta=0.1)
    loss = out.loss_BT.sum() / 2  # seq_mean_token_sum over the two rows = the mean over pairs
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.01)), abs=1e-6)
    assert loss.item() == pytest.approx(0.688160, abs=1e-6)
    loss.backward()
    # d loss / d logp_t = -beta * sigmoid(-z) * w_t (chosen), +beta * sigmoid(-z) * w_t (rejected); z = 0.01
    g = 0.1 / (1 + math.exp(0.01))
    torch.testing.assert_close(logp.grad, torch.tensor([[-g, -2.5 * g, -g, 0.0], [g, g, g, 0.0]], dtype=F64),
                               atol=1e-7, rtol=0)
    unweighted = POLICY_LOSSES["dpo"](logp.detach(), inputs._replace(weights=None), beta=0.1)
    assert (unweighted.loss_BT.sum() / 2).item() == pytest.approx(0.673347, abs=1e-6)


def test_token_weights_survive_collate_select_and_the_buffer_bytes():
    def exp(resp, weights):
        n = len(resp)
        return Experience(torch.tensor([1, 2]), torch.tensor(resp), torch.ones(n), torch.zeros(n), 1.0, "g", "t",
                          token_weights=None if weights is None else torch.tensor(weights))

    a, b = exp([3, 4, 5], [2.5, 1.0, 1.0]), exp([6, 7], None)
    batch = collate([a, b], pad_id=0)
    torch.testing.assert_close(batch.weights_BT, torch.tensor([[2.5, 1.0, 1.0], [1.0, 1.0, 0.0]]))
    torch.testing.assert_close(batch.select(torch.tensor([1])).weights_BT, torch.tensor([[1.0, 1.0, 0.0]]))
    assert collate([b], pad_id=0).weights_BT is None  # no row has weights: the loss sees None (weight 1)
    back = Experience.from_bytes(*a.to_bytes())
    torch.testing.assert_close(back.token_weights, a.token_weights)
