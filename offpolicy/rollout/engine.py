"""Batched sampling on Hugging Face transformers with a KV cache, recording behaviour log-probs.

``HFEngine.generate`` samples ``n`` responses for each prompt in one batch: prompts are
left-padded, the first forward fills the cache once per prompt (indexed out to its ``n`` rows),
then one token per forward. For every sampled
token it records ``behav_logp`` = log softmax(logits / temperature)[token], i.e. the log-prob
under the tempered distribution *before* top-p truncation — the same quantity the trainer
recomputes, so that at staleness 0 the ratio is exactly 1 up to float error. (Under top-p the
true sampling distribution is the truncated one; recording the untruncated value is the
convention of verl and vLLM's ``logprobs`` and keeps the trainer's log-probs comparable.)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


@dataclass
class Rollouts:
    """Per sequence (prompt i repeated n times, in order): response ids and their behaviour log-probs."""

    prompt_index: list[int]
    response_ids: list[torch.Tensor]
    behav_logp: list[torch.Tensor]
    finished: list[bool]


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p):] = 1
    return ids, attn


def _top_p_filter(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside the smallest set whose probability reaches ``top_p``."""
    sorted_logits, order = logits_BV.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits_BV.masked_fill(drop, float("-inf"))


def _cache_keyword(model) -> str:
    """transformers >= 5.2x names the KV cache ``cache``; older releases ``past_key_values``. A PEFT wrapper
    takes ``**kwargs`` and passes them on, so the wrapped model's signature decides."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class HFEngine:
    """Sampling engine over a ``transformers`` causal LM (CPU or CUDA)."""

    def __init__(self, model, *, pad_id: int, eos_id: int):
        self.model = model
        self.pad_id = pad_id
        self.eos_id = eos_id
        self._cache_kw = _cache_keyword(model)

    def _forward(self, ids, attn, pos, cache=None):
        kw = {self._cache_kw: cache} if cache is not None else {}
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True,
                         logits_to_keep=1, **kw)
        return getattr(out, self._cache_kw), out.logits[:, -1].float()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, n: int = 1, max_new_tokens: int = 8,
                 temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                 generator: torch.Generator | None = None) -> Rollouts:
        """Sample ``n`` responses per prompt. EOS ends a response (and is part of it)."""
        ids, attn = _left_pad(prompts, self.pad_id)
        ids, attn = ids.to(self.device), attn.to(self.device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        # each prompt is run once; its KV cache and last logits are then indexed out to its n rows
        cache, logits = self._forward(ids, attn, pos)
        if n > 1:
            rows = torch.arange(len(prompts), device=self.device).repeat_interleave(n)
            if hasattr(cache, "batch_select_indices"):
                cache.batch_select_indices(rows)
                attn, pos, logits = attn[rows], pos[rows], logits[rows]
            else:  # a cache type that cannot be indexed: run every row
                ids, attn, pos = ids[rows], attn[rows], pos[rows]
                cache, logits = self._forward(ids, attn, pos)
        B = attn.shape[0]
        next_pos = pos[:, -1:] + 1
        tokens, logps = [], []
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        alive_steps = torch.zeros(B, dtype=torch.long, device=self.device)
        for t in range(max_new_tokens):
            scaled = logits if greedy else logits / temperature
            logp_BV = scaled.log_softmax(-1)
            if greedy:
                tok = logp_BV.argmax(-1)
            else:
                sample_from = _top_p_filter(scaled, top_p) if top_p < 1.0 else scaled
                probs = sample_from.softmax(-1)
                tok = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(self.device)
            lp = logp_BV.gather(-1, tok[:, None]).squeeze(-1)
            tok = torch.where(done, torch.full_like(tok, self.pad_id), tok)
            tokens.append(tok)
            logps.append(torch.where(done, torch.zeros_like(lp), lp))
            alive_steps += (~done).long()
            done = done | (tok == self.eos_id)
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=self.device)], dim=1)
            cache, logits = self._forward(tok[:, None], attn, next_pos, cache)
            next_pos = next_pos + 1
        tok_BT = torch.stack(tokens, 1).cpu()
        lp_BT = torch.stack(logps, 1).cpu()
        lengths = alive_steps.cpu().tolist()
        return Rollouts(
            prompt_index=[i for i in range(len(prompts)) for _ in range(n)],
            response_ids=[tok_BT[i, :L] for i, L in enumerate(lengths)],
            behav_logp=[lp_BT[i, :L] for i, L in enumerate(lengths)],
            finished=done.cpu().tolist(),
        )

