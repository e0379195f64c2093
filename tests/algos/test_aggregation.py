"""Aggregation: hand values (ALGORITHMS.md §1) and micro-batch gradient invariance."""

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
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    params = {"max_len": 16} if name == "seq_mean_token_sum_norm" else {}
    x = torch.randn(B, T, generator=gen, dtype=torch.float64, requires_grad=True)
    full = AGGREGATIONS[name]((x * w) ** 2, mask, **params)
    (g_full,) = torch.autograd.grad(full, x)
    total, counts = 0.0, {"num_tokens": mask.sum(), "num_seqs": B}
    for idx in torch.arange(B).chunk(splits):
        part = AGGREGATIONS[name]((x[idx] * w[idx]) ** 2, mask[idx], **counts, **params)
        part.backward()
        total = total + part.detach()
    close(total, full.detach(), atol=1e-12)
    close(x.grad, g_full, atol=1e-12)
