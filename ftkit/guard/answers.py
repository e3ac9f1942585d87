"""A model's own answers, generated once and cached: the self-replay set, the general and the learned checks.

``ftkit train`` builds one ``BaseModelAnswers`` around the model it is about to train (loaded lazily, so
a run whose answers are all cached does not wait on generation) and ``ftkit data preview`` builds one to
show the replay examples. Generation runs on the inference engine (``ftkit.engine.replies``); the model being trained and
the check model are loaded the one way every stage loads them (``ftkit.models``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.markup import escape

from ftkit.guard.answer_cache import GENERATION_BATCH, AnswerCache, model_fingerprint
from ftkit.guard.general_check import HELDOUT_MAX_NEW_TOKENS, GeneralCheck, GeneralResult
from ftkit.guard.learned_check import LearnedCheck, LearnedItem, LearnedResult, answer_length
from ftkit.guard.replay import REPLAY_BATCH_FINISHED, REPLAY_MAX_NEW_TOKENS, self_replay
from ftkit.models.inference import LazyModel

CHECK_BATCH = 80  # the 40 held-out questions, with and without a system prompt, in one batch


Generate = Callable[[list], list]


class BaseModelAnswers:
    """The base model's cached greedy answers (replay, held-out check) and the trained model's check.

    The cache key covers the model files, the chat template, the dtype and every load option
    (``LoadOptions``: quantization, attention implementation, remote code) the answers are generated
    with: answers cached under one way of loading are never reused under another.
    """

    def __init__(self, config: Any, source: Any, template: str, options: Any, dtype: Any, tokenizer: Any,
                 base_model: Callable[[], Any], report: Callable[[str], None] = print, *,
                 device: Any = None, separate_check: bool = False) -> None:
        """``base_model`` returns the model being trained (loaded on first use). With ``separate_check`` the
        general check loads the base again in ``general_check_dtype`` (full precision, adapters merged, as
        ``ftkit chat`` does) instead of asking the model being trained."""
        import torch

        self.config, self.tokenizer, self.base_model, self.report = config, tokenizer, base_model, report
        self.source, self.options = source, options
        self.device = device or torch.device("cpu")
        self.check_dtype = general_check_dtype(self.device, dtype) if separate_check else dtype
        self.separate_check = separate_check
        self.identity = {"model": model_fingerprint(source.path, source.gguf_file), "template": template,
                         "dtype": str(dtype), "load": options.as_kwargs()}
        check_options = options.full_precision() if separate_check else options
        self.check_identity = {**self.identity, "dtype": str(self.check_dtype), "load": check_options.as_kwargs()}

    def check_model(self, adapters: list[str]) -> Any:
        """The base in the check dtype with ``adapters`` merged, as ``ftkit chat`` loads it."""
        from ftkit.models import load_for_inference

        return load_for_inference(self.source, adapters, dtype=self.check_dtype, device=self.device,
                                  options=self.options.full_precision(), tokenizer=self.tokenizer).model

    def _generate(self, model_getter: Callable[[], Any], max_new_tokens: int, batch_size: int,
                  stop_batch_when_finished: float | None = None) -> Generate:
        from ftkit.engine.replies import generate_replies

        def generate(conversations):
            model = model_getter()
            model.eval()
            return generate_replies(model, self.tokenizer, conversations, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, stop_batch_when_finished=stop_batch_when_finished)
        return generate

    def replay_cache(self) -> AnswerCache:
        return AnswerCache.open(purpose="replay", max_new_tokens=REPLAY_MAX_NEW_TOKENS, **self.identity)

    def self_replay(self, count: int) -> tuple[list, str]:
        """``count`` self-replay conversations (generated where the cache lacks them) and how they were got."""
        conversations, report = self_replay(count, self.replay_cache(), self._generate(
            self.base_model, REPLAY_MAX_NEW_TOKENS, GENERATION_BATCH, REPLAY_BATCH_FINISHED))
        return conversations, report.summary()

    def self_replay_cached(self, count: int) -> list:
        """Up to ``count`` self-replay conversations from the cache alone (nothing is generated)."""
        return self_replay(count, self.replay_cache(), None)[0]

    def general_check(self) -> GeneralCheck:
        """The base model's answers to the held-out general questions (from the cache when it has them)."""
        return self.checks_before_training(general=True, learned=[])[0]

    def checks_before_training(self, *, general: bool, learned: list[LearnedItem]
                               ) -> tuple[GeneralCheck | None, LearnedCheck | None]:
        """The base model's answers for the general check (when ``general``) and the learned check (for the
        sampled training prompts ``learned``), from the cache where it has them, with one model load."""
        model = LazyModel(lambda: self.check_model([]) if self.separate_check else self.base_model())
        check = learned_check = None
        if general:
            cache = AnswerCache.open(purpose="general", max_new_tokens=HELDOUT_MAX_NEW_TOKENS, **self.check_identity)
            check = GeneralCheck.of_base(cache, self._generate(model, HELDOUT_MAX_NEW_TOKENS, CHECK_BATCH))
            self.report(f"general check: the base model answers {len(check.base_right)}/{len(check.questions)} "
                        f"held-out questions right ({escape(check.base_report.summary())})")
        if learned:
            length = answer_length(learned, self.tokenizer)
            cache = AnswerCache.open(purpose="learned", max_new_tokens=length, **self.check_identity)
            learned_check = LearnedCheck.of_base(learned, cache, self._generate(model, length, len(learned)),
                                                 len(learned), length)
            self.report(f"learned check: {len(learned)} training prompts, base model's answers "
                        f"({escape(learned_check.base_report.summary())})")
        model.release()  # a separate check model is freed before training starts
        return check, learned_check

    def learned_now(self, learned: LearnedCheck, model: Any) -> LearnedResult:
        """The learned check asked of ``model`` as it is (the model being trained, mid-run)."""
        trained = learned.answer(self._generate(lambda: model, learned.max_new_tokens, len(learned.items)))
        return learned.compare(trained, self.tokenizer)

    def checks_after_training(self, check: GeneralCheck | None, learned: LearnedCheck | None, model: Any,
                              output_dir: Path) -> tuple[GeneralResult | None, LearnedResult | None]:
        """The trained model's answers to the same questions and prompts, compared with the base model's.

        With a separate check model, the base is loaded again in the check dtype and the adapter just saved
        in ``output_dir`` merged into it (as ``ftkit chat`` does), or the full model saved there is loaded;
        otherwise the trained ``model`` answers.
        """
        started = time.perf_counter()
        if self.separate_check and self.config.uses_lora:
            model = self.check_model([str(output_dir)])
        elif self.separate_check:  # a full or freeze fine-tune: the saved model itself
            from ftkit.models import load_for_inference

            model = load_for_inference(str(output_dir), [], dtype=self.check_dtype, device=self.device,
                                       options=self.options.full_precision(), tokenizer=self.tokenizer).model
        model_config = getattr(getattr(model, "get_base_model", lambda: model)(), "config", None)
        if model_config is not None:
            model_config.use_cache = True  # off while training with gradient checkpointing
        general_result = learned_result = None
        if check is not None:
            trained = check.answer(self._generate(lambda: model, HELDOUT_MAX_NEW_TOKENS, CHECK_BATCH))
            general_result = check.compare(trained, self.config.identity_name)
        if learned is not None:
            learned_result = self.learned_now(learned, model)
        said = [result.summary() for result in (general_result, learned_result) if result is not None]
        self.report(f"{escape(', '.join(said))} (checked in {time.perf_counter() - started:.0f} s)")
        return general_result, learned_result


def general_check_dtype(device: Any, load_dtype: Any) -> Any:
    """The dtype the general check runs in: fp32 on a CPU, the training dtype elsewhere.

    On a CPU, bf16 greedy answers depend on the number of threads (measured on the embedded model: 2 of
    40 held-out answers changed between 1 and 2 threads in bf16, none in fp32), so a bf16 check would
    report forgetting that is only rounding. On GPUs the training dtype is also the serving dtype.
    """
    import torch

    return torch.float32 if device.type == "cpu" else load_dtype
