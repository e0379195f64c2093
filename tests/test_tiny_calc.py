"""The bundled calculator agent (assets/tiny-calc): tokenizer, loading, the SFT mixture's masking, the
rollout loop's tool protocol, the warm start's measured behaviour, reproducible pretraining."""

import hashlib
import random

import pytest
import torch

from offpolicy.data import calculator
from offpolicy.train.tiny_calc import DEFAULT_DIR, _sft_batch, measure, pretrain_tiny_calc, rollout


@pytest.fixture(scope="module")
def policy():
    from offpolicy.rollout.model import load_policy

    torch.manual_seed(0)
    return load_policy(str(DEFAULT_DIR))


def test_bundled_calc_tokenizer_round_trips_its_alphabet(policy):
    model, tok = policy
    assert 0.4e6 <= sum(p.numel() for p in model.parameters()) <= 1e6
    assert model.config.max_position_embeddings >= 40  # longest episode: <bos>999*999=[999*999]{998001}998001<eos> = 33
    assert len(tok) == 3 + len(calculator.ALPHABET)
    for text in (calculator.ALPHABET, "482*77=[482*77]{37114}37114", "482*77=[482*]{?}37094", "12-50=-38"):
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
        assert tok.pad_token_id not in ids  # <pad> is also the unknown token: every character is known
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_sft_labels_train_the_call_and_answer_but_not_the_observation():
    tok = _tokenizer()
    task = calculator.Task("t", "48*7=", "336")
    ids, labels = _sft_batch(tok, [task], random.Random(0), tool_frac=1.0)
    text = "48*7=[48*7]{336}336"
    assert ids[0].tolist() == tok(text)["input_ids"] + [tok.eos_token_id]
    trained = "".join(ch if lab != -100 else "." for ch, lab in zip(" " + text, labels[0][:-1].tolist()))
    assert trained == "......[48*7].....336" and labels[0, -1] == tok.eos_token_id  # <bos> and prompt: untrained
    ids, labels = _sft_batch(tok, [task], random.Random(0), tool_frac=0.0)
    assert ids[0].tolist() == tok("48*7=336")["input_ids"] + [tok.eos_token_id]
    assert (labels[0] != -100).sum() == 4  # "336" and <eos>


def _tokenizer():
    from offpolicy.train.tiny import build_tokenizer

    return build_tokenizer(alphabet=calculator.ALPHABET)


def test_rollout_appends_the_calculators_answer_as_untrained_tokens(policy):
    model, tok = policy
    tasks = calculator.generate("eval", 32, seed=1)
    eps = rollout(model, tok, tasks, n=4, generator=torch.Generator().manual_seed(0))
    assert len(eps) == 128 and [e.task_index for e in eps[:8]] == [0, 0, 0, 0, 1, 1, 1, 1]
    called = [e for e in eps if e.calls]
    assert called and len(called) < len(eps)
    for e in eps:
        assert len(e.ids) == len(e.trained)
        text = tok.decode(e.ids, skip_special_tokens=True)
        assert e.success == (e.answer == tasks[e.task_index].answer)
        untrained = "".join(tok.decode([i]) for i, tr in zip(e.ids, e.trained) if not tr)
        expected = "<bos>" + tasks[e.task_index].prompt + "".join("{" + calculator.calculate(c) + "}" for c in e.calls)
        assert untrained == expected
        if e.calls and e.answer:
            assert text.endswith("]{" + calculator.calculate(e.calls[-1]) + "}" + e.answer)


def test_warm_start_calls_the_tool_in_a_minority_of_samples_and_copies_its_result(policy):
    model, tok = policy
    # measured with these seeds: tool_rate 0.277, copy_accuracy 0.972, greedy_success 0.078
    m = measure(model, tok, calculator.generate("eval", 64, seed=0), samples=4, seed=0)
    assert 0.15 <= m["tool_rate"] <= 0.40
    assert m["copy_accuracy"] >= 0.85
    assert m["greedy_success"] <= 0.3
    assert m["sampled_success"] <= m["tool_rate"] + 0.05  # a direct answer is (almost) never right


def _digest(folder):
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_pretrain_same_seed_same_weights(tmp_path):
    quiet = lambda *a: None  # noqa: E731
    a = pretrain_tiny_calc(tmp_path / "a", seed=3, steps=3, batch_size=8, eval_n=4, log=quiet)
    b = pretrain_tiny_calc(tmp_path / "b", seed=3, steps=3, batch_size=8, eval_n=4, log=quiet)
    c = pretrain_tiny_calc(tmp_path / "c", seed=4, steps=3, batch_size=8, eval_n=4, log=quiet)
    assert _digest(a.path) == _digest(b.path)
    assert _digest(a.path) != _digest(c.path)
    assert a.metrics == b.metrics
