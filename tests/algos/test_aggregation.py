"""Aggregation: hand values (docs/algorithms.md, "Aggregation"), fully masked rows, micro-batch invariance."""

import pytest
import torch

from offpolicy.algos import AGGREGATIONS

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def close(a, b, atol=1e-6):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=atol, rtol=0)


def test_token_mean_hand():
    # (1 + 2 + 4) / 3 tokens
    close(AGGREGATIONS["token_mean"](LOSS, MASK), 7 / 3)
    close(AGGREGATIONS["token_mean"](LOSS, MASK, num_tokens=7), 1.0)


def test_seq_mean_token_mean_hand():
    # seq 1: (1+2)/2 = 1.5, seq 2: 4/1 = 4 -> mean 2.75
    close(AGGREGATIONS["seq_mean_token_mean"](LOSS, MASK), 2.75)
    close(AGGREGATIONS["seq_mean_token_mean"](LOSS, MASK, num_seqs=4), 5.5 / 4)


def test_seq_mean_token_sum_hand():
    # seq sums 3 and 4 -> mean 3.5
    close(AGGREGATIONS["seq_mean_token_sum"](LOSS, MASK), 3.5)


def test_fully_masked_row_not_counted_hand():
    # a third row with no trainable token is not a sequence: the values above are unchanged
    loss = torch.cat([LOSS, torch.tensor([[7.0, 8.0, 9.0]], dtype=torch.float64)])
    mask = torch.cat([MASK, torch.zeros(1, 3, dtype=MASK.dtype)])
    close(AGGREGATIONS["seq_mean_token_mean"](loss, mask), 2.75)  # not 5.5 / 3
    close(AGGREGATIONS["seq_mean_token_sum"](loss, mask), 3.5)  # not 7 / 3
    close(AGGREGATIONS["seq_mean_token_sum_norm"](loss, mask), 7 / 6)  # 7 / (2 seqs * T = 3), not 7 / 9
    close(AGGREGATIONS["token_mean"](loss, mask), 7 / 3)
    close(AGGREGATIONS["seq_mean_token_sum"](loss, mask, num_seqs=7), 1.0)  # an explicit count wins


def test_seq_mean_token_sum_norm_hand():
    # 7 / (2 seqs * L_max); default L_max = T = 3; explicit 10
    close(AGGREGATIONS["seq_mean_token_sum_norm"](LOSS, MASK), 7 / 6)
    close(AGGREGATIONS["seq_mean_token_sum_norm"](LOSS, MASK, max_len=10), 7 / 20)


@pytest.mark.parametrize("name", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                  "seq_mean_token_sum_norm"])
def test_masked_junk_never_leaks(name):
    loss = LOSS.clone().requires_grad_(True)
    junk = LOSS.detach().clone()
    junk[MASK == 0] = torch.tensor([float("inf"), float("nan"), 1e30], dtype=torch.float64)
    junk.requires_grad_(True)
    a = AGGREGATIONS[name](loss, MASK)
    b = AGGREGATIONS[name](junk, MASK)
    close(b, a.detach())
    b.backward()
    assert torch.isfinite(junk.grad).all() and (junk.grad[MASK == 0] == 0).all()


@pytest.mark.parametrize("name", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                  "seq_mean_token_sum_norm"])
def test_fully_masked_rows_change_nothing(name):
    """Fully masked rows holding junk (inf, nan) leave the value and every gradient unchanged."""
    gen = torch.Generator().manual_seed(3)
    B, T = 5, 4
    x = torch.randn(B, T, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = (torch.arange(T)[None, :] < torch.tensor([4, 1, 3, 2, 4])[:, None]).long()
    base = AGGREGATIONS[name](x.exp(), mask)
    (g_base,) = torch.autograd.grad(base, x)
    junk = torch.tensor([[float("inf"), float("nan"), -float("inf"), 1e30],
                         [float("nan")] * T], dtype=torch.float64, requires_grad=True)
    loss_more = torch.cat([x[:2].exp(), junk[:1], x[2:].exp(), junk[1:]])
    mask_more = torch.cat([mask[:2], torch.zeros(1, T, dtype=mask.dtype), mask[2:],
                           torch.zeros(1, T, dtype=mask.dtype)])
    more = AGGREGATIONS[name](loss_more, mask_more)
    g_x, g_junk = torch.autograd.grad(more, (x, junk))
    close(more, base.detach(), atol=1e-12)
    close(g_x, g_base, atol=1e-12)
    assert (g_junk == 0).all()


def test_empty_mask_is_zero_not_nan():
    for fn in AGGREGATIONS.values():
        out = fn(LOSS, torch.zeros_like(MASK))
        assert out == 0


@pytest.mark.parametrize("name", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                  "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("splits", [1, 2, 4])
def test_micro_batch_invariance(name, splits):
    gen = torch.Generator().manual_seed(1)
    B, T = 8, 6
    w = torch.randn(B, T, generator=gen, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    lengths[3] = 0  # a fully masked row: not a sequence
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    params = {"max_len": 16} if name == "seq_mean_token_sum_norm" else {}
    x = torch.randn(B, T, generator=gen, dtype=torch.float64, requires_grad=True)
    full = AGGREGATIONS[name]((x * w) ** 2, mask, **params)
    (g_full,) = torch.autograd.grad(full, x)
    # the global counts of the optimiser batch: tokens, and rows with at least one trainable token
    total, counts = 0.0, {"num_tokens": mask.sum(), "num_seqs": (mask.sum(-1) > 0).sum()}
    for idx in torch.arange(B).chunk(splits):
        part = AGGREGATIONS[name]((x[idx] * w[idx]) ** 2, mask[idx], **counts, **params)
        part.backward()
        total = total + part.detach()
    close(total, full.detach(), atol=1e-12)
    close(x.grad, g_full, atol=1e-12)
