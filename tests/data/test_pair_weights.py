"""Optional token weights of a preference pair (chosen_weights / rejected_weights): read, checked with the
row's place, written back, and carried by the pairs workflow into the experiences."""

import json

import pytest

from offpolicy.data.pairs import load_pairs, write_pairs
from offpolicy.data.task_files import DatasetError
from offpolicy.rollout.model import BUNDLED, load_tokenizer

ROW = {"prompt": "44+29=", "chosen": "73", "rejected": "63"}


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_weights_are_read_written_back_and_reach_the_experiences(tmp_path):
    from offpolicy.rollout.pairs import PairsWorkflow
    from offpolicy.rollout.workflow import Sampling

    f = jsonl(tmp_path / "p.jsonl", [{**ROW, "chosen_weights": [2.5, 1, 1], "rejected_weights": [2.5, 1, 1]}, ROW])
    weighted, plain = load_pairs(f)
    assert weighted.chosen_weights == (2.5, 1.0, 1.0) and plain.chosen_weights is None
    assert load_pairs(write_pairs(tmp_path / "back.jsonl", [weighted, plain])) == [
        p.__class__(**{**p.__dict__, "pair_id": f"back-{i + 1}", "where": f"{tmp_path / 'back.jsonl'}:{i + 1}"})
        for i, p in enumerate((weighted, plain))]
    exps = PairsWorkflow()(None, load_tokenizer(BUNDLED), [weighted, plain], None, sampling=Sampling())
    assert exps[0].token_weights.tolist() == [2.5, 1.0, 1.0] and exps[1].info["role"] == "rejected"
    assert exps[2].token_weights is None


@pytest.mark.parametrize("field, value, message", [
    ("chosen_weights", [], "must be a non-empty list of numbers"),
    ("chosen_weights", "2.5", "must be a non-empty list of numbers"),
    ("rejected_weights", [1, "x"], "item 1 must be a finite number >= 0"),
    ("rejected_weights", [1, -1.0], "item 1 must be a finite number >= 0"),
    ("chosen_weights", [1, True], "item 1 must be a finite number >= 0"),
])
def test_bad_weights_name_the_row(tmp_path, field, value, message):
    f = jsonl(tmp_path / "p.jsonl", [ROW, {**ROW, field: value}])
    with pytest.raises(DatasetError, match=f"{f}:2: field '{field}' {message}"):
        load_pairs(f)


def test_a_weight_count_that_does_not_match_the_tokens_names_the_row(tmp_path):
    from offpolicy.rollout.pairs import PairsWorkflow
    from offpolicy.rollout.workflow import Sampling

    from offpolicy.data.pairs import encode_pairs

    f = jsonl(tmp_path / "p.jsonl", [ROW, {**ROW, "chosen_weights": [2.5, 1.0]}])  # "73" + EOS is 3 tokens
    message = f"{f}:2: field 'chosen_weights' has 2 weights but the response has 3 tokens"
    with pytest.raises(DatasetError, match=message):  # at start-up, when a run encodes its pairs
        encode_pairs(load_tokenizer(BUNDLED), load_pairs(f))
    with pytest.raises(DatasetError, match=message):
        PairsWorkflow()(None, load_tokenizer(BUNDLED), load_pairs(f), None, sampling=Sampling())
