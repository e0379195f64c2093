"""Hostile inputs give a clear error and lose nothing: a binary config, corrupt weights, a full disk or a
read-only directory while checkpointing, huge task rows and prompts longer than the context, and rewards
that hang (circuit breaker, per-batch deadline, the first fault printed as it happens)."""

import errno
import json
import os
import shutil
import time
import tracemalloc

import pytest
import torch

from offpolicy.cli import main
from offpolicy.config import ConfigError, load_config
from offpolicy.rewards.guard import GuardedReward, RewardFaultError, RewardStalledError
from offpolicy.train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, save_checkpoint
from offpolicy.train.metrics import read_metrics

SMALL = ["rollout.prompts_per_step=4", "rollout.group_size=4", "tasks.eval_size=8", "eval.every=0",
         "run.progress=false", "run.loggers=[]", "run.save_final=false", "train.threads=1"]


def hangs(response: str, truth: str) -> float:
    """A reward that never returns (imported by name by the reward worker)."""
    time.sleep(60)
    return 0.0


def hangs_after_marker_count(response: str, truth: str) -> float:
    """Scores normally for the first $OFFPOLICY_TEST_CALLS calls (counted in a marker file), then hangs."""
    marker = os.environ["OFFPOLICY_TEST_MARKER"]
    with open(marker, "a") as f:
        f.write(".")
    if os.path.getsize(marker) > int(os.environ["OFFPOLICY_TEST_CALLS"]):
        time.sleep(60)
    return float(response == truth)


def slow(response: str, truth: str) -> float:
    time.sleep(0.2)
    return 1.0


def raises_or_sleeps(response: str, truth: str) -> float:
    if response == "raise":
        raise ValueError("bad sample")
    if response == "hang":
        time.sleep(60)
    time.sleep(float(response))
    return 1.0


# ---------------------------------------------------------------------------- unreadable config and weights


