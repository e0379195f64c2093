"""pipeline.mode=ray on a local Ray instance (2 CPUs): equivalence with sync at staleness 0, the staleness
schedule across N explorers, an explorer actor killed mid-run, a stop and ``--resume``, and a data-parallel
trainer group (train.workers=2) on gloo. Each run starts its actors (~10-30 s on 2 busy cores): all but the
first test are marked slow (``pytest -m slow tests/pipeline/test_ray.py``)."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from offpolicy.config import load_config
from offpolicy.data.sql_buffer import SQLiteBuffer
from offpolicy.pipeline import run
from offpolicy.pipeline.resume import RunStopped
from offpolicy.train.metrics import read_metrics

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

SMALL = ["rollout.prompts_per_step=8", "rollout.group_size=4", "tasks.eval_size=32", "eval.every=10",
         "run.progress=false", "run.loggers=[]", "train.threads=1"]
RAY = ["pipeline.mode=ray", "pipeline.explorer_threads=1"]  # explorer threads: read in ray mode only
ROWS = 8 * 4


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray instance for the module (start-up costs ~15 s); the runner uses it as it is."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _run(tmp_path, name, *overrides, resume=False):
    cfg = load_config(None, [*SMALL, f"run.dir={tmp_path / name}", *overrides])
    return run(cfg, resume=resume, log=lambda *a: None).run_dir


def _comparable(rows):
    ray_only = ("explorer_count/", "explorer_restarts")
    return [{k: v for k, v in r.items() if not k.endswith(("_s", "per_s")) and not k.startswith(ray_only)}
            for r in rows]


def _explorer_pids() -> list[int]:
    """Processes of explorer actors (Ray titles them ``ray::ExplorerActor...``)."""
    out = []
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmd.read_bytes().startswith(b"ray::ExplorerActor"):
                out.append(int(cmd.parent.name))
        except OSError:
            continue
    return sorted(out)


def _when_trained(run_dir: Path, steps: int, action, timeout: float = 240.0) -> threading.Thread:
    """Run ``action()`` in a thread once ``run_dir`` has logged ``steps`` train steps."""

    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir, "train")) >= steps:
                action()
                return
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def _check_ledger(run_dir: Path, steps: int, *, failed_steps: int = 0) -> dict:
    """Nothing handed out twice, every step trained on one full batch. ``failed_steps``: steps whose batch
    was taken (``used``) by a training step that died; the resumed run trains a regenerated batch."""
    ledger = SQLiteBuffer(run_dir / "buffer.db").ledger()
    fates = [e.fate for e in ledger.values()]
    assert set(fates) <= {"used", "dropped", "available"}
    assert all(e.use_count <= 1 for e in ledger.values())  # nothing handed out twice
    assert fates.count("used") == (steps + failed_steps) * ROWS  # nothing lost
    return ledger


def test_one_explorer_at_staleness_zero_equals_sync(tmp_path):
    a = _run(tmp_path, "sync", "train.steps=12", "tasks.eval_size=16")
    b = _run(tmp_path, "ray", "train.steps=12", "tasks.eval_size=16", *RAY)
    ra, rb = read_metrics(a), read_metrics(b)
    assert len(ra) == len(rb) == 12 + 3  # 12 train records; evaluations at steps 0, 10 and 12
    assert _comparable(ra) == _comparable(rb)
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    train = read_metrics(b, "train")
    assert all(r["staleness_max"] == 0 and r["explorer_count/0"] == ROWS for r in train)


@pytest.mark.slow
def test_two_explorers_with_sync_offset_keep_staleness_in_bounds(tmp_path):
    n, steps = 2, 8
    d = _run(tmp_path, "offset", f"train.steps={steps}", *RAY, "pipeline.explorers=2",
             f"pipeline.sync_offset={n}", "eval.every=0")
    rows = read_metrics(d, "train")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:  # batch e = step - 1 is generated with version max(0, e - n): staleness exactly min(e, n)
        assert r["staleness_min"] == r["staleness_max"] == min(r["step"] - 1, n)
        assert r["explorer_count/0"] == r["explorer_count/1"] == ROWS // 2  # each explorer made half the batch
    ledger = _check_ledger(d, steps)
    assert all(e.fate == "used" for e in ledger.values())  # nothing generated too stale to train (dropped)


@pytest.mark.slow
def test_killed_explorer_and_a_stop_then_resume_lose_nothing(tmp_path):
    """Two explorers at sync_offset=1: SIGKILL one after step 3 (restarted, its unfinished shards
    regenerated), SIGINT the run after step 8 (checkpoint, RunStopped), resume it to the end. The
    ledger: every step trained one full batch, no row handed out twice."""
    steps = 14
    args = [f"train.steps={steps}", *RAY, "pipeline.explorers=2", "pipeline.sync_offset=1",
            "eval.every=0", "checkpoint.every=4", "tasks.eval_size=8"]
    run_dir = tmp_path / "run"
    killed = []

    def kill_an_explorer():
        pids = _explorer_pids()
        killed.extend(pids[-1:])
        os.kill(pids[-1], signal.SIGKILL)

    killer = _when_trained(run_dir, 3, kill_an_explorer)
    stopper = _when_trained(run_dir, 8, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(RunStopped):
        _run(tmp_path, "run", *args)
    killer.join(), stopper.join()
    assert killed
    rows = read_metrics(run_dir, "train")
    assert rows[-1]["explorer_restarts"] == 1
    stopped_at = rows[-1]["step"]
    assert 8 <= stopped_at < steps
    _run(tmp_path, "run", *args, resume=True)
    rows = read_metrics(run_dir, "train")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # the step counter continued
    assert all(r["staleness_max"] <= 1 for r in rows)
    _check_ledger(run_dir, steps)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_trainer_workers_train_like_one(tmp_path, parallel):
    """train.workers=2 (a gloo group: this process and one actor) logs the losses of one worker: the same
    updates, and the same weights published to the explorer (FSDP2: gathered from the shards), since the
    batches of steps 2 and 3 are generated with them."""
    one = _run(tmp_path, "w1", "train.steps=3", *RAY, "eval.every=0")
    two = _run(tmp_path, "w2", "train.steps=3", *RAY, "eval.every=0", "train.workers=2",
               f"train.parallel={parallel}")
    r1, r2 = read_metrics(one, "train"), read_metrics(two, "train")
    assert r1[0]["reward_mean"] == r2[0]["reward_mean"]  # the same first batch (weights of version 0)
    for a, b in zip(r1, r2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_a_dead_trainer_worker_stops_with_a_checkpoint_and_resumes(tmp_path):
    """SIGKILL the trainer group's rank 1 after step 3: the run stops (TrainerDied) with a checkpoint of the
    last completed step, and ``--resume`` (a new group) finishes the run with nothing trained twice."""
    from offpolicy.pipeline.ray_runner import TrainerDied
    from offpolicy.train.checkpoint import latest_checkpoint

    steps = 10
    args = [f"train.steps={steps}", *RAY, "train.workers=2", "eval.every=0", "tasks.eval_size=8"]
    run_dir = tmp_path / "run"

    def kill_rank_1():
        for cmd in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if cmd.read_bytes().startswith(b"ray::TrainerWorker"):
                    os.kill(int(cmd.parent.name), signal.SIGKILL)
            except OSError:
                continue

    killer = _when_trained(run_dir, 3, kill_rank_1)
    with pytest.raises(TrainerDied):
        _run(tmp_path, "run", *args)
    killer.join()
    done = read_metrics(run_dir, "train")[-1]["step"]
    assert 3 <= done < steps
    assert latest_checkpoint(run_dir).name == f"step-{done:08d}"  # the last step whose record was written
    _run(tmp_path, "run", *args, resume=True)
    assert [r["step"] for r in read_metrics(run_dir, "train")] == list(range(1, steps + 1))
    _check_ledger(run_dir, steps, failed_steps=1)


@pytest.mark.slow
def test_spear_self_imitation_and_kl_terms_with_two_trainer_workers(tmp_path):
    """SPEAR on the calculator agent with a KL to the reference, train.workers=2 (ddp): the self-imitation
    replay passes go through the group (a pass rank 0 took alone would leave its DDP collectives waiting), and
    the reference's log-probs travel with each batch from rank 0. Clip-Cov draws its tokens at random within
    each forward's rows, so runs match only where it is out of play: the main loss's Clip-Cov is turned off
    (cov_lb), and step 1 (same weights, same batch) gives the losses of one worker running the same row split
    as two micro-batches; later steps (after replay passes, whose Clip-Cov stays on) within 1e-3
    (docs/scaling.md)."""
    spear = ["model.path=bundled:tiny-calc", "tasks.name=calculator", "workflow.name=multi_turn",
             "workflow.env=calculator", "workflow.max_turns=3", "workflow.max_total_tokens=40",
             "rollout.max_new_tokens=12", "algorithm.preset=spear", "algorithm.kl_coef=0.05",
             "algorithm.loss_params.cov_lb=1.0e+9", "algorithm.self_imitation.replay_factor=0.1",
             "algorithm.self_imitation.horizon=1", "train.lr=1e-4", "train.steps=4", *RAY,
             "eval.every=0"]
    one = _run(tmp_path, "w1", *spear, "train.micro_batches=2")
    two = _run(tmp_path, "w2", *spear, "train.workers=2")
    r1, r2 = read_metrics(one, "train"), read_metrics(two, "train")
    assert [r["sil/replayed_samples"] for r in r2] == [r["sil/replayed_samples"] for r in r1]
    assert sum(r["sil/replay_passes"] > 0 for r in r2) >= 2 and r2[-1]["kl_ref"] > 0
    for k in ("loss", "grad_norm", "kl_ref", "entropy"):
        assert r2[0][k] == pytest.approx(r1[0][k], rel=1e-4, abs=1e-9), k
    for a, b in zip(r1, r2, strict=True):  # measured: equal to 1e-7 at every step on this machine
        for k in ("loss", "grad_norm", "sil/loss"):
            assert b[k] == pytest.approx(a[k], rel=1e-3), (k, b["step"])
