"""`offpolicy eval` measures a model the way a training run of the same config does: through the config's
workflow (multi-turn episodes for an agent), or by the workflow's own measure (preference accuracy of pairs);
pass@k only where the workflow generates answers."""

from pathlib import Path

import pytest

from offpolicy.cli import main
from offpolicy.data.pairs import arithmetic_pairs, write_pairs
from offpolicy.train.metrics import read_metrics

CALC = str(Path(__file__).parents[2] / "examples" / "calculator_agent.yaml")


def test_an_agent_is_evaluated_through_its_multi_turn_workflow(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", CALC, "train.steps=2", "tasks.eval_size=64", "rollout.prompts_per_step=4",
                 "rollout.group_size=4", f"run.dir={run}", "run.loggers=[]", "run.progress=false"]) == 0
    last = read_metrics(run, "eval")[-1]  # the run's own evaluation of its final weights
    assert last["step"] == 2 and last["accuracy"] > 0
    capsys.readouterr()
    assert main(["eval", "--model", str(run / "final"), "--config", CALC, "--k", "0", "tasks.eval_size=64"]) == 0
    out = capsys.readouterr().out
    # single-turn generation of these prompts never calls the tool: it scored 0.000
    assert "64 held-out calculator tasks, workflow multi_turn" in out
    assert f"greedy accuracy {last['accuracy']:.3f}  success {last['success']:.3f}" in out
    assert main(["eval", "--model", str(run / "final"), "--config", CALC, "--k", "4", "--limit", "8"]) == 0
    out = capsys.readouterr().out
    assert "8 held-out calculator tasks" in out and "pass@4" in out  # k sampled episodes per task


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return (write_pairs(d / "train.jsonl", arithmetic_pairs("train", 64, seed=0)),
            write_pairs(d / "eval.jsonl", arithmetic_pairs("eval", 20, seed=0)))


def test_pairs_are_evaluated_by_preference_accuracy_without_pass_at_k(pair_files, capsys):
    train, held = pair_files
    pairs = ["algorithm.preset=dpo", "tasks.name=pairs", f"tasks.train_path={train}", "rollout.group_size=2"]
    assert main(["eval", *pairs, f"tasks.eval_path={held}"]) == 0
    out = capsys.readouterr().out
    # the model against itself as the reference: every pair a tie
    assert "20 held-out pairs, reference bundled  preference_accuracy 0.500" in out and "pass@" not in out
    assert main(["eval", "--k", "4", *pairs, f"tasks.eval_path={held}"]) == 2
    assert "--k 4: workflow.name=pairs is evaluated by its own measure (pairs: preference accuracy" \
        in capsys.readouterr().err
    assert main(["eval", *pairs, "tasks.eval_size=8"]) == 0  # no tasks.eval_path: the first training pairs
    assert "8 training-set pairs (no tasks.eval_path)" in capsys.readouterr().out
