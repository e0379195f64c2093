"""Figures and tables from run directories: what `offpolicy plot` and `offpolicy compare` draw.

A run is read from its ``metrics.jsonl`` (train and eval records) and ``config.json``. Runs are
grouped by a label (the preset plus any pipeline setting that differs), and seeds are averaged.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from offpolicy.train.metrics import read_metrics


@dataclass
class RunCurves:
    label: str
    seed: int
    steps: list[int] = field(default_factory=list)  # eval steps
    accuracy: list[float] = field(default_factory=list)
    rollouts: list[int] = field(default_factory=list)  # samples generated up to each eval step
    seconds: list[float] = field(default_factory=list)  # wall-clock training seconds up to each eval step
    train_steps: list[int] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    reward: list[float] = field(default_factory=list)  # training reward (of the task, before shaping), per step
    staleness: list[float] = field(default_factory=list)
    tool_calls: list[float] = field(default_factory=list)  # per episode, per train step (multi-turn runs only)


def run_label(cfg: dict) -> str:
    p = cfg.get("pipeline", {})
    label = cfg["algorithm"]["preset"]
    if p.get("mode") in ("async", "ray"):
        label += f" {p['mode']}(offset={p.get('sync_offset', 0)},interval={p.get('sync_interval', 1)})"
    if cfg.get("train", {}).get("updates_per_batch", 1) > 1:
        label += f" m={cfg['train']['updates_per_batch']}"
    return label


def load_run(run_dir: str | Path, label: str | None = None) -> RunCurves:
    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    train, evals = read_metrics(run_dir, "train"), read_metrics(run_dir, "eval")
    curves = RunCurves(label or run_label(cfg), cfg["train"]["seed"])
    cum_rollouts, cum_s, by_step = 0, 0.0, {}
    for r in train:
        cum_rollouts += r.get("fresh_samples", r.get("samples", 0))
        cum_s += r.get("step_s", 0.0)
        by_step[r["step"]] = (cum_rollouts, cum_s)
        curves.train_steps.append(r["step"])
        curves.entropy.append(r.get("entropy", math.nan))
        curves.reward.append(r.get("reward_mean", math.nan))
        curves.staleness.append(r.get("staleness_mean", 0.0))
        if "tool_calls_mean" in r:
            curves.tool_calls.append(r["tool_calls_mean"])
    for r in evals:
        rollouts, secs = by_step.get(r["step"], (0, 0.0))
        curves.steps.append(r["step"])
        curves.accuracy.append(r["accuracy"])
        curves.rollouts.append(rollouts)
        curves.seconds.append(secs)
    return curves


def _first_reach(xs: list[float], accs: list[float], target: float) -> float:
    return next((x for x, a in zip(xs, accs) if a >= target - 1e-12), math.nan)


def _mean_curve(rs: list[RunCurves], attr: str) -> tuple[list[float], list[float]]:
    """(mean x, mean accuracy) over seeds at each evaluation (the seeds of a label share their evaluation
    steps; a shorter run cuts the curve)."""
    n = min(len(r.accuracy) for r in rs)
    xs = [statistics.mean(getattr(r, attr)[i] for r in rs) for i in range(n)]
    return xs, [statistics.mean(r.accuracy[i] for r in rs) for i in range(n)]


def summary_table(runs: list[RunCurves], target: float | None = None) -> tuple[str, float]:
    """Markdown table per label: final accuracy mean ± std over seeds, rollouts and seconds to ``target``
    (default: the first label's mean final accuracy). Returns (table, target).

    "To target" is read off the label's seed-mean curve (mean accuracy at each evaluation, against the mean
    rollouts / seconds there), so the reference label reaches its own mean at the latest at its last
    evaluation; "never" means the mean curve stays below the target."""
    labels = list(dict.fromkeys(r.label for r in runs))
    finals = {lab: [r.accuracy[-1] for r in runs if r.label == lab] for lab in labels}
    if target is None:
        target = statistics.mean(finals[labels[0]])
    lines = [f"| run | seeds | held-out acc. start | final (mean ± std) | rollouts to {target:.3f} | "
             f"seconds to {target:.3f} | mean staleness |", "|---|---|---|---|---|---|---|"]
    for lab in labels:
        rs = [r for r in runs if r.label == lab]
        f = finals[lab]
        std = statistics.stdev(f) if len(f) > 1 else 0.0
        reach_r = _first_reach(*_mean_curve(rs, "rollouts"), target)
        reach_s = _first_reach(*_mean_curve(rs, "seconds"), target)
        fmt = lambda x, spec: "never" if math.isnan(x) else format(x, spec)  # noqa: E731
        stale = statistics.mean(statistics.mean(r.staleness) if r.staleness else 0.0 for r in rs)
        lines.append(f"| {lab} | {len(rs)} | {statistics.mean(r.accuracy[0] for r in rs):.3f} | "
                     f"{statistics.mean(f):.3f} ± {std:.3f} | {fmt(reach_r, ',.0f')} | {fmt(reach_s, '.1f')} | "
                     f"{stale:.2f} |")
    return "\n".join(lines), target


def _smooth(ys: list[float], k: int = 10) -> list[float]:
    out, acc = [], []
    for y in ys:
        acc.append(y)
        acc = acc[-k:]
        out.append(sum(acc) / len(acc))
    return out


def dashboard(runs: list[RunCurves], out_png: str | Path, title: str = "") -> Path:
    """One PNG: accuracy vs steps / rollouts / seconds, training reward, entropy and staleness vs steps, and
    tool calls per episode vs steps when the runs are multi-turn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r.label for r in runs))
    colors = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
    tools = any(r.tool_calls for r in runs)
    fig, axes = plt.subplots(1, 7 if tools else 6, figsize=(33.6 if tools else 28.8, 4.2))
    panels = [("steps", "step"), ("rollouts", "rollouts generated"), ("seconds", "wall-clock s")]
    for ax, (attr, xlabel) in zip(axes[:3], panels):
        for r in runs:
            ax.plot(getattr(r, attr), r.accuracy, "o-", ms=2.5, lw=1, alpha=0.8, color=colors[r.label])
        ax.set(xlabel=xlabel, ylabel="held-out greedy accuracy")
    for r in runs:
        axes[3].plot(r.train_steps, _smooth(r.reward), lw=1, alpha=0.8, color=colors[r.label])
        axes[4].plot(r.train_steps, _smooth(r.entropy), lw=1, alpha=0.8, color=colors[r.label])
        axes[5].plot(r.train_steps, r.staleness, lw=1, alpha=0.8, color=colors[r.label])
    axes[3].set(xlabel="step", ylabel="training reward (10-step mean)")
    axes[4].set(xlabel="step", ylabel="entropy (10-step mean)")
    axes[5].set(xlabel="step", ylabel="mean staleness (versions)")
    if tools:
        for r in runs:
            axes[6].plot(r.train_steps[: len(r.tool_calls)], _smooth(r.tool_calls), lw=1, alpha=0.8,
                         color=colors[r.label])
        axes[6].set(xlabel="step", ylabel="tool calls per episode (10-step mean)")
    handles = [plt.Line2D([], [], color=colors[lab], label=lab) for lab in labels]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(labels), 6), frameon=False)
    if title:
        fig.suptitle(title, y=0.02, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.9))
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
