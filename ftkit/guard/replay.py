"""Replay: general examples mixed into a small fine-tune so it teaches without erasing.

A few dozen identity or format examples, trained for a few epochs, move a small model's answers to easy
questions too (measured in bench/forgetting.py: with replay off the identity quickstart keeps 17-18 of
21 held-out general answers, "A dog has five legs."). Mixing in general examples fixes that, but someone
else's answers teach their own style and mistakes. ``replay_source: self`` therefore replays the *base
model's own* greedy answers to prompts ftkit ships (``resources/replay/general_prompts.jsonl``): the pull
is toward what the model already did, so the replay teaches nothing new. ``replay_source`` may instead
name any dataset.

The self answers are generated once per model and cached (``ftkit.guard.answer_cache``).

Defaults (the README says why): for stage sft on at most ``SMALL_SFT_SET`` examples, replay is on with
``DEFAULT_REPLAY_RATIO`` replay examples per training example, capped at the short answers the shipped
prompts yield.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from ftkit.data.formats import Conversation
from ftkit.guard.answer_cache import GENERATION_BATCH, AnswerCache, Generate, GenerationReport
from ftkit.paths import package_resource

SMALL_SFT_SET = 1000  # training examples up to which the guard (replay, system-prompt variants) is on
DEFAULT_REPLAY_RATIO = 0.5  # replay examples per training example when replay is on by default
# Replay answers are short, like the question/answer pairs of a typical first fine-tune: that is where a
# small model forgets (answers to easy questions flip), and replaying short answers anchors it there.
# Measured on the identity quickstart (bench/README.md): answers up to 48 tokens kept 20/21 general answers
# where answers up to 128 tokens kept 18/21, the same as no replay. Unfinished answers are not replayed.
REPLAY_MAX_NEW_TOKENS = 48
# A static batch runs until its longest answer ends; the replay set only needs finished answers, so a batch
# stops once this share of it has finished.
REPLAY_BATCH_FINISHED = 0.5


def guard_applies(config: Any, user_examples: int) -> bool:
    """Whether the forgetting guard's defaults apply: supervised fine-tuning on a small set."""
    return config.stage == "sft" and user_examples <= SMALL_SFT_SET


@dataclass
class ReplayPlan:
    """How many replay examples a run mixes in, from where, and why."""

    source: str
    ratio: float
    count: int
    automatic: bool
    user_examples: int

    @property
    def is_self(self) -> bool:
        return self.source == "self"

    def notice(self, found: int) -> str:
        what = "the base model's own answers to ftkit's general prompts" if self.is_self else f"dataset {self.source}"
        short = f" (only {found} available)" if found < self.count else ""
        line = (f"forgetting guard: mixing {found} replay examples{short} ({self.ratio:g} per training example) from "
                f"{what}")
        if self.automatic:
            line += (f"; on by default for sft on up to {SMALL_SFT_SET:,} examples, set replay_ratio: 0 to turn it "
                     "off")
        return line


def plan_replay(config: Any, user_examples: int) -> ReplayPlan | None:
    """The replay for this config and training-set size, or None when replay is off."""
    automatic = config.replay_ratio is None
    ratio = (DEFAULT_REPLAY_RATIO if guard_applies(config, user_examples) else 0.0) if automatic else config.replay_ratio
    count = round(ratio * user_examples)
    if count <= 0 or config.stage != "sft":
        return None
    return ReplayPlan(config.replay_source, ratio, count, automatic, user_examples)


def read_prompts(name: str) -> list[dict[str, Any]]:
    """A shipped prompt set (``general_prompts`` or ``heldout_general``), one JSON object per line."""
    path = package_resource("replay", f"{name}.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def replay_prompt_order() -> list[str]:
    """The shipped general prompts in a fixed shuffled order: every run asks for a prefix of it, so the
    cache serves runs of any size and seed, and a prefix mixes every kind of prompt."""
    prompts = [row["prompt"] for row in read_prompts("general_prompts")]
    random.Random(0).shuffle(prompts)
    return prompts


def self_replay(count: int, cache: AnswerCache, generate: Generate | None
                ) -> tuple[list[Conversation], GenerationReport]:
    """``count`` conversations of a shipped prompt and the base model's finished answer to it.

    Prompts are taken in ``replay_prompt_order``. Answers that hit ``REPLAY_MAX_NEW_TOKENS`` (mostly
    loops) or were cut when their batch stopped (``REPLAY_BATCH_FINISHED``) are skipped. Answers are
    generated in fixed batches of that order (its first ``GENERATION_BATCH`` prompts, then the next), never
    in batches sized for one run: which answers finish, and in bf16 their very words, depend on the batch a
    prompt is in, so a run of any size replays the same answers whichever run filled the cache first. With
    ``generate`` None only cached answers are used.
    """
    order = replay_prompt_order()

    def usable(prompt: str) -> bool:
        answer = cache.answers.get(prompt)
        return answer is not None and answer.finished and bool(answer.text.strip())

    report = GenerationReport()
    for start in range(0, len(order) if generate is not None else 0, GENERATION_BATCH):
        if sum(usable(p) for p in order[:start]) >= count:
            break
        report.merge(cache.fill(order[start:start + GENERATION_BATCH], generate, desc="replay answers",
                                batch_size=GENERATION_BATCH))
    chosen = [p for p in order if usable(p)][:count]
    if generate is None:
        report.cached = len(chosen)
    return [[{"role": "user", "content": p}, {"role": "assistant", "content": cache.answers[p].text}]
            for p in chosen], report


def dataset_replay(count: int, conversations: list[Conversation], seed: int) -> list[Conversation]:
    """``count`` conversations drawn from a replay dataset without repeats (all of it if it is smaller)."""
    if len(conversations) <= count:
        return list(conversations)
    return random.Random(seed).sample(conversations, count)
