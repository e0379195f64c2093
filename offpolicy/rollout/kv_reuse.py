"""KV-cache reuse across calls of :class:`~offpolicy.rollout.engine.HFEngine` (multi-turn episodes).

A multi-turn episode's next context is its previous context, the model's turn and the environment's
observation. Recomputing that context every turn makes the prompt forward grow with the episode; the
model's turn has already been through the model once. So a call made with ``keep_kv=True`` leaves its KV
cache behind (:class:`KeptKV`), and the next call continues from it: each new prompt that starts with a
kept row's tokens (the row's prompt and the response tokens its cache holds) takes those keys and values,
and only the rest of the prompt is run through the model. This is what vLLM's prefix cache does by
itself, done here for one step back, which is what turn-by-turn generation needs.

Layout of the continued batch, per row ``j`` continuing kept row ``r`` over ``u`` tokens::

    [ pad ... | the u kept columns of row r ] [ pad ... | prompt_j[u:] ]
      width M = max u (right-aligned)            width S = max suffix (left-padded)

The attention mask opens exactly the row's tokens, and the positions continue from ``u``, so every token
sees the same keys, values and positions as in a full recompute (equal to float rounding: the cached
keys were computed in another batch). ``u`` is at most ``len(prompt) - 1``: the prompt's last token is
always run, since its logits start the sampling.

Only plain per-layer key/value caches are continued (``DynamicLayer`` / ``StaticLayer``); a model whose
cache is anything else (sliding-window, linear attention, hybrid) is recomputed as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_MOD = (1 << 61) - 1  # rolling-hash modulus (a Mersenne prime)


def _prefix_hashes(seq: list[int]) -> list[int]:
    """``h[m]`` = the hash of ``seq[:m]`` for m = 0..len(seq)."""
    h, out = 0, [0]
    for tok in seq:
        h = (h * 1_000_003 + tok + 1) % _MOD
        out.append(h)
    return out


def plain_layers(cache) -> list | None:
    """The cache's per-layer key/value holders, or None when it is not a plain full-attention cache."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(type(layer).__name__ in ("DynamicLayer", "StaticLayer") and
                             getattr(layer, "keys", None) is not None for layer in layers):
        return None
    return layers


@dataclass
class KeptKV:
    """The cache of one :meth:`HFEngine.generate` call: ``valid_BL[i]`` marks the cache columns holding row
    ``i``'s tokens ``seqs[i]``, in order."""

    layers: list
    valid_BL: torch.Tensor
    seqs: list[list[int]]
    _index: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for r, s in enumerate(self.seqs):
            self._index.setdefault((len(s), _prefix_hashes(s)[-1]), r)
        self._lengths = sorted({len(s) for s in self.seqs}, reverse=True)

    def match(self, prompts: list[list[int]]) -> list[tuple[int, int]]:
        """Per prompt, ``(row, u)``: the kept row whose tokens are the longest prefix of the prompt, and how
        many of its tokens to reuse (``u <= len(prompt) - 1``); ``(-1, 0)`` where none matches."""
        out = []
        for p in prompts:
            h = _prefix_hashes(p)
            hit = (-1, 0)
            for m in self._lengths:
                if m > len(p):
                    continue
                r = self._index.get((m, h[m]))
                if r is not None and self.seqs[r] == p[:m]:
                    hit = (r, min(m, len(p) - 1))
                    break
            out.append(hit)
        return out

    def gather(self, matches: list[tuple[int, int]], make_cache) -> tuple[object, torch.Tensor]:
        """A new cache holding, right-aligned in ``M = max u`` columns, each row's reused keys and values,
        and its (B, M) attention mask. ``make_cache(pairs)`` builds the model's cache from (keys, values)
        per layer."""
        device = self.valid_BL.device
        M = max(u for _, u in matches)
        B = len(matches)
        src_rows = torch.tensor([max(r, 0) for r, _ in matches], device=device)
        cols = torch.zeros((B, M), dtype=torch.long, device=device)
        attn = torch.zeros((B, M), dtype=torch.long, device=device)
        for j, (r, u) in enumerate(matches):
            if u:
                cols[j, M - u:] = self.valid_BL[r].nonzero().squeeze(-1)[:u]
                attn[j, M - u:] = 1
        rows = src_rows[:, None].expand(B, M)
        pairs = [(layer.keys[rows, :, cols].transpose(1, 2).contiguous(),
                  layer.values[rows, :, cols].transpose(1, 2).contiguous()) for layer in self.layers]
        return make_cache(pairs), attn
