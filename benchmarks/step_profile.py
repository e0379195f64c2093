"""Benchmark: the lean step options on the demo, A/B/A/B in one process, against measured matmul peaks.

    .venv/bin/python benchmarks/step_profile.py [--steps 30] [--warmup 3] [--variants a,b,...] [--quick]

The demo (``offpolicy train`` defaults: bundled model, 32 prompts x 8 samples, <= 5 new tokens, grpo, sync)
is run once per variant per round, the variants alternating (round 1: A B C ..., round 2: A B C ...), so that
a machine whose load drifts slows every variant alike and the medians stay comparable. Each variant has its
own copy of the policy, optimiser, engine and explorer (same seeds), built from config overrides:

- ``baseline``: what the demo ran before issue 18 (AdamW for_loop, dynamic KV cache, float32, eager,
  transformers' forward: every variant but the lean ones sets ``model.forward_impl=transformers``);
- ``fused``: ``train.optimizer_impl=fused``;
- ``bf16``: fused + ``model.autocast=bfloat16`` (engine and trainer both under autocast);
- ``bf16_trainer``: fused + bf16 autocast in the trainer only (engine float32): shows the mismatch that
  running the engine under the same autocast avoids;
- ``compile``: fused + ``train.compile=true``;
- ``static``: fused + ``rollout.kv_cache=static``;
- ``compile_decode``: static + ``rollout.compile_decode=true``;
- ``all``: fused + bf16 + compile + static + compiled decode;
- ``lean``: ``model.forward_impl=lean`` (offpolicy's functional Llama forward, engine and trainer; what
  the demo's default ``auto`` picks);
- ``lean_compile``: lean + ``train.compile=true``;
- ``lean_bf16``: lean + ``model.autocast=auto`` (bf16 where the device has bf16 matrix units, else float32).

Per step: generation seconds (``Explorer.explore``: sampling + reward, the runner's ``gen_s``), training
seconds (collate + ``train_step`` + scheduler, the runner's ``train_s``), their sum, ``engine_kl`` and
``engine_max_abs_diff`` (the trainer's log-probs against the engine's at staleness 0), torch.compile graph
counts, and ``os.getloadavg()``.

FLOPs are counted from the model config and each step's actual (padded) shapes: a forward costs
2 x (matmul parameters of the layers) per token through the layers, plus 2 x hidden x vocab per token that
reaches the output head (logits_to_keep), plus attention 4 x context x hidden per token per layer
(QK^T and AV); a backward costs 2 forwards. Training = one no-grad forward (the plan's recomputed old_logp,
if any) + forward + backward over the shared prompt (once per group) and the response tokens; generation =
the prompt prefill (once per group) + one token per row per decode step. Effective rates are these FLOPs
over the median seconds, against the matmul peaks measured here (``a @ b`` of the demo's shapes, fp32 and
bf16, same threads; the 3072x128x512 one again every round, its median used). Writes ``benchmarks/out/step_profile/{result.json, summary.md}`` and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FUSED = ["train.optimizer_impl=fused"]
STATIC = ["rollout.kv_cache=static"]
VARIANTS = {
    "baseline": ["train.optimizer_impl=for_loop"],
    "fused": FUSED,
    "bf16": [*FUSED, "model.autocast=bfloat16"],
    "bf16_trainer": [*FUSED],  # autocast around train_step only (see _train)
    "compile": [*FUSED, "train.compile=true"],
    "static": [*FUSED, *STATIC],
    "compile_decode": [*FUSED, *STATIC, "rollout.compile_decode=true"],
    "all": [*FUSED, "model.autocast=bfloat16", "train.compile=true", *STATIC, "rollout.compile_decode=true"],
    "lean": ["model.forward_impl=lean"],
    "lean_compile": ["model.forward_impl=lean", "train.compile=true"],
    "lean_bf16": ["model.forward_impl=lean", "model.autocast=auto"],
}
QUICK = ["baseline", "fused", "bf16", "static"]  # nothing that compiles: seconds, not minutes
# quick: a small batch, rewards scored in-process (no worker pool per variant)
QUICK_SETTINGS = ["rollout.prompts_per_step=8", "rollout.group_size=4", "tasks.eval_size=4", "reward.timeout_s=null"]


@dataclass
class Variant:
    name: str
    cfg: object
    model: object
    optimizer: object
    scheduler: object
    explorer: object
    trainer_autocast: bool
    rows: dict = field(default_factory=dict)  # key -> list of per-step values


SHAPES = ((3072, 128, 512), (3072, 512, 128), (256, 128, 512))  # MLP up / down over a batch's tokens; one decode step
MAIN = "3072x128x512"


def matmul_peaks(threads: int, repeats: int = 20, shapes=SHAPES) -> dict:
    """Median GFLOP/s of ``a @ b`` for the demo's shapes, float32 and bfloat16."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for m, k, n in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            for _ in range(3):
                a @ b
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - t0)
            out[f"{m}x{k}x{n} {str(dtype).split('.')[-1]}"] = 2 * m * k * n / statistics.median(times) / 1e9
    return out


