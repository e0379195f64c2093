"""An async run whose explorer process is killed (SIGKILL) mid-run restarts it, regenerates what it had not
reported, finishes, and the buffer's ledger shows nothing lost and nothing used twice."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
