"""The GPU path, measured: generation and training throughput and model FLOP utilisation (issue 18, item 4).

    python3 benchmarks/gpu.py --out gpu_bench.md                   # on one GPU: 3 sizes, within 8 minutes
    .venv/bin/python benchmarks/gpu.py --dry-run --out /tmp/g.md   # CPU, tiniest size, 2 timed calls, ~10 s

Models: random smoke Qwen2 models (:mod:`offpolicy.train.smoke`) built here, offline, from the working tree:
``make_smoke_model`` trains its byte-level BPE tokenizer (ChatML specials and template) on a jsonl this script
writes from the repository's own text (docs/*.md, README.md and the package's source), not on the GSM8K file,
which lives outside the checkout and does not travel to a GPU machine; ``build_qwen2`` then builds one model
per size (``HIDDENxLAYERS``: head dim 64, a quarter as many KV heads, MLP 4 x hidden, tied embeddings).

Per size and precision, with the project's own code paths:

- HF engine: :meth:`offpolicy.rollout.engine.HFEngine.generate` on ``--prompts`` prompts of ``--prompt-len``
  tokens, ``--samples`` samples each, ``--new-tokens`` tokens per sample (EOS is disabled so that every call
  does the same work, as benchmarks of serving engines do); generated tokens/s and seconds per call.
- training: :func:`offpolicy.train.step.train_step` on those rollouts (random 0/1 rewards), with
  :meth:`Algorithm.from_config` and :func:`build_plan` from the default config (preset grpo) and the
  trainer's AdamW; seconds per step and trained response tokens/s. The batch is collated on the CPU and moved
  by the step, as in the pipeline.
- continuous batching: transformers' ``model.generate_batch`` on the same requests (each prompt repeated
  ``--samples`` times, EOS disabled, sampling at temperature 1), where the installed version has it.
- model FLOP utilisation: 6·N·tokens for training and 2·N·tokens for generation, N = the parameter count
  (the tied embedding counted once, as the output head's matmul), attention's own FLOPs left out. The tokens
  are those the code runs through the model: for training each group's prompt once (the step shares it) plus
  the responses but their last token (which predicts nothing); for generation the same prompt tokens plus
  every generated token. Continuous batching is credited with the same work. The peak is ``--peak-tflops``,
  else the datasheet's dense bf16 rate for a known device, else the bf16 matmul rate measured here.

Timing: ``--warmup`` calls first, never timed; ``torch.cuda.synchronize()`` before and after every timed
call; the median of the timed calls. ``--budget-s`` bounds the whole run: a measurement stops taking timed
calls once the budget is spent (it keeps at least one), and a row is skipped, with a printed reason, when less
of the budget is left than the previous (smaller) row took; the first row always runs. Output: a Markdown
table (date, device, versions, peak used) printed and written to ``--out`` (rewritten after each row).

On a GPU machine whose Python lacks pydantic (the config's dependency), carry it as wheels: see the "GPU
path" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# dense bf16 tensor-core rate by the vendors' datasheets (TFLOP/s, no sparsity); the first key found in the
# device name wins, so the PCIe/NVL parts come before the SXM ones
DATASHEET_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "H100": 989.0, "H200": 989.0,
                         "A100": 312.0, "L40S": 362.0}
DEFAULT_SIZES = "256x4,512x8,1024x12"
# --precision names -> the model config that the pipeline would run with
PRECISIONS = {"autocast": ["model.dtype=float32", "model.autocast=bfloat16"], "bf16": ["model.dtype=bfloat16"],
              "fp32": ["model.dtype=float32"]}
COLUMNS = ("size", "params M", "precision", "gen tok/s", "gen s", "gen MFU %", "train tok/s", "train s",
           "train MFU %", "step s", "CB tok/s", "CB MFU %", "timed calls")


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int

    @classmethod
    def parse(cls, text: str) -> "Size":
        hidden, layers = (int(x) for x in text.lower().split("x"))
        return cls(hidden, layers)

    @property
    def name(self) -> str:
        return f"{self.hidden}x{self.layers}"

    @property
    def heads(self) -> int:
        return max(1, self.hidden // 64)


def _corpus_jsonl(path: Path) -> str:
    """Question/answer rows of consecutive paragraphs of the repository's own text; returns the text too."""
    files = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"] + sorted((ROOT / "offpolicy").rglob("*.py"))
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in files if f.is_file())
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    with path.open("w", encoding="utf-8") as f:
        for q, a in zip(paras[::2], paras[1::2]):
            f.write(json.dumps({"question": q, "answer": a}) + "\n")
    return text


