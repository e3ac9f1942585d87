"""The scheduler on its own: token budget, chunked prefill, admission by free blocks, preemption, priority."""

from __future__ import annotations

import pytest

from ftkit.engine.block_pool import BlockPool
from ftkit.engine.kv_cache_manager import KVCacheManager
from ftkit.engine.request import Request, RequestStatus, SamplingParams
from ftkit.engine.scheduler import Scheduler
from ftkit.errors import FtkitError


def make_scheduler(num_blocks: int, *, block_size: int = 4, max_num_seqs: int = 8, budget: int = 64,
                   policy: str = "fcfs") -> Scheduler:
    manager = KVCacheManager(BlockPool(num_blocks, enable_caching=False), block_size)
    return Scheduler(manager, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, policy=policy)


def make_request(request_id: str, length: int, priority: int = 0) -> Request:
    return Request(request_id, list(range(1, length + 1)), SamplingParams(), priority=priority, max_model_len=10_000)


def run_step(scheduler: Scheduler) -> dict[str, int]:
    """Schedule, then pretend the model ran: count the tokens and sample token 7 where a sequence is complete."""
    plan = scheduler.schedule()
    for request, count in plan.scheduled:
        request.num_computed_tokens += count
        if request.num_computed_tokens == request.num_tokens:
            request.output_token_ids.append(7)
    return {request.request_id: count for request, count in plan.scheduled}


def test_the_token_budget_chunks_a_long_prefill_and_holds_back_the_rest():
    scheduler = make_scheduler(64, budget=16)
    for name in "abc":
        scheduler.add(make_request(name, 10))
    assert run_step(scheduler) == {"a": 10, "b": 6}
    assert run_step(scheduler) == {"a": 1, "b": 4, "c": 10}  # decode first, then the rest of b's prompt, then c
    assert run_step(scheduler) == {"a": 1, "b": 1, "c": 1}


def test_at_most_max_num_seqs_run():
    scheduler = make_scheduler(64, max_num_seqs=2)
    for name in "abc":
        scheduler.add(make_request(name, 3))
    assert set(run_step(scheduler)) == {"a", "b"}
    assert [r.request_id for r in scheduler.waiting] == ["c"]


def test_a_request_waits_when_its_blocks_are_not_free():
    scheduler = make_scheduler(3)  # 12 slots
    scheduler.add(make_request("a", 8))
    scheduler.add(make_request("b", 8))
    assert run_step(scheduler) == {"a": 8}
    assert scheduler.waiting[0].request_id == "b"


def test_fcfs_preempts_the_latest_request_when_blocks_run_out_and_recomputes_it_later():
    scheduler = make_scheduler(4)  # 16 slots: a and b with 8 tokens each fill them
    scheduler.add(make_request("a", 8))
    scheduler.add(make_request("b", 8))
    assert run_step(scheduler) == {"a": 8, "b": 8}
    plan = scheduler.schedule()  # a's ninth token needs a fifth block: b, the latest, goes
    assert [r.request_id for r in plan.preempted] == ["b"]
    assert [(r.request_id, n) for r, n in plan.scheduled] == [("a", 1)]
    b = scheduler.waiting[0]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert scheduler.kv_cache.pool.num_free_blocks == 4 - 3
    scheduler.finish(scheduler.running[0])
    assert run_step(scheduler) == {"b": 9}  # its prompt and its output so far, recomputed


def test_priority_admits_the_smallest_priority_value_first():
    scheduler = make_scheduler(64, max_num_seqs=1, policy="priority")
    scheduler.add(make_request("low", 4, priority=5))
    scheduler.add(make_request("high", 4, priority=0))
    assert run_step(scheduler) == {"high": 4}


def test_priority_preempts_a_lower_priority_running_request_for_a_higher_one():
    scheduler = make_scheduler(64, max_num_seqs=1, policy="priority")
    scheduler.add(make_request("low", 4, priority=5))
    assert run_step(scheduler) == {"low": 4}
    scheduler.add(make_request("urgent", 4, priority=0))
    plan = scheduler.schedule()
    assert [r.request_id for r in plan.preempted] == ["low"]
    assert [r.request_id for r, _ in plan.scheduled] == ["urgent"]


def test_priority_running_out_of_blocks_preempts_the_lowest_priority_not_the_latest():
    scheduler = make_scheduler(4, policy="priority")
    scheduler.add(make_request("low", 8, priority=9))
    assert run_step(scheduler) == {"low": 8}
    scheduler.add(make_request("high", 8, priority=1))
    assert run_step(scheduler) == {"low": 1}  # two blocks were free: low's decode took one, high needs two
    plan = scheduler.schedule()
    assert [r.request_id for r in plan.preempted] == ["low"]
    assert [(r.request_id, n) for r, n in plan.scheduled] == [("high", 8)]


def test_an_unknown_policy_is_one_sentence():
    with pytest.raises(FtkitError, match="scheduling_policy must be one of fcfs, priority, got 'lifo'"):
        make_scheduler(4, policy="lifo")
