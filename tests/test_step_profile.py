"""benchmarks/step_profile.py runs (quick mode: a small batch, two variants alternating) and reports positive,
finite numbers; no timing is asserted."""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import step_profile  # noqa: E402


def test_quick_profile_reports_positive_finite_numbers():
    res = step_profile.run(steps=1, warmup=1, variants=["baseline", "static"], threads=2, quick=True,
                           log=lambda *a: None)
    assert set(res["variants"]) == {"baseline", "static"}
    assert all(v > 0 and math.isfinite(v) for v in res["peaks_gflops"].values())
    for r in res["variants"].values():
        assert r["steps"] == 1
        for k in ("gen_s", "train_s", "step_s", "gen_gflop", "train_gflop", "gen_gflops", "train_gflops",
                  "peak_gflops", "load1"):
            assert r[k] > 0 and math.isfinite(r[k]), (k, r[k])
        assert r["train_gflop"] > r["gen_gflop"]  # forward + backward (+ recompute) outweigh a 5-token sampling
        assert 0 <= r["engine_max_abs_diff"] < 1e-3  # float32 engine and trainer agree at staleness 0
    table = step_profile.summary(res)
    assert "| baseline |" in table and "| static |" in table and "load average" in table
