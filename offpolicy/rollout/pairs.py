"""The ``pairs`` workflow: offline preference pairs as experiences (DPO / IPO training; tasks.name=pairs).

Each pair becomes one group of two experiences, ``chosen`` then ``rejected`` (``info["role"]``), whose
response tokens are the pair's own (nothing is sampled: ``behav_logp`` is 0 and no loss reads it).
Pairs thus go through the same buffer, versions and checkpoints as RL experiences; a pair's token
weights (``chosen_weights`` / ``rejected_weights``) become its experiences' ``token_weights``, read by the
``dpo`` loss. Each carries a
``ref_key``, so the trainer computes its reference log-probs once and reuses them
(:mod:`offpolicy.pipeline.ref_cache`). The workflow's
``evaluate`` measures held-out preference accuracy: the share of pairs whose implicit reward margin
``sum_t (logp - ref_logp)`` is larger for the chosen response than for the rejected one.
"""

from __future__ import annotations

from typing import Sequence

import torch

from offpolicy.data.experience import Experience, collate
from offpolicy.data.pairs import check_token_weights, pair_token_ids
from offpolicy.rollout.workflow import Sampling, Scorer


def _pair_experiences(tokenizer, pair, *, version: int, batch_index: int) -> list[Experience]:
    ids = pair_token_ids(tokenizer, pair)
    check_token_weights(pair, ids.chosen_ids, ids.rejected_ids)
    group = f"{pair.pair_id}@{f'b{batch_index}' if batch_index >= 0 else f'v{version}'}"
    out = []
    for role, resp in (("chosen", ids.chosen_ids), ("rejected", ids.rejected_ids)):
        weights = getattr(pair, f"{role}_weights")
        out.append(Experience(
            prompt_ids=torch.tensor(ids.prompt_ids, dtype=torch.long), response_ids=torch.tensor(resp, dtype=torch.long),
            response_mask=torch.ones(len(resp)), behav_logp=torch.zeros(len(resp)),
            reward=float(role == "chosen"), group_id=group, task_id=pair.pair_id, version=version,
            batch_index=batch_index, info={"role": role, "correct": role == "chosen", "pair_id": pair.pair_id,
                                           "ref_key": f"{pair.pair_id}/{role}"},
            token_weights=None if weights is None else torch.tensor(weights, dtype=torch.float32)))
    return out


class PairsWorkflow:
    """``workflow(engine, tokenizer, pairs, ...)``: two experiences per pair, engine and scorer unused."""

    def __call__(self, engine, tokenizer, tasks: Sequence, scorer: Scorer, *, sampling: Sampling, version: int = 0,
                 batch_index: int = -1, generator: torch.Generator | None = None) -> list[Experience]:
        return [e for pair in tasks for e in _pair_experiences(tokenizer, pair, version=version,
                                                               batch_index=batch_index)]

    @torch.no_grad()
    def evaluate(self, ctx, pairs: Sequence, *, batch_pairs: int = 64) -> dict[str, float]:
        """Held-out ``preference_accuracy`` (also as ``accuracy``; a tie counts 1/2, so the initial policy,
        equal to the reference, scores 0.5) and the mean implicit ``reward_margin`` (beta not applied),
        policy against the reference model; ``tasks``: the pairs evaluated."""
        from offpolicy.train.step import _to_device, response_logp

        model, ref = ctx.model, ctx.ref_model
        device = next(model.parameters()).device
        was = model.training
        model.eval()
        wins, margins = [], []
        for i in range(0, len(pairs), batch_pairs):
            exps = self(None, ctx.tokenizer, pairs[i : i + batch_pairs], None, sampling=Sampling())
            batch = _to_device(collate(exps, ctx.tokenizer.pad_token_id), device)  # collated on the CPU
            delta_B = ((response_logp(model, batch)[0] - response_logp(ref, batch)[0]) * batch.mask_BT).sum(-1)
            margin_P = delta_B[0::2] - delta_B[1::2]
            # a tie (policy = reference, up to float noise) is a coin flip, not a loss
            wins += torch.where(margin_P.abs() < 1e-5, 0.5, (margin_P > 0).float()).tolist()
            margins += margin_P.tolist()
        model.train(was)
        acc = sum(wins) / max(len(wins), 1)
        return {"accuracy": acc, "preference_accuracy": acc, "reward_margin": sum(margins) / max(len(margins), 1),
                "tasks": len(pairs)}
