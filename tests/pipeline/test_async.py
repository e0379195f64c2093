"""The asynchronous pipeline: equivalence with sync at staleness 0, and the staleness schedule."""

import json

import pytest
import torch
from safetensors.torch import load_file

from offpolicy.config import load_config
from offpolicy.pipeline import run
from offpolicy.pipeline.explorer import weights_version
from offpolicy.train.metrics import read_metrics

SMALL = ["rollout.prompts_per_step=8", "rollout.group_size=4", "tasks.eval_size=32", "eval.every=10",
         "run.progress=false", "run.loggers=[]", "train.threads=1"]
ASYNC = ["pipeline.mode=async", "pipeline.explorer_threads=1"]  # explorer threads: read in async mode only
TIMING = ("_s", "per_s")


def _run(tmp_path, name, *overrides):
    cfg = load_config(None, [*SMALL, f"run.dir={tmp_path / name}", *overrides])
    run(cfg, log=lambda *a: None)
    return tmp_path / name


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.endswith(TIMING)} for r in rows]


def test_async_at_staleness_zero_equals_sync(tmp_path):
    a = _run(tmp_path, "sync", "train.steps=20")
    b = _run(tmp_path, "async", "train.steps=20", *ASYNC)
    ra, rb = read_metrics(a), read_metrics(b)
    assert len(ra) == len(rb) == 20 + 3  # 20 train records; evaluations at steps 0, 10 and 20 (the last)
    assert _comparable(ra) == _comparable(rb)
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(r["staleness_max"] == 0 for r in read_metrics(b, "train"))


@pytest.mark.parametrize("offset, interval", [(0, 1), (1, 1), (2, 1), (0, 3), (1, 2)])
def test_weights_version_schedule(offset, interval):
    for e in range(30):
        v = weights_version(e, sync_offset=offset, sync_interval=interval)
        assert v % interval == 0 and 0 <= v <= e
        if e >= offset:
            assert offset <= e - v <= offset + interval - 1
        else:
            assert v == 0


def test_sync_offset_gives_staleness_within_bounds(tmp_path):
    n = 2
    d = _run(tmp_path, "offset", "train.steps=8", *ASYNC, f"pipeline.sync_offset={n}",
             "eval.every=0")
    rows = read_metrics(d, "train")
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r in rows:
        # batch e = step - 1 is trained at version e; from batch n on, its staleness is exactly n
        e = r["step"] - 1
        expected = min(e, n)
        assert r["staleness_min"] == r["staleness_max"] == expected
        assert r["staleness_max"] <= json.loads((d / "config.json").read_text())["pipeline"]["sync_offset"]
    assert any(r["staleness_min"] == n for r in rows)
    # train.old_logp=auto: on stale data pi_old is the sampling policy (behav_logp), so the PPO ratio
    # measures the policy's drift since sampling (not identically 1) and the clip can act
    stale = [r for r in rows if r["staleness_min"] >= 1]
    assert stale and all(r["loss/ratio_is_one"] == 0.0 for r in stale)
    assert any(abs(r["loss/ratio_max"] - 1) > 1e-3 for r in stale)


def test_old_logp_recompute_makes_the_stale_ratio_identically_one(tmp_path):
    d = _run(tmp_path, "recompute", "train.steps=3", *ASYNC, "pipeline.sync_offset=1",
             "eval.every=0", "train.old_logp=recompute")
    rows = read_metrics(d, "train")
    assert rows[-1]["staleness_min"] == 1
    assert all(r["loss/ratio_is_one"] == 1.0 for r in rows)


def test_trainer_failing_before_training_stops_the_explorer(tmp_path, monkeypatch):
    """The explorer process starts before the trainer's context; a failure there must end it cleanly."""
    from offpolicy.pipeline import asynchronous

    real_context, procs = asynchronous.mp.get_context, []

    class Recording:
        def __init__(self, ctx):
            self._ctx = ctx

        def __getattr__(self, name):
            return getattr(self._ctx, name)

        def Process(self, *args, **kwargs):  # noqa: N802 (multiprocessing's name)
            procs.append(self._ctx.Process(*args, **kwargs))
            return procs[-1]

    def failing_context(*args, **kwargs):
        raise RuntimeError("the trainer's context failed")

    monkeypatch.setattr(asynchronous.mp, "get_context", lambda method: Recording(real_context(method)))
    monkeypatch.setattr(asynchronous, "build_context", failing_context)
    cfg = load_config(None, [*SMALL, f"run.dir={tmp_path / 'x'}", "train.steps=4", *ASYNC])
    with pytest.raises(RuntimeError, match="context failed"):
        asynchronous.run_async(cfg, log=lambda *a: None)
    assert len(procs) == 1 and not procs[0].is_alive()
    assert procs[0].exitcode == 0  # it returned by itself (terminate() would give -15)


def test_decoupled_ppo_gets_a_proximal_policy_distinct_from_behav_when_stale(tmp_path):
    """Default config: at staleness 1 the behaviour weight exp(old - behav) is not identically 1 and
    KL(behav || old) is not 0 (old is the trainer's step-start policy, never behav_logp)."""
    d = _run(tmp_path, "dppo", "train.steps=4", *ASYNC, "pipeline.sync_offset=1", "eval.every=0",
             "algorithm.preset=decoupled_ppo")
    plan = json.loads((d / "plan.json").read_text())
    assert plan["old_logp"] == "current" and plan["loss_reads"] == ["behav_logp", "old_logp"]
    stale = [r for r in read_metrics(d, "train") if r["staleness_min"] >= 1]
    assert len(stale) == 3
    for r in stale:
        assert r["loss/behav_weight_max"] - r["loss/behav_weight_min"] > 1e-3
        assert abs(r["kl_behav_old"]) > 1e-6
