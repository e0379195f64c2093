"""`offpolicy compare`: run presets (x optional settings) x seeds on the same tasks and budget, in
sequence, then write one PNG dashboard and a Markdown table (see :mod:`offpolicy.report`)."""

from __future__ import annotations

import math
import time
from pathlib import Path

from offpolicy.config import load_config
from offpolicy.report import dashboard, load_run, summary_table

EVAL_POINTS = 10  # evaluations per run when eval.every is not set


def run_compare(presets: list[str], seeds: list[int], out_dir: str | Path, *, config: str | None = None,
                overrides: list[str] = (), variants: dict[str, list[str]] | None = None,
                target: float | None = None, log=print) -> tuple[Path, Path]:
    """Run every (variant, preset, seed) and return (dashboard PNG, table .md).

    ``variants`` maps a label suffix to extra overrides (e.g. {"async": ["pipeline.mode=async", ...]});
    default: one variant with no extra overrides. Every config is validated before the first run. Unless
    ``eval.every`` is set, runs evaluate about :data:`EVAL_POINTS` times, so that short runs have curves.
    """
    from offpolicy.pipeline import run

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = variants or {"": []}
    plan = []
    for suffix, extra in variants.items():
        for preset in presets:
            for seed in seeds:
                name = f"{preset}{('-' + suffix) if suffix else ''}-s{seed}"
                cfg = load_config(config, [*overrides, *extra, f"algorithm.preset={preset}", f"train.seed={seed}",
                                           f"run.dir={out_dir / name}", "run.progress=false", "run.save_final=false"])
                if "every" not in cfg.eval.model_fields_set:  # the default (50) leaves a short run two points
                    cfg.eval.every = max(1, math.ceil(cfg.train.steps / EVAL_POINTS))
                plan.append((name, f"{preset}{(' ' + suffix) if suffix else ''}", cfg))
    from offpolicy.pipeline.context import bind_algorithm

    for _, _, cfg in plan:  # fail on a bad preset or parameter before any run starts
        bind_algorithm(cfg)
    curves = []
    for i, (name, label, cfg) in enumerate(plan, 1):
        t0 = time.perf_counter()
        res = run(cfg, log=lambda *a: None)
        log(f"[{i}/{len(plan)}] {name}: {res.eval_before['accuracy']:.3f} -> {res.eval_after['accuracy']:.3f} "
            f"({time.perf_counter() - t0:.0f} s)")
        curves.append(load_run(cfg.run.dir, label))
    table, target = summary_table(curves, target)
    png = dashboard(curves, out_dir / "dashboard.png", title=" ".join(overrides))
    md = out_dir / "table.md"
    md.write_text(f"Overrides: `{' '.join(overrides) or '(none)'}`; seeds {seeds}; "
                  f"target accuracy {target:.3f}\n\n{table}\n")
    return png, md
