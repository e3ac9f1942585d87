"""The allocator of KV-cache blocks: a fixed set of blocks, a free queue, reference counts, prefix hashes.

The design is vLLM v1's ``BlockPool`` (``vllm/v1/core/block_pool.py``), written here because no library
ships one that stands apart from its own model runner (transformers' ``PagedAttentionCache`` allocates
blocks but neither shares them between requests nor keeps freed blocks for reuse):

- Every block is in exactly one of two states: in use (``ref_count > 0``) or in the free queue.
- A full block of a request is registered under a hash of (parent block's hash, its token ids, adapter),
  so a later request with the same prefix finds it (``cached_block``) and shares it (``touch``).
- A freed block keeps its hash and K/V while it waits in the free queue: a cache hit takes it back out.
  ``allocate`` takes the least-recently freed block first, and only then forgets its hash (LRU eviction).
- A freed block without a hash (a partial block, or any block with caching off) holds nothing anyone can
  find, so it goes to the *front* of the queue and is reused before a never-used block: on CPU the cache
  tensors are allocated untouched, and a block's pages cost memory only once written.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ftkit.errors import FtkitError


@dataclass(eq=False)
class KVBlock:
    """One block of ``block_size`` token slots in every layer's KV tensors."""

    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int], adapter: str | None) -> bytes:
    """The content hash of a full block: it depends on every token before it through ``parent_hash``.

    SHA-256 rather than Python's ``hash``: a collision would silently reuse another prompt's K/V.
    """
    digest = hashlib.sha256(parent_hash or b"root")
    digest.update((adapter or "").encode() + b"\0")
    digest.update(b",".join(str(t).encode() for t in token_ids))
    return digest.digest()


class BlockPool:
    """``num_blocks`` blocks handed out and taken back; freed blocks with a hash stay findable until evicted."""

    def __init__(self, num_blocks: int, *, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise FtkitError(f"The KV cache must hold at least one block, got {num_blocks}; give it more memory.")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.enable_caching = enable_caching
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[bytes, KVBlock] = {}
        self.num_evictions = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks not used by any request (cached ones included: they are evicted on demand)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, count: int) -> list[KVBlock]:
        """Take ``count`` blocks from the free queue (least recently freed first), evicting their hashes."""
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} blocks with {len(self._free)} free")  # the caller checks first
        taken = []
        for _ in range(count):
            _, block = self._free.popitem(last=False)
            self._forget_hash(block)
            block.ref_count = 1
            taken.append(block)
        return taken

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Share ``blocks`` (cache hits) with one more request; a free one leaves the free queue."""
        for block in blocks:
            if block.ref_count == 0:
                del self._free[block.block_id]
            block.ref_count += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference to each block, in order; a block nobody uses joins the end of the free queue.

        Callers pass a request's blocks tail first, so the end of a prompt is evicted before its shared start.
        """
        for block in blocks:
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block.block_id} freed more often than taken")
            if block.ref_count == 0:
                self._free[block.block_id] = block
                if block.block_hash is None:
                    self._free.move_to_end(block.block_id, last=False)

    def cached_block(self, block_hash: bytes) -> KVBlock | None:
        """The block holding the content ``block_hash`` names, if it is still cached."""
        return self._cached.get(block_hash) if self.enable_caching else None

    def cache_full_block(self, block: KVBlock, block_hash: bytes) -> None:
        """Register ``block`` (just filled) under ``block_hash``; a content already cached keeps its first block."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash not in self._cached:
            block.block_hash = block_hash
            self._cached[block_hash] = block

    def _forget_hash(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
            block.block_hash = None
            self.num_evictions += 1

    def reset_prefix_cache(self) -> None:
        """Forget every hash (e.g. after adapter weights changed); blocks in use stay in use."""
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
