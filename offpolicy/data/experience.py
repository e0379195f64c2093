"""Experience (one trajectory) and Batch (a padded training batch).

Shape convention used across offpolicy: a suffix names the axes of a tensor.
``B`` = sequences in a batch, ``T`` = response positions, ``P`` = prompt positions,
``N`` = flat samples (usually equal to B). Example: ``behav_logp_BT`` is (B, T).

An :class:`Experience` holds 1-D tensors for one trajectory (response length ``T_i``);
:func:`collate` pads a list of them into a :class:`Batch` with prompts left-padded and
responses right-padded, which is the layout the trainer's single forward pass uses.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

import torch

_TENSOR_FIELDS = ("prompt_ids", "response_ids", "response_mask", "behav_logp", "engine_logp", "old_logp", "ref_logp",
                  "token_weights")


_EID: dict[str, Any] = {"pid": None}


def _new_eid() -> str:
    """A unique experience id (32 hex digits): a random prefix drawn once per process, then a counter (a uuid4
    per row cost ~13 us, 3 ms of a demo step). Re-drawn in a forked child, whose counter would repeat."""
    if _EID["pid"] != os.getpid():
        _EID.update(pid=os.getpid(), prefix=uuid.uuid4().hex[:20], count=itertools.count())
    return f"{_EID['prefix']}{next(_EID['count']):012x}"


@dataclass
class Experience:
    """One sampled trajectory and everything the trainer needs to learn from it.

    Tensors are 1-D: ``prompt_ids`` (P_i,), the others (T_i,). ``response_mask`` is 1 on
    trainable response tokens (0 on tool outputs). ``behav_logp`` is the log-prob of each
    sampled token under the distribution it was actually sampled from: the policy of version
    ``version`` at the sampling temperature, truncated by top-k / top-p and renormalised over the
    kept tokens. ``engine_logp`` is the engine's untruncated tempered log-prob of the same tokens
    (what the trainer recomputes; for the engine-vs-trainer mismatch), None when sampling did not
    truncate (then it equals ``behav_logp``). Optional ``old_logp`` / ``ref_logp`` are filled by
    the trainer when needed. Optional ``token_weights`` (T_i,) weigh each response token's log-ratio in a
    token-weighted preference loss (OPA-DPO's revised spans); None = 1. ``batch_index`` is the explorer
    batch the experience was generated in
    (-1: unknown, e.g. data put by hand); ``group_id`` is only a key, never parsed.
    """

    prompt_ids: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    behav_logp: torch.Tensor
    reward: float
    group_id: str
    task_id: str
    version: int = 0
    batch_index: int = -1
    use_count: int = 0
    created_at: float = field(default_factory=time.time)
    engine_logp: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    token_weights: torch.Tensor | None = None
    expert: bool = False
    replayed: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    eid: str = field(default_factory=lambda: _new_eid())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields that are set (1-D, contiguous)."""
        return {k: getattr(self, k).contiguous() for k in _TENSOR_FIELDS if getattr(self, k) is not None}

    def meta(self) -> dict[str, Any]:
        """The non-tensor fields as a JSON-able dict."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _TENSOR_FIELDS}

    def to_bytes(self) -> tuple[bytes, str]:
        """(blob, JSON metadata) — no pickle anywhere. The blob is the tensors' raw little-endian bytes
        back to back; the metadata names each one's dtype and length (``_layout``). Plain arrays rather
        than a safetensors file per row: the per-call overhead of the latter dominated ``put``."""
        tensors = self.tensors()
        layout = [[k, str(t.dtype).removeprefix("torch."), t.numel()] for k, t in tensors.items()]
        blob = b"".join(t.cpu().view(torch.uint8).numpy().tobytes() for t in tensors.values())
        return blob, json.dumps({**self.meta(), "_layout": layout})

    @classmethod
    def from_bytes(cls, blob: bytes, meta_json: str) -> "Experience":
        meta = json.loads(meta_json)
        buf = bytearray(blob)  # one writable copy per row; its tensors are disjoint views of it
        tensors, offset = {}, 0
        for name, dtype, n in meta.pop("_layout"):
            dt = getattr(torch, dtype)
            tensors[name] = torch.frombuffer(buf, dtype=dt, count=n, offset=offset) if n else torch.empty(0, dtype=dt)
            offset += n * dt.itemsize
        return cls(**tensors, **meta)


@dataclass
class Batch:
    """A padded batch. Prompts are left-padded to P, responses right-padded to T.

    ``input_ids_BL`` = concat(prompt, response), L = P + T; ``attn_BL`` marks real tokens.
    The logits that predict response token t sit at position ``P - 1 + t``. ``engine_logp_BT`` is
    the engine's untruncated log-prob (see :class:`Experience`): None when no row carries one,
    else ``behav_logp`` stands in for rows without it (they were sampled without truncation).
    ``weights_BT``: the experiences' ``token_weights`` (1 for rows without them); None when no row has any.
    """

    input_ids_BL: torch.Tensor
    attn_BL: torch.Tensor
    mask_BT: torch.Tensor
    behav_logp_BT: torch.Tensor
    rewards_B: torch.Tensor
    group_ids_B: torch.Tensor
    versions_B: torch.Tensor
    prompt_len: int
    old_logp_BT: torch.Tensor | None = None
    ref_logp_BT: torch.Tensor | None = None
    prev_logp_BT: torch.Tensor | None = None  # ReMix KL-Convex: the previous policy pi_{k-1}
    engine_logp_BT: torch.Tensor | None = None
    weights_BT: torch.Tensor | None = None
    pair_B: torch.Tensor | None = None  # bool: a (chosen, rejected) row of a preference pair; None when no row is

    @property
    def response_ids_BT(self) -> torch.Tensor:
        return self.input_ids_BL[:, self.prompt_len :]

    def __len__(self) -> int:
        return self.input_ids_BL.shape[0]

    def select(self, idx: torch.Tensor) -> "Batch":
        """Rows ``idx`` of the batch (for mini-/micro-batches)."""
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Batch(
            self.input_ids_BL[idx], self.attn_BL[idx], self.mask_BT[idx], self.behav_logp_BT[idx],
            self.rewards_B[idx], self.group_ids_B[idx], self.versions_B[idx], self.prompt_len,
            pick(self.old_logp_BT), pick(self.ref_logp_BT), pick(self.prev_logp_BT), pick(self.engine_logp_BT),
            pick(self.weights_BT), pick(self.pair_B),
        )


def _ragged_index(lengths_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every element of rows with ``lengths_B`` elements, laid out one row after another."""
    row = torch.repeat_interleave(torch.arange(len(lengths_B)), lengths_B)
    starts = torch.cumsum(lengths_B, 0) - lengths_B
    return row, torch.arange(int(lengths_B.sum())) - starts[row]


def collate(exps: list[Experience], pad_id: int) -> Batch:
    """Pad a list of experiences into a :class:`Batch` (group ids become dense ints)."""
    B = len(exps)
    p_lens = [e.prompt_ids.shape[0] for e in exps]
    t_lens = [e.response_ids.shape[0] for e in exps]
    P, T = max(p_lens), max(max(t_lens), 1)
    # one scatter per field (rows concatenated, then written at (row, column)) instead of a copy per row
    p_B, t_B = torch.tensor(p_lens), torch.tensor(t_lens)
    prow, pcol = _ragged_index(p_B)
    trow, tcol = _ragged_index(t_B)
    pcol = pcol + (P - p_B)[prow]  # prompts end at column P (left padding)
    input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    input_ids[prow, pcol] = torch.cat([e.prompt_ids for e in exps]).long()
    input_ids[trow, P + tcol] = torch.cat([e.response_ids for e in exps]).long()
    attn = torch.zeros((B, P + T), dtype=torch.long)
    attn[prow, pcol] = 1
    attn[trow, P + tcol] = 1

    def responses(values: list[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros((B, T))
        out[trow, tcol] = torch.cat(values).float()
        return out

    mask = responses([e.response_mask for e in exps])
    behav = responses([e.behav_logp for e in exps])
    old = responses([e.old_logp for e in exps]) if all(e.old_logp is not None for e in exps) else None
    ref = responses([e.ref_logp for e in exps]) if all(e.ref_logp is not None for e in exps) else None
    engine = None
    if any(e.engine_logp is not None for e in exps):
        engine = responses([e.behav_logp if e.engine_logp is None else e.engine_logp for e in exps])
    weights = None
    if any(e.token_weights is not None for e in exps):
        weights = responses([torch.ones(t) if e.token_weights is None else e.token_weights
                             for e, t in zip(exps, t_lens)])
    roles = [e.info.get("role") in ("chosen", "rejected") for e in exps]
    pair = torch.tensor(roles) if any(roles) else None
    gid_index: dict[str, int] = {}
    for e in exps:
        gid_index.setdefault(e.group_id, len(gid_index))
    return Batch(
        input_ids_BL=input_ids,
        attn_BL=attn,
        mask_BT=mask,
        behav_logp_BT=behav,
        rewards_B=torch.tensor([e.reward for e in exps], dtype=torch.float32),
        group_ids_B=torch.tensor([gid_index[e.group_id] for e in exps], dtype=torch.long),
        versions_B=torch.tensor([e.version for e in exps], dtype=torch.long),
        prompt_len=P,
        old_logp_BT=old,
        ref_logp_BT=ref,
        engine_logp_BT=engine,
        weights_BT=weights,
        pair_B=pair,
    )
