"""The forgetting guard: a small fine-tune teaches without erasing what the model knew, and every run says so.

- ``replay``: how many replay examples a run mixes in (``plan_replay``) and the base model's own answers
  as replay (``self_replay``), from the shipped general prompts.
- ``answer_cache``: those answers, generated once per model and load options, cached on disk.
- ``answers``: ``BaseModelAnswers``, which generates them with the model being trained (or a check model).
- ``general_check``: "general answers kept: X/Y" on held-out questions, before and after training.
- ``system_prompt_variants``: each example trained with its system prompt kept or swapped.
- ``guarded_data``: the training data with these decisions applied (``prepare_guarded_dataset``).

The guard stands on ``ftkit.data`` (encoding) and ``ftkit.models`` (loading, generation); stages use it
(train runs it, ``ftkit data preview`` shows its replay, evaluate will reuse the general check).
"""

from ftkit.guard.answer_cache import AnswerCache, GenerationReport
from ftkit.guard.answers import BaseModelAnswers, general_check_dtype
from ftkit.guard.general_check import GeneralCheck, GeneralResult
from ftkit.guard.guarded_data import prepare_guarded_dataset, replay_conversations, system_prompt_variants
from ftkit.guard.replay import ReplayPlan, guard_applies, plan_replay

__all__ = [
    "AnswerCache",
    "BaseModelAnswers",
    "GeneralCheck",
    "GeneralResult",
    "GenerationReport",
    "ReplayPlan",
    "general_check_dtype",
    "guard_applies",
    "plan_replay",
    "prepare_guarded_dataset",
    "replay_conversations",
    "system_prompt_variants",
]