@pytest.mark.parametrize("content, reason", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "is not UTF-8 text (invalid start byte at byte 0)"),
    (b"train:\n  steps: 3\x00\x00\x01", "is binary (NUL byte at offset 17)"),
])
def test_a_binary_config_file_is_named_with_the_reason(tmp_path, capsys, content, reason):
    f = tmp_path / "model.bin"
    f.write_bytes(content)
    assert main(["train", "--config", str(f), f"run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"config file {f} {reason}" in err and "--config takes a YAML file" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_corrupt_weights_name_the_file_and_the_reason(tmp_path, capsys):
    from offpolicy.rollout.model import BUNDLED

    model = tmp_path / "model"
    shutil.copytree(BUNDLED, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut in half
    assert main(["eval", "--model", str(model), "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert f"model.path: cannot load the weights {weights}: " in err and "Error while deserializing header" in err
    assert main(["train", f"model.path={model}", f"run.dir={tmp_path / 'run'}", *SMALL]) == 2
    err = capsys.readouterr().err
    assert f"cannot load the weights {weights}" in err and "Traceback" not in err


# ---------------------------------------------------------------------------- checkpoints on a full / read-only disk


def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoint_and_nothing_is_lost(tmp_path, capsys,
                                                                                         monkeypatch):
    import safetensors.torch

    run_dir = tmp_path / "run"
    args = ["train", f"run.dir={run_dir}", "train.steps=3", "checkpoint.every=1", "buffer.kind=sqlite", *SMALL]
    real, calls = safetensors.torch.save_model, []

    def fills_the_disk(model, filename, *a, **k):
        calls.append(filename)
        if len(calls) == 2:  # the checkpoint of step 2: the disk is full half-way through the weights
            with open(filename, "wb") as f:
                f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real(model, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_model", fills_the_disk)
    assert main(args) == 3
    out, err = capsys.readouterr()
    first = run_dir / "checkpoints" / "step-00000001"
    assert "could not write the checkpoint of step 2" in err and "No space left on device" in err
    assert f"the partial folder was removed, the last good checkpoint {first} is intact" in err
    assert err.rstrip().endswith(f"is intact\n(once it can be written: offpolicy train --resume {run_dir})")
    assert "Traceback" not in err
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000001"]  # no .tmp- left behind
    assert (run_dir / "run.log").read_text().rstrip().splitlines()[-1].startswith("error: CheckpointError: could not")
    assert json.loads((first / "state.json").read_text())["step"] == 1
    from offpolicy.data.sql_buffer import SQLiteBuffer

    buf = SQLiteBuffer(run_dir / "buffer.db")
    assert buf.stats().put == 2 * 16 and buf.stats().dropped == 0  # both generated batches are there
    buf.close()
    # resume from the intact checkpoint once there is space: the run finishes, one record per step
    monkeypatch.undo()
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert [r["step"] for r in read_metrics(run_dir, "train")] == [1, 2, 3]
    buf = SQLiteBuffer(run_dir / "buffer.db")
    ledger = buf.ledger()
    assert buf.stats().put == len(ledger) and all(e.use_count <= 1 for e in ledger.values())  # none used twice
    buf.close()


def _tiny_state(random_tiny):
    model = random_tiny[0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return {"model": model, "optimizer": opt, "scheduler": None, "state": {}, "generators": {"g": b"\x01\x02"}}


def test_torch_save_failing_on_a_full_disk_is_a_checkpoint_error(tmp_path, random_tiny, monkeypatch):
    parts = _tiny_state(random_tiny)
    good = save_checkpoint(tmp_path, 1, **parts)
    # what torch.save raises when the disk fills (measured on a full tmpfs)
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")))
    with pytest.raises(CheckpointError, match=r"step 2 .*RuntimeError: \[enforce fail.*MiB free on that disk\); "
                                              r"the partial folder was removed, the last good checkpoint"):
        save_checkpoint(tmp_path, 2, **parts)
    assert list_checkpoints(tmp_path) == [good] and not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_a_read_only_run_directory_leaves_the_last_checkpoint_intact(tmp_path, random_tiny, monkeypatch):
    parts = _tiny_state(random_tiny)
    good = save_checkpoint(tmp_path, 1, **parts)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    root = tmp_path / "checkpoints"
    if os.geteuid() == 0:  # root writes through permission bits: raise what a read-only mount raises
        from pathlib import Path

        real_mkdir = Path.mkdir

        def read_only(self, *a, **k):
            if self.name.startswith(".tmp-"):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return real_mkdir(self, *a, **k)

        monkeypatch.setattr(Path, "mkdir", read_only)
        reason = os.strerror(errno.EROFS)
    else:
        root.chmod(0o555)
        reason = os.strerror(errno.EACCES)
    try:
        with pytest.raises(CheckpointError, match=f"could not write the checkpoint of step 2 .*: {reason}"):
            save_checkpoint(tmp_path, 2, **parts)
    finally:
        root.chmod(0o755)
    assert latest_checkpoint(tmp_path) == good and {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert not list(root.glob(".tmp-*"))


# ---------------------------------------------------------------------------- task rows and prompts


def _rows(path, extra):
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10, 20) for b in range(10, 14)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + extra))


def test_huge_rows_and_prompts_longer_than_the_context_are_left_out_with_file_line_and_count(tmp_path, capsys):
    from offpolicy.pipeline.context import task_source

    f = tmp_path / "tasks.jsonl"
    huge = {"prompt": "1" * 3_000_000, "answer": "1"}
    long = {"prompt": "1+" * 40 + "1=", "answer": "41"}  # 83 tokens: the bundled model's context is 64
    _rows(f, [huge, long, huge])
    train, held_out = task_source(load_config(None, ["tasks.name=file", f"tasks.train_path={f}",
                                                     "tasks.max_row_bytes=100000"]))
    out = capsys.readouterr().out
    assert f"tasks: 2 row(s) left out, over tasks.max_row_bytes=100000: {f}:41 (3,000,029 bytes), {f}:43 " in out
    assert (f"tasks: 1 row(s) left out, prompt longer than the model's context 64 - 5 response tokens = 59 tokens: "
            f"{f}:42 (83 tokens)") in out
    assert len(held_out) == 40 and {next(train).task_id for _ in range(200)} == {f"tasks-{n}" for n in range(1, 41)}


def test_a_huge_json_line_is_never_held_whole(tmp_path):
    from offpolicy.data.task_files import Skipped, load_rows_where

    f = tmp_path / "tasks.jsonl"
    _rows(f, [{"prompt": "7" * 20_000_000, "answer": "7"}])  # the 20 MB line of the report
    skipped = Skipped()
    tracemalloc.start()
    rows = load_rows_where(f, max_row_bytes=1_000_000, skipped=skipped)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(rows) == 40 and list(skipped.rows.values())[0] == {f"{f}:41": "20,000,029 bytes"}
    assert peak < 4_000_000  # read a chunk at a time and dropped (the line alone is 20 MB)


def test_a_file_with_no_row_left_is_an_error_with_the_reasons(tmp_path):
    from offpolicy.pipeline.context import task_source

    f = tmp_path / "tasks.csv"
    f.write_text("prompt,answer\n" + "".join(f"{'9' * 500},1\n" for _ in range(3)))
    with pytest.raises(ConfigError, match=r"tasks: .*tasks.csv: no tasks \(3 row\(s\) left out, over "
                                          r"tasks.max_row_bytes=100: .*tasks.csv:2 \(501 bytes\)"):
        task_source(load_config(None, ["tasks.name=file", f"tasks.train_path={f}", "tasks.max_row_bytes=100"]))


# ---------------------------------------------------------------------------- rewards that hang


@pytest.mark.timing
def test_a_reward_that_always_hangs_stops_the_run_naming_it(tmp_path, capsys):
    t0 = time.monotonic()
    rc = main(["train", f"run.dir={tmp_path}", "train.steps=2", "reward.function=test_hostile_inputs:hangs",
               "reward.timeout_s=0.3", "reward.max_timeouts=3", *SMALL])
    assert rc == 3 and time.monotonic() - t0 < 60  # 3 time-outs, not 8 evaluation tasks x (limit + restart)
    err = capsys.readouterr().err
    assert "first reward fault of kind 'timeout' (evaluation):" in err  # printed when it happened
    assert err.rstrip().endswith("reward test_hostile_inputs:hangs timed out on 3 consecutive samples (reward."
                                 "timeout_s=0.3, reward.max_timeouts=3): it seems to hang; stopping\n(no checkpoint: "
                                 "the run stopped before its first step)")


@pytest.mark.timing
def test_a_reward_that_starts_hanging_mid_run_stops_after_a_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OFFPOLICY_TEST_MARKER", str(tmp_path / "calls"))
    monkeypatch.setenv("OFFPOLICY_TEST_CALLS", str(8 + 16))  # the first evaluation and step 1's batch
    run_dir = tmp_path / "run"
    rc = main(["train", f"run.dir={run_dir}", "train.steps=4", "reward.timeout_s=0.3", "reward.max_timeouts=2",
               "reward.function=test_hostile_inputs:hangs_after_marker_count", "buffer.kind=sqlite", *SMALL])
    assert rc == 3
    err = capsys.readouterr().err
    assert "reward test_hostile_inputs:hangs_after_marker_count timed out on 2 consecutive samples" in err
    assert f"(last good state: {run_dir / 'checkpoints' / 'step-00000001'}; resume with" in err
    assert [r["step"] for r in read_metrics(run_dir, "train")] == [1]


@pytest.mark.timing
def test_the_breaker_counts_consecutive_timeouts_only(tmp_path):
    guard = GuardedReward(raises_or_sleeps, timeout_s=0.3, max_timeouts=2)
    try:
        out = guard([("hang", ""), ("0", ""), ("hang", ""), ("0", "")])  # never two in a row
        assert [o.fault for o in out] == ["timeout", None, "timeout", None]
        guard([("hang", "")])
        with pytest.raises(RewardStalledError, match="timed out on 2 consecutive samples"):
            guard([("hang", ""), ("0", "")])  # the second in a row, across calls
    finally:
        guard.close()


@pytest.mark.timing
@pytest.mark.parametrize("timeout_s", [5.0, None])
def test_a_batch_past_its_deadline_stops(timeout_s):
    guard = GuardedReward(slow, timeout_s=timeout_s, batch_timeout_s=0.5, name="slow_reward")
    try:
        guard([("x", "")])  # the worker is up (its start is not the reward's time)
        t0 = time.monotonic()
        with pytest.raises(RewardStalledError, match=r"reward slow_reward scored [1-3] of 20 samples of a batch "
                                                     r"within reward.batch_timeout_s=0.5 s"):
            guard([("x", "")] * 20)
        assert time.monotonic() - t0 < 2.0  # not 20 x 0.2 s
        assert isinstance(RewardStalledError("x"), RewardFaultError)  # the runners checkpoint and stop on it
    finally:
        guard.close()


@pytest.mark.timing
def test_the_first_fault_of_each_kind_is_reported_as_it_happens():
    seen = []
    guard = GuardedReward(raises_or_sleeps, timeout_s=5.0, on_fault=lambda s: seen.append((s.fault,
                                                                                           time.monotonic())))
    try:
        out = guard([("raise", ""), ("1.0", "")])
        done = time.monotonic()
        assert [o.fault for o in out] == ["exception", None]
        assert seen[0][0] == "exception" and done - seen[0][1] > 0.8  # before the slow sample was scored
    finally:
        guard.close()
