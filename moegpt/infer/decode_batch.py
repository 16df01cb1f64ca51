"""A decode step's metadata in persistent buffers (vLLM V1's persistent batch): the positions and
block tables of the sequences decoding, kept on the model's device and updated in place as they
advance, instead of rebuilt from Python lists every step.

While the same sequences decode step after step, a step costs one in-place add to the positions and,
once every block_size tokens, the new block's entry in the table of the sequence that crossed into
it. When the batch changes (a sequence joins, finishes or is preempted, or a sequence's table is not
the one held), the buffers are rebuilt.

Legend: B sequences decoding, nb block-table entries held per sequence (capacity).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moegpt.infer.paged_cache import block_table_tensor

TABLE_HEADROOM = 8  # entries past the longest table, so a growing sequence rarely forces a rebuild


@dataclass(frozen=True, kw_only=True)
class DecodeMeta:
    """Where a decode step's keys go and come from."""

    block_tables: torch.Tensor  # (B, nb) int64 physical block of each logical block, padded with block 0
    block_size: int
    lens: tuple[int, ...]  # keys of each sequence once this step's are written (its position + 1)


@dataclass(frozen=True, kw_only=True)
class DecodeRow:
    """One sequence of a decode step: its identity (None: not kept across steps), position, table."""

    seq_id: int | None
    position: int
    block_table: tuple[int, ...]


class DecodeBatchState:
    def __init__(self, block_size: int, device: torch.device):
        self.block_size, self.device = block_size, device
        self.ids: tuple[int | None, ...] = ()
        self.held: list[tuple[int, ...]] = []  # the table entries each row's buffer holds
        self.last: tuple[int, ...] = ()  # the positions of the last step
        self.positions = torch.zeros(0, dtype=torch.long, device=device)  # (B,)
        self.tables = torch.zeros(0, 0, dtype=torch.long, device=device)  # (B, nb)
        self.rebuilds = 0  # how often the buffers were built afresh (a test and a profile read it)

    def update(self, rows: list[DecodeRow]) -> tuple[torch.Tensor, DecodeMeta]:
        """This step's positions (B,) and metadata, the buffers updated in place where they can be."""
        ids = tuple(r.seq_id for r in rows)
        positions = tuple(r.position for r in rows)
        needed = [r.position // self.block_size + 1 for r in rows]  # table entries this step reads
        for r, n in zip(rows, needed):
            if len(r.block_table) < n:  # padding would map the position to block 0: another sequence's
                raise ValueError(f"sequence {r.seq_id}: position {r.position} needs {n} blocks, its block table "
                                 f"has {len(r.block_table)}")
        same = (None not in ids and ids == self.ids and all(p == q + 1 for p, q in zip(positions, self.last))
                and max(needed) <= self.tables.shape[1])
        if same:
            for i, (r, held) in enumerate(zip(rows, self.held)):
                if r.block_table[:len(held)] != held:  # the table changed under the sequence
                    same = False
                    break
        if not same:
            self._rebuild(rows, ids, positions)
        else:
            self.positions.add_(1)
            for i, (r, n) in enumerate(zip(rows, needed)):
                held = self.held[i]
                if n > len(held):  # the sequence crossed into a block the buffer does not hold yet
                    new = r.block_table[len(held):n]
                    self.tables[i, len(held):n] = torch.tensor(new, dtype=torch.long, device=self.device)
                    self.held[i] = held + new
        self.last = positions
        meta = DecodeMeta(block_tables=self.tables, block_size=self.block_size, lens=tuple(p + 1 for p in positions))
        return self.positions, meta

    def _rebuild(self, rows: list[DecodeRow], ids: tuple[int | None, ...], positions: tuple[int, ...]) -> None:
        nb = max(len(r.block_table) for r in rows) + TABLE_HEADROOM
        self.held = [tuple(r.block_table) for r in rows]
        self.tables = block_table_tensor(self.held, nb, self.device)
        self.positions = torch.tensor(positions, dtype=torch.long, device=self.device)
        self.ids = ids
        self.rebuilds += 1
