"""The training data with the guard's decisions applied: system-prompt variants and replay, planned and mixed in.

``ftkit.data`` encodes, mixes and splits; it takes the variants and the replay conversations as inputs.
This module decides them (``plan_replay``, ``system_prompt_variants``) and fetches the replay: the base
model's own answers through ``BaseModelAnswers`` (``replay_source: self``) or a dataset's conversations.
"""

from __future__ import annotations

from typing import Any

from ftkit.data.dataset import (
    PreparedData,
    ReplaySet,
    count_conversations,
    encode_datasets,
    prepare_dataset,
    read_conversations,
)
from ftkit.data.formats import Conversation
from ftkit.data.options import DataOptions
from ftkit.data.registry import resolve_dataset
from ftkit.guard.replay import ReplayPlan, dataset_replay, guard_applies, plan_replay
from ftkit.guard.system_prompts import SystemPromptVariants

VARIANTS_NOTE = ("system prompts: each example trains with its system prompt kept or swapped (in or out) by a "
                 "seeded coin, so it works with and without one; system_prompt_variants: false turns it off")


def system_prompt_variants(config: Any, options: DataOptions) -> tuple[SystemPromptVariants | None, bool]:
    """The variants this run trains with (None when off), and whether they are on by default (not asked for).

    ``system_prompt_variants`` unset: on for sft on a small set (``guard_applies``), counted in usable
    conversations before encoding, so the datasets are encoded once.
    """
    if config.stage != "sft" or config.system_prompt_variants is False:
        return None, False
    if config.system_prompt_variants:
        return SystemPromptVariants(config.seed), False
    if guard_applies(config, count_conversations(options)):
        return SystemPromptVariants(config.seed), True
    return None, False


def replay_conversations(config: Any, plan: ReplayPlan, answers: Any | None) -> tuple[list[Conversation], str | None]:
    """The replay conversations ``plan`` asks for (and how self answers were obtained)."""
    if plan.is_self:
        if answers is None:
            raise ValueError("replay_source self needs BaseModelAnswers (self_replay) to generate answers")
        return answers.self_replay(plan.count)
    options = DataOptions.from_config(config)
    conversations, _ = read_conversations(resolve_dataset(plan.source, config.dataset_dir), options)
    return dataset_replay(plan.count, conversations, config.seed), None


def prepare_guarded_dataset(config: Any, tokenizer: Any, answers: Any | None = None, *,
                            use_cache: bool = True) -> PreparedData:
    """The train config's data, with system-prompt variants and replay as the guard decides.

    ``answers`` (a ``BaseModelAnswers``) generates the base model's answers when ``replay_source`` is self.
    """
    options = DataOptions.from_config(config)
    variants, automatic = system_prompt_variants(config, options)
    encoded = encode_datasets(options, tokenizer, variants=variants, use_cache=use_cache)
    notes = [VARIANTS_NOTE] if automatic else []
    plan = plan_replay(config, len(encoded.train))
    replay, how = None, None
    if plan is not None:
        conversations, how = replay_conversations(config, plan, answers)
        replay = ReplaySet(f"replay ({plan.source})", conversations)
    data = prepare_dataset(options, tokenizer, variants=variants, replay=replay, encoded=encoded)
    if plan is not None:
        notes.append(plan.notice(data.replay_examples) + (f"; {how}" if how else ""))
    data.notes.extend(notes)
    return data
