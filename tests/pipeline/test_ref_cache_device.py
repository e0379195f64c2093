"""The reference log-probs of preference pairs are computed where the reference model lives: the pairs'
batch is collated on the CPU, so the cache (and the held-out evaluations of pairs) must move it to the
model's device first, as the training step does. On the CPU only the move is checked (a model whose
parameter sits on the meta device); the CUDA test runs the real thing and is skipped without a GPU."""

import pytest
import torch

import offpolicy.train.step as step_mod
from offpolicy.data.pairs import arithmetic_pairs
from offpolicy.pipeline.ref_cache import RefCache
from offpolicy.rollout.model import load_policy
from offpolicy.rollout.pairs import PairsWorkflow
from offpolicy.rollout.workflow import Sampling


def test_fill_runs_the_reference_on_its_device(monkeypatch):
    _, tok = load_policy("bundled")
    exps = PairsWorkflow()(None, tok, arithmetic_pairs("train", 2, seed=0), None, sampling=Sampling())
    model = torch.nn.Linear(1, 1, device="meta")  # stands for a model on another device than the batch
    seen = []

    def fake_logp(m, batch, **kw):
        seen.append(batch.input_ids_BL.device)
        return torch.zeros(batch.response_ids_BT.shape), None

    monkeypatch.setattr(step_mod, "response_logp", fake_logp)
    out = RefCache(model, pad_id=tok.pad_token_id).fill(exps)
    assert seen == [torch.device("meta")]
    assert all(e.ref_logp.device.type == "cpu" and len(e.ref_logp) == len(e.response_ids) for e in out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pairs_on_cuda():
    from types import SimpleNamespace

    from offpolicy.pipeline.opa_dpo import pair_accuracy
    from offpolicy.rollout.model import reference_policy

    model, tok = load_policy("bundled", device="cuda")
    pairs = arithmetic_pairs("eval", 8, seed=0)
    ref = reference_policy(model)
    exps = RefCache(ref, pad_id=tok.pad_token_id).fill(PairsWorkflow()(None, tok, pairs, None, sampling=Sampling()))
    assert all(e.ref_logp is not None for e in exps)
    res = PairsWorkflow().evaluate(SimpleNamespace(model=model, ref_model=ref, tokenizer=tok), pairs)
    assert res["preference_accuracy"] == 0.5  # policy = reference: every pair a tie
    assert 0.0 <= pair_accuracy(model, tok, pairs) <= 1.0
