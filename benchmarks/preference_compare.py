"""Offline DPO vs online DPO vs OPA-DPO vs GRPO on the bundled model, one budget, several seeds.

    python benchmarks/preference_compare.py --seeds 0 1 2 --steps 200 --out benchmarks/out/preference_compare

Every method trains the bundled arithmetic model for ``--steps`` optimiser steps of 32 prompts or pairs
(AdamW), and is scored the same way at the end: greedy accuracy on the 512 held-out arithmetic tasks
(``offpolicy eval``'s measure). What each step consumes differs, and that is the point of the comparison.
Each method runs with the settings its docs recommend:

- ``grpo``: 32 tasks x 8 on-policy samples, rule reward, lr 3e-4 (the demo);
- ``online_dpo``: the same sampling, one (best, worst) pair per task, beta 0.1, lr 3e-4 (the preset);
- ``dpo``: 32 offline pairs per step from a file (correct answer > a wrong one, ``offpolicy.data.pairs``),
  nothing sampled, beta 0.1, lr 1e-4 (docs/preferences.md: the best of the measured settings); nothing is
  random here but the order of the pairs, so the seed sets that (``tasks.seed``);
- ``dpo_nll``: the same with the chosen response's NLL added to each pair's loss (RPO, ``nll_coef`` 1.0);
- ``opa_dpo``: ``examples/opa_dpo_tiny.yaml``: 2,000 sampled answers, revised by the ground truth, 100
  steps of supervised alignment, then ``--steps`` DPO steps (beta 2.0, lr 3e-5) from the aligned policy.

Writes ``results.json`` (every run), ``summary.md`` (mean +- std over seeds, seconds) and
``preference_compare.png`` (held-out accuracy per method and seed) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

METHODS = ("grpo", "online_dpo", "dpo", "dpo_nll", "opa_dpo")
COMMON = ["run.loggers=[]", "run.progress=false", "train.threads=2", "eval.every=0"]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _greedy(model_dir: Path, seed: int) -> float:
    """Held-out greedy accuracy of a saved policy on the arithmetic tasks (as ``offpolicy eval``)."""
    from offpolicy.config import load_config
    from offpolicy.pipeline.context import reward_function, task_source
    from offpolicy.rollout.model import load_policy
    from offpolicy.train.evaluate import evaluate

    cfg = load_config(None, [f"model.path={model_dir}", f"train.seed={seed}"])
    model, tok = load_policy(str(model_dir))
    tasks = task_source(cfg, tok)[1]
    return evaluate(model, tok, tasks, reward_function(cfg), max_new_tokens=cfg.rollout.max_new_tokens)["accuracy"]


def _train(overrides: list[str]) -> dict:
    from offpolicy.config import load_config
    from offpolicy.pipeline import run

    res = run(load_config(None, [*COMMON, *overrides]))
    return {"before": res.eval_before["accuracy"], "after": res.eval_after["accuracy"], "run_dir": str(res.run_dir)}


def run_method(method: str, seed: int, steps: int, out: Path, pairs: tuple[Path, Path]) -> dict:
    run_dir = out / f"{method}-s{seed}"
    t0 = time.perf_counter()
    base = [f"train.steps={steps}", f"train.seed={seed}", f"run.dir={run_dir}"]
    if method == "grpo":
        r = _train(base)
        acc = {"greedy_before": r["before"], "greedy_after": r["after"]}
    elif method == "online_dpo":
        r = _train([*base, "algorithm.preset=online_dpo"])
        acc = {"greedy_before": r["before"], "greedy_after": r["after"]}
    elif method in ("dpo", "dpo_nll"):
        nll = ["algorithm.loss_params={nll_coef: 1.0}"] if method == "dpo_nll" else []
        r = _train([*base, "algorithm.preset=dpo", "tasks.name=pairs", f"tasks.train_path={pairs[0]}",
                    f"tasks.eval_path={pairs[1]}", "train.lr=1e-4", f"tasks.seed={seed}", *nll])  # seed: pair order
        acc = {"preference_after": r["after"], "greedy_after": _greedy(run_dir / "final", seed)}
    elif method == "opa_dpo":
        from offpolicy.pipeline.opa_dpo import opa_dpo_run

        r = opa_dpo_run(EXAMPLES / "opa_dpo_tiny.yaml", seed=seed, overrides=[*COMMON, f"train.steps={steps}"],
                        run_dir=run_dir)
        acc = {"greedy_before": r["greedy_accuracy_base"], "greedy_aligned": r["greedy_accuracy_aligned"],
               "greedy_after": r["greedy_accuracy"], "preference_after": r["preference_accuracy"]}
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return {"method": method, "seed": seed, "steps": steps, **acc, "seconds": time.perf_counter() - t0}


def summarise(results: list[dict]) -> str:
    lines = ["| method | greedy held-out accuracy, mean ± std | per seed | seconds (mean) |", "|---|---|---|---|"]
    for m in METHODS:
        rows = [r for r in results if r["method"] == m]
        if not rows:
            continue
        accs = [r["greedy_after"] for r in rows]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        per_seed = ", ".join(f"{a:.3f}" for a in accs)
        lines.append(f"| {m} | {statistics.mean(accs):.3f} ± {std:.3f} | {per_seed} | "
                     f"{statistics.mean(r['seconds'] for r in rows):.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path, before: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, m in enumerate(METHODS):
        accs = [r["greedy_after"] for r in results if r["method"] == m]
        if accs:
            ax.scatter([i] * len(accs), accs, color="C0", zorder=3)
            ax.bar(i, statistics.mean(accs), color="C0", alpha=0.35)
    if before is not None:
        ax.axhline(before, color="gray", ls="--", lw=1, label=f"initial policy {before:.3f}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xticks(range(len(METHODS)), METHODS)
    ax.set_ylabel("greedy held-out accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"bundled model, {results[0]['steps']} steps, {len({r['seed'] for r in results})} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/preference_compare"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from offpolicy.data.pairs import arithmetic_pairs, write_pairs

    pairs = (write_pairs(args.out / "pairs_train.jsonl", arithmetic_pairs("train", 4000, seed=0)),
             write_pairs(args.out / "pairs_eval.jsonl", arithmetic_pairs("eval", 256, seed=0)))
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["method"], r["seed"], r["steps"]) for r in results}
    for seed in args.seeds:  # seed-major: an interrupted run still has every method for the first seeds
        for m in args.methods:
            if (m, seed, args.steps) in done:
                continue
            r = run_method(m, seed, args.steps, args.out, pairs)
            print(json.dumps(r), flush=True)
            results.append(r)
            results_path.write_text(json.dumps(results, indent=1) + "\n")
    results = [r for r in results if r["steps"] == args.steps and r["seed"] in args.seeds]
    before = next((r["greedy_before"] for r in results if "greedy_before" in r), None)
    table = summarise(results)
    (args.out / "summary.md").write_text(table + "\n")
    plot(results, args.out / "preference_compare.png", before)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
