"""Turning logits into the next token: penalties, then greedy or temperature / top-k / top-p / min-p
(the options of ``SamplingParams``).

Randomness comes from an explicit ``torch.Generator``, so a seed reproduces a sample. Every function
works on one request's rows: nothing here mixes requests, which keeps outputs batch-invariant.
Legend: R rows (positions of one request), V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moegpt.infer.outputs import TokenLogprob
from moegpt.infer.sampling_params import SamplingParams


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int],
                    output_ids: Sequence[int]) -> torch.Tensor:
    """logits (V,) of the position after ``prompt_ids + output_ids`` -> penalised logits (V,).
    Repetition penalty counts prompt and output tokens (as HF does); presence and frequency only
    the generated ones (as OpenAI does)."""
    if not params.has_penalties:
        return logits
    logits = logits.float().clone()
    V = logits.shape[-1]
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(V, dtype=torch.bool, device=logits.device)
        seen[torch.tensor(list(prompt_ids) + list(output_ids), dtype=torch.long, device=logits.device)] = True
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(list(output_ids), dtype=torch.long, device=logits.device),
                                minlength=V)[:V].float()
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
    return logits


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (R, V) -> the distribution actually sampled from (R, V): temperature, then top-k,
    top-p and min-p. Greedy is the one-hot of the argmax."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (R, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the token crossing it included).
        drop = sorted_p.cumsum(-1) - sorted_p >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), 0.0)
    return probs / probs.sum(-1, keepdim=True)


def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """probs (R, V) -> token ids (R,). Inverse-CDF with one uniform per row from ``generator``, so
    the draw depends only on this request's generator and distribution."""
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device)  # (R, 1)
    cdf = probs.double().cumsum(-1)  # (R, V)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    # u * total can round up to total: never step past the last token that has mass.
    last = (probs > 0).long().mul(torch.arange(probs.shape[-1], device=probs.device)).amax(-1)  # (R,)
    idx = torch.minimum(idx, last)
    return idx


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits (R, V) -> the most likely token of each row (R,), the first where several tie. 16-bit
    logits are widened first: the same argmax, and torch's argmax over 32k bf16 values costs ~120 us
    on a CPU against ~30 in fp32."""
    return (logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits).argmax(dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (R, V) -> token ids (R,)."""
    if params.greedy:
        return greedy(logits)
    return sample_from(filtered_probs(logits, params), generator)


def top_logprobs(logits: torch.Tensor, chosen: int, n: int) -> TokenLogprob:
    """logits (V,) -> the log-probability and rank of ``chosen`` and the ``n`` most likely (token,
    log-probability). Log-probabilities are the model's own (log-softmax of its logits, before any
    sampling filter), as OpenAI and vLLM report them."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logp, min(n, logp.shape[-1])) if n > 0 else None
    pairs = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
    rank = 1 + int((logp > logp[chosen]).sum())
    return TokenLogprob(token_id=chosen, logprob=float(logp[chosen]), rank=rank, top=pairs)
