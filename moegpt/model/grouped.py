"""Grouped matmul: rows of x grouped by expert, each group times its own expert's weight.

Legend: A rows (assignments) sorted by expert, E experts, I in features, O out features.

PyTorch's ``grouped_mm`` does all experts in one kernel (and one weight-gradient buffer in backward);
the per-expert loop is the fallback where it is missing or unsupported, and the reference in tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_linear_loop(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """x (A, I), w (E, O, I), counts per expert summing to A -> (A, O)."""
    # Under autograd, unbind once: its backward stacks the E gradients in one go, where indexing w[e]
    # per expert would scatter into a zero tensor of the whole (E, O, I) stack for every expert.
    # Without it (decoding), index only the experts that have rows: at batch 1 that is k of E, and
    # unbind's E views would cost more Python time than the k matmuls' weight reads save.
    ws = w.unbind(0) if torch.is_grad_enabled() and w.requires_grad else w
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            outs.append(F.linear(x[start:start + n], ws[e]))  # (n, O)
            start += n
    if not outs:
        return x.new_zeros(x.shape[0], w.shape[1])
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    # The kernels need row strides (in and out features) in multiples of 16 bytes, aligned storage.
    out_features, in_features = w.shape[-2], w.shape[-1]
    if (in_features * w.element_size()) % 16 or (out_features * w.element_size()) % 16:
        return False
    if x.data_ptr() % 16 or w.data_ptr() % 16:
        return False
    if x.device.type == "cpu":
        return True
    # CUDA kernels need sm80+ and bf16 operands.
    return x.device.type == "cuda" and w.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """x (A, I), w (E, O, I), counts per expert summing to A -> (A, O)."""
    # grouped_mm is not autocast-aware: cast both operands to the autocast dtype ourselves.
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else w.dtype
    if x.dtype != dtype or w.dtype != dtype:
        x, w = x.to(dtype), w.to(dtype)
    # With fewer rows than experts (decoding a small batch) most experts are empty; the loop touches
    # only the experts that have rows, where the CPU grouped kernel still visits every expert.
    if x.shape[0] < w.shape[0] or not grouped_mm_supported(x, w):
        return grouped_linear_loop(x, w, counts)
    offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)  # (E,) end of each group
    return F.grouped_mm(x, w.transpose(-2, -1), offs=offs)
