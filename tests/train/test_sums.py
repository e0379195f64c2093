"""DeviceSums: the training step's statistics kept on the device and moved in one transfer, with the same
float64 arithmetic as adding Python floats (bit for bit); and train_step's host transfers counted."""

import collections
import random

import pytest
import torch

from offpolicy.train.sums import DeviceSums


def _reference(ops):
    """The arithmetic DeviceSums replaces: ``sums[k] = sums.get(k, 0.0) + w * float(v.float())``."""
    sums = {}
    for kind, key, value, w in ops:
        v = float(value.float()) if torch.is_tensor(value) else float(value)
        if kind == "add":
            sums[key] = sums.get(key, 0.0) + (w * v if w != 1.0 else v)
        else:
            sums[key] = max(sums.get(key, 0.0), v)
    return sums


def test_flushed_sums_equal_python_float_sums_bit_for_bit():
    rng = random.Random(0)
    ops = []
    for _ in range(400):
        key = rng.choice(["loss", "entropy", "loss/clip_frac", "grad_norm", "skipped"])
        value = (1.0 if key == "skipped" else
                 torch.tensor(rng.uniform(-3, 3), dtype=rng.choice([torch.float32, torch.float64, torch.bfloat16])))
        if key == "grad_norm" and rng.random() < 0.3:
            value = rng.uniform(0, 5)  # a plain number between tensors of the same key
        ops.append(("add", key, value, rng.choice([1.0, 0.25, 1 / 3])))
        if rng.random() < 0.2:
            ops.append(("max", "_peak", torch.tensor(rng.uniform(0, 2)), 1.0))
    sums = DeviceSums()
    for i, (kind, key, value, w) in enumerate(ops):
        sums.add(key, value, w) if kind == "add" else sums.max(key, value)
        if i % 37 == 0:
            sums.flush()  # flushing in between changes nothing
    sums.flush()
    assert sums.done == _reference(ops)  # exact equality of floats
    assert len(sums.done) == 6


def test_flush_returns_the_extra_values_and_a_nan_peak_is_ignored_like_pythons_max():
    sums = DeviceSums()
    sums.max("_peak", torch.tensor(0.5))
    sums.max("_peak", torch.tensor(float("nan")))
    sums.add("loss", torch.tensor(2.0))
    flag, norm = sums.flush(torch.tensor(True), torch.tensor(3.5))
    assert (flag, norm) == (1.0, 3.5) and sums.done == {"_peak": 0.5, "loss": 2.0}
    assert sums.flush() == [] and sums.done == {"_peak": 0.5, "loss": 2.0}


@pytest.mark.parametrize("forward_impl", ["lean", "transformers"])
def test_a_training_step_moves_its_statistics_to_the_host_in_one_transfer(tmp_path, forward_impl, monkeypatch,
                                                                           demo_batch):
    """Each float(t) / t.item() is a host sync on a GPU: the step made 21 before DeviceSums (one per
    statistic), now one transfer per optimiser step and a few fixed ones (the sequence count, the lean
    forward's packing)."""
    from offpolicy.train.step import train_step

    # decoupled_ppo: several regularisers and loss statistics
    _, ctx, batch = demo_batch(tmp_path, f"model.forward_impl={forward_impl}", "algorithm.preset=decoupled_ppo")
    calls = collections.Counter()
    for name in ("__float__", "__int__", "__bool__", "item", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _f=real, **k: (calls.update([_n]), _f(self, *a, **k))[1])
    stats = train_step(ctx.model, ctx.optimizer, batch, ctx.algo, ctx.plan, ref_model=ctx.ref_model, step=1)
    monkeypatch.undo()
    steps = stats["optimizer_steps"]
    assert len([k for k in stats if k.startswith("loss/")]) >= 3 and stats["skipped_steps"] == 0
    assert calls["tolist"] == steps  # the flush, once per optimiser step
    assert sum(calls.values()) <= steps + 5, calls
