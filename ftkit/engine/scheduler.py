"""Decides, every step, which requests run and how many of their tokens: continuous batching.

The policy is vLLM v1's (``vllm/v1/core/sched/scheduler.py``), written here because transformers'
``generate_batch`` has no priorities, no prefix sharing and no preemption. There is no separate prefill
or decode phase: a request simply has tokens without K/V yet (``num_tokens - num_computed_tokens``), all of
its prompt when it arrives and one after each sampled token, and each step hands out a budget of
``max_num_batched_tokens`` tokens:

1. Running requests first, in admission order: a decode takes one token, an unfinished prefill the rest of
   its prompt or what is left of the budget (chunked prefill). When the pool has no block for it, the
   lowest-priority running request (for ``fcfs``: the latest admitted) is preempted: its blocks are freed
   and it goes back to the front of the waiting queue, to be recomputed later (its prompt and output so far
   become its new prompt; cached blocks usually make that cheap).
2. Then, if nothing was preempted, waiting requests in policy order (``fcfs``: arrival; ``priority``:
   smallest ``priority`` then arrival), up to ``max_num_seqs`` running, each starting after its
   prefix-cache hit, while blocks and budget last.

Under ``priority``, a waiting request that outranks a running one and does not fit first preempts the
lowest-priority running requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ftkit.engine.kv_cache_manager import KVCacheManager
from ftkit.engine.request import Request, RequestStatus
from ftkit.errors import FtkitError

SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclass
class SchedulerOutput:
    """One step's plan: ``(request, number of its tokens to compute)`` in batch order, and who was preempted."""

    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(count for _, count in self.scheduled)


class Scheduler:
    """The waiting and running queues and the per-step plan over them."""

    def __init__(self, kv_cache: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: str = "fcfs") -> None:
        if policy not in SCHEDULING_POLICIES:
            raise FtkitError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, got {policy!r}.")
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.waiting: list[Request] = []
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _next_waiting(self) -> Request:
        if self.policy == "priority":
            return min(self.waiting, key=Request.sort_key)
        return self.waiting[0]

    def _victim(self) -> Request:
        """The running request to preempt: lowest priority, latest arrival (for fcfs simply the latest admitted)."""
        if self.policy == "priority":
            return max(self.running, key=Request.sort_key)
        return self.running[-1]

    def _preempt(self, request: Request, output: SchedulerOutput) -> None:
        self.running.remove(request)
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.waiting.insert(0, request)
        output.preempted.append(request)
        for index, (scheduled, _) in enumerate(output.scheduled):
            if scheduled is request:
                del output.scheduled[index]
                break

    def schedule(self) -> SchedulerOutput:
        """Plan the next step (and change the queues and block tables accordingly)."""
        output = SchedulerOutput()
        if self.policy == "priority":
            self._preempt_for_higher_priority(output)
        budget = self.max_num_batched_tokens
        index, preempted_for_room = 0, False
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:
                index += 1
                continue
            while not self.kv_cache.allocate_slots(request, num_new):
                victim = self._victim()
                budget += next((n for r, n in output.scheduled if r is victim), 0)
                if self.running.index(victim) < index:
                    index -= 1
                self._preempt(victim, output)
                preempted_for_room = True
                if victim is request:
                    break
            else:
                output.scheduled.append((request, num_new))
                budget -= num_new
                index += 1
        if not preempted_for_room:
            self._admit_waiting(output, budget)
        return output

    def _admit_waiting(self, output: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self._next_waiting()
            prefix = self.kv_cache.computed_prefix(request)
            num_computed = len(prefix) * self.kv_cache.block_size
            num_new = min(request.num_tokens - num_computed, budget)
            if not self.kv_cache.allocate_slots(request, num_new, prefix):
                break
            self.waiting.remove(request)
            request.num_computed_tokens = num_computed
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            output.scheduled.append((request, num_new))
            budget -= num_new

    def _preempt_for_higher_priority(self, output: SchedulerOutput) -> None:
        """Free room for a waiting request that outranks running ones and would not fit otherwise."""
        while self.waiting and self.running:
            best, worst = self._next_waiting(), self._victim()
            if best.priority >= worst.priority:
                return
            needed = self.kv_cache.blocks_for(min(best.num_tokens, self.max_num_batched_tokens))
            if len(self.running) < self.max_num_seqs and needed <= self.kv_cache.pool.num_free_blocks:
                return
            self._preempt(worst, output)

    def finish(self, request: Request) -> None:
        """Take a finished or aborted request out of the queues and give back its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv_cache.free(request)
