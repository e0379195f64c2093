"""The bundled model: loads with the Auto classes, tokenizer round-trips, pretraining is reproducible."""

import hashlib

import torch

from offpolicy.rollout.model import BUNDLED


def test_bundled_model_loads_with_auto_classes():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(BUNDLED)
    n = sum(p.numel() for p in model.parameters())
    assert 0.4e6 <= n <= 3e6
    tok = AutoTokenizer.from_pretrained(BUNDLED)
    for text in ("37+48=85", "12-65=-53", "45+61-5=101"):
        ids = tok(text)["input_ids"]
        assert len(ids) == len(text) + 1  # one token per character, plus BOS
        assert tok.decode(ids, skip_special_tokens=True) == text


def _digest(folder):
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_pretrain_same_seed_same_weights(tmp_path):
    from offpolicy.train.tiny import pretrain_tiny

    quiet = lambda *a: None  # noqa: E731
    a = pretrain_tiny(tmp_path / "a", seed=3, steps=4, eval_n=8, log=quiet)
    b = pretrain_tiny(tmp_path / "b", seed=3, steps=4, eval_n=8, log=quiet)
    c = pretrain_tiny(tmp_path / "c", seed=4, steps=4, eval_n=8, log=quiet)
    assert _digest(a.path) == _digest(b.path)
    assert _digest(a.path) != _digest(c.path)
    assert torch.equal(torch.tensor(a.accuracy), torch.tensor(b.accuracy))
