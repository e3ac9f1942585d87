"""Per-request block tables over the block pool: prefix-cache look-up, slot allocation, freeing.

As in vLLM v1's ``KVCacheManager`` (``vllm/v1/core/kv_cache_manager.py``): the scheduler asks for the
cached prefix of a request it is about to admit (``computed_prefix``), then for room for the tokens it
schedules this step (``allocate_slots``, which says no rather than failing when the pool is short, so the
scheduler can preempt); every full block is hashed and registered as soon as its tokens are scheduled, so
a request admitted later, even in the same step, reuses it. Slot ``s`` of the KV tensors is position
``s % block_size`` of block ``s // block_size``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ftkit.engine.block_pool import BlockPool, KVBlock, hash_block_tokens
from ftkit.engine.request import Request


class KVCacheManager:
    """Owns which blocks each request's tokens live in."""

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self.block_tables: dict[str, list[KVBlock]] = {}
        self._num_hashed_blocks: dict[str, int] = {}
        self.num_prefix_queries = 0  # tokens looked up in the prefix cache
        self.num_prefix_hits = 0  # of them, tokens found

    def blocks_for(self, num_tokens: int) -> int:
        """How many blocks ``num_tokens`` tokens fill."""
        return -(-num_tokens // self.block_size)

    def _block_hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """The hashes of the request's first ``num_blocks`` full blocks (computed once, kept on the request)."""
        hashes, tokens, size = request.block_hashes, request.all_token_ids, self.block_size
        while len(hashes) < num_blocks:
            index = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, tokens[index * size:(index + 1) * size], request.adapter))
        return hashes[:num_blocks]

    def computed_prefix(self, request: Request) -> list[KVBlock]:
        """The cached blocks that already hold the start of a request not yet admitted.

        At least the last token is always left to compute (its logits give the next token), and a
        request that asks for prompt log-probabilities gets no hit (those need every position's logits).
        """
        if not self.pool.enable_caching or request.wants_prompt_logprobs:
            return []
        usable = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in self._block_hashes(request, usable):
            block = self.pool.cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        self.num_prefix_queries += request.num_tokens
        self.num_prefix_hits += len(hits) * self.block_size
        return hits

    def allocate_slots(self, request: Request, num_new_tokens: int, prefix: Sequence[KVBlock] = ()) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``request`` (after its cached ``prefix``, if any).

        Returns False, changing nothing, when the pool has too few free blocks.
        """
        table = self.block_tables.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(prefix) * self.block_size
        num_new_blocks = self.blocks_for(num_computed + num_new_tokens) - len(table) - len(prefix)
        reclaimed = sum(1 for block in prefix if block.ref_count == 0)  # hits still in the free queue
        if num_new_blocks + reclaimed > self.pool.num_free_blocks:
            if not table:
                del self.block_tables[request.request_id]
            return False
        self.pool.touch(prefix)
        table.extend(prefix)
        if num_new_blocks > 0:
            table.extend(self.pool.allocate(num_new_blocks))
        self._register_full_blocks(request, num_computed + num_new_tokens)
        return True

    def _register_full_blocks(self, request: Request, num_tokens: int) -> None:
        if not self.pool.enable_caching:
            return
        table = self.block_tables[request.request_id]
        first = self._num_hashed_blocks.get(request.request_id, 0)
        num_full = num_tokens // self.block_size
        for index, block_hash in enumerate(self._block_hashes(request, num_full)[first:], start=first):
            self.pool.cache_full_block(table[index], block_hash)
        self._num_hashed_blocks[request.request_id] = max(first, num_full)

    def free(self, request: Request) -> None:
        """Give back every block of ``request`` (tail first, so shared prefixes are evicted last)."""
        table = self.block_tables.pop(request.request_id, [])
        self._num_hashed_blocks.pop(request.request_id, None)
        self.pool.free(reversed(table))

    def slot_mapping(self, request: Request, start: int, end: int) -> list[int]:
        """The cache slots of positions ``start..end-1`` of ``request``."""
        table, size = self.block_tables[request.request_id], self.block_size
        return [table[p // size].block_id * size + p % size for p in range(start, end)]

    def block_ids(self, request: Request) -> list[int]:
        return [block.block_id for block in self.block_tables.get(request.request_id, [])]

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_prefix_hits / self.num_prefix_queries if self.num_prefix_queries else 0.0
