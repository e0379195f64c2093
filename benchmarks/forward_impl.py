"""Benchmark: the policy's forward per model size: transformers (sdpa, eager) against the lean forward.

    .venv/bin/python benchmarks/forward_impl.py [--sizes 64x2,128x2,256x2,512x4] [--repeats 7] [--threads 2]
                                                [--shape 32x8x8x5]

For each size (random Llama, head dim 32, MLP 4 x hidden, the bundled character tokenizer's 16 tokens), on a
demo-shaped batch (32 prompts of 8 tokens x 8 samples, 5 new tokens): the trainer's forward + backward of
``response_logp`` (shared prompt, entropy, summed loss), and the HF engine's ``generate`` (sampling, 5 tokens,
EOS off so every call does the same work). Medians of ``--repeats`` timed calls after two warm-ups, the three
implementations alternating per repeat. This is what ``model.forward_impl=auto`` is set from
(``offpolicy/rollout/lean.py``, ``AUTO_MAX_HIDDEN``); results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IMPLS = ("sdpa", "eager", "lean")


def _model(hidden: int, layers: int, attn: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=16, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32, head_dim=32,
                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=True, attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


def _batch(engine_out, prompts, K: int, T: int):
    import torch

    from offpolicy.data.experience import Batch

    B, P = len(prompts) * K, len(prompts[0])
    resp = torch.zeros((B, T), dtype=torch.long)
    for i, r in enumerate(engine_out.response_ids):
        resp[i, : len(r)] = r
    ids = torch.cat([torch.tensor(prompts).repeat_interleave(K, 0), resp], 1)
    attn = torch.ones_like(ids)
    z = torch.zeros(B)
    return Batch(ids, attn, torch.ones(B, T), torch.zeros(B, T), z, torch.arange(B) // K, z.long(), P)


def measure(hidden: int, layers: int, *, repeats: int, G: int = 32, K: int = 8, P: int = 8, T: int = 5) -> dict:
    import torch

    from offpolicy.rollout.engine import HFEngine
    from offpolicy.rollout.lean import enable_lean_forward
    from offpolicy.train.step import response_logp

    base = _model(hidden, layers, "sdpa")
    models = {"sdpa": base, "eager": _model(hidden, layers, "eager"), "lean": copy.deepcopy(base)}
    models["eager"].load_state_dict(base.state_dict())
    enable_lean_forward(models["lean"])
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 16, (P,), generator=g).tolist() for _ in range(G)]
    engines = {k: HFEngine(m, pad_id=0, eos_id=-1) for k, m in models.items()}  # EOS off: T tokens per row
    sample = dict(n=K, max_new_tokens=T)
    batch = _batch(engines["sdpa"].generate(prompts, generator=torch.Generator().manual_seed(1), **sample),
                   prompts, K, T)
    times = {k: {"gen": [], "train": []} for k in models}

    def train(m):
        m.train()
        logp, ent = response_logp(m, batch, with_entropy=True)
        (logp.sum() + 0.01 * ent.sum()).backward()
        m.zero_grad(set_to_none=True)
        m.eval()

    for r in range(repeats + 2):
        for k, m in models.items():
            t0 = time.perf_counter()
            engines[k].generate(prompts, generator=torch.Generator().manual_seed(r), **sample)
            t1 = time.perf_counter()
            train(m)
            t2 = time.perf_counter()
            if r >= 2:
                times[k]["gen"].append(t1 - t0)
                times[k]["train"].append(t2 - t1)
    params = sum(p.numel() for p in base.parameters())
    return {"size": f"{hidden}x{layers}", "params_m": params / 1e6,
            **{f"{k}_{part}": statistics.median(v[part]) for k, v in times.items() for part in ("gen", "train")}}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64x2,128x2,256x2,512x4", help="HIDDENxLAYERS,...")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shape", default="32x8x8x5", help="PROMPTSxSAMPLESxPROMPT_LENxNEW_TOKENS (default: the demo's)")
    args = ap.parse_args()
    G, K, P, T = map(int, args.shape.split("x"))
    torch.set_num_threads(args.threads)
    print(f"shape {args.shape} (prompts x samples x prompt tokens x new tokens), {args.threads} threads")
    print("| size | params M | gen s: sdpa / eager / lean | train s: sdpa / eager / lean | lean vs sdpa: gen, train |")
    print("|---|---|---|---|---|")
    for size in args.sizes.split(","):
        hidden, layers = map(int, size.split("x"))
        r = measure(hidden, layers, repeats=args.repeats, G=G, K=K, P=P, T=T)
        gen = " / ".join(f"{r[f'{k}_gen']:.4f}" for k in IMPLS)
        train = " / ".join(f"{r[f'{k}_train']:.4f}" for k in IMPLS)
        print(f"| {r['size']} | {r['params_m']:.2f} | {gen} | {train} | {r['sdpa_gen'] / r['lean_gen']:.2f}x, "
              f"{r['sdpa_train'] / r['lean_train']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
