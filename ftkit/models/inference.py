"""The one way every stage loads a model to generate with or to score: base + adapters, tokenizer, template.

``ftkit chat``, the forgetting guard's general check, ``ftkit merge-lora`` (its reference and export
checks) and the coming serve, evaluate and quantize stages all call ``load_for_inference``; the train
stage and ``ftkit data preview`` build the load arguments of the model they train from the config with
``LoadOptions.from_config``, so every caller loads a config's model the same way (and the answer cache
keys on the same options).

Adapters are merged into fp32 weights and the result is cast once to the inference dtype, exactly as
``ftkit merge-lora`` exports it: merging into bf16 weights rounds twice and drops small LoRA updates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ftkit.models.loader import load_model, load_tokenizer, sync_special_tokens
from ftkit.models.precision import default_device, inference_dtype
from ftkit.models.source import (
    ModelSource,
    refuse_repeated_adapters,
    resolve_adapter_dir,
    resolve_model_source,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ftkit.config.sections import ModelSection


@dataclass(frozen=True)
class LoadOptions:
    """How a config asks for its model to be loaded, apart from the dtype: every field changes the model."""

    quantization_bits: int | None = None
    quantization_type: str = "nf4"
    double_quantization: bool = True
    attn_implementation: str = "auto"
    trust_remote_code: bool = False

    @classmethod
    def from_config(cls, section: ModelSection) -> LoadOptions:
        """The load options of a stage config's model keys (``qlora`` means 4 bits unless quantization_bit says)."""
        bits = section.quantization_bit
        if bits is None and getattr(section, "finetuning_type", None) == "qlora":
            bits = 4
        return cls(quantization_bits=bits, quantization_type=section.quantization_type,
                   double_quantization=section.double_quantization, attn_implementation=section.flash_attn,
                   trust_remote_code=section.trust_remote_code)

    def full_precision(self) -> LoadOptions:
        """The same options without quantization (adapters are merged into full-precision weights only)."""
        return replace(self, quantization_bits=None)

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``load_model``."""
        return asdict(self)


def adapter_tokenizer_source(source: ModelSource, adapter_dirs: list[Path]) -> ModelSource | None:
    """The last adapter's own tokenizer (``ftkit train`` saves it, with the chat template it trained with), as a
    source to load it from; None when the adapter has none and the base's tokenizer applies."""
    if adapter_dirs and (adapter_dirs[-1] / "tokenizer_config.json").is_file():
        return replace(source, path=adapter_dirs[-1], gguf_file=None)
    return None


@dataclass
class InferenceModel:
    """A model ready to generate: weights in ``dtype`` with adapters merged, and the tokenizer to prompt it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: ModelSource
    dtype: torch.dtype


def load_for_inference(
    source: ModelSource | str,
    adapters: list[str | Path] | None = None,
    *,
    template: str = "auto",
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    options: LoadOptions | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> InferenceModel:
    """Load ``source`` (a resolved source or any name ``resolve_model_source`` takes) with ``adapters`` merged.

    ``dtype`` defaults to ``inference_dtype(device)``. The tokenizer is the last adapter's own if it saved
    one, else the base's, with ``template`` applied; pass ``tokenizer`` to reuse one already loaded. With
    ``options.quantization_bits`` the base stays quantized and a single adapter stays unmerged.
    """
    from ftkit.data.templates import apply_chat_template_to_tokenizer
    from ftkit.models.saved_adapters import load_adapters

    source = resolve_model_source(source) if isinstance(source, str) else source
    options = options or LoadOptions()
    adapter_dirs = [resolve_adapter_dir(str(a)) for a in adapters or []]
    refuse_repeated_adapters([str(a) for a in adapters or []], adapter_dirs)
    device = device or default_device()
    dtype = dtype or inference_dtype(device)
    if tokenizer is None:
        tokenizer = load_tokenizer(adapter_tokenizer_source(source, adapter_dirs) or source,
                                   trust_remote_code=options.trust_remote_code)
        apply_chat_template_to_tokenizer(tokenizer, template)
    merge_in_fp32 = bool(adapter_dirs) and options.quantization_bits is None
    model = load_model(source, dtype=torch.float32 if merge_in_fp32 else dtype, device=device, **options.as_kwargs())
    if adapter_dirs:
        model = load_adapters(model, adapter_dirs, trainable=False, dtype=dtype if merge_in_fp32 else None)
    sync_special_tokens(model, tokenizer)
    model.eval()
    return InferenceModel(model, tokenizer, source, dtype)


class LazyModel:
    """A model loaded on first call and the same one after; ``release`` drops it (to free memory).

    The train stage and ``ftkit data preview`` hand one to the forgetting guard: a run whose base-model
    answers are all cached never loads the model for them.
    """

    def __init__(self, load: Callable[[], PreTrainedModel]) -> None:
        self._load, self._model = load, None

    def __call__(self) -> PreTrainedModel:
        if self._model is None:
            self._model = self._load()
        return self._model

    def release(self) -> None:
        self._model = None

    @classmethod
    def of(cls, source: ModelSource, *, dtype: torch.dtype, device: torch.device | None,
           options: LoadOptions) -> LazyModel:
        """``load_model(source, ...)`` with ``options``, on first use."""
        return cls(lambda: load_model(source, dtype=dtype, device=device, **options.as_kwargs()))
