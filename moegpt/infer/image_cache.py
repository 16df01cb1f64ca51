"""The image cache: each image's cross-attention keys and values, computed once and shared.

An image block holds one image's keys and values for every gated cross-attention layer (L latents
each). Blocks are named by the image's content hash and reference-counted by the sequences that
read them: a request whose image is cached already (many questions about one screenshot) reuses
its block, and nothing is recomputed per step. A block whose last reader finished, was preempted
or aborted keeps its content in an LRU free list, so a later request with the same image still
hits it until the block is handed out again. ``ImageBlocks`` is the bookkeeping (pure Python);
``ImageKVCache`` the tensors.

Legend: S image blocks, L latents per image, H cross-attention heads, Dh head dim.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch


def image_digest(pixels: torch.Tensor) -> bytes:
    """The content hash of an image's pixel values (its shape and float32 bytes)."""
    data = pixels.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(str(tuple(data.shape)).encode() + data.numpy().tobytes()).digest()


@dataclass(kw_only=True)
class ImageCacheStats:
    encoded: int = 0  # images run through the encoder and resampler
    hits: int = 0  # image requests served from a cached block


class ImageBlocks:
    """Which block holds which image, and who reads it."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"image cache blocks={num_blocks} must be >= 1")
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # oldest first
        self.block_of: dict[bytes, int] = {}
        self.digest_of: dict[int, bytes] = {}
        self.stats = ImageCacheStats()

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def acquire(self, digest: bytes, fill: Callable[[int], None]) -> int:
        """The block holding the image ``digest``, one more reader on it; on a miss a free block is
        taken and ``fill(block)`` computes its content. Raises when every block is being read."""
        block = self.block_of.get(digest)
        if block is not None:
            self.stats.hits += 1
            if self.ref_count[block] == 0:
                del self.free[block]
        else:
            if not self.free:
                raise ImageCacheFull(f"all {self.num_blocks} image cache blocks are in use")
            block, _ = self.free.popitem(last=False)
            old = self.digest_of.pop(block, None)
            if old is not None:
                del self.block_of[old]
            fill(block)
            self.block_of[digest], self.digest_of[block] = block, digest
            self.stats.encoded += 1
        self.ref_count[block] += 1
        return block

    def release(self, block: int) -> None:
        """One reader fewer; the last one leaves the content cached, first in line for reuse last."""
        if self.ref_count[block] <= 0:
            raise ValueError(f"image block {block} released more often than acquired")
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            self.free[block] = None


class ImageCacheFull(RuntimeError):
    """Every image block is read by a running request: try again later (a server answers 503)."""


class ImageKVCache:
    """The tensors: per gated layer, keys and values (S, L, H, Dh) of each block's image."""

    def __init__(self, layers: tuple[int, ...], num_blocks: int, latents: int, heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.layers = layers
        self.k = {i: torch.zeros(num_blocks, latents, heads, head_dim, dtype=dtype, device=device) for i in layers}
        self.v = {i: torch.zeros_like(self.k[i]) for i in layers}
        self.blocks = ImageBlocks(num_blocks)

    def bytes_per_block(self) -> int:
        k = next(iter(self.k.values()))
        return 2 * len(self.layers) * k[0].numel() * k.element_size()

    def write(self, block: int, keys_values: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One image's keys and values (1, L, H, Dh) per layer into ``block``."""
        for i in self.layers:
            k, v = keys_values[i]
            self.k[i][block].copy_(k[0])
            self.v[i][block].copy_(v[0])

    def gather(self, blocks: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """blocks (U,) -> per layer keys and values (U, L, H, Dh) of those images."""
        return {i: (self.k[i].index_select(0, blocks), self.v[i].index_select(0, blocks)) for i in self.layers}
