"""Crash and resume: SIGKILL a training run after its first checkpoint, resume it, and check that
nothing was lost or trained twice and that the metrics equal an uninterrupted run's. And the pieces:
the roll-back by batch index, the explorer's generator state saved and restored as bytes."""

import os
import random
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from offpolicy.data.buffer import MemoryBuffer
from offpolicy.data.experience import Experience
from offpolicy.data.sampling import Selection, make_strategy
from offpolicy.data.sql_buffer import SQLiteBuffer
from offpolicy.pipeline.resume import RollBackBatches, checkpoint_run, restore_run
from offpolicy.train.checkpoint import latest_checkpoint, list_checkpoints
from offpolicy.train.metrics import read_metrics

STEPS = 24
ROWS = 4 * 4
ARGS = [f"train.steps={STEPS}", "rollout.prompts_per_step=4", "rollout.group_size=4", "tasks.eval_size=16",
        "eval.every=8", "checkpoint.every=4", "checkpoint.keep=2", "buffer.kind=sqlite", "run.progress=false",
        "run.loggers=[]", "train.threads=1"]


def _train(run_dir, *extra, resume=False):
    cmd = [sys.executable, "-m", "offpolicy.cli", "train", *ARGS, f"run.dir={run_dir}", *extra]
    if resume:
        cmd = [sys.executable, "-m", "offpolicy.cli", "train", "--resume", str(run_dir)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _group(gid, batch_index, *, version=0, expert=False):
    return [Experience(torch.tensor([1]), torch.tensor([2]), torch.ones(1), torch.zeros(1), 0.0, gid, gid,
                       version=version, batch_index=batch_index, expert=expert) for _ in range(2)]


class _TakeAll:
    """A strategy that returns every group (to list what is left)."""

    def select(self, groups, n, now_version):
        return Selection(take=tuple(g.key for g in groups))

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_roll_back_removes_the_groups_of_later_batches_consumed_or_not(tmp_path, kind):
    buf = MemoryBuffer() if kind == "memory" else SQLiteBuffer(tmp_path / "b.sqlite")
    for e in range(4):
        buf.put(_group(f"b{e}", e, version=e))
    buf.put(_group("late-expert", 9, expert=True) + _group("by-hand", -1))
    buf.sample(2, make_strategy("fifo"), now_version=0)  # batch 0 consumed
    buf.put(_group("late-used", 5, version=5))
    buf.sample(2, make_strategy("priority"), now_version=5)  # the highest version first: late-used, consumed
    buf.sample(0, RollBackBatches(1), now_version=5)  # a checkpoint after batch 1: b2 and b3 go
    fates = [entry.fate for entry in buf.ledger().values()]
    kept = {e.group_id for e in buf.sample(len(buf), _TakeAll(), now_version=0)}
    # b2, b3 never consumed: dropped; late-used consumed by the dead step: used (priority had kept it)
    assert fates.count("dropped") == 4 and fates.count("used") == 4
    assert kept == {"b1", "late-expert", "by-hand"}
    buf.close()


@pytest.mark.slow  # a long end-to-end run: make test-slow (CI runs it)
def test_a_remix_run_killed_after_a_checkpoint_resumes_like_an_uninterrupted_one(tmp_path):
    """ReMix's Mix strategy keeps consumed groups for replay: the groups a dead step consumed after the
    checkpoint must go with the roll-back (before, the regenerated batch collided with them)."""
    extra = ["algorithm.preset=remix"]
    reference = tmp_path / "reference"
    assert _train(reference, *extra).wait() == 0
    run_dir = tmp_path / "crashed"
    proc = _train(run_dir, *extra)
    deadline = time.monotonic() + 120
    while '"kind": "train", "step": 6,' not in _text(run_dir / "metrics.jsonl"):  # 2 steps after the checkpoint at 4
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert int(latest_checkpoint(run_dir).name.split("-")[1]) == 4  # batches 4 and 5 consumed after it
    resumed = _train(run_dir, resume=True)
    out = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0, out
    assert [r["step"] for r in read_metrics(run_dir, "train")] == list(range(1, STEPS + 1))
    # up to the checkpoint the run is the reference's; after it, not bit for bit: the dead steps' Mix selections
    # also retired older groups (out of the window), which the roll-back cannot bring back (docs/logging.md)
    upto = [r for r in read_metrics(run_dir) if r["step"] <= 4]
    assert _comparable(upto) == _comparable([r for r in read_metrics(reference) if r["step"] <= 4])
    ledger = SQLiteBuffer(run_dir / "buffer.db").ledger()
    assert sum(e.fate == "dropped" for e in ledger.values()) == 0  # remix consumed each batch it wrote


def test_explorer_generator_state_is_saved_and_restored_as_bytes(tmp_path):
    model = torch.nn.Linear(2, 2)
    ctx = SimpleNamespace(run_dir=tmp_path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                          scheduler=None, cfg=SimpleNamespace(checkpoint=SimpleNamespace(keep=2), train=SimpleNamespace(steps=10)))
    gen = torch.Generator().manual_seed(7)
    torch.rand(5, generator=gen)  # somewhere mid-stream
    saved = bytes(gen.get_state().numpy())
    checkpoint_run(ctx, 3, explorer_state={"tasks_consumed": 12, "generator": saved}, strategy=make_strategy("fifo"),
                   trainer_state={"eval_before": {}, "last_eval": 0.0})
    state = restore_run(ctx, strategy=make_strategy("fifo"), buffer=MemoryBuffer())
    assert state["step"] == 3 and state["explorer"] == {"tasks_consumed": 12, "generator": saved}
    again = torch.Generator()
    again.set_state(torch.frombuffer(bytearray(state["explorer"]["generator"]), dtype=torch.uint8))
    assert torch.equal(torch.rand(4, generator=again), torch.rand(4, generator=gen))


def _text(path):
    return path.read_text() if path.exists() else ""


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.endswith(("_s", "per_s"))} for r in rows]


