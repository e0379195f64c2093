"""A run that fails while it is being set up: the error is clear (no traceback) and in run.log once the run
directory exists; a failed resume leaves the run as it was; a directory whose run never trained a step can be
used again (its files moved aside, not deleted); checks that need no model fail before one loads."""

import json

import pytest

from offpolicy.cli import main
from offpolicy.config import ConfigError, load_config
from offpolicy.pipeline.context import make_run_dir, reward_function
from offpolicy.train import metrics

SMALL = ["rollout.prompts_per_step=4", "rollout.group_size=4", "tasks.eval_size=8", "eval.every=0",
         "run.progress=false", "run.save_final=false", "train.threads=1"]


def _last_log_line(run_dir) -> str:
    return (run_dir / "run.log").read_text().rstrip().splitlines()[-1]


def test_a_failed_resume_with_another_lora_rank_names_it_and_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "model.lora.r=8", "train.steps=2", "run.loggers=[]", f"run.dir={run}", *SMALL]) == 0
    kept = {name: (run / name).read_bytes() for name in ("config.json", "config.yaml", "plan.json")}
    capsys.readouterr()
    for r, built in (("0", "model.lora.r=0 (full fine-tuning)"), ("4", "model.lora.r=4")):
        assert main(["train", "--resume", str(run), "--allow-changed-config", f"model.lora.r={r}"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert f"holds a LoRA adapter of rank 8, but this run's {built} does not fit it; resume with model.lora.r=8" in err
        assert "model.lora.r:" in _last_log_line(run)  # the error is in run.log too
        assert {name: (run / name).read_bytes() for name in kept} == kept  # config.json still says r=8
    assert main(["train", "--resume", str(run)]) == 0  # so the plain resume still works


class _Unreachable:
    """A tracker whose service refuses the run, as W&B does without a login."""

    module, extra = "json", None

    def __init__(self, run_dir, project, config):
        raise RuntimeError("No API key configured.\nUse `wandb login` to log in.")


def test_a_tracker_that_cannot_start_is_one_clear_error_and_the_directory_can_be_used_again(tmp_path, capsys,
                                                                                             monkeypatch):
    monkeypatch.setitem(metrics.TRACKERS, "wandb", _Unreachable)
    run = tmp_path / "run"
    assert main(["train", "train.steps=1", "run.loggers=[wandb]", f"run.dir={run}", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        "offpolicy: error: run.loggers: wandb could not start its run: RuntimeError: No API key configured. Use "
        "`wandb login` to log in. — to run without it: WANDB_MODE=offline")
    assert "run.loggers=[]" in err
    assert _last_log_line(run).startswith("error: TrackerError: run.loggers: wandb could not start its run")
    assert not (run / "config.yaml").exists()

    assert main(["train", "train.steps=1", "run.loggers=[]", f"run.dir={run}", *SMALL]) == 0  # not refused
    out = capsys.readouterr().out
    aside = [p for p in run.iterdir() if p.name.startswith("aborted-")]
    assert len(aside) == 1 and f"moved to {aside[0]}" in out
    assert "TrackerError" in _last_log_line(aside[0])  # the failed attempt's files are kept, not deleted
    assert "TrackerError" not in (run / "run.log").read_text()
    assert len(metrics.read_metrics(run, "train")) == 1


def test_a_directory_whose_run_trained_is_still_refused(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 0}) + "\n"
                                            + json.dumps({"kind": "train", "step": 1}) + "\n")
    with pytest.raises(ConfigError, match=r"run.dir: .* already holds a run that trained \(steps in metrics.jsonl\)"):
        make_run_dir(cfg)
    assert (tmp_path / "metrics.jsonl").exists() and not any(tmp_path.glob("aborted-*"))


def test_a_directory_whose_run_only_evaluated_is_reused_with_its_files_moved_aside(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 0}) + "\n")
    (tmp_path / "buffer.db").write_bytes(b"rows")
    (tmp_path / "notes.txt").write_text("mine")  # not a run's file: stays
    said = []
    assert make_run_dir(cfg, said.append) == tmp_path
    (aside,) = tmp_path.glob("aborted-*")
    assert sorted(p.name for p in aside.iterdir()) == ["buffer.db", "metrics.jsonl"]
    assert (tmp_path / "notes.txt").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert "stopped before its first training step" in said[0]


@pytest.mark.parametrize("setting", [["algorithm.preset=remix"], ["buffer.kind=memory"]])
def test_async_refusals_come_before_any_model_loads_or_directory_is_made(tmp_path, capsys, setting):
    run = tmp_path / "run"
    assert main(["train", "pipeline.mode=async", *setting, "train.steps=1", f"run.dir={run}", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("buffer.strategy=mix" in err or "buffer.kind=memory" in err)
    assert not run.exists()  # nothing to block a corrected rerun


def test_an_unknown_reward_gets_the_closest_name():
    with pytest.raises(ConfigError, match=r"unknown reward 'exact_mach' \(did you mean 'exact_match'\?\)"):
        reward_function(load_config(None, ["reward.function=exact_mach"]))
    with pytest.raises(ConfigError, match=r"unknown reward 'mth' \(did you mean 'math'\?\)"):
        reward_function(load_config(None, ["reward.function=mth:1.0,format:0.1"]))
