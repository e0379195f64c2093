"""Benchmark: the demo's median step time on a shared machine (one competing CPU-bound process) vs quiet.

    .venv/bin/python benchmarks/contention.py [--steps 120] [--variants default passive threads1]

Each variant runs ``offpolicy train`` (the default demo, ``--steps`` steps, no evaluation in between) in a
fresh process, once quiet and once beside a busy loop (``python -c 'while True: pass'``, one core's
worth of work), and reports the median step seconds over the steps after the first 10 and the ratio
loaded / quiet. Variants: ``default`` (the shipped defaults), ``passive`` (``OMP_WAIT_POLICY=PASSIVE``),
``active`` (``OMP_WAIT_POLICY=ACTIVE``, spinning threads), ``threads1`` (``train.threads=1``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"default": ({}, []), "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, []),
            "active": ({"OMP_WAIT_POLICY": "ACTIVE"}, []), "threads1": ({}, ["train.threads=1"]),
            "spin1k": ({"GOMP_SPINCOUNT": "1000"}, []), "spin10k": ({"GOMP_SPINCOUNT": "10000"}, []),
            "spin100k": ({"GOMP_SPINCOUNT": "100000"}, [])}


def median_step(steps: int, env: dict, overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "offpolicy.cli", "train", f"train.steps={steps}", "eval.every=0",
               "tasks.eval_size=32", "run.loggers=[]", "run.save_final=false", "run.progress=false",
               f"run.dir={tmp}/run", *overrides]
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        return statistics.median(r["step_s"] for r in rows if r.get("kind") == "train" and r["step"] > 10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    print("| variant | quiet median step s | loaded median step s | loaded / quiet |")
    print("|---|---|---|---|")
    for name in args.variants:
        env, overrides = VARIANTS[name]
        quiet = median_step(args.steps, env, overrides)
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            loaded = median_step(args.steps, env, overrides)
        finally:
            hog.kill()
        print(f"| {name} | {quiet:.3f} | {loaded:.3f} | {loaded / quiet:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
