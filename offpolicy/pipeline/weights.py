"""Publishing trainer weights to the explorer process through shared memory, with versions.

One slot of shared-memory tensors (a copy of the policy's trainable state: the whole state dict, or
under LoRA the adapter alone, the explorer holding the same frozen base and PEFT wrapper) plus two
counters: the version in the slot and the last version the explorer loaded. The trainer overwrites
the slot only after the explorer has loaded what was there, so the explorer always gets exactly the
version its schedule asks for (no race that would make staleness depend on timing). Publishing is
one in-memory copy of those tensors (~2 MB for the bundled model; a LoRA adapter is a fraction of
that) and its time is logged. Tied weights (an output head that is the input embedding) take one slot
tensor under both names, copied once.
"""

from __future__ import annotations

import math
import time

import torch

from offpolicy.rollout.model import load_trainable_state, tied_aliases, trainable_state


class PeerGone(RuntimeError):
    """The process on the other end of the channel died while this one waited for it."""


def _poll(done, *, deadline: float, alive, what: str) -> None:
    """Wait until ``done()``, sleeping 0.5 ms growing to 10 ms; PeerGone / TimeoutError otherwise."""
    pause = 0.0005
    while not done():
        if alive is not None and not alive():
            raise PeerGone(f"the other process died while waiting for {what}")
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{what} did not happen in time")
        time.sleep(pause)
        pause = min(pause * 2, 0.01)


class WeightChannel:
    """Created by the trainer before the explorer process starts and pickled into it (spawn): the
    counters and their lock. The slot itself comes later (:meth:`allocate` in the trainer once its
    model exists, sent to the explorer, which calls :meth:`attach`), so the explorer process can start
    and load its own model while the trainer is still building its context.

    Waiting is polling (sub-millisecond at first), not a multiprocessing Condition: a Condition's
    ``notify`` blocks until every waiter wakes, so one waiter killed (``kill -9``) would hang the other
    side forever. The lock is held only while copying; one left held by a dead process is replaced by
    :meth:`renew_lock`.
    """

    def __init__(self, mp_context):
        self.tensors: dict[str, torch.Tensor] | None = None
        self._aliases: dict[str, str] = {}  # tied names -> the name whose slot tensor they share
        self._published = mp_context.Value("q", -1, lock=False)
        self._loaded = mp_context.Value("q", -1, lock=False)
        self._lock = mp_context.Lock()

    def allocate(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Create the slot (shared-memory copies of ``model``'s trainable state); returns it for :meth:`attach`."""
        state = trainable_state(model)
        self._aliases = tied_aliases(state)
        self.tensors = {}
        for k, v in state.items():  # a tied name gets its first name's tensor (one object: pickled once too)
            self.tensors[k] = (self.tensors[self._aliases[k]] if k in self._aliases
                               else v.detach().to("cpu", copy=True).share_memory_())
        return self.tensors

    def renew_lock(self, mp_context) -> None:
        """A fresh lock, before a new explorer process starts: one killed while copying would hold the old
        one forever. Only the trainer may call this, with no explorer alive."""
        self._lock = mp_context.Lock()

    def attach(self, tensors: dict[str, torch.Tensor]) -> None:
        """Use the slot the trainer allocated (received through a queue: the same shared memory)."""
        self.tensors = tensors

    def __getstate__(self) -> dict:
        return {**self.__dict__, "tensors": None}  # the slot travels separately (see the class docstring)

    @property
    def published(self) -> int:
        return self._published.value

    def _acquire(self, deadline: float, alive) -> None:
        while not self._lock.acquire(timeout=0.5):
            if alive is not None and not alive():
                raise PeerGone("the other process died holding the weight channel's lock")
            if time.perf_counter() > deadline:
                raise TimeoutError("the weight channel's lock was not released in time")

    def publish(self, model: torch.nn.Module, version: int, *, after_loaded: int | None,
                timeout: float | None = None, alive=None) -> tuple[float, float]:
        """Copy ``model``'s weights into the slot as ``version`` once the explorer has loaded
        ``after_loaded`` (None: do not wait). Returns (seconds waited, seconds copying).

        ``alive``: a callable telling whether the explorer still lives, checked while waiting: PeerGone
        instead of waiting forever for a dead process. ``timeout``: None (default) waits as long as it lives (a
        batch may take longer than any fixed limit); seconds: TimeoutError after them."""
        t0 = time.perf_counter()
        deadline = math.inf if timeout is None else t0 + timeout
        if after_loaded is not None:
            _poll(lambda: self._loaded.value >= after_loaded, deadline=deadline, alive=alive,
                  what=f"the explorer to load weight version {after_loaded}")
        self._acquire(deadline, alive)
        try:
            t1 = time.perf_counter()
            with torch.no_grad():
                for k, v in trainable_state(model).items():
                    if k not in self._aliases:
                        self.tensors[k].copy_(v.detach())
            self._published.value = version
        finally:
            self._lock.release()
        return t1 - t0, time.perf_counter() - t1

    def mark_loaded(self, version: int) -> None:
        """Treat ``version`` as loaded (after a resume the explorer may skip straight to a newer one)."""
        self._loaded.value = max(self._loaded.value, version)

    def load(self, model: torch.nn.Module, version: int, *, timeout: float | None = None,
             alive=None) -> tuple[float, float]:
        """Wait for ``version`` in the slot and copy it into ``model``. Returns (seconds waited, copying).

        ``alive``: a callable checked while waiting, so a dead trainer ends the wait with an error; ``timeout``
        as in :meth:`publish` (None: as long as the trainer lives, which may train, evaluate and checkpoint for
        longer than any fixed limit).
        """
        t0 = time.perf_counter()
        deadline = math.inf if timeout is None else t0 + timeout
        try:
            _poll(lambda: self._published.value >= version, deadline=deadline, alive=alive,
                  what=f"weight version {version} to be published")
        except (PeerGone, TimeoutError):
            raise TimeoutError(f"weight version {version} was not published") from None
        self._acquire(deadline, alive)
        try:
            if self._published.value != version:
                raise RuntimeError(f"weight slot holds version {self._published.value}, expected {version}")
            t1 = time.perf_counter()
            with torch.no_grad():
                load_trainable_state(model, self.tensors)
            self._loaded.value = version
        finally:
            self._lock.release()
        return t1 - t0, time.perf_counter() - t1