def _crash_after_first_checkpoint(run_dir, *extra, rng):
    proc = _train(run_dir, *extra)
    deadline = time.monotonic() + 120
    while latest_checkpoint(run_dir) is None:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.5))  # a random point after the first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_and_resume_loses_nothing_and_matches_an_uninterrupted_run(tmp_path, mode):
    extra = ["pipeline.mode=async", "pipeline.explorer_threads=1", "pipeline.sync_offset=1"] if mode == "async" else []
    reference = tmp_path / "reference"
    assert _train(reference, *extra).wait() == 0
    run_dir = tmp_path / "crashed"
    killed = _crash_after_first_checkpoint(run_dir, *extra, rng=random.Random(os.getpid()))
    ckpt = latest_checkpoint(run_dir)
    ckpt_step = int(ckpt.name.split("-")[1])
    if killed.returncode == 0:  # the run finished before the kill landed: nothing to resume
        pytest.skip("the run finished before SIGKILL")
    resumed = _train(run_dir, resume=True)
    out = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0, out
    assert f"resuming from step {ckpt_step}" in out

    rows = read_metrics(run_dir, "train")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # the step counter continued
    if mode == "sync":  # sync resumes bit for bit; async regenerates with the checkpoint's weights
        assert _comparable(read_metrics(run_dir)) == _comparable(read_metrics(reference))
    assert len(list_checkpoints(run_dir)) <= 2

    ledger = SQLiteBuffer(run_dir / "buffer.db").ledger()
    # nothing is trained twice: every consumed row was handed to the trainer exactly once
    assert all(e.use_count == 1 for e in ledger.values() if e.fate == "used")
    # nothing written before the checkpoint was lost: every such row was consumed (or is still there);
    # only rows written after it can have been rolled back (fate "dropped") and regenerated
    offset = 1 if mode == "async" else 0
    assert {e.fate for e in ledger.values()} <= {"used", "dropped", "available"}
    for e in ledger.values():
        if e.fate == "dropped":
            assert e.version >= ckpt_step - offset
    # every step trained one full batch
    assert sum(e.fate == "used" for e in ledger.values()) >= STEPS * ROWS


