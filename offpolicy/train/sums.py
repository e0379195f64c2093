"""Running statistics of a training step without a host sync per statistic.

A step adds a few dozen scalars (loss, entropy, clip fractions, KL estimates, the gradient norm, ...).
Turning each into a Python float as it is made (``float(t)``) waits for the device every time: on a GPU,
each such sync drains the queue the host had run ahead on. :class:`DeviceSums` keeps tensor values on
their device and moves them to the host in one transfer per optimiser step (:meth:`DeviceSums.flush`).

The arithmetic is the one ``sums[k] = sums.get(k, 0.0) + float(v)`` did: each value taken to float32 and
then float64, weights multiplied and sums added in float64, in the same order, so the flushed numbers
equal the per-value floats bit for bit.
"""

from __future__ import annotations

import torch

__all__ = ["DeviceSums"]


class DeviceSums:
    """``done``: the flushed sums (plain floats; a data-parallel rank reduces them over the group).
    Tensor values wait on their device until :meth:`flush`."""

    def __init__(self) -> None:
        self.done: dict[str, float] = {}
        self._sum: dict[str, torch.Tensor] = {}
        self._max: dict[str, torch.Tensor] = {}

    def add(self, key: str, value, weight: float = 1.0) -> None:
        """``sums[key] += weight * value``."""
        if torch.is_tensor(value):
            v = _f64(value) if weight == 1.0 else _f64(value) * weight
            self._sum[key] = self._running(key, v.device, self._sum) + v
        elif key in self._sum:  # a plain number after tensors of the same key
            self._sum[key] = self._sum[key] + weight * float(value)
        else:
            self.done[key] = self.done.get(key, 0.0) + weight * float(value)

    def max(self, key: str, value) -> None:
        """``sums[key] = max(sums[key], value)`` (0 when absent, as for absolute values); a NaN value is
        ignored, as Python's ``max(running, nan)`` did."""
        v = _f64(value)
        self._max[key] = torch.fmax(self._running(key, v.device, self._max), v)

    def flush(self, *extra: torch.Tensor) -> list[float]:
        """Move every waiting value to :attr:`done` in one transfer per device; returns ``extra`` (scalar
        tensors the caller needs on the host too, e.g. a finiteness flag) as floats, from the same transfer."""
        pending = [*self._sum.items(), *self._max.items()]
        extra_keys = [(f"\0extra{i}", _f64(t)) for i, t in enumerate(extra)]
        by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
        for key, t in [*pending, *extra_keys]:
            by_device.setdefault(t.device, []).append((key, t))
        values: dict[str, float] = {}
        for items in by_device.values():
            values.update(zip((k for k, _ in items), torch.stack([t for _, t in items]).tolist()))
        self._sum.clear()
        self._max.clear()
        self.done.update({k: values[k] for k, _ in pending})
        return [values[k] for k, _ in extra_keys]

    def _running(self, key: str, device: torch.device, pending: dict[str, torch.Tensor]) -> torch.Tensor:
        """The running value of ``key``: waiting on the device, or the flushed float put there (a fill, not a
        host-to-device copy)."""
        if key in pending:
            return pending[key]
        return torch.full((), self.done.pop(key, 0.0), dtype=torch.float64, device=device)


def _f64(t: torch.Tensor) -> torch.Tensor:
    """As ``float(t.detach().float())`` would give it, kept on the device: float32, then float64."""
    return t.detach().reshape(()).float().double()
