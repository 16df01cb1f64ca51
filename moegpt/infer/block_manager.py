"""Paged KV-cache bookkeeping: fixed-size blocks, per-sequence block tables, reference counts, and
prefix caching. Pure Python: the runner turns block tables into tensor indices.

Prefix caching: a full block is named by a hash chained over every token up to its end, so two
sequences that share a prompt prefix share its blocks (reference-counted). A freed block keeps its
hash while it waits in the free list (oldest freed first), so a later request with the same prefix
can still reuse it until the block is handed out again.
"""

from __future__ import annotations

from collections import OrderedDict

from moegpt.infer.sequence import Sequence


def chain_hash(previous: int | None, tokens: tuple[int, ...]) -> int:
    """Name of a full block: its tokens and everything before it (through ``previous``)."""
    return hash((previous, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True, draft_cache: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.draft_cache = draft_cache  # a draft model keeps a second cache in the same blocks
        self.ref_count = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # oldest first
        self.hash_of: dict[int, int] = {}  # block -> hash, for full blocks
        self.block_of: dict[int, int] = {}  # hash -> block
        # seq_id -> (how many of its leading blocks are named, the chain hash of the last of them)
        self.named: dict[int, tuple[int, int | None]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation --------------------------------------------------------------------------
    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        if block in self.hash_of:  # evict its cached content
            del self.block_of[self.hash_of.pop(block)]
        self.ref_count[block] = 1
        return block

    def _block_tokens(self, seq: Sequence, i: int) -> tuple[int, ...]:
        return tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])

    def _cached_prefix(self, seq: Sequence) -> tuple[list[int], int | None]:
        """Blocks holding a leading run of ``seq``'s full blocks, found by hash, and the chain hash of
        the last one. The last token is never taken from the cache: the model must run on it to
        produce the next token's logits."""
        found, last = [], None
        if not self.prefix_caching:
            return found, last
        for i in range((seq.num_tokens - 1) // self.block_size):
            h = chain_hash(last, self._block_tokens(seq, i))
            block = self.block_of.get(h)
            if block is None:
                break
            found.append(block)
            last = h
        return found, last

    def admit(self, seq: Sequence) -> None:
        """Give a waiting sequence its cached prefix blocks; it computes the rest."""
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        cached, last = self._cached_prefix(seq)
        for block in cached:
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
        seq.num_computed = seq.num_draft_computed = len(cached) * self.block_size
        self.named[seq.seq_id] = (len(cached), last)

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq.num_computed + num_new_tokens) - len(seq.block_table) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make room for the next ``num_new_tokens`` keys/values of ``seq``."""
        while len(seq.block_table) < self.blocks_needed(seq.num_computed + num_new_tokens):
            seq.block_table.append(self._take_free())

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: name the blocks that are now full and computed, so others can share them
        (with a draft model, only blocks both caches hold)."""
        if not self.prefix_caching:
            return
        done, last = self.named.get(seq.seq_id, (0, None))
        computed = min(seq.num_computed, seq.num_draft_computed) if self.draft_cache else seq.num_computed
        full = computed // self.block_size
        for i in range(done, full):
            block = seq.block_table[i]
            last = chain_hash(last, self._block_tokens(seq, i))
            if last not in self.block_of and block not in self.hash_of:  # first copy of this content wins
                self.block_of[last], self.hash_of[block] = block, last
        self.named[seq.seq_id] = (max(done, full), last)

    def release(self, seq: Sequence) -> None:
        """Return the sequence's blocks (on finish, abort or preemption); shared blocks stay."""
        for block in reversed(seq.block_table):  # the tail first: prefixes stay cached longest
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
        seq.block_table.clear()
        seq.num_computed = seq.num_draft_computed = 0
        self.named.pop(seq.seq_id, None)
