"""BAPO end to end: the clip bounds are searched on every update over that update's tokens, under the
staleness that reuse (updates_per_batch > 1) or the async pipeline brings, and logged per step."""

import pytest

from offpolicy.config import load_config
from offpolicy.pipeline import run
from offpolicy.train.metrics import read_metrics

SMALL = ["algorithm.preset=bapo", "train.steps=3", "eval.every=0", "tasks.eval_size=8",
         "rollout.prompts_per_step=4", "rollout.group_size=4", "run.progress=false", "run.loggers=[]",
         "run.save_final=false", "train.threads=1"]


def _rows(tmp_path, *extra):
    run(load_config(None, [*SMALL, f"run.dir={tmp_path}", *extra]), log=lambda *a: None)
    return read_metrics(tmp_path, "train")


@pytest.mark.parametrize("setting", [["train.updates_per_batch=2"],
                                     ["pipeline.mode=async", "pipeline.explorer_threads=1", "pipeline.sync_offset=1"]],
                         ids=["reuse", "async"])
def test_bounds_and_positive_fraction_are_logged_every_step(tmp_path, setting):
    rows = _rows(tmp_path, *setting)
    assert len(rows) == 3
    for r in rows:
        assert 0.6 <= r["loss/bapo_c_low"] <= 0.9 and 1.2 <= r["loss/bapo_c_high"] <= 3.0
        assert 0.0 <= r["loss/bapo_frac"] <= 1.0
    stale = rows[1:] if "pipeline.mode=async" in setting else rows
    # off-policy updates: the ratio is not identically 1, so the search sees real ratios
    assert all(r["loss/ratio_is_one"] < 1.0 for r in stale)


def test_search_runs_over_the_updates_tokens(tmp_path):
    # rho0 = 1 is unreachable while any negative-advantage token contributes: the paper's search walks
    # its whole path on every update, to c_high = b+ = 3.0 first and then c_low up to b- = 0.9
    rows = _rows(tmp_path / "max", "train.updates_per_batch=2", "algorithm.loss_params.rho0=1.0")
    assert all(r["loss/bapo_c_low"] == pytest.approx(0.9) and r["loss/bapo_c_high"] == pytest.approx(3.0)
               for r in rows)
    # rho0 = 0 is met at the start: the bounds stay at (a-, a+) = (0.6, 1.2)
    rows = _rows(tmp_path / "min", "train.updates_per_batch=2", "algorithm.loss_params.rho0=0.0")
    assert all(r["loss/bapo_c_low"] == pytest.approx(0.6) and r["loss/bapo_c_high"] == pytest.approx(1.2)
               for r in rows)


def test_data_parallel_bapo_is_refused_naming_the_setting():
    """Ranks would search the bounds over their own shares of a micro-batch: not the one-process update."""
    from offpolicy.config import ConfigError
    from offpolicy.pipeline.context import bind_algorithm

    with pytest.raises(ConfigError, match=r"bapo loss searches its clip bounds.*train.workers=2"):
        bind_algorithm(load_config(None, ["algorithm.preset=bapo", "pipeline.mode=ray", "train.workers=2"]))
    bind_algorithm(load_config(None, ["algorithm.preset=bapo"]))  # one process: fine
