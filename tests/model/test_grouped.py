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


def test_grouped_matmul_follows_bf16_autocast():
    x, w = torch.randn(6, 16), torch.randn(3, 8, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_linear(x, w, [2, 0, 4])
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32  # master weights stay fp32
    torch.testing.assert_close(y.float(), grouped_linear_loop(x, w, [2, 0, 4]), rtol=0.05, atol=0.1)


def test_fast_path_is_taken_where_pytorch_has_grouped_mm():
    import torch.nn.functional as F

    from moegpt.model.grouped import grouped_mm_supported

    assert grouped_mm_supported(torch.zeros(2, 64), torch.zeros(4, 32, 64)) == hasattr(F, "grouped_mm")
    assert not grouped_mm_supported(torch.zeros(2, 3), torch.zeros(4, 5, 3))  # unaligned rows: the loop


def test_inference_loop_touches_only_experts_with_rows_and_matches_autograd_loop():
    g = torch.Generator().manual_seed(1)
    counts = [0, 2, 0, 0, 1, 0]
    w, x = torch.randn(6, 12, 8, generator=g), torch.randn(3, 8, generator=g)
    with torch.no_grad():
        fast = grouped_linear_loop(x, w, counts)
    slow = grouped_linear_loop(x, w.clone().requires_grad_(), counts).detach()
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(fast[2], x[2] @ w[4].t())
