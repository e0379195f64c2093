"""Benchmark: weight-publish time versus model size through the async runner's WeightChannel
(offpolicy/pipeline/weights.py: one shared-memory slot between the trainer and the explorer process).

    .venv/bin/python benchmarks/weight_publish.py [--sizes 10 50 200] [--dtype float32] [--versions 8]
        [--threads 1] [--out FILE.json]

For each size a randomly initialised Qwen2 causal LM (transformers; tied embeddings, vocabulary 32,000)
is built in the trainer (this process) and in a spawned explorer process, as the async runner does: the
trainer allocates the slot and sends it over a queue; then ``--versions`` times the trainer publishes
version v (``WeightChannel.publish``, after the explorer loaded v - 1) and the explorer loads it
(``WeightChannel.load``, i.e. ``load_state_dict`` from the slot). Reported: parameters, bytes, the
median seconds of the trainer's copy into the slot (the time the trainer is held) and of the explorer's
copy out of it, and the implied GB/s. Waiting is excluded: it is the schedule's, not the channel's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from offpolicy.pipeline.weights import WeightChannel

# target millions of parameters -> (hidden, layers, intermediate, heads)
SHAPES = {10: (256, 4, 1024, 4), 50: (512, 8, 2048, 8), 200: (1024, 10, 4096, 16), 500: (1536, 14, 6144, 16)}


def build(size: int, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, inter, heads = SHAPES[size]
    cfg = Qwen2Config(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                      num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=True,
                      max_position_embeddings=512)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(dtype).eval()


def explorer(size: int, dtype: str, threads: int, channel: WeightChannel, setup, results, versions: int) -> None:
    torch.set_num_threads(threads)
    model = build(size, getattr(torch, dtype))
    channel.attach(setup.get()["tensors"])
    setup_done = time.perf_counter()
    copies = []
    for v in range(versions + 1):
        _, copy_s = channel.load(model, v)
        copies.append(copy_s)
    results.put({"load_s": copies[1:], "first_load_s": copies[0], "after_setup_s": time.perf_counter() - setup_done})


def measure(size: int, args) -> dict:
    dtype = getattr(torch, args.dtype)
    ctx = mp.get_context("spawn")
    channel = WeightChannel(ctx)
    setup, results = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=explorer, args=(size, args.dtype, args.threads, channel, setup, results, args.versions))
    proc.start()
    model = build(size, dtype)
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    t = time.perf_counter()
    slot = channel.allocate(model)
    allocate_s = time.perf_counter() - t
    channel.publish(model, 0, after_loaded=None)
    setup.put({"tensors": slot})
    publish = []
    for v in range(1, args.versions + 1):
        with torch.no_grad():  # a training step changed the weights
            next(model.parameters()).add_(1e-3)
        _, copy_s = channel.publish(model, v, after_loaded=v - 1)
        publish.append(copy_s)
    got = results.get(timeout=600)
    proc.join()
    pub, load = statistics.median(publish), statistics.median(got["load_s"])
    return {"size": size, "params_M": params / 1e6, "bytes_MB": nbytes / 1e6, "allocate_s": allocate_s,
            "publish_s": pub, "load_s": load, "publish_GBps": nbytes / pub / 1e9, "load_GBps": nbytes / load / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 200], choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--versions", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print("| params (M) | state dict (MB) | allocate slot s | publish s (trainer) | load s (explorer) | publish GB/s | load GB/s |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        r = measure(size, args)
        rows.append(r)
        print(f"| {r['params_M']:.1f} | {r['bytes_MB']:.0f} | {r['allocate_s']:.3f} | {r['publish_s']:.4f} | "
              f"{r['load_s']:.4f} | {r['publish_GBps']:.2f} | {r['load_GBps']:.2f} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=1))


if __name__ == "__main__":
    main()
