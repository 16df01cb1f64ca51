"""The moegpt model: embedding -> N x [RMSNorm -> attention -> RMSNorm -> MoE/MLP] -> RMSNorm -> head.

A plain module: no torch.distributed, no hidden state. Build it on the meta device to count or plan,
then ``to_empty`` + ``init_weights`` to materialise. Parallelism is applied from outside.

Legend: B batch, T tokens, D d_model, V vocab, E experts, Lm MoE layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from moegpt.config import ModelConfig, RopeType
from moegpt.model.attention import Attention, DocumentMask, KVCacheView
from moegpt.model.experts import DenseMLP
from moegpt.model.layers import RMSNorm
from moegpt.model.rope import rope_cos_sin
from moegpt.model.moe import MoE, RouterStats


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    router: list[RouterStats]  # one per MoE layer

    @property
    def aux_loss(self) -> torch.Tensor:
        """Mean load-balancing loss over MoE layers (0 for a dense model)."""
        if not self.router:
            return self.logits.new_zeros(())
        return torch.stack([s.aux_loss for s in self.router]).mean()

    @property
    def z_loss(self) -> torch.Tensor:
        if not self.router:
            return self.logits.new_zeros(())
        return torch.stack([s.z_loss for s in self.router]).mean()

    @property
    def expert_counts(self) -> torch.Tensor:
        """(Lm, E) assignments per expert per MoE layer."""
        return torch.stack([s.expert_counts for s in self.router])


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer) else DenseMLP(cfg.d_model, cfg.d_ff, cfg.mlp)

    def forward(self, x, cos, sin, positions, cache: KVCacheView | None = None):
        x = x + self.attn(self.attn_norm(x), cos, sin, positions, cache)
        y, stats = self.ffn(self.ffn_norm(x))
        return x + y, stats


class MoEGPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: Sequence[KVCacheView] | None = None) -> ModelOutput:
        """tokens (B, T); positions (T,) absolute positions (default 0..T-1), or (B, T) one row each;
        cache: one attention view per layer (a KV cache, or attention.DocumentMask for packed rows)."""
        x, stats = self.trunk(tokens, positions, cache)
        return ModelOutput(logits=self.head(x), router=stats)  # logits (B, T, V)

    def trunk(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
              cache: Sequence[KVCacheView] | None = None) -> tuple[torch.Tensor, list[RouterStats]]:
        """Everything but the output head: tokens (B, T) -> final-normed hidden states (B, T, D) and the
        router stats. An inference runner applies ``head`` to only the rows it samples from (a
        prefill chunk needs one row of its T, and the head is a (V, D) matmul per row)."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        x, stats = self.blocks(self.embed(tokens), positions, cache)  # (B, T, D)
        return self.norm(x), stats

    def blocks(self, x: torch.Tensor, positions: torch.Tensor,
               cache: Sequence[KVCacheView] | None = None) -> tuple[torch.Tensor, list[RouterStats]]:
        """The decoder layers alone: x (B, T, D) at ``positions`` -> (B, T, D) and the router stats
        (a pipeline stage of a served model runs its own layers on the previous stage's output)."""
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling,
                                self._rope_len(positions, cache))  # (T, Dh) each, or (B, T, Dh)
        if positions.dim() == 2:  # positions per row (packed documents): broadcast over heads
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, Dh)
        if cos.dtype != x.dtype:  # cast once here rather than twice per layer in apply_rope (same values)
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        stats: list[RouterStats] = []
        for i, layer in enumerate(self.layers):
            x, s = layer(x, cos, sin, positions, None if cache is None else cache[i])
            if s is not None:
                stats.append(s)
        return x, stats

    def _rope_len(self, positions: torch.Tensor, cache: Sequence[KVCacheView] | None) -> int | None:
        """The length a dynamic rope scaling is evaluated at: this forward's own (as transformers)
        when nothing is cached, max_seq_len with a KV cache (keys cached at one base stay valid)."""
        scaling = self.cfg.rope_scaling
        if scaling is None or scaling.type != RopeType.DYNAMIC:
            return None
        if cache is None or isinstance(cache[0], DocumentMask):
            return int(positions.max()) + 1
        return self.cfg.max_seq_len

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., D) -> logits (..., V)."""
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return x @ weight.t()

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """GPT-2 style: N(0, 0.02), output projections scaled by 1/sqrt(2L); norms at 1."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        std = 0.02
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            s = out_std if name.endswith(("wo.weight", "w_down")) else std
            p.copy_(torch.randn(p.shape, generator=g) * s)


def compute_weight(model: nn.Module) -> torch.Tensor:
    """A full-precision parameter in the dtype and on the device ``model`` computes in: its final
    norm's scale (a quantized model's first parameter may be packed bytes). A model holding a text
    model as ``text`` (vision) answers with that one's."""
    return getattr(model, "text", model).norm.weight


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int = 0,
                dtype: torch.dtype = torch.float32) -> MoEGPT:
    """Build on the meta device, then materialise on ``device`` and initialise (meta stays empty)."""
    with torch.device("meta"):
        model = MoEGPT(cfg)
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    model.init_weights(seed)
    return model.to(dtype)
