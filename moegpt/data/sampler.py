"""Resumable mixture sampler: the order in which (source, block) training samples are drawn.

One *pass* over the mixture draws `round(epochs * n_blocks)` samples from each source:
every full epoch is a fresh permutation of that source's blocks, and a fractional last
epoch takes the first part of one more permutation. All draws of all sources are then
interleaved by one global permutation, so sources are mixed evenly throughout training.

The order of pass `p` depends only on (seed, p, block counts, epochs), and the cursor is
just (pass, position), so a checkpointed `state_dict` resumes the exact sample stream,
whatever batch sizes were used before and after (batch ramp-up is free).
The sampler is pure: it yields indices; `MixtureData.gather` turns them into tokens.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

_STATE_KEYS = ("seed", "pass_index", "position", "fingerprint")


def draws_per_source(block_counts: Sequence[int], epochs: Sequence[float]) -> tuple[int, ...]:
    """Samples each source contributes to one pass: epochs * blocks, rounded half up."""
    # floor(x + 0.5) instead of round(): Python's round() is banker's rounding.
    return tuple(math.floor(e * n + 0.5) for n, e in zip(block_counts, epochs, strict=True))


def _derived_seed(*parts: int | str) -> int:
    """A 63-bit seed from the parts; stable across runs and platforms (unlike hash())."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode("ascii")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class MixtureSampler:
    """Cursor over an endless sequence of passes; `next_batch(n)` returns (n, 2) [source, block] indices."""

    def __init__(self, block_counts: Sequence[int], epochs: Sequence[float], seed: int) -> None:
        if len(block_counts) != len(epochs) or not block_counts:
            raise ValueError(f"need one epochs value per source: {len(block_counts)} counts, {len(epochs)} epochs")
        for i, (n, e) in enumerate(zip(block_counts, epochs)):
            if n < 1:
                raise ValueError(f"source {i} has block count {n}; every source needs at least one block")
            if not (math.isfinite(e) and e > 0):
                raise ValueError(f"source {i} has epochs {e!r}; epochs must be positive")
        self.block_counts = tuple(int(n) for n in block_counts)
        self.epochs = tuple(float(e) for e in epochs)
        self.seed = int(seed)
        self.draws = draws_per_source(self.block_counts, self.epochs)
        self.pass_length = sum(self.draws)
        if self.pass_length == 0:
            raise ValueError(f"epochs {self.epochs} x blocks {self.block_counts} round to zero samples per pass")
        self.pass_index = 0
        self.position = 0
        self._order: torch.Tensor | None = None  # order of self.pass_index, built lazily
        self._order_pass: int | None = None

    @property
    def fingerprint(self) -> int:
        """Identifies the sample stream: block counts, epochs and seed (a plain int for checkpoints)."""
        return _derived_seed(self.seed, *self.block_counts, *(e.hex() for e in self.epochs))

    @property
    def samples_seen(self) -> int:
        return self.pass_index * self.pass_length + self.position

    def pass_order(self, pass_index: int) -> torch.Tensor:
        """All samples of one pass, shape (pass_length, 2): column 0 source, column 1 block."""
        generator = torch.Generator().manual_seed(_derived_seed(self.seed, pass_index))
        sources: list[torch.Tensor] = []
        blocks: list[torch.Tensor] = []
        for source, (n_blocks, n_draws) in enumerate(zip(self.block_counts, self.draws)):
            remaining = n_draws
            while remaining > 0:
                # Each epoch is its own permutation; a fractional epoch keeps a prefix of one.
                take = min(n_blocks, remaining)
                blocks.append(torch.randperm(n_blocks, generator=generator)[:take])
                sources.append(torch.full((take,), source, dtype=torch.long))
                remaining -= take
        order = torch.stack((torch.cat(sources), torch.cat(blocks)), dim=1)
        return order[torch.randperm(self.pass_length, generator=generator)]

    def _current_order(self) -> torch.Tensor:
        if self._order is None or self._order_pass != self.pass_index:
            self._order = self.pass_order(self.pass_index)
            self._order_pass = self.pass_index
        return self._order

    def next_batch(self, n: int) -> torch.Tensor:
        """The next `n` samples as a LongTensor (n, 2); rolls into a new pass when one ends."""
        if n < 1:
            raise ValueError(f"batch size {n} must be at least 1")
        pieces: list[torch.Tensor] = []
        needed = n
        while needed > 0:
            take = min(needed, self.pass_length - self.position)
            pieces.append(self._current_order()[self.position : self.position + take])
            self.position += take
            needed -= take
            if self.position == self.pass_length:
                self.pass_index += 1
                self.position = 0
        return torch.cat(pieces)

    def state_dict(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "pass_index": self.pass_index,
            "position": self.position,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"sampler state is missing keys {missing}")
        if int(state["seed"]) != self.seed or int(state["fingerprint"]) != self.fingerprint:
            raise ValueError(
                f"sampler state fingerprint {state['fingerprint']} (seed {state['seed']}) does not match "
                f"{self.fingerprint} (seed {self.seed}, blocks {self.block_counts}, epochs {self.epochs})"
            )
        pass_index, position = int(state["pass_index"]), int(state["position"])
        if pass_index < 0 or not 0 <= position < self.pass_length:
            raise ValueError(
                f"sampler state pass {pass_index} position {position} out of range (pass length {self.pass_length})"
            )
        self.pass_index = pass_index
        self.position = position


class SampledMixture:
    """What a dataset of named sources with epoch counts shares (dataset.MixtureData, sft.SFTData):
    its names, epochs and the sampler over its training rows (``train_block_counts`` per source)."""

    sources: tuple
    train_block_counts: tuple[int, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sources)

    @property
    def epochs(self) -> tuple[float, ...]:
        return tuple(s.epochs for s in self.sources)

    def make_sampler(self, seed: int) -> MixtureSampler:
        return MixtureSampler(self.train_block_counts, self.epochs, seed)