def _model_flops(model) -> tuple[int, int, int, int]:
    """(matmul parameters per token in the layers, hidden, vocab, layers) from the model config."""
    c = model.config
    d, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    head_dim = getattr(c, "head_dim", None) or d // c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    attn = d * c.num_attention_heads * head_dim * 2 + d * kv * head_dim * 2  # q, o; k, v
    mlp = 3 * d * c.intermediate_size  # gate, up, down
    return layers * (attn + mlp), d, vocab, layers


def forward_flops(shape, *, tokens: int, head_tokens: int, context_sum: int) -> float:
    """FLOPs of one forward: ``tokens`` through the layers, ``head_tokens`` through the output head,
    ``context_sum`` = the sum over tokens of the positions each attends to."""
    body, d, vocab, layers = shape
    return 2 * body * tokens + 2 * d * vocab * head_tokens + 4 * d * layers * context_sum


def step_flops(shape, batch, *, recompute: bool) -> tuple[float, float]:
    """(generation FLOPs, training FLOPs) of one demo step from the batch's padded shapes."""
    B, L = batch.input_ids_BL.shape
    P, T = batch.prompt_len, L - batch.prompt_len
    G = int((batch.input_ids_BL[1:, :P] != batch.input_ids_BL[:-1, :P]).any(-1).sum()) + 1
    prefill = forward_flops(shape, tokens=G * P, head_tokens=G, context_sum=G * P * (P + 1) // 2)
    decode = sum(forward_flops(shape, tokens=B, head_tokens=B, context_sum=B * (P + t + 1)) for t in range(T - 1))
    # trainer: the prompt once per group, then response tokens 0..T-2 (each predicts the next)
    resp = forward_flops(shape, tokens=B * (T - 1), head_tokens=B * (T - 1),
                         context_sum=sum(B * (P + t + 1) for t in range(T - 1)))
    fwd = prefill + resp
    return prefill + decode, fwd * (3 + (1 if recompute else 0))


def _build(name: str, base_cfg_overrides: list[str], ctx, tmp: Path, threads: int) -> Variant:
    from offpolicy.config import load_config
    from offpolicy.pipeline.context import make_optimizer, task_source
    from offpolicy.pipeline.explorer import Explorer
    from offpolicy.rollout.lean import enable_lean_forward
    from offpolicy.rollout.model import enable_autocast
    from offpolicy.train.step import compile_forward

    cfg = load_config(None, [*base_cfg_overrides, *VARIANTS[name]])
    model = copy.deepcopy(ctx.model)  # the same initial weights for every variant
    if cfg.model.forward_impl == "lean":
        enable_lean_forward(model)
    if cfg.model.autocast:
        enable_autocast(model, cfg.model.autocast)
    if cfg.train.compile:
        compile_forward(model)
    opt, sched = make_optimizer(cfg, model)
    tasks, _ = task_source(cfg, ctx.tokenizer)
    explorer = Explorer(cfg, model, ctx.tokenizer, tasks=tasks, reward_fn=ctx.reward_fn, run_dir=tmp)
    return Variant(name, cfg, model, opt, sched, explorer, trainer_autocast=name == "bf16_trainer")


def _step(v: Variant, step: int, ctx, shape) -> dict:
    import torch

    from offpolicy.data.experience import collate
    from offpolicy.train.step import train_step

    exps, gen_s = v.explorer.explore(step - 1, version=step - 1)
    t0 = time.perf_counter()
    batch = collate(exps, ctx.tokenizer.pad_token_id)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=v.trainer_autocast)
    with autocast:
        stats = train_step(v.model, v.optimizer, batch, ctx.algo, ctx.plan, step=step)
    v.scheduler.step()
    train_s = time.perf_counter() - t0
    gen_f, train_f = step_flops(shape, batch, recompute="recompute" in (ctx.plan.old_logp, ctx.plan.center_logp))
    return {"gen_s": gen_s, "train_s": train_s, "step_s": gen_s + train_s, "gen_gflop": gen_f / 1e9,
            "train_gflop": train_f / 1e9, "engine_kl": stats.get("engine_kl", float("nan")),
            "engine_max_abs_diff": stats.get("engine_max_abs_diff", float("nan")),
            "reward": sum(e.reward for e in exps) / len(exps), "load1": os.getloadavg()[0]}


def _graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - counters are internal: 0 where they moved
        return 0


