"""Resume: restore a run from its newest checkpoint, and roll back what happened after it.

Restored: weights (and KL-Convex's pi_{k-1}), optimiser, LR schedule, every RNG, the sample strategy, the explorer's task cursor
and sampling generator (its state saved as the bytes the explorer gives), the step / policy version and
the evaluation before training. Rolled back:

- buffer rows written after the checkpoint are removed, consumed or not: the groups whose ``batch_index``
  the checkpoint's explorer cursor had not reached (fate ``dropped`` in the buffer's ledger, or ``used``
  for those a dead step had consumed, so they stay accounted for); the explorer regenerates from the
  checkpoint's cursor. A strategy that keeps consumed groups for replay (mix, priority) would otherwise
  replay rows of the rolled-back future, and the regenerated batch's groups would collide with them;
- ``metrics.jsonl`` records of steps after the checkpoint move to ``metrics.rolled_back.jsonl``
  (nothing written is deleted), so the metrics file reads as one run.

Rows consumed after the checkpoint were handed to a training step whose update died with the process:
they are ``used`` in the ledger (consumed once, never handed out again, removed even where the strategy
keeps consumed groups). In sync mode the batch is
regenerated identically from the restored cursor (new rows, same content), so the resumed run's metrics
equal an uninterrupted run's with the fifo strategy. With a strategy that keeps consumed groups (mix,
priority) they do not, after the checkpoint: what the dead steps' selections retired (mix: groups that left
the replay window) or counted (priority: use counts) is not rolled back. In async mode the few batches the explorer had written ahead of the
trainer are rolled back too and everything from the checkpoint's batch on is regenerated in order.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, Sequence

from offpolicy.data.sampling import GroupMeta, Selection
from offpolicy.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


class RollBackBatches:
    """A one-shot sample strategy: remove the policy groups of batches with index > ``last_batch``, i.e. the
    rows written after a checkpoint, consumed or not. Groups of unknown batch (-1) and expert groups stay."""

    def __init__(self, last_batch: int):
        self.last_batch = last_batch

    def select(self, groups: Sequence[GroupMeta], n: int, now_version: int) -> Selection:
        late = [g.key for g in groups if not g.expert and g.batch_index > self.last_batch]
        return Selection(remove=tuple(late))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def roll_back_metrics(run_dir: Path, step: int, *, eval_at_step: bool = True) -> int:
    """Move records of steps > ``step`` to metrics.rolled_back.jsonl; returns how many moved.

    ``eval_at_step=False`` also moves the evaluation logged at ``step`` itself: the final evaluation runs
    after the last step's checkpoint, so a run killed between the two evaluates again when resumed.
    """
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    keep, moved = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            at = record.get("step", 0)
            later = at > step or (at == step and not eval_at_step and record.get("kind") == "eval")
            (moved if later else keep).append(line)
        except json.JSONDecodeError:  # a line cut by the crash
            moved.append(line)
    if moved:
        with (run_dir / "metrics.rolled_back.jsonl").open("a") as f:
            f.write("\n".join(moved) + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
    return len(moved)


def checkpoint_run(ctx, step: int, *, explorer_state: dict, strategy, trainer_state: dict,
                   next_batch: int | None = None, eval_after: dict | None = None, frozen: dict | None = None) -> Path:
    """Save the whole run state after ``step`` (see :mod:`offpolicy.train.checkpoint`).

    ``trainer_state``: ``TrainLoop.state_dict()`` (the evaluation before training, the last held-out
    accuracy, SPEAR's self-imitation buffer when there is one); ``frozen``: ``TrainLoop.frozen_models()``
    (KL-Convex's pi_{k-1}), saved whole beside the policy.

    ``explorer_state``: the explorer's cursor before batch ``next_batch`` (default: ``step``), as
    ``Explorer.state_dict()`` gives it (its ``generator`` state is bytes and is saved as they are).
    """
    state = {"version": step, "next_batch": step if next_batch is None else next_batch,
             "explorer": {"tasks_consumed": explorer_state["tasks_consumed"]},
             "strategy": strategy.state_dict(), **trainer_state, "eval_after": eval_after}
    return save_checkpoint(ctx.run_dir, step, model=ctx.model, optimizer=ctx.optimizer, scheduler=ctx.scheduler,
                           state=state, generators={"explorer": explorer_state["generator"]},
                           keep=ctx.cfg.checkpoint.keep, frozen=frozen)


def restore_run(ctx, *, strategy, buffer) -> dict:
    """Load the newest checkpoint into ``ctx``/``strategy``; roll back buffer and metrics.

    Unconsumed buffer rows of batches the checkpoint's explorer cursor had not reached (written after
    it) are removed. Returns the checkpoint's ``state.json`` whose ``explorer`` entry is the explorer's
    cursor, ready for ``Explorer.load_state_dict`` (its ``generator`` state as bytes).
    """
    path = latest_checkpoint(ctx.run_dir)
    if path is None:
        raise FileNotFoundError(f"{ctx.run_dir} holds no checkpoint to resume from")
    state = load_checkpoint(path, model=ctx.model, optimizer=ctx.optimizer, scheduler=ctx.scheduler)
    strategy.load_state_dict(state["strategy"])
    step = state["step"]
    buffer.sample(0, RollBackBatches(state.get("next_batch", step) - 1), now_version=step)
    # the final evaluation follows the last step's checkpoint; it is in the run only once the finished
    # run's checkpoint (which carries eval_after) is written
    final_eval_pending = step >= ctx.cfg.train.steps and not state.get("eval_after")
    roll_back_metrics(ctx.run_dir, step, eval_at_step=not final_eval_pending)
    state["explorer"]["generator"] = state.pop("generators")["explorer"]
    state["path"] = str(path)
    return state


class StopRequest:
    """SIGTERM / SIGINT set a flag; the runner checkpoints at the end of the current step and stops."""

    def __init__(self):
        self.requested = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        if self.requested is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)
        return False


class RunStopped(RuntimeError):
    """The run stopped on a signal after writing a checkpoint."""
