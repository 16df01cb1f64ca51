"""Paged KV-cache bookkeeping: fixed-size blocks, per-sequence block tables, reference counts, and
prefix caching. Pure Python: the runner turns block tables into tensor indices.

Prefix caching, safe by construction: a full block is named by a SHA-256 hash chained over every
token up to its end (as vLLM's ``sha256`` prefix-caching hash), so two sequences that share a prompt
prefix share its blocks (reference-counted); an image in the prompt is named by its content hash
beside its token, so a prompt with another picture shares nothing from that image on. A name alone
is never trusted: each named block keeps its own token ids and which named block precedes it, and a
hit is used only when both match, so
even colliding hashes can only cost a cache miss, never a wrong key or value. A freed block keeps
its name while it waits in the free list (oldest freed first), so a later request with the same
prefix can still reuse it until the block is handed out again.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections import OrderedDict
from dataclasses import dataclass

from moegpt.infer.sequence import Sequence

ROOT = bytes(32)  # the chain's start: the "previous hash" of a sequence's first block


def chain_hash(previous: bytes, tokens: tuple[int, ...]) -> bytes:
    """Name of a full block: SHA-256 of the previous block's name (32 bytes) and its token ids, each
    as 8 little-endian bytes (a fixed-width encoding: different inputs, different bytes)."""
    return hashlib.sha256(previous + struct.pack(f"<{len(tokens)}q", *tokens)).digest()


@dataclass(frozen=True, kw_only=True)
class CachedBlock:
    """What a named block holds, checked on every hit."""

    name: bytes  # its chain hash
    tokens: tuple[int, ...]  # its token ids
    parent: int | None  # serial of the named block before it; None for a sequence's first block
    serial: int  # unique for the life of the manager: a block named again gets a new one


@dataclass(frozen=True, kw_only=True)
class _Chain:
    """How far a sequence's blocks are named: its first ``count`` blocks, the last of them ``name``,
    whose content (and everything before it) the cached block of ``serial`` holds."""

    count: int
    name: bytes
    serial: int | None  # None at the start (count 0), or after a collision
    broken: bool = False  # its chain met another content's name: nothing after it is named for it


_START = _Chain(count=0, name=ROOT, serial=None)  # nothing named yet


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True, draft_cache: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.draft_cache = draft_cache  # a draft model keeps a second cache in the same blocks
        self.ref_count = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # oldest first
        self.cached: dict[int, CachedBlock] = {}  # block -> its name and content, for named full blocks
        self.block_of: dict[bytes, int] = {}  # name -> block
        self.named: dict[int, _Chain] = {}  # seq_id -> how far its blocks are named
        self._serials = itertools.count()

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation --------------------------------------------------------------------------
    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        if block in self.cached:  # evict its cached content
            del self.block_of[self.cached.pop(block).name]
        self.ref_count[block] = 1
        return block

    def _block_tokens(self, seq: Sequence, i: int) -> tuple[int, ...]:
        """The block's token ids, then, for each image it holds, its position and content hash (as
        four int64s): the same tokens beside another picture are other content."""
        start, end = i * self.block_size, (i + 1) * self.block_size
        tokens = tuple(seq.token_ids[start:end])
        images = tuple(n for pos, digest in seq.image_keys if start <= pos < end
                       for n in (pos, *struct.unpack("<4q", digest)))
        return tokens + images if images else tokens

    def _lookup(self, name: bytes, tokens: tuple[int, ...], parent: int | None) -> CachedBlock | None:
        """The cached block of this name, if it really holds ``tokens`` after the block ``parent``."""
        block = self.block_of.get(name)
        if block is None:
            return None
        c = self.cached[block]
        return c if c.tokens == tokens and c.parent == parent else None  # else a hash collision

    def _cached_prefix(self, seq: Sequence) -> tuple[list[int], _Chain]:
        """Blocks holding a leading run of ``seq``'s full blocks, found by name and verified by
        content, and how far that names the sequence. The last token is never taken from the cache:
        the model must run on it to produce the next token's logits."""
        found, name, serial = [], ROOT, None
        if self.prefix_caching:
            for i in range((seq.num_tokens - 1) // self.block_size):
                tokens = self._block_tokens(seq, i)
                next_name = chain_hash(name, tokens)
                c = self._lookup(next_name, tokens, serial)
                if c is None:
                    break
                found.append(self.block_of[next_name])
                name, serial = next_name, c.serial
        return found, _Chain(count=len(found), name=name, serial=serial)

    def admit(self, seq: Sequence) -> None:
        """Give a waiting sequence its cached prefix blocks; it computes the rest."""
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        cached, chain = self._cached_prefix(seq)
        for block in cached:
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
        seq.num_computed = seq.num_draft_computed = len(cached) * self.block_size
        self.named[seq.seq_id] = chain

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq.num_computed + num_new_tokens) - len(seq.block_table) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make room for the next ``num_new_tokens`` keys/values of ``seq``."""
        while len(seq.block_table) < self.blocks_needed(seq.num_computed + num_new_tokens):
            seq.block_table.append(self._take_free())

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: name the blocks that are now full and computed, so others can share them
        (with a draft model, only blocks both caches hold). The first copy of a content keeps the
        name; a later copy stays unnamed, and the sequence's chain goes on through the first copy."""
        if not self.prefix_caching:
            return
        chain = self.named.get(seq.seq_id, _START)
        computed = min(seq.num_computed, seq.num_draft_computed) if self.draft_cache else seq.num_computed
        full = computed // self.block_size
        if chain.broken or full <= chain.count:
            return
        name, serial = chain.name, chain.serial  # serial: the cached block holding the prefix so far
        for i in range(chain.count, full):
            tokens = self._block_tokens(seq, i)
            name = chain_hash(name, tokens)
            if name in self.block_of:  # named already: the same content, or a collision
                c = self._lookup(name, tokens, serial)
                if c is None:  # a collision: this sequence's later blocks go unnamed
                    self.named[seq.seq_id] = _Chain(count=full, name=name, serial=None, broken=True)
                    return
                serial = c.serial
                continue
            block = seq.block_table[i]
            c = CachedBlock(name=name, tokens=tokens, parent=serial, serial=next(self._serials))
            self.cached[block], self.block_of[name], serial = c, block, c.serial
        self.named[seq.seq_id] = _Chain(count=full, name=name, serial=serial)

    def release(self, seq: Sequence) -> None:
        """Return the sequence's blocks (on finish, abort or preemption); shared blocks stay."""
        for block in reversed(seq.block_table):  # the tail first: prefixes stay cached longest
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
        seq.block_table.clear()
        seq.num_computed = seq.num_draft_computed = 0
        self.named.pop(seq.seq_id, None)
