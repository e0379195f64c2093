"""An async run whose explorer process is killed (SIGKILL) mid-run restarts it, regenerates what it had not
reported, finishes, and the buffer's ledger shows nothing lost and nothing used twice."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from offpolicy.data.sql_buffer import SQLiteBuffer
from offpolicy.train.metrics import read_metrics

STEPS = 40
ARGS = [f"train.steps={STEPS}", "rollout.prompts_per_step=4", "rollout.group_size=4", "tasks.eval_size=8",
        "eval.every=0", "pipeline.mode=async", "pipeline.sync_offset=1", "run.progress=false", "run.loggers=[]",
        "train.threads=1", "pipeline.explorer_threads=1"]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _explorer_pid(trainer_pid: int) -> int | None:
    """The explorer: the first process the trainer spawned (``spawn_main``; the resource tracker is not one)."""
    spawned = []
    for child in _children(trainer_pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                spawned.append(child)
        except OSError:
            continue
    return min(spawned) if spawned else None


def test_killed_explorer_is_restarted_and_nothing_is_lost_or_used_twice(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "offpolicy.cli", "train", *ARGS, f"run.dir={run_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # wait for a few trained steps, then kill the explorer
            if (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir, "train")) >= 3:
                break
            time.sleep(0.2)
        victim = _explorer_pid(proc.pid)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "restarting it (1/3)" in out
    rows = read_metrics(run_dir, "train")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["explorer_restarts"] == 1
    assert all(r["staleness_max"] <= 1 for r in rows)  # within the bound sync_offset + interval - 1
    ledger = SQLiteBuffer(run_dir / "buffer.db").ledger()
    fates = [e.fate for e in ledger.values()]
    assert set(fates) <= {"used", "dropped", "available"}
    assert all(e.use_count <= 1 for e in ledger.values())  # nothing handed out twice
    assert fates.count("used") == STEPS * 16  # every step trained on exactly one full batch of rows


class _Dead:
    exitcode = -9

    def is_alive(self):
        return False


def _waiting_trainer(last_reported: int):
    """The trainer's side of the hand-off (no process): reports arrive through ``ready`` and ``reports``."""
    import queue
    import threading

    from offpolicy.pipeline.asynchronous import _ExplorerProcess

    side = object.__new__(_ExplorerProcess)
    side.pending, side.latest = {}, (last_reported, None)
    side.ready, side.reports, side.proc = threading.Semaphore(0), queue.Queue(), _Dead()
    return side


def _batch(e: int):
    import torch

    from offpolicy.data.experience import Experience

    return [Experience(torch.tensor([1]), torch.tensor([2]), torch.ones(1), torch.zeros(1), 0.0, f"g{e}", f"g{e}",
                       version=e, batch_index=e) for _ in range(2)]


def test_a_batch_put_but_not_reported_is_not_handed_to_the_trainer(tmp_path):
    """The explorer dies between putting batch 1 and reporting it: the trainer must not take those rows (they
    would count as used, yet the restart regenerates batch 1); the restart's roll-back drops them."""
    from offpolicy.data.sampling import make_strategy
    from offpolicy.pipeline.asynchronous import ExplorerDied
    from offpolicy.pipeline.resume import RollBackBatches

    buffer = SQLiteBuffer(tmp_path / "b.db")
    side = _waiting_trainer(last_reported=-1)  # as at the start of a run
    buffer.put(_batch(0))
    side.reports.put({"batch": 0, "state": {"cursor": 1}})
    side.ready.release()
    staleness = make_strategy("staleness", max_staleness=1)
    exps, report = side.next_batch(buffer, staleness, rows=2, now_version=0)
    assert [e.batch_index for e in exps] == [0, 0] and report["state"] == {"cursor": 1}
    buffer.put(_batch(1))  # ... and the explorer dies before reporting it
    with pytest.raises(ExplorerDied):
        side.next_batch(buffer, staleness, rows=2, now_version=1)
    buffer.sample(0, RollBackBatches(side.latest[0]), now_version=1)  # what the restart does
    fates = sorted((entry.version, entry.fate) for entry in buffer.ledger().values())  # batch e has version e
    assert fates == [(0, "used"), (0, "used"), (1, "dropped"), (1, "dropped")]
    buffer.close()
