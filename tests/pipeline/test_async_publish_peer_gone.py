"""The explorer dies while the trainer waits, in a weight publish, for it to load the previous version, and no
restart is left (pipeline.explorer_restarts): the run stops with ExplorerDied and a checkpoint of the last
step it logged, as when the death is noticed while waiting for a batch."""

import os
import signal

import pytest

from offpolicy.config import load_config
from offpolicy.train.checkpoint import latest_checkpoint
from offpolicy.train.metrics import read_metrics

ARGS = ["train.steps=6", "rollout.prompts_per_step=4", "rollout.group_size=4", "tasks.eval_size=8", "eval.every=0",
        "pipeline.mode=async", "pipeline.sync_offset=1", "pipeline.explorer_restarts=0", "checkpoint.every=0",
        "run.progress=false", "run.loggers=[]", "run.save_final=false", "train.threads=1",
        "pipeline.explorer_threads=1"]


def test_explorer_dying_during_a_publish_stops_with_a_checkpoint(tmp_path, monkeypatch):
    from offpolicy.pipeline import asynchronous
    from offpolicy.pipeline.weights import PeerGone, WeightChannel

    real = WeightChannel.publish

    def publish(self, model, version, *, after_loaded, timeout=600.0, alive=None):
        if version == 3 and alive is not None:  # the trainer's publish after step 3: the explorer dies meanwhile
            proc = alive.__self__
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(30)
            raise PeerGone("the other process died while waiting for the explorer to load weight version 2")
        return real(self, model, version, after_loaded=after_loaded, timeout=timeout, alive=alive)

    monkeypatch.setattr(WeightChannel, "publish", publish)
    run_dir = tmp_path / "run"
    cfg = load_config(None, [*ARGS, f"run.dir={run_dir}"])
    with pytest.raises(asynchronous.ExplorerDied):
        asynchronous.run_async(cfg, log=lambda *a: None)
    steps = [r["step"] for r in read_metrics(run_dir, "train")]
    assert steps[:3] == [1, 2, 3]
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None, "no checkpoint: the trained steps are lost"
    assert int(ckpt.name.removeprefix("step-")) == steps[-1]


def test_explorer_dying_during_a_publish_is_restarted(tmp_path, monkeypatch):
    from offpolicy.pipeline import asynchronous
    from offpolicy.pipeline.weights import PeerGone, WeightChannel

    real, killed = WeightChannel.publish, []

    def publish(self, model, version, *, after_loaded, timeout=600.0, alive=None):
        if version == 3 and alive is not None and not killed:
            proc = alive.__self__
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(30)
            killed.append(proc.pid)
            raise PeerGone("the other process died while waiting for the explorer to load weight version 2")
        return real(self, model, version, after_loaded=after_loaded, timeout=timeout, alive=alive)

    monkeypatch.setattr(WeightChannel, "publish", publish)
    run_dir = tmp_path / "run"
    cfg = load_config(None, [*ARGS, f"run.dir={run_dir}", "pipeline.explorer_restarts=1"])
    asynchronous.run_async(cfg, log=lambda *a: None)
    rows = read_metrics(run_dir, "train")
    assert [r["step"] for r in rows] == list(range(1, 7)) and rows[-1]["explorer_restarts"] == 1
    assert all(0 <= r["staleness_min"] and r["staleness_max"] <= 1 for r in rows)