def test_roll_back_moves_an_evaluation_logged_after_the_checkpoint_of_its_step(tmp_path):
    """The final evaluation runs after the last step's checkpoint: killed between the two, the resumed run
    evaluates again, so the first one's record must go (and only that record)."""
    import json

    from offpolicy.pipeline.resume import roll_back_metrics

    rows = [{"kind": "eval", "step": 0}, {"kind": "train", "step": 4}, {"kind": "eval", "step": 4},
            {"kind": "train", "step": 5}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text)
    assert roll_back_metrics(tmp_path, 4) == 1
    assert read_metrics(tmp_path) == rows[:3]
    (tmp_path / "metrics.jsonl").write_text(text)
    assert roll_back_metrics(tmp_path, 4, eval_at_step=False) == 2
    assert read_metrics(tmp_path) == rows[:2]


def _stepped(cfg, model, steps):
    from offpolicy.pipeline.context import make_optimizer

    opt, sched = make_optimizer(cfg, model)
    for _ in range(steps):
        model(input_ids=torch.tensor([[1, 2, 3]])).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return opt, sched


def test_a_resume_keeps_the_optimiser_state_but_takes_the_settings_of_its_config(tmp_path):
    """torch's load_state_dict would restore the saved lr, weight decay and implementation: a resume with
    --allow-changed-config train.lr=... used to keep training at the old rate."""
    from offpolicy.config import load_config
    from offpolicy.pipeline.context import lr_multiplier, make_optimizer
    from offpolicy.train.checkpoint import load_checkpoint, save_checkpoint
    from offpolicy.train.tiny import build_model

    schedule = ["train.steps=10", "train.warmup_steps=2", "train.lr_schedule=linear"]
    old = load_config(None, ["train.lr=0.0003", "train.optimizer_impl=for_loop", *schedule])
    model = build_model(21, hidden=16, layers=1, heads=2, intermediate=32, seed=0)
    opt, sched = _stepped(old, model, 3)
    saved_lr, saved_moment = opt.param_groups[0]["lr"], opt.state[opt.param_groups[0]["params"][0]]["exp_avg"].clone()
    save_checkpoint(tmp_path, 3, model=model, optimizer=opt, scheduler=sched, state={}, generators={})

    new = load_config(None, ["train.lr=0.001", "train.weight_decay=0.5", "train.optimizer_impl=fused", *schedule])
    opt2, sched2 = make_optimizer(new, model)
    load_checkpoint(latest_checkpoint(tmp_path), model=model, optimizer=opt2, scheduler=sched2)
    group = opt2.param_groups[0]
    factor = lr_multiplier(new.train)(3)
    assert 0 < factor < 1 and saved_lr == pytest.approx(0.0003 * factor)
    assert group["lr"] == pytest.approx(0.001 * factor, rel=1e-12) and sched2.get_last_lr() == [group["lr"]]
    assert group["weight_decay"] == 0.5 and group["fused"] is True and sched2.base_lrs == [0.001]
    assert sched2.last_epoch == 3
    assert torch.equal(opt2.state[group["params"][0]]["exp_avg"], saved_moment)  # the state is the checkpoint's
    sched2.step()
    assert group["lr"] == pytest.approx(0.001 * lr_multiplier(new.train)(4), rel=1e-12)

    # the same config: the learning rate an uninterrupted run would have had, to the bit
    opt3, sched3 = make_optimizer(old, model)
    load_checkpoint(latest_checkpoint(tmp_path), model=model, optimizer=opt3, scheduler=sched3)
    assert opt3.param_groups[0]["lr"] == saved_lr and opt3.param_groups[0]["fused"] is None