def run(*, steps: int, warmup: int, variants: list[str], threads: int, quick: bool, log=print) -> dict:
    import torch

    from offpolicy.config import load_config
    from offpolicy.pipeline.context import build_context

    torch.set_num_threads(threads)
    peaks = matmul_peaks(threads, repeats=5 if quick else 20)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # the shared model is built with transformers' forward; the lean variants install the lean one on their copy
        base = [f"run.dir={tmp}/run", "run.loggers=[]", f"train.threads={threads}", "model.forward_impl=transformers",
                *(QUICK_SETTINGS if quick else [])]
        ctx = build_context(load_config(None, base), tmp)
        torch.set_num_threads(threads)
        shape = _model_flops(ctx.model)
        built = [_build(name, base, ctx, tmp, threads) for name in variants]
        graphs, round_peaks = {}, {}
        try:
            for r in range(warmup + steps):
                for v in built:  # alternate: A B C ... per round
                    g0 = _graphs()
                    row = _step(v, r + 1, ctx, shape)
                    graphs.setdefault(v.name, []).append(_graphs() - g0)
                    if r >= warmup:
                        for k, x in row.items():
                            v.rows.setdefault(k, []).append(x)
                # the peaks again each round (a drifting load hits them as it hits the variants): median over rounds
                for key, v in matmul_peaks(threads, repeats=3, shapes=SHAPES[:1]).items():
                    round_peaks.setdefault(key, []).append(v)
                log(f"round {r + 1}/{warmup + steps}: " + ", ".join(
                    f"{v.name} {v.rows['step_s'][-1] if v.rows else float('nan'):.3f}s" for v in built)
                    + f" (load {os.getloadavg()[0]:.1f})")
        finally:
            for v in built:
                v.explorer.close()
    peaks.update({f"{k} per round": statistics.median(v) for k, v in round_peaks.items()})
    fp32, bf16 = peaks[f"{MAIN} float32 per round"], peaks[f"{MAIN} bfloat16 per round"]
    results = {}
    for v in built:
        med = {k: statistics.median(x) for k, x in v.rows.items()}
        bf = v.cfg.model.autocast is not None or v.trainer_autocast
        results[v.name] = {
            **med, "steps": len(v.rows["step_s"]), "overrides": VARIANTS[v.name],
            "gen_gflops": med["gen_gflop"] / med["gen_s"], "train_gflops": med["train_gflop"] / med["train_s"],
            "peak_gflops": bf16 if bf else fp32, "engine_kl_max": max(map(abs, v.rows["engine_kl"])),
            "engine_max_abs_diff_max": max(v.rows["engine_max_abs_diff"]),
            "graphs_warmup": sum(graphs[v.name][:warmup]), "graphs_timed": sum(graphs[v.name][warmup:]),
            "load1_min": min(v.rows["load1"]), "load1_max": max(v.rows["load1"]),
            "per_step": {k: v.rows[k] for k in ("gen_s", "train_s", "step_s", "load1")},  # for quiet-round subsets
        }
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": threads, "quick": quick,
            "steps": steps, "warmup": warmup, "peaks_gflops": peaks, "variants": results,
            "loadavg_end": os.getloadavg(), "torch": torch.__version__, "cpu_bf16_units": _bf16_units()}


def _bf16_units() -> bool:
    from offpolicy.rollout.model import bf16_matmul_units

    return bf16_matmul_units("cpu")


def summary(res: dict) -> str:
    base = res["variants"].get("baseline")
    lines = [f"step_profile {res['date']}, {res['threads']} threads, {res['steps']} timed steps per variant after "
             f"{res['warmup']} warm-up, alternating; bf16 matrix units detected: {res['cpu_bf16_units']}; "
             f"load average at the end {', '.join(f'{x:.1f}' for x in res['loadavg_end'])}",
             "", "matmul peaks (GFLOP/s, a @ b median): "
             + ", ".join(f"{k} {v:.3g}" for k, v in res["peaks_gflops"].items()), "",
             "| variant | median gen s | median train s | median step s | step vs baseline | gen GFLOP/s (% peak) | "
             "train GFLOP/s (% peak) | engine_kl (max abs) | engine_max_abs_diff (max) | graphs warm-up/timed | "
             "load1 min-max |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["variants"].items():
        rel = f"{base['step_s'] / r['step_s']:.2f}x" if base else "-"
        lines.append(
            f"| {name} | {r['gen_s']:.4f} | {r['train_s']:.4f} | {r['step_s']:.4f} | {rel} | "
            f"{r['gen_gflops']:.3g} ({100 * r['gen_gflops'] / r['peak_gflops']:.2g}%) | "
            f"{r['train_gflops']:.3g} ({100 * r['train_gflops'] / r['peak_gflops']:.2g}%) | "
            f"{r['engine_kl_max']:.2e} | {r['engine_max_abs_diff_max']:.2e} | {r['graphs_warmup']}/{r['graphs_timed']} | "
            f"{r['load1_min']:.1f}-{r['load1_max']:.1f} |")
    r0 = next(iter(res["variants"].values()))
    lines += ["", f"FLOPs per step (median, from the model config and the batch shapes): generation "
              f"{r0['gen_gflop']:.2f} GFLOP, training {r0['train_gflop']:.2f} GFLOP; % peak against the fp32 peak "
              "(bf16 variants: the bf16 peak) of 3072x128x512, measured once per round (median)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first (compiles happen here)")
    ap.add_argument("--variants", default=None, help=f"comma list of {', '.join(VARIANTS)} (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true",
                    help="8 prompts x 4 samples, 1 warm-up + 2 timed steps, no compiling variants")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "step_profile"))
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    names = args.variants.split(",") if args.variants else (QUICK if args.quick else list(VARIANTS))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    res = run(steps=args.steps, warmup=args.warmup, variants=names, threads=args.threads, quick=args.quick,
              log=lambda *a: print(*a, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(res, indent=2))
    text = summary(res)
    (out / "summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
