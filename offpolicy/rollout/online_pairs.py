"""The ``online_pairs`` workflow: preference pairs built from on-policy samples (online DPO).

Each task gets ``group_size`` samples from the engine (the ``single_turn`` workflow), scored by the run's
reward. Pairs are then built inside each task's group (``workflow.pairing``):

- ``best_vs_worst``: the highest-rewarded sample against the lowest (the first of equals, in sample order):
  one pair per task, as in TRL's online DPO with a judge and in "self-rewarding" recipes;
- ``all_pairs``: every sample above the group's median reward against every one below it: with a 0/1
  reward and an even K, each correct sample against each incorrect one; up to ``floor(K/2)**2`` pairs.

The rules are :func:`offpolicy.algos.best_vs_worst` and :func:`offpolicy.algos.all_pairs` (ALGORITHMS.md §8b).

A group whose rewards are all equal has no preference to teach. So that every task yields the same number
of rows (the runners train on a fixed number of rows per step, taken whole from the buffer), the missing
pairs are filled with *inert* pairs: real samples whose trainable mask is all zero (no token reaches the
loss, no row counts in the mean; ``info["inert"]``). ``pairs_live`` in the step record says how many were real.

Every pair is a group of two rows, ``chosen`` then ``rejected`` (``info["role"]``), keeping the version,
batch index and ``behav_logp`` of its samples: pairs go through the same buffer, staleness accounting and
checkpoints as RL experiences. With ``workflow.keep_samples=true`` the sampled group itself is also kept
as an RL group (its K rows first, then the task's pairs), so one run can train a policy-gradient loss on the
samples and a DPO term (``algorithm.preference_coef``) on the pairs built from them.

Held-out evaluation measures the policy's own answers, one greedy sample per task through ``single_turn``
(``eval_workflow``, read by :func:`offpolicy.train.evaluate.evaluate_workflow`), whatever the pairing: one
sample makes no pair under ``all_pairs``, so evaluating the pair rows would score 0 of 0.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Literal, Sequence

import torch

from offpolicy.algos import PAIR_BUILDERS
from offpolicy.data.experience import Experience
from offpolicy.rollout.workflow import Sampling, Scorer, group_id, single_turn

Pairing = Literal["best_vs_worst", "all_pairs"]


def pairs_per_task(pairing: Pairing, group_size: int) -> int:
    """Pairs each task yields (live or inert): 1 for best_vs_worst; for all_pairs at most
    ``floor(K/2)**2`` (fewer than K/2 samples lie strictly above the median, and fewer below)."""
    return 1 if pairing == "best_vs_worst" else (group_size // 2) ** 2


def _row(exp: Experience, role: str, pair_id: str, group: str, *, live: bool) -> Experience:
    info = {**exp.info, "role": role, "pair_id": pair_id}
    mask = exp.response_mask
    if not live:
        info["inert"] = True
        mask = torch.zeros_like(mask)
    # a row of its own in the buffer (a sample may sit in several pairs, and in its RL group too)
    return replace(exp, response_mask=mask, group_id=group, info=info, eid=uuid.uuid4().hex)


def build_pairs(group: Sequence[Experience], pairing: Pairing, group_size: int) -> list[Experience]:
    """The pair rows of one task's scored group: ``pairs_per_task`` pairs, the live ones first, the rest
    inert. A sample whose reward faulted (``reward_fault``) takes part in no pair."""
    ranked = PAIR_BUILDERS[pairing]([None if "reward_fault" in e.info else e.reward for e in group])
    n = pairs_per_task(pairing, group_size)
    base = group_id(group[0], group[0].version, group[0].batch_index)  # the task's, from fields (never parsed)
    out: list[Experience] = []
    for k in range(n):
        live = k < len(ranked)
        c, r = ranked[k] if live else (0, len(group) - 1)
        chosen, rejected = group[c], group[r]
        pair_id = f"{base}/p{k}"
        out += [_row(chosen, "chosen", pair_id, pair_id, live=live),
                _row(rejected, "rejected", pair_id, pair_id, live=live)]
    return out


class OnlinePairs:
    """``workflow(engine, tokenizer, tasks, scorer, ...)``: sample, score, pair (see the module docstring)."""

    eval_workflow = staticmethod(single_turn)  # the samples, not the pairs, are evaluated (module docstring)

    def __init__(self, pairing: Pairing = "best_vs_worst", keep_samples: bool = False):
        self.pairing, self.keep_samples = pairing, keep_samples

    @classmethod
    def from_config(cls, workflow_cfg) -> "OnlinePairs":
        return cls(workflow_cfg.pairing, workflow_cfg.keep_samples)

    def rows_per_task(self, group_size: int) -> int:
        return 2 * pairs_per_task(self.pairing, group_size) + (group_size if self.keep_samples else 0)

    def __call__(self, engine, tokenizer, tasks: Sequence, scorer: Scorer, *, sampling: Sampling, version: int = 0,
                 batch_index: int = -1, generator: torch.Generator | None = None) -> list[Experience]:
        samples = single_turn(engine, tokenizer, tasks, scorer, sampling=sampling, version=version,
                              batch_index=batch_index, generator=generator)
        K = sampling.group_size
        out: list[Experience] = []
        for t in range(len(tasks)):
            group = samples[t * K : (t + 1) * K]
            if self.keep_samples:
                out += group
            out += build_pairs(group, self.pairing, K)
        return out
