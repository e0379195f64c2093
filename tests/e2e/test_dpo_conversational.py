"""A preference file in the standard format with text and conversational rows trains through
`offpolicy train algorithm.preset=dpo tasks.name=pairs ...` without conversion (issue 14).

The bundled model has no chat template, so a conversational row is its messages' text
(offpolicy.data.pairs.plain_rendering): a file whose rows alternate between the two kinds trains on the
same tokens as the all-text file, and the run's numbers are the same. A model with a chat template (the
smoke Qwen2 folder, ChatML) trains on its rendering. JSON lines, Parquet and a `datasets` folder all feed
the command; a row that cannot be read or rendered stops it before training, naming its file:line.
"""

import json

import pytest

from offpolicy.cli import main
from offpolicy.data.pairs import arithmetic_pairs, pair_row, write_pairs
from offpolicy.train.metrics import read_metrics

STEPS = ["train.steps=20", "eval.every=10", "run.loggers=[]", "run.save_final=false", "train.threads=1",
         "run.progress=false"]


def mixed_file(path, pairs):
    """Every other row conversational (messages), the rest plain text."""
    path.write_text("".join(json.dumps(pair_row(p, conversational=i % 2 == 1)) + "\n" for i, p in enumerate(pairs)))
    return path


@pytest.fixture(scope="module")
def pairs():
    return arithmetic_pairs("train", 1000, seed=0), arithmetic_pairs("eval", 64, seed=0)


def train(run_dir, train_path, eval_path, *extra):
    rc = main(["train", "algorithm.preset=dpo", "tasks.name=pairs", f"tasks.train_path={train_path}",
               f"tasks.eval_path={eval_path}", f"run.dir={run_dir}", *STEPS, *extra])
    assert rc == 0
    return read_metrics(run_dir, "eval")


def test_a_mixed_file_trains_as_the_text_file_does(pairs, tmp_path):
    train_pairs, held = pairs
    mixed = train(tmp_path / "mixed", mixed_file(tmp_path / "mixed.jsonl", train_pairs),
                  mixed_file(tmp_path / "mixed_eval.jsonl", held))
    assert sum('"role"' in line for line in (tmp_path / "mixed.jsonl").read_text().splitlines()) == 500
    assert [r["step"] for r in mixed] == [0, 10, 20]
    assert mixed[0]["preference_accuracy"] == 0.5  # policy = reference: every pair a tie
    assert mixed[-1]["preference_accuracy"] > 0.6 and mixed[-1]["reward_margin"] > 0
    text = train(tmp_path / "text", write_pairs(tmp_path / "text.jsonl", train_pairs),
                 write_pairs(tmp_path / "text_eval.jsonl", held))
    for a, b in zip(mixed, text):  # the same tokens, the same seed: the same run
        assert a["preference_accuracy"] == pytest.approx(b["preference_accuracy"], abs=1e-9)
        assert a["reward_margin"] == pytest.approx(b["reward_margin"], rel=1e-5, abs=1e-6)


def test_parquet_and_datasets_sources_train(pairs, tmp_path):
    pa = pytest.importorskip("pyarrow")
    datasets = pytest.importorskip("datasets")
    import pyarrow.parquet as pq

    train_pairs, held = pairs
    pq.write_table(pa.Table.from_pylist([pair_row(p) for p in train_pairs[:200]]), tmp_path / "train.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([pair_row(p, conversational=True) for p in held])}
                         ).save_to_disk(str(tmp_path / "held_ds"))
    evals = train(tmp_path / "run", tmp_path / "train.parquet", tmp_path / "held_ds", "train.steps=10",
                  "eval.every=10")
    assert [r["step"] for r in evals] == [0, 10] and evals[0]["preference_accuracy"] == 0.5
    assert evals[-1]["preference_accuracy"] > 0.5


def test_conversational_pairs_with_a_chat_template(pairs, tmp_path, smoke_model_dir):
    """A ChatML model folder trains on the mixed file (its conversational rows through the template)."""
    train_pairs, held = pairs
    evals = train(tmp_path / "run", mixed_file(tmp_path / "m.jsonl", train_pairs[:64]),
                  mixed_file(tmp_path / "e.jsonl", held[:16]), f"model.path={smoke_model_dir}", "train.steps=2",
                  "eval.every=2", "rollout.prompts_per_step=8")
    assert [r["step"] for r in evals] == [0, 2] and evals[0]["preference_accuracy"] == 0.5
    assert evals[-1]["preference_accuracy"] != 0.5  # the policy moved away from the reference


@pytest.mark.parametrize("row, message", [
    ({"prompt": [{"role": "human", "content": "1+1="}], "chosen": [{"role": "assistant", "content": "2"}],
      "rejected": [{"role": "assistant", "content": "3"}]}, "field 'prompt' message 0 has role 'human'"),
    ({"prompt": [{"role": "user", "content": "1+1="}], "chosen": [{"role": "assistant"}],
      "rejected": [{"role": "assistant", "content": "3"}]}, "field 'chosen' message 0 must be an object"),
    ({"prompt": [{"role": "user", "content": "1+1="}],
      "chosen": [{"role": "assistant", "content": "2"}, {"role": "user", "content": "ok"}],
      "rejected": [{"role": "assistant", "content": "3"}]}, "'chosen' response must end with an assistant"),
    # readable rows, but text the bundled (digits-only) tokenizer cannot encode: refused before training
    ({"prompt": [{"role": "user", "content": "What is 1+1?"}], "chosen": [{"role": "assistant", "content": "2"}],
      "rejected": [{"role": "assistant", "content": "3"}]}, "the prompt holds text the tokenizer cannot encode"),
])
def test_a_bad_row_stops_the_command_before_training_naming_file_and_line(pairs, tmp_path, capsys, row, message):
    f = mixed_file(tmp_path / "p.jsonl", pairs[0][:5])
    f.write_text(f.read_text() + json.dumps(row) + "\n")
    rc = main(["train", "algorithm.preset=dpo", "tasks.name=pairs", f"tasks.train_path={f}",
               f"run.dir={tmp_path / 'run'}", *STEPS])
    err = capsys.readouterr().err
    assert rc == 2 and f"{f}:6: " in err and message in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained, nothing evaluated
