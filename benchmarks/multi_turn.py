"""Benchmark: per-turn generation cost of a multi-turn episode (the calculator agent, HF engine, CPU).

    .venv/bin/python benchmarks/multi_turn.py [--tasks 32] [--group 8] [--repeats 3]

Runs the ``multi_turn`` workflow of ``examples/calculator_agent.yaml`` (bundled calculator agent, compact
tool format, <= 3 turns) on held-out tasks with the warm-start weights, timing every call the workflow
makes to the rollout engine. Per turn: episodes still running, mean context length (prompt + everything
so far), tokens generated, seconds, and seconds per generated token, with the KV cache carried across
turns (``keep_kv``, the default) and with every turn's context recomputed; then one single-turn call with
the same number of rows and new tokens, for comparison.

``--continue-sizes`` adds where the reuse pays: a random Llama (hidden 256, 4 layers) with contexts of
C tokens per row, continued by 8 observation tokens and 8 generated tokens, timed recomputing the
context against continuing the kept cache.
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
    def __init__(self, engine, reuse: bool = True):
        self.engine, self.reuse, self.calls = engine, reuse, []

    def generate(self, prompts, **kw):
        t0 = time.perf_counter()
        ro = self.engine.generate(prompts, **{**kw, "keep_kv": kw.get("keep_kv", False) and self.reuse})
        self.calls.append({"rows": len(prompts) * kw.get("n", 1), "context": statistics.mean(len(p) for p in prompts),
                           "tokens": sum(len(r) for r in ro.response_ids), "s": time.perf_counter() - t0})
        return ro


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--continue-sizes", default="", help="e.g. 64,256,1024: context tokens per row")
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
    runs = {True: [], False: []}
    for r in range(args.repeats + 1):  # the first repeat warms up
        for reuse in (True, False):  # alternated, so load drifts hit both alike
            engine = TimedEngine(make_engine("hf", model, tok), reuse)
            t0 = time.perf_counter()
            exps = workflow(engine, tok, tasks, scorer, sampling=sampling,
                            generator=torch.Generator().manual_seed(r), version=0, batch_index=-1)
            if r:
                runs[reuse].append((engine.calls, time.perf_counter() - t0, exps))
    print("| KV across turns | turn | episodes running | mean context tokens | tokens generated | median s | "
          "ms per generated token |")
    print("|---|---|---|---|---|---|---|")
    for reuse, rows in runs.items():
        for turn in range(max(len(c) for c, _, _ in rows)):
            cs = [c[turn] for c, _, _ in rows if turn < len(c)]
            s = statistics.median(c["s"] for c in cs)
            toks = statistics.median(c["tokens"] for c in cs)
            print(f"| {'kept' if reuse else 'recomputed'} | {turn + 1} | {statistics.median(c['rows'] for c in cs):.0f}"
                  f" | {statistics.median(c['context'] for c in cs):.1f} | {toks:.0f} | {s:.3f} | "
                  f"{1000 * s / max(toks, 1):.2f} |")
    for reuse, rows in runs.items():
        turns = statistics.mean(e.info["episode"]["turns"] for _, _, ex in rows for e in ex)
        total = statistics.median(t for _, t, _ in rows)
        gen = statistics.median(sum(c["s"] for c in calls) for calls, _, _ in rows)
        print(f"\nKV {'kept' if reuse else 'recomputed'}: episodes {args.tasks} x {args.group}, mean turns "
              f"{turns:.2f}; whole batch {total:.3f} s, of which engine {gen:.3f} s and environment + assembly "
              f"{total - gen:.3f} s")
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
    if args.continue_sizes:
        continuation(tok, [int(c) for c in args.continue_sizes.split(",")], args.tasks, args.repeats)


def continuation(tok, sizes: list[int], rows: int, repeats: int) -> None:
    """Seconds of a turn that continues C-token contexts: recomputing them against continuing the cache."""
    import torch

    from offpolicy.rollout.engine import HFEngine
    from offpolicy.train.tiny import build_model

    vocab = len(tok)
    model = build_model(vocab, hidden=256, layers=4, heads=4, intermediate=1024, seed=0, max_positions=max(sizes) + 64).eval()
    print(f"\ncontinuing a turn: random Llama 256x4 ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M), "
          f"{rows} rows, 8 observation + 8 generated tokens")
    print("| context tokens | recomputed s | continued s | speed-up |")
    print("|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for C in sizes:
        prompts = [torch.randint(3, vocab, (C,), generator=g).tolist() for _ in range(rows)]
        obs = torch.randint(3, vocab, (8,), generator=g).tolist()
        times = {True: [], False: []}
        for _ in range(repeats + 1):
            for keep in (True, False):
                engine = HFEngine(model, pad_id=tok.pad_token_id, eos_id=-1)  # no EOS: every row runs its tokens
                ro = engine.generate(prompts, max_new_tokens=8, keep_kv=keep, generator=torch.Generator().manual_seed(1))
                nxt = [p + r.tolist() + obs for p, r in zip(prompts, ro.response_ids)]
                t0 = time.perf_counter()
                engine.generate(nxt, max_new_tokens=8, generator=torch.Generator().manual_seed(2))
                times[keep].append(time.perf_counter() - t0)
        kept, recomputed = statistics.median(times[True][1:]), statistics.median(times[False][1:])
        print(f"| {C} | {recomputed:.3f} | {kept:.3f} | {recomputed / kept:.2f}x |")


if __name__ == "__main__":
    main()
