"""Benchmark: per-turn generation cost of a multi-turn episode (the calculator agent, HF engine, CPU).

    .venv/bin/python benchmarks/multi_turn.py [--tasks 32] [--group 8] [--repeats 3]

Runs the ``multi_turn`` workflow of ``examples/calculator_agent.yaml`` (bundled calculator agent, compact
tool format, <= 3 turns) on held-out tasks with the warm-start weights, timing every call the workflow
makes to the rollout engine. Per turn: episodes still running, mean context length (prompt + everything
so far), tokens generated, seconds, and seconds per generated token; then the same for one single-turn
call with the same number of rows and new tokens, for comparison. The engine recomputes each turn's whole
context (no KV cache carried across turns), which is the overhead measured here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class TimedEngine:
    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompts, **kw):
        t0 = time.perf_counter()
        ro = self.engine.generate(prompts, **kw)
        self.calls.append({"rows": len(prompts) * kw.get("n", 1), "context": statistics.mean(len(p) for p in prompts),
                           "tokens": sum(len(r) for r in ro.response_ids), "s": time.perf_counter() - t0})
        return ro


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from offpolicy.config import load_config
    from offpolicy.data import calculator
    from offpolicy.rewards.exact_match import exact_match
    from offpolicy.rewards.guard import GuardedReward
    from offpolicy.rollout.engine import make_engine
    from offpolicy.rollout.model import policy_from_config
    from offpolicy.rollout.workflow import Sampling, build_workflow

    torch.set_num_threads(2)
    cfg = load_config(ROOT / "examples" / "calculator_agent.yaml")
    model, tok = policy_from_config(cfg.model, training=False)
    workflow = build_workflow(cfg.workflow)
    tasks = calculator.generate("eval", args.tasks, seed=0)
    scorer = GuardedReward(exact_match, timeout_s=None)
    sampling = Sampling(args.group, cfg.rollout.max_new_tokens)
    rows = []
    for r in range(args.repeats + 1):  # the first repeat warms up
        engine = TimedEngine(make_engine("hf", model, tok))
        t0 = time.perf_counter()
        exps = workflow(engine, tok, tasks, scorer, sampling=sampling, generator=torch.Generator().manual_seed(r),
                        version=0, batch_index=-1)
        if r:
            rows.append((engine.calls, time.perf_counter() - t0, exps))
    print("| turn | episodes running | mean context tokens | tokens generated | median s | ms per generated token |")
    print("|---|---|---|---|---|---|")
    for turn in range(max(len(c) for c, _, _ in rows)):
        cs = [c[turn] for c, _, _ in rows if turn < len(c)]
        s = statistics.median(c["s"] for c in cs)
        toks = statistics.median(c["tokens"] for c in cs)
        print(f"| {turn + 1} | {statistics.median(c['rows'] for c in cs):.0f} | "
              f"{statistics.median(c['context'] for c in cs):.1f} | {toks:.0f} | {s:.3f} | {1000 * s / max(toks, 1):.2f} |")
    turns = statistics.mean(e.info["episode"]["turns"] for _, _, ex in rows for e in ex)
    total = statistics.median(t for _, t, _ in rows)
    gen = statistics.median(sum(c["s"] for c in calls) for calls, _, _ in rows)
    print(f"\nepisodes: {args.tasks} x {args.group}, mean turns {turns:.2f}; whole batch {total:.3f} s, of which "
          f"engine {gen:.3f} s and environment + assembly {total - gen:.3f} s")
    engine = make_engine("hf", model, tok)
    prompts = [tok(t.prompt)["input_ids"] for t in tasks]
    times = []
    for r in range(args.repeats + 1):
        t0 = time.perf_counter()
        engine.generate(prompts, n=args.group, max_new_tokens=cfg.rollout.max_new_tokens,
                        generator=torch.Generator().manual_seed(r))
        times.append(time.perf_counter() - t0)
    print(f"single-turn call on the same prompts (n={args.group}, <= {cfg.rollout.max_new_tokens} tokens): "
          f"{statistics.median(times[1:]):.3f} s")


if __name__ == "__main__":
    main()
