"""Reference log-probs computed once per response and reused: for data the trainer sees again and again
(preference pairs over several epochs), ``ref_logp`` under the frozen reference never changes.

Experiences that carry ``info["ref_key"]`` (the pairs workflow sets ``<pair id>/<role>``) get their
``ref_logp`` from the cache, computed with one no-grad forward of the reference the first time a key is
seen. The cache is cleared when the reference changes (ReMix's reincarnation). Experiences without a key
are left alone (the step plan then computes the batch's reference log-probs as usual).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from offpolicy.data.experience import Experience, collate


class RefCache:
    def __init__(self, ref_model, *, pad_id: int, temperature: float = 1.0):
        self.ref_model, self.pad_id, self.temperature = ref_model, pad_id, temperature
        self.cache: dict[str, torch.Tensor] = {}
        self.computed = 0  # responses whose reference log-probs were computed (not reused)

    def fill(self, exps: list[Experience]) -> list[Experience]:
        """``exps`` with ``ref_logp`` set wherever a ``ref_key`` is known or can be computed now."""
        from offpolicy.train.step import _to_device, response_logp

        missing = [e for e in exps if "ref_key" in e.info and e.info["ref_key"] not in self.cache]
        if missing:
            # collated on the CPU; the reference runs where it lives (as the training step moves its batch)
            batch = _to_device(collate(missing, self.pad_id), next(self.ref_model.parameters()).device)
            with torch.no_grad():
                ref_BT = response_logp(self.ref_model, batch, temperature=self.temperature)[0].cpu()
            for i, e in enumerate(missing):
                self.cache[e.info["ref_key"]] = ref_BT[i, : len(e.response_ids)].clone()
            self.computed += len(missing)
        return [replace(e, ref_logp=self.cache[e.info["ref_key"]]) if "ref_key" in e.info else e for e in exps]

    def clear(self) -> None:
        self.cache.clear()