def _prompts(tokenizer, text: str, count: int, length: int) -> list[list[int]]:
    """``count`` windows of ``length`` real tokens from ``text`` (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stride = max(1, (len(ids) - length) // count)
    return [ids[i * stride: i * stride + length] for i in range(count)]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, *, warmup: int, iters: int, deadline: float) -> list[float]:
    """Seconds of each timed call of ``fn`` after ``warmup`` untimed ones; stops at ``deadline`` (keeps >= 1)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < iters and (not times or time.perf_counter() < deadline):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _matmul_tflops(device, dim: int) -> float:
    """The bf16 matmul rate measured here (median of 5 products of dim x dim x dim after 2 warm-ups)."""
    import torch

    a = torch.randn(dim, dim, device=device, dtype=torch.bfloat16)
    b = torch.randn(dim, dim, device=device, dtype=torch.bfloat16)
    times = _timed(lambda: a @ b, device, warmup=2, iters=5, deadline=math.inf)
    return 2 * dim**3 / statistics.median(times) / 1e12


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _peak(given: float | None, name: str, measured: float) -> tuple[float, str]:
    """The peak MFU is reported against, and where it comes from."""
    if given:
        return given, "given with --peak-tflops"
    for key, tflops in DATASHEET_BF16_TFLOPS.items():
        if key in name:
            return tflops, f"{key} datasheet, dense bf16"
    return measured, "the bf16 matmul rate measured here: no datasheet entry for this device"


def _rollout_batch(rollouts, prompts, *, pad_id: int, seed: int):
    """The training batch of these rollouts: random 0/1 rewards, one group per prompt."""
    import torch

    from offpolicy.data.experience import Experience, collate

    rng = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 2, (len(rollouts.prompt_index),), generator=rng).tolist()
    exps = [Experience(prompt_ids=torch.tensor(prompts[i]), response_ids=ids, response_mask=torch.ones(len(ids)),
                       behav_logp=logp, reward=float(r), group_id=str(i), task_id=str(i))
            for i, ids, logp, r in zip(rollouts.prompt_index, rollouts.response_ids, rollouts.behav_logp, rewards)]
    return collate(exps, pad_id)


def _continuous_batching(model, tokenizer, prompts, args, device, deadline):
    """(generated tokens per call, timed seconds) of ``model.generate_batch``, or (0, reason) when absent."""
    import transformers
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        return 0, f"transformers {transformers.__version__} has no generate_batch (continuous batching)"

    requests = [p for p in prompts for _ in range(args.samples)]
    gen_cfg = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                               eos_token_id=-1, pad_token_id=tokenizer.pad_token_id)
    # on a GPU the library sizes its cache from free memory; on a CPU that would be the host's memory (slow to fill)
    cb_cfg = (transformers.ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=1024)
              if device.type == "cpu" and hasattr(transformers, "ContinuousBatchingConfig") else None)
    counts: list[int] = []

    def call() -> None:
        out = model.generate_batch(requests, generation_config=gen_cfg, continuous_batching_config=cb_cfg,
                                   max_new_tokens=args.new_tokens, persistent_manager=True, progress_bar=False)
        counts.append(sum(len(r.generated_tokens) for r in out.values()))

    try:
        times = _timed(call, device, warmup=args.warmup, iters=args.iters, deadline=deadline)
    except Exception as e:  # a version whose continuous batching cannot run this model or device
        return 0, f"generate_batch failed: {type(e).__name__}: {e}"
    finally:
        if hasattr(model, "destroy_cached_continuous_batching_manager"):
            model.destroy_cached_continuous_batching_manager()
    expected = len(requests) * args.new_tokens
    if min(counts) != expected:
        return 0, f"generate_batch returned {min(counts)} of {expected} tokens (failed requests)"
    return expected, times


