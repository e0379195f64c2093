"""SPEAR's self-imitation learning (arXiv 2509.22601; docs/algorithms.md, SPEAR), wired into the trainer.

After every update the trajectories of the batch with a positive advantage enter a replay buffer, tagged
with the step; entries more than ``tolerate_steps`` older than the newest are evicted. The history of
group-mean rewards (the last ``history`` groups) gives the baseline P50. Replay happens when the entries
whose reward beats that baseline exceed ``replay_factor x batch_size``: ``min(2^floor(log2 n), batch_size)``
of them are drawn without replacement, their advantages recalibrated to ``A = R - P50`` (only A > 0 kept),
and one optimiser pass is made with the self-imitation loss (``sil``: PPO-clip + Clip-Cov against the
stored ``behav_logp``, never recomputed), weighted by ``w_sil(t)`` (0 -> 1 over ``horizon`` steps); then
the buffer is cleared. The buffer, the history and the sampler's random state are saved with checkpoints.
"""

from __future__ import annotations

import base64
import random
from collections import deque
from dataclasses import replace

import torch

from offpolicy.algos import bind, recalibrate_advantages, replay_sample_size, sil_weight
from offpolicy.data.experience import Experience, collate
from offpolicy.train.algorithm import Algorithm
from offpolicy.train.step import train_step


class SelfImitation:
    """The replay buffer and its pass; ``after_step`` is called by the trainer after every update."""

    def __init__(self, settings, *, agg_fn, plan, batch_size: int, seed: int = 0):
        self.s = settings
        self.batch_size = settings.batch_size or batch_size
        self.algo = Algorithm(bind("advantage", "identity"), bind("policy_loss", *settings.loss), agg_fn)
        self.plan = replace(plan, loss=settings.loss[0], loss_reads=tuple(sorted(self.algo.loss_reads)),
                            regularizers=(), old_logp="unused", center_logp="unused", ref_logp="unused",
                            prev_logp="unused", mini_batches=1, updates_per_batch=1)
        if self.algo.reads - {"behav_logp"}:
            raise ValueError(f"self_imitation.loss {settings.loss[0]!r} must read only the stored behav_logp "
                             f"(it reads {sorted(self.algo.reads)}); use ratio_to='behav'")
        self.entries: list[tuple[int, Experience]] = []
        self.history: deque[float] = deque(maxlen=settings.history)
        self.rng = random.Random(seed)
        self.passes = 0

    def observe(self, exps: list[Experience], adv_N: torch.Tensor, step: int) -> int:
        """Insert the positive-advantage trajectories of a trained batch; evict; extend the history.
        Returns how many were inserted."""
        new = [(step, e) for e, a in zip(exps, adv_N.tolist()) if a > 0 and float(e.response_mask.sum()) > 0]
        self.entries += new
        self.entries = [(t, e) for t, e in self.entries if step - t <= self.s.tolerate_steps]
        groups: dict[str, list[float]] = {}
        for e in exps:
            if float(e.response_mask.sum()) > 0:
                groups.setdefault(e.group_id, []).append(e.reward)
        self.history.extend(sum(r) / len(r) for r in groups.values())
        return len(new)

    def candidates(self) -> tuple[list[Experience], torch.Tensor]:
        """Entries whose recalibrated advantage ``R - P50(history)`` is positive, and those advantages."""
        exps = [e for _, e in self.entries]
        if not exps:
            return [], torch.zeros(0)
        adv = recalibrate_advantages(torch.tensor([e.reward for e in exps]), list(self.history))
        keep = (adv > 0).nonzero().flatten().tolist()
        return [exps[i] for i in keep], adv[keep]

    def after_step(self, ctx, exps: list[Experience], adv_N: torch.Tensor, step: int, step_fn=train_step) -> dict:
        """Observe the batch; replay if triggered. Returns the step's ``sil/*`` metrics. ``step_fn``: the
        trainer's (a data-parallel group's, so that every rank takes the replay pass too)."""
        inserted = self.observe(exps, adv_N, step)
        cands, adv = self.candidates()
        out = {"sil/inserted": inserted, "sil/buffer_size": len(self.entries), "sil/candidates": len(cands),
               "sil/replayed_samples": 0, "sil/weight": sil_weight(step, self.s.horizon)}
        if len(cands) > self.s.replay_factor * self.batch_size:
            n = replay_sample_size(len(cands), self.batch_size)
            pick = self.rng.sample(range(len(cands)), n)
            replay = [replace(cands[i], reward=float(adv[i]), group_id=f"sil{i}") for i in pick]
            self.entries.clear()
            self.passes += 1
            out.update({"sil/replayed_samples": n, "sil/adv_mean": float(adv[pick].mean())})
            if out["sil/weight"] > 0:
                batch = collate(replay, ctx.tokenizer.pad_token_id)
                stats = step_fn(ctx.model, ctx.optimizer, batch, self.algo, self.plan, step=step,
                                loss_weight=out["sil/weight"])
                out.update({f"sil/{k}": v for k, v in stats.items() if k in ("loss", "grad_norm")
                            or k.startswith("loss/")})
        out["sil/replay_passes"] = self.passes
        return out

    def state_dict(self) -> dict:
        """JSON-able: the entries (each experience as base64 of its raw arrays + metadata), the history,
        the pass count and the sampler's random state."""
        def enc(e: Experience) -> list:
            blob, meta = e.to_bytes()
            return [base64.b64encode(blob).decode(), meta]

        return {"entries": [[t, enc(e)] for t, e in self.entries], "history": list(self.history),
                "passes": self.passes, "rng": _jsonable(self.rng.getstate())}

    def load_state_dict(self, state: dict) -> None:
        self.entries = [(t, Experience.from_bytes(base64.b64decode(b), m)) for t, (b, m) in state["entries"]]
        self.history.clear()
        self.history.extend(state["history"])
        self.passes = state["passes"]
        self.rng.setstate(_tuples(state["rng"]))


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x
