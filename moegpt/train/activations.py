"""Activation memory: recompute each layer in the backward pass instead of keeping its activations
(activation checkpointing, applied from outside the plain model), and measure what a forward keeps
for the backward.

``checkpoint_layers`` replaces each block's forward on the instance with a non-reentrant
``torch.utils.checkpoint`` of it: parameter names, state dicts and the parallel plans are
unchanged, the numbers are the same (the MoE routing is recomputed from the same inputs), and a
layer keeps only its input for the backward. ``SavedActivations`` counts the bytes autograd saves
(parameters excluded, each storage once): a deterministic measure that tests can compare, beside
the process's peak resident memory, which the trainer logs per step.
"""

from __future__ import annotations

import functools
import resource
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_layers(model: nn.Module) -> None:
    """Recompute every transformer block of ``model`` (a MoEGPT) in the backward pass."""
    for block in model.layers:
        if not isinstance(block.forward, functools.partial):  # once
            block.forward = functools.partial(_checkpointed, block.forward)


class SavedActivations:
    """``with SavedActivations(model) as saved: loss = f(model); loss.backward()``; then
    ``saved.bytes``: what autograd kept between the forward and the backward."""

    def __init__(self, model: nn.Module):
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._seen: set[int] = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._params and ptr not in self._seen:
            self._seen.add(ptr)
            self.bytes += storage.nbytes()
        return t.detach()  # the tensor itself would hold its grad_fn: a reference cycle per saved output

    def __enter__(self) -> "SavedActivations":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def reset_peak_rss() -> bool:
    """Start a new peak of this process's resident memory (Linux: clear_refs 5); False where the
    kernel does not allow it (the peak then covers the whole run)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """The process's peak resident memory since the last reset (VmHWM), else since it started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