def _measure(size: Size, precision: str, tokenizer, prompts, args, device, deadline: float, peak: float,
             notes: list[str]) -> dict:
    import torch

    from offpolicy.config import load_config
    from offpolicy.rollout.engine import HFEngine
    from offpolicy.rollout.model import enable_autocast
    from offpolicy.train.algorithm import Algorithm
    from offpolicy.train.plan import build_plan
    from offpolicy.train.smoke import build_qwen2
    from offpolicy.train.step import train_step

    G, K, P, T = len(prompts), args.samples, args.prompt_len, args.new_tokens
    cfg = load_config(None, ["algorithm.preset=grpo", f"rollout.prompts_per_step={G}", f"rollout.group_size={K}",
                             f"rollout.max_new_tokens={T}", f"model.device={device}", *PRECISIONS[precision]])
    algo = Algorithm.from_config(cfg.algorithm, max_len=T)
    plan = build_plan(cfg, algo)
    model = build_qwen2(tokenizer, hidden=size.hidden, layers=size.layers, heads=size.heads,
                        kv_heads=max(1, size.heads // 4), intermediate=4 * size.hidden, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    model.to(device, dtype=getattr(torch, cfg.model.dtype))
    if cfg.model.autocast:  # as policy_from_config does: float32 master weights, bf16 matmuls
        enable_autocast(model, cfg.model.autocast)
    model.eval()
    # EOS disabled (no token id is -1): every call generates T tokens per row, the same work each time
    engine = HFEngine(model, pad_id=tokenizer.pad_token_id, eos_id=-1)
    gen = dict(n=K, max_new_tokens=T, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
               top_k=cfg.rollout.top_k)
    rollouts = engine.generate(prompts, **gen, generator=torch.Generator().manual_seed(args.seed))
    gen_times = _timed(lambda: engine.generate(prompts, **gen, generator=torch.Generator().manual_seed(args.seed)),
                       device, warmup=args.warmup - 1, iters=args.iters, deadline=deadline)
    gen_tokens = sum(len(r) for r in rollouts.response_ids)
    batch = _rollout_batch(rollouts, prompts, pad_id=tokenizer.pad_token_id, seed=args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                  weight_decay=cfg.train.weight_decay)
    skipped = []
    step = iter(range(1, 10**9))
    train_times = _timed(lambda: skipped.append(train_step(model, optimizer, batch, algo, plan,
                                                           step=next(step))["skipped_steps"]),
                         device, warmup=args.warmup, iters=args.iters, deadline=deadline)
    if sum(skipped):
        notes.append(f"{size.name} {precision}: {sum(skipped)} of {len(skipped)} training steps skipped (non-finite "
                     "loss or gradient: no optimiser update in those)")
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del optimizer
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":  # the library sizes its cache from the free memory
        torch.cuda.empty_cache()
    if cfg.model.autocast:  # the CB cache takes the model's dtype: float32 would not hold autocast's bf16 keys
        model.to(getattr(torch, cfg.model.autocast))
    model.eval()
    cb_tokens, cb = _continuous_batching(model, tokenizer, prompts, args, device, deadline)
    if not cb_tokens:
        notes.append(f"{size.name} {precision}: continuous batching skipped: {cb}")

    gen_s, train_s = statistics.median(gen_times), statistics.median(train_times)
    gen_flops = 2 * n_params * (G * P + gen_tokens)
    train_flops = 6 * n_params * (G * P + int(batch.mask_BT[:, :-1].sum()))
    row = {"size": size.name, "params M": n_params / 1e6, "precision": precision,
           "gen tok/s": gen_tokens / gen_s, "gen s": gen_s, "gen MFU %": 100 * gen_flops / gen_s / (peak * 1e12),
           "train tok/s": float(batch.mask_BT.sum()) / train_s, "train s": train_s,
           "train MFU %": 100 * train_flops / train_s / (peak * 1e12), "step s": gen_s + train_s,
           "CB tok/s": None, "CB MFU %": None,
           "timed calls": f"{len(gen_times)}/{len(train_times)}/{len(cb) if cb_tokens else 0}"}
    if cb_tokens:
        cb_s = statistics.median(cb)
        row.update({"CB tok/s": cb_tokens / cb_s, "CB MFU %": 100 * gen_flops / cb_s / (peak * 1e12)})
    print(f"  {size.name} {precision}: {n_params / 1e6:.1f}M params, gen {gen_s:.3f} s, train {train_s:.3f} s"
          + (f", CB {statistics.median(cb):.3f} s" if cb_tokens else "")
          + (f", peak memory {mem:.1f} GiB" if mem is not None else ""), flush=True)
    del model, engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return row


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"
    return str(v)


def render(header: list[str], rows: list[dict], notes: list[str]) -> str:
    lines = [*header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiniest size, tiny workload, 2 timed calls (< 60 s)")
    ap.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available; cpu with --dry-run)")
    ap.add_argument("--sizes", help=f"HIDDENxLAYERS,... (default {DEFAULT_SIZES}; 64x2 with --dry-run)")
    ap.add_argument("--precision",
                    help="comma list of autocast (fp32 weights + bf16 autocast, model.autocast=bfloat16), bf16 "
                         "(model.dtype=bfloat16), fp32 (default: autocast; all three with --dry-run)")
    ap.add_argument("--peak-tflops", type=float,
                    help="the device's peak for MFU (default: datasheet dense bf16, else the measured bf16 matmul)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of the measurements")
    ap.add_argument("--out", default="benchmarks/out/gpu.md", help="Markdown file for the table")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt (the group size)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=5, help="timed calls per measurement")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls first (>= 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device = args.device or "cpu"
        args.sizes = args.sizes or "64x2"
        args.precision = args.precision or "autocast,bf16,fp32"
        args.prompts, args.samples, args.prompt_len, args.new_tokens = 4, 2, 16, 8
        args.vocab_size, args.iters, args.warmup = 512, 2, 1
    args.warmup = max(1, args.warmup)
    start = time.perf_counter()

    try:
        import torch
        import transformers

        from offpolicy.config import load_config  # noqa: F401  (pydantic, yaml)
        from offpolicy.rollout.model import load_tokenizer
        from offpolicy.train.smoke import make_smoke_model
    except ImportError as e:
        print(f"missing package: {e}. Carry it as wheels (docs/benchmarks.md, 'GPU path').", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)  # a warning per persistent-manager call
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dry_run:  # a tiny model gains nothing from a second thread, and the test suite may share the cores
        torch.set_num_threads(1)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {device}: CUDA is not available (torch {torch.__version__})", file=sys.stderr)
        return 2
    sizes = [Size.parse(s) for s in (args.sizes or DEFAULT_SIZES).split(",")]
    precisions = (args.precision or "autocast").split(",")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        ap.error(f"--precision: unknown {bad}; choose from {', '.join(PRECISIONS)}")

    with tempfile.TemporaryDirectory() as tmp:
        text = _corpus_jsonl(Path(tmp) / "corpus.jsonl")
        smoke = make_smoke_model(Path(tmp) / "smoke", data=Path(tmp) / "corpus.jsonl", vocab_size=args.vocab_size,
                                 seed=args.seed)
        tokenizer = load_tokenizer(smoke.path)
    prompts = _prompts(tokenizer, text, args.prompts, args.prompt_len)
    name = _device_name(device)
    dim = 512 if device.type == "cpu" else 8192
    measured = _matmul_tflops(device, dim)
    peak, peak_source = _peak(args.peak_tflops, name, measured)
    print(f"device {name}; peak {peak:.1f} TFLOP/s ({peak_source}); bf16 matmul {dim}^3 measured "
          f"{measured:.1f} TFLOP/s; tokenizer: {len(tokenizer)} tokens in {smoke.seconds:.1f} s", flush=True)

    def table() -> str:
        header = [
            f"GPU benchmark ({'dry run, ' if args.dry_run else ''}{datetime.date.today().isoformat()}): {name}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
            "",
            f"Peak for MFU: {peak:.1f} TFLOP/s ({peak_source}); a bf16 {dim}^3 matmul measured {measured:.1f} "
            f"TFLOP/s here. Workload: {args.prompts} prompts x {args.samples} samples, prompt {args.prompt_len} "
            f"tokens, {args.new_tokens} new tokens (EOS off); tokenizer {len(tokenizer)} tokens; preset grpo; "
            f"medians of timed calls after {args.warmup} warm-up(s); wall {time.perf_counter() - start:.0f} s.",
            "",
            "Columns: tok/s = generated (gen, CB) or trained response (train) tokens per second; gen s = one "
            "HFEngine.generate call; train s = one train_step; step s = gen s + train s; MFU = 2N (generation) or "
            "6N (training) FLOPs per token run, against the peak (fp32 rows too); CB = transformers' generate_batch "
            "(autocast rows: on the weights cast to bf16, since its cache takes the model's dtype); timed calls = "
            "gen/train/CB.",
        ]
        return render(header, rows, notes)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    deadline = start + args.budget_s
    rows: list[dict] = []
    notes: list[str] = []
    last_s = 0.0  # what the last measured row took: a larger model takes at least as long (the first row always runs)
    for size in sizes:
        for precision in precisions:
            left = deadline - time.perf_counter()
            if rows and left < last_s:
                notes.append(f"{size.name} {precision}: skipped, {left:.0f} s of --budget-s left and the previous "
                             f"row took {last_s:.0f} s")
                print(f"  {notes[-1]}", flush=True)
                continue
            t0 = time.perf_counter()
            rows.append(_measure(size, precision, tokenizer, prompts, args, device, deadline, peak, notes))
            last_s = time.perf_counter() - t0
            out.write_text(table(), encoding="utf-8")  # row by row: a run stopped from outside keeps what it measured

    text = table()
    out.write_text(text, encoding="utf-8")
    print("\n" + text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
