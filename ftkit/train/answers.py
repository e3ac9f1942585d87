"""A model's own answers, generated once and cached: the self-replay set and the held-out general check.

``ftkit train`` builds one ``BaseModelAnswers`` around the model it is about to train (loaded lazily, so
a run whose answers are all cached does not wait on generation) and ``ftkit data preview`` builds one to
show the replay examples.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.markup import escape

from ftkit.data.replay import (
    GENERATION_BATCH,
    REPLAY_BATCH_FINISHED,
    REPLAY_MAX_NEW_TOKENS,
    AnswerCache,
    model_fingerprint,
    self_replay,
)
from ftkit.train.forgetting import HELDOUT_MAX_NEW_TOKENS, GeneralCheck, GeneralResult

CHECK_BATCH = 80  # the 40 held-out questions, with and without a system prompt, in one batch


Generate = Callable[[list], list]


class BaseModelAnswers:
    """The base model's cached greedy answers (replay, held-out check) and the trained model's check.

    The cache key covers the model files, the chat template and the dtype/quantization the model is
    loaded in for training, which is also what the answers are generated in.
    """

    def __init__(self, config: Any, source: Any, template: str, dtype: Any, tokenizer: Any,
                 base_model: Callable[[], Any], report: Callable[[str], None] = print, *,
                 check_model: Callable[[list[str]], Any] | None = None, check_dtype: Any = None) -> None:
        """``base_model`` returns the model being trained (loaded on first use); ``check_model(adapters)``, when
        given, loads the base in ``check_dtype`` with those adapters merged, for the general check."""
        self.config, self.tokenizer, self.base_model, self.report = config, tokenizer, base_model, report
        self.check_model = check_model
        self.identity = {"model": model_fingerprint(source.path, source.gguf_file), "template": template,
                         "dtype": str(dtype), "quantization_bits": config.quantization_bits}
        self.check_identity = {**self.identity, "dtype": str(check_dtype or dtype),
                               "quantization_bits": None if check_model else config.quantization_bits}

    def _generate(self, model_getter: Callable[[], Any], max_new_tokens: int, batch_size: int,
                  stop_batch_when_finished: float | None = None) -> Generate:
        from ftkit.models.generate import generate_replies

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
        cache = AnswerCache.open(purpose="general", max_new_tokens=HELDOUT_MAX_NEW_TOKENS, **self.check_identity)
        model = _LoadedOnce(lambda: self.check_model([]) if self.check_model else self.base_model())
        check = GeneralCheck.of_base(cache, self._generate(model, HELDOUT_MAX_NEW_TOKENS, CHECK_BATCH))
        model.release()  # a separate check model is freed before training starts
        self.report(f"general check: the base model answers {len(check.base_right)}/{len(check.questions)} "
                    f"held-out questions right ({escape(check.base_report.summary())})")
        return check

    def general_result(self, check: GeneralCheck, model: Any, output_dir: Path) -> GeneralResult:
        """The trained model's answers to the same questions, compared with the base model's.

        With a separate check model, the base is loaded again in the check dtype and the adapter just saved
        in ``output_dir`` merged into it (as ``ftkit chat`` does); otherwise the trained ``model`` answers.
        """
        started = time.perf_counter()
        if self.check_model is not None:
            model = self.check_model([str(output_dir)])
        model_config = getattr(getattr(model, "get_base_model", lambda: model)(), "config", None)
        if model_config is not None:
            model_config.use_cache = True  # off while training with gradient checkpointing
        trained = check.answer(self._generate(lambda: model, HELDOUT_MAX_NEW_TOKENS, CHECK_BATCH))
        result = check.compare(trained, self.config.identity_name)
        self.report(f"{escape(result.summary())} (checked in {time.perf_counter() - started:.0f} s)")
        return result


class _LoadedOnce:
    """A model getter that loads on first call, returns the same model after, and can drop it."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self.load, self.model = load, None

    def __call__(self) -> Any:
        if self.model is None:
            self.model = self.load()
        return self.model

    def release(self) -> None:
        self.model = None


def general_check_dtype(device: Any, load_dtype: Any) -> Any:
    """The dtype the general check runs in: fp32 on a CPU, the training dtype elsewhere.

    On a CPU, bf16 greedy answers depend on the number of threads (measured on the embedded model: 2 of
    40 held-out answers changed between 1 and 2 threads in bf16, none in fp32), so a bf16 check would
    report forgetting that is only rounding. On GPUs the training dtype is also the serving dtype.
    """
    import torch

    return torch.float32 if device.type == "cpu" else load_dtype
