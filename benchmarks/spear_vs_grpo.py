"""Benchmark: SPEAR vs GRPO on the calculator environment (bundled calculator agent, CPU), same budget.

    .venv/bin/python benchmarks/spear_vs_grpo.py [--seeds 0 1 2] [--out benchmarks/out/agents] [key=value ...]

Runs ``examples/calculator_agent.yaml`` with ``algorithm.preset=spear`` and ``algorithm.preset=grpo`` for
every seed (in sequence, through ``offpolicy compare``), then writes the dashboard PNG (held-out success vs
steps / rollouts / seconds, entropy, tool calls per episode) and a Markdown table with, per preset, the
held-out success before and after, the tool calls per episode over the first and last 10 steps, and the
self-imitation replay counts. The runs go to ``<out>/runs/<time>/`` (a rerun starts afresh); the dashboard
and the table are copied to ``<out>/``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _mean(xs):
    return statistics.mean(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--presets", nargs="+", default=["spear", "grpo"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "agents"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from benchmarks.rundirs import fresh_runs, publish
    from offpolicy.pipeline.compare import run_compare
    from offpolicy.train.metrics import read_metrics

    out = fresh_runs(args.out)
    png, md = run_compare(args.presets, args.seeds, out, config=str(ROOT / "examples" / "calculator_agent.yaml"),
                          overrides=args.overrides)
    lines = ["| preset | seeds | success before | success after | tool calls/episode, first 10 steps | last 10 steps "
             "| SIL replay passes | entropy, last 10 steps |", "|---|---|---|---|---|---|---|---|"]
    for preset in args.presets:
        runs = [out / f"{preset}-s{s}" for s in args.seeds]
        ev = [read_metrics(r, "eval") for r in runs]
        tr = [read_metrics(r, "train") for r in runs]
        lines.append(
            f"| {preset} | {len(runs)} | {_mean([e[0]['accuracy'] for e in ev]):.3f} | "
            f"{_mean([e[-1]['accuracy'] for e in ev]):.3f} ± {statistics.pstdev([e[-1]['accuracy'] for e in ev]):.3f} | "
            f"{_mean([_mean([r['tool_calls_mean'] for r in t[:10]]) for t in tr]):.2f} | "
            f"{_mean([_mean([r['tool_calls_mean'] for r in t[-10:]]) for t in tr]):.2f} | "
            f"{_mean([t[-1].get('sil/replay_passes', 0) for t in tr]):.1f} | "
            f"{_mean([_mean([r['entropy'] for r in t[-10:]]) for t in tr]):.3f} |")
    summary = "\n".join(lines)
    md.write_text(md.read_text() + "\n" + summary + "\n")
    publish(args.out, png, md)
    print(md.read_text())
    print(f"dashboard: {Path(args.out) / png.name}; runs: {out}")


if __name__ == "__main__":
    main()
