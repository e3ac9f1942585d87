"""What a caller asks the engine for and what it gets back: sampling parameters, request state, outputs.

``SamplingParams`` checks itself when a request is added (``validate``), so a bad value is one
``FtkitError`` for that request and never reaches a running step. ``Request`` is one sequence the
scheduler moves between the waiting and running queues: its prompt, the tokens generated so far, how many
of them have K/V in the cache (``num_computed_tokens``) and the per-request sampling state (its own
``torch.Generator`` when seeded). ``n > 1`` samples of one prompt are ``n`` sibling requests grouped back
into one ``RequestOutput`` by the engine, as vLLM's v1 engine fans them out.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ftkit.errors import FtkitError

# A user logits processor: (generated token ids, logits row) -> logits row.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


@dataclass
class SamplingParams:
    """How one prompt is sampled. ``temperature == 0`` is greedy; ``seed`` makes sampling reproducible
    whatever else runs in the same batch. Penalties follow vLLM: ``repetition_penalty`` (1 = off) over
    prompt and output tokens, ``presence_penalty``/``frequency_penalty`` (0 = off) over output tokens."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) = off
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # None = off; k >= 0: the sampled token's logprob plus the top k
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logits_processors: list[LogitsProcessor] = field(default_factory=list)

    def validate(self, vocab_size: int) -> None:
        """Raise ``FtkitError`` naming the first bad field and what would be right."""
        checks = [
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (self.temperature >= 0, f"temperature must be 0 (greedy) or more, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= -1, f"top_k must be -1 or 0 (off) or a positive count, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be above 0 (1 = off), got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), got {self.min_tokens}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be between 0 and 20, got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             f"prompt_logprobs must be between 0 and 20, got {self.prompt_logprobs}"),
            (all(isinstance(s, str) and s for s in self.stop), f"stop must be a list of non-empty strings, got {self.stop!r}"),
            (all(isinstance(t, int) and 0 <= t < vocab_size for t in self.stop_token_ids),
             f"stop_token_ids must be token ids below the vocabulary size {vocab_size}, got {self.stop_token_ids}"),
        ]
        for ok, message in checks:
            if not ok:
                raise FtkitError(f"Sampling parameter {message}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    """One position's log-probability of the chosen token, and the ``top`` most likely tokens (id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


class Request:
    """One sequence inside the engine (a prompt, or one of its ``n`` samples)."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                 priority: int = 0, adapter: str | None = None, eos_token_ids: frozenset[int] = frozenset(),
                 max_model_len: int, group_id: str | None = None, sample_index: int = 0,
                 device: torch.device | None = None) -> None:
        self.request_id = request_id
        self.group_id = group_id or request_id
        self.sample_index = sample_index
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.priority = priority
        self.adapter = adapter
        self.arrival_time = time.monotonic()
        self.status = RequestStatus.WAITING
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        self.max_model_len = max_model_len
        self.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_token_ids)
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.error: str | None = None
        self.text = ""
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] = [None] if params.prompt_logprobs is not None else []
        self.block_hashes: list[bytes] = []  # filled by the KV-cache manager as full blocks become known
        self.generator: torch.Generator | None = None
        if params.seed is not None and not params.greedy:
            self.generator = torch.Generator(device=device or "cpu")
            self.generator.manual_seed(params.seed + sample_index)
        self.first_token_time: float | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        """True while prompt log-probabilities are asked for and not all collected yet."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    def sort_key(self) -> tuple[int, float]:
        """Priority order (vLLM's convention: a smaller ``priority`` is served first), then arrival."""
        return (self.priority, self.arrival_time)

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason


@dataclass
class CompletionOutput:
    """One sample of a prompt: its tokens, text (stop strings cut off), why it ended and its logprobs."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop", "length", "abort", "error", or None while running
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    """What the engine reports for one prompt: all its samples, and ``finished`` once every one has ended.

    ``error`` holds the one sentence when this request failed (a bad parameter, a failing logits
    processor); other requests in the same batch are never affected.
    """

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
