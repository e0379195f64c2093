"""Second check of offpolicy.algos: the entropy's gradient with banned (-inf) logits."""

import math

import torch

from offpolicy.algos import entropy_from_logits

F64 = torch.float64


def test_entropy_gradient_is_finite_with_a_banned_logit():
    # logits [a, b, -inf]: H = H(softmax([a, b])), and the banned token gets no gradient.
    # a = 1, b = 2: p = [s, 1 - s], s = sigmoid(-1) = 0.268941; dH/da = -p_a (log p_a + H) = 0.196612,
    # dH/db = -0.196612 (the two-token answer, obtained without the -inf entry).
    z = torch.tensor([[[1.0, 2.0, -math.inf]]], dtype=F64, requires_grad=True)
    entropy_from_logits(z).sum().backward()
    s = 1 / (1 + math.e)
    h = -(s * math.log(s) + (1 - s) * math.log(1 - s))
    g = -s * (math.log(s) + h)
    torch.testing.assert_close(z.grad, torch.tensor([[[g, -g, 0.0]]], dtype=F64), atol=1e-12, rtol=0)


def test_entropy_gradient_matches_the_finite_logits_case():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 5, dtype=F64)
    a = z.clone().requires_grad_()
    entropy_from_logits(a).sum().backward()
    b = torch.cat([z, torch.full((2, 3, 2), -math.inf, dtype=F64)], -1).requires_grad_()
    entropy_from_logits(b).sum().backward()
    torch.testing.assert_close(b.grad[..., :5], a.grad, atol=1e-12, rtol=0)
    assert (b.grad[..., 5:] == 0).all()
