"""Loss aggregation: per-token loss (B, T) -> scalar, a choice separate from the per-token loss.

Signature ``fn(loss_BT, mask_BT, *, num_tokens=None, num_seqs=None, **params)``. ``num_tokens`` and
``num_seqs`` override the counts of this tensor with those of the whole optimiser batch, so that the
sum of the micro-batch losses equals the full-batch loss (and so do the accumulated gradients).
Masked positions are selected away with ``torch.where``; junk there never reaches the result.

A *sequence* is a row with at least one trainable token (``mask.sum(-1) > 0``): a fully masked row (a
response made only of tool output, or padding rows) is not counted, so it cannot dilute the sequence
means. The default ``num_seqs`` is the number of such rows; a caller that splits the batch passes the
global count of such rows. Counts are clamped at 1, so an empty batch gives 0, not nan.

- ``token_mean``: sum(m * l) / sum(m)  (DAPO, arXiv 2503.14476).
- ``seq_mean_token_mean``: sum_i( sum_t m l / sum_t m ) / num_seqs  (original GRPO; GSPO).
- ``seq_mean_token_sum``: sum_i( sum_t m l ) / num_seqs.
- ``seq_mean_token_sum_norm``: sum(m * l) / (num_seqs * max_len)  (Dr. GRPO, arXiv 2503.20783).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import builtin

Count = int | float | Tensor | None


def masked_loss(loss_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """``loss`` on the mask, exact 0 elsewhere (no gradient leaks from masked positions), (B, T)."""
    return torch.where(mask_BT.bool(), loss_BT, torch.zeros((), dtype=loss_BT.dtype, device=loss_BT.device))


def seq_count(mask_BT: Tensor, num_seqs: Count, dtype: torch.dtype) -> Tensor:
    """``num_seqs``, or by default the number of rows of ``mask_BT`` with a trainable token; 0-dim, >= 1."""
    n = (mask_BT.bool().sum(-1) > 0).sum() if num_seqs is None else num_seqs
    return torch.as_tensor(n, dtype=dtype).clamp(min=1)


@builtin("aggregation", "token_mean")
def token_mean(loss_BT: Tensor, mask_BT: Tensor, *, num_tokens: Count = None, num_seqs: Count = None) -> Tensor:
    """Sum of masked losses over the token count (``num_tokens``: global count of the optimiser batch)."""
    n = mask_BT.bool().sum() if num_tokens is None else num_tokens
    return masked_loss(loss_BT, mask_BT).sum() / torch.as_tensor(n, dtype=loss_BT.dtype).clamp(min=1)


@builtin("aggregation", "seq_mean_token_mean")
def seq_mean_token_mean(loss_BT: Tensor, mask_BT: Tensor, *, num_tokens: Count = None,
                        num_seqs: Count = None) -> Tensor:
    """Per-sequence token mean, averaged over the sequences (see :func:`seq_count`). Ignores num_tokens."""
    per_seq_B = masked_loss(loss_BT, mask_BT).sum(-1) / mask_BT.bool().sum(-1).clamp(min=1)
    return per_seq_B.sum() / seq_count(mask_BT, num_seqs, loss_BT.dtype)


@builtin("aggregation", "seq_mean_token_sum")
def seq_mean_token_sum(loss_BT: Tensor, mask_BT: Tensor, *, num_tokens: Count = None,
                       num_seqs: Count = None) -> Tensor:
    """Per-sequence token sum, averaged over the sequences (see :func:`seq_count`). Ignores num_tokens."""
    return masked_loss(loss_BT, mask_BT).sum() / seq_count(mask_BT, num_seqs, loss_BT.dtype)


@builtin("aggregation", "seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(loss_BT: Tensor, mask_BT: Tensor, *, num_tokens: Count = None,
                            num_seqs: Count = None, max_len: int | None = None) -> Tensor:
    """Dr. GRPO: ``sum(m * l) / (num_seqs * max_len)`` with a constant ``max_len``.

    ``max_len`` should be the generation limit; it defaults to T of this tensor, which is only
    micro-batch invariant if every micro-batch is padded to the same T. verl's ``seq-mean-token-sum-norm``
    divides by ``max_len`` only (a sum over sequences, B times ours); see docs/algorithms.md.
    """
    length = loss_BT.shape[-1] if max_len is None else max_len
    return masked_loss(loss_BT, mask_BT).sum() / (seq_count(mask_BT, num_seqs, loss_BT.dtype) * length)
