"""Benchmark: weight-publish time versus model size through Ray's object store, as the Ray runner does it
(offpolicy/pipeline/ray_runner.py: ``ray.put`` of the trainable state, packed as numpy byte arrays, once
per version; each explorer actor gets it as a call argument and copies it into its model with
``load_state_dict``).

    .venv/bin/python benchmarks/ray_publish.py [--sizes 10 50 200] [--dtype float32] [--versions 5]
        [--explorers 1] [--out FILE.json]

For each size a randomly initialised Qwen2 causal LM (tied embeddings, vocabulary 32,000; the shapes of
benchmarks/weight_publish.py) is built in the trainer (this process) and in ``--explorers`` actors. Then
``--versions`` times: the trainer ``ray.put``s the state dict (the time the trainer is held), and every
actor receives that object and loads it (fetch + deserialise + ``load_state_dict``: the explorer's weight
load). Medians are reported, with bytes and GB/s. One machine: the object store is shared memory, so this
is a copy in and a copy out; across machines add the transfer (bytes / network bandwidth) per node.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

# target millions of parameters -> (hidden, layers, intermediate, heads): benchmarks/weight_publish.py's shapes
SHAPES = {10: (256, 4, 1024, 4), 50: (512, 8, 2048, 8), 200: (1024, 10, 4096, 16), 500: (1536, 14, 6144, 16)}


def build(size: int, dtype: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, inter, heads = SHAPES[size]
    cfg = Qwen2Config(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                      num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=True)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(getattr(torch, dtype)).eval()


class Loader:
    """An explorer stand-in: a model of the same shape that loads each published version."""

    def __init__(self, size: int, dtype: str):
        torch.set_num_threads(1)
        self.model = build(size, dtype)

    def load(self, weights) -> float:
        from offpolicy.pipeline.ray_runner import unpack_state

        t0 = time.perf_counter()
        self.model.load_state_dict(unpack_state(weights))
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 200], choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--versions", type=int, default=5)
    ap.add_argument("--explorers", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    import ray

    from offpolicy.pipeline.ray_runner import pack_state

    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    actor_cls = ray.remote(num_cpus=0.5)(Loader)
    rows = []
    for size in args.sizes:
        model = build(size, args.dtype)
        params = sum(p.numel() for p in model.parameters())
        state = model.state_dict()
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        actors = [actor_cls.remote(size, args.dtype) for _ in range(args.explorers)]
        ray.get([a.__ray_ready__.remote() for a in actors])
        put_s, load_s, round_s = [], [], []
        for v in range(args.versions):
            with torch.no_grad():  # a new version: the trainer's weights changed
                next(model.parameters()).add_(1e-3)
            t0 = time.perf_counter()
            ref = ray.put(pack_state(state))
            t1 = time.perf_counter()
            loads = ray.get([a.load.remote(ref) for a in actors])
            t2 = time.perf_counter()
            put_s.append(t1 - t0)
            load_s.append(max(loads))
            round_s.append(t2 - t1)  # fetch + deserialise + load, seen from the trainer
            del ref
        for a in actors:
            ray.kill(a)
        row = {"size_m": size, "params": params, "bytes": nbytes, "dtype": args.dtype, "explorers": args.explorers,
               "put_s": statistics.median(put_s), "load_s": statistics.median(load_s),
               "receive_s": statistics.median(round_s)}
        row["put_gb_s"] = nbytes / row["put_s"] / 1e9
        row["receive_gb_s"] = nbytes / row["receive_s"] / 1e9
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model, state
    ray.shutdown()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
