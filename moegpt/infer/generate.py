"""Autoregressive generation with a contiguous KV cache: one prefill, then one token per step.

Legend: B batch (prompts of equal length), T prompt length, V vocab.
"""

from __future__ import annotations

from typing import Iterator

import torch

from moegpt.infer.kv_cache import KVCache
from moegpt.infer.sampling import sample
from moegpt.infer.sampling_params import SamplingParams
from moegpt.model import MoEGPT, compute_weight


@torch.no_grad()
def generate_tokens(model: MoEGPT, prompt: torch.Tensor, max_new_tokens: int, params: SamplingParams,
                    eos_id: int | None = None, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yields the next token (B,) each step; stops after max_new_tokens or when every row hit eos."""
    B, T = prompt.shape
    if T == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    max_len = T + max_new_tokens
    if max_len > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len ({model.cfg.max_seq_len})")
    dtype = compute_weight(model).dtype
    cache = KVCache(model.cfg, B, max_len, device=prompt.device, dtype=dtype)
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    tokens, positions = prompt, torch.arange(T, device=prompt.device)
    for _ in range(max_new_tokens):
        logits = model(tokens, positions, cache).logits[:, -1]  # (B, V)
        nxt = sample(logits, params, generator)  # (B,)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        yield nxt
        if bool(done.all()):
            return
        tokens, positions = nxt[:, None], positions[-1:] + 1


def generate(model: MoEGPT, prompt: torch.Tensor, max_new_tokens: int,
             params: SamplingParams = SamplingParams(temperature=0.0),
             eos_id: int | None = None, seed: int | None = None) -> torch.Tensor:
    """prompt (B, T) -> prompt followed by the generated tokens (B, T + n)."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=prompt.device).manual_seed(seed)
    out = list(generate_tokens(model, prompt, max_new_tokens, params, eos_id, generator))
    if not out:
        return prompt
    return torch.cat([prompt, torch.stack(out, dim=1)], dim=1)
