"""A trainer group that fails (TrainerDied, weights intact) at step s stops with a checkpoint of step s - 1. That
checkpoint's explorer cursors must be those after batch s - 2 (the resume regenerates batch s - 1 from them), not
those after batch s - 1, which the explorers had already reported when step s started: with those, the resumed
run would give batch s - 1 the tasks of batch s and skip a batch's worth of the task stream."""

import json

import pytest

pytest.importorskip("ray")

from offpolicy.config import load_config  # noqa: E402
from offpolicy.train.checkpoint import latest_checkpoint  # noqa: E402

P = 4
ARGS = ["train.steps=6", f"rollout.prompts_per_step={P}", "rollout.group_size=4", "tasks.eval_size=8", "eval.every=0",
        "pipeline.mode=ray", "checkpoint.every=0", "run.progress=false", "run.loggers=[]", "run.save_final=false",
        "train.threads=1", "pipeline.explorer_threads=1"]


@pytest.mark.slow  # a long end-to-end run: make test-slow (CI runs it)
def test_checkpoint_after_a_trainer_failure_holds_the_cursor_of_its_step(tmp_path, monkeypatch):
    import ray

    from offpolicy.pipeline import ray_runner
    from offpolicy.train.step import train_step

    def failing(model, optimizer, batch, algo, plan, **kw):
        if kw.get("step") == 4:
            raise ray_runner.TrainerDied("a rank died before the optimiser step", intact=True)
        return train_step(model, optimizer, batch, algo, plan, **kw)

    monkeypatch.setattr(ray_runner, "train_step", failing)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        with pytest.raises(ray_runner.TrainerDied):
            ray_runner.run_ray(load_config(None, [*ARGS, f"run.dir={tmp_path / 'run'}"]), log=lambda *a: None)
    finally:
        ray.shutdown()
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "step-00000003"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["next_batch"] == 3
    assert [c["tasks_consumed"] for c in state["explorers"]] == [3 * P]  # after batches 0, 1, 2
    assert state["explorer"]["tasks_consumed"] == 3 * P
