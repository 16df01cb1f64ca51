"""The one-kernel grouped matmul against the per-expert loop, values and gradients."""

import torch

from moegpt.model.grouped import grouped_linear, grouped_linear_loop


def test_grouped_matmul_matches_per_expert_loop_with_empty_groups():
    g = torch.Generator().manual_seed(0)
    counts = [5, 0, 7, 1, 0, 3]
    w = torch.randn(6, 12, 8, generator=g, requires_grad=True)
    x = torch.randn(sum(counts), 8, generator=g, requires_grad=True)
    r = torch.randn(sum(counts), 12, generator=g)
    results = []
    for fn in (grouped_linear, grouped_linear_loop):
        x.grad = w.grad = None
        y = fn(x, w, counts)
        (y * r).sum().backward()
        results.append((y.detach(), x.grad.clone(), w.grad.clone()))
    for fast, slow in zip(*results):
        torch.testing.assert_close(fast, slow)
    assert results[0][2][1].abs().sum() == 0  # an expert with no tokens gets no gradient
