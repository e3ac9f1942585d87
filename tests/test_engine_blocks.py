"""Block pool and KV-cache manager: allocation, reference counts, prefix-cache hits, LRU eviction."""

from __future__ import annotations

import pytest

from ftkit.engine.block_pool import BlockPool, hash_block_tokens
from ftkit.engine.kv_cache_manager import KVCacheManager
from ftkit.engine.request import Request, SamplingParams
from ftkit.errors import FtkitError


def make_request(request_id: str, tokens: list[int], *, adapter: str | None = None, **params) -> Request:
    return Request(request_id, tokens, SamplingParams(**params), adapter=adapter, max_model_len=10_000)


def test_allocate_and_free_give_every_block_back():
    pool = BlockPool(4)
    taken = pool.allocate(3)
    assert [b.ref_count for b in taken] == [1, 1, 1]
    assert pool.num_free_blocks == 1
    pool.free(taken)
    assert pool.num_free_blocks == 4 and all(b.ref_count == 0 for b in pool.blocks)


def test_allocating_more_than_free_is_a_programming_error():
    with pytest.raises(RuntimeError):
        BlockPool(2).allocate(3)


def test_a_pool_without_blocks_is_refused_with_a_sentence():
    with pytest.raises(FtkitError, match="at least one block"):
        BlockPool(0)


def test_shared_blocks_are_counted_and_freed_only_by_the_last_user():
    pool = BlockPool(4)
    block = pool.allocate(1)[0]
    pool.touch([block])
    assert block.ref_count == 2
    pool.free([block])
    assert block.ref_count == 1 and pool.num_free_blocks == 3
    pool.free([block])
    assert pool.num_free_blocks == 4
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([block])


def test_block_hash_depends_on_parent_tokens_and_adapter():
    first = hash_block_tokens(None, [1, 2], None)
    assert hash_block_tokens(None, [1, 2], None) == first
    assert hash_block_tokens(None, [1, 3], None) != first
    assert hash_block_tokens(None, [1, 2], "french") != first
    assert hash_block_tokens(first, [1, 2], None) != hash_block_tokens(None, [1, 2], None)


def test_a_second_request_with_the_same_prefix_hits_the_cached_full_blocks():
    manager = KVCacheManager(BlockPool(8), block_size=4)
    first = make_request("a", list(range(10)))  # two full blocks and a partial one
    assert manager.computed_prefix(first) == []
    assert manager.allocate_slots(first, 10)
    first_blocks = manager.block_tables["a"]
    second = make_request("b", list(range(8)) + [99, 98, 97])
    hits = manager.computed_prefix(second)
    assert hits == first_blocks[:2]
    assert manager.allocate_slots(second, 3, hits)
    assert [b.ref_count for b in first_blocks[:2]] == [2, 2]
    manager.free(first)
    manager.free(second)
    assert manager.pool.num_free_blocks == 8


def test_the_last_prompt_token_is_always_computed_even_when_every_block_is_cached():
    manager = KVCacheManager(BlockPool(8), block_size=4)
    first = make_request("a", list(range(8)))
    manager.allocate_slots(first, 8)
    manager.free(first)
    again = make_request("b", list(range(8)))
    assert len(manager.computed_prefix(again)) == 1  # 7 usable tokens: one full block


def test_prompt_logprobs_requests_and_other_adapters_get_no_hit():
    manager = KVCacheManager(BlockPool(8), block_size=4)
    manager.allocate_slots(make_request("a", list(range(9))), 9)
    assert manager.computed_prefix(make_request("b", list(range(9)), prompt_logprobs=0)) == []
    assert manager.computed_prefix(make_request("c", list(range(9)), adapter="french")) == []


def test_freed_cached_blocks_are_reused_by_a_hit_and_evicted_least_recently_used_first():
    pool = BlockPool(4)
    manager = KVCacheManager(pool, block_size=2)
    old = make_request("old", [1, 2, 3])
    manager.allocate_slots(old, 3)
    manager.free(old)  # its full block [1, 2] stays cached in the free queue
    newer = make_request("newer", [5, 6, 7])
    manager.allocate_slots(newer, 3)
    manager.free(newer)
    assert pool.num_free_blocks == 4
    hit = make_request("hit", [1, 2, 9])
    hits = manager.computed_prefix(hit)
    assert len(hits) == 1 and manager.allocate_slots(hit, 1, hits)
    assert pool.num_free_blocks == 2
    # Three more blocks are not there; two are, and taking them evicts [5, 6]'s block, not [1, 2]'s (in use).
    assert not manager.allocate_slots(make_request("big", list(range(20, 26))), 6)
    manager.allocate_slots(make_request("fits", [20, 21, 22, 23]), 4)
    assert manager.computed_prefix(make_request("probe", [5, 6, 7])) == []
    assert pool.num_evictions >= 1


def test_a_freed_block_without_a_hash_is_reused_before_a_never_used_one():
    pool = BlockPool(8)
    first, second = pool.allocate(2)
    pool.cache_full_block(first, hash_block_tokens(None, [1, 2], None))
    pool.free([second, first])
    assert pool.allocate(1)[0] is second  # hashless: reused at once, no cached content lost
    assert pool.allocate(1)[0].block_id == 2  # then never-used blocks, and the cached one is kept longest
    assert pool.cached_block(hash_block_tokens(None, [1, 2], None)) is first


def test_allocation_that_does_not_fit_changes_nothing():
    pool = BlockPool(2)
    manager = KVCacheManager(pool, block_size=2)
    request = make_request("a", list(range(6)))
    assert not manager.allocate_slots(request, 6)
    assert pool.num_free_blocks == 2 and "a" not in manager.block_tables


def test_slot_mapping_follows_the_block_table():
    manager = KVCacheManager(BlockPool(4), block_size=2)
    manager.pool.allocate(1)  # block 0 taken by someone else
    request = make_request("a", [1, 2, 3])
    manager.allocate_slots(request, 3)
    ids = manager.block_ids(request)
    assert manager.slot_mapping(request, 0, 3) == [ids[0] * 2, ids[0] * 2 + 1, ids[1] * 2]


def test_the_cache_takes_kv_cache_memory_or_a_small_cpu_default_and_never_more_than_sequences_can_use():
    import torch

    from ftkit.engine.options import GIB, EngineOptions, plan_kv_blocks

    cpu = torch.device("cpu")
    blocks, max_len = plan_kv_blocks(EngineOptions(kv_cache_memory=0.5, max_num_seqs=10_000), bytes_per_block=GIB // 1024,
                                     model_max_len=8192, device=cpu)
    assert (blocks, max_len) == (512, 8192)
    blocks, _ = plan_kv_blocks(EngineOptions(max_num_seqs=10_000), bytes_per_block=GIB // 1024, model_max_len=8192,
                               device=cpu)
    assert blocks <= 512  # at most 0.5 GiB on CPU by default
    blocks, _ = plan_kv_blocks(EngineOptions(max_num_seqs=2, kv_cache_memory=4), bytes_per_block=1024,
                               model_max_len=64, device=cpu)
    assert blocks == 2 * 4  # two sequences of 64 tokens in blocks of 16
    assert plan_kv_blocks(EngineOptions(num_kv_blocks=3, block_size=4), bytes_per_block=1, model_max_len=64,
                          device=cpu) == (3, 12)  # max_model_len no longer than the whole cache
