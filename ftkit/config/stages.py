"""One schema per stage, each the union of the sections it needs, plus the rules that span sections.

``TrainConfig`` serves ``ftkit train``, ``ftkit data preview`` and ``ftkit validate``; ``MergeConfig``
serves ``ftkit merge-lora``. Serve, evaluate and quantize will reuse ``ModelSection`` (and
``DataSection`` for custom evaluation sets) the same way.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ftkit.config.sections import DataSection, MethodSection, ModelSection, Problem, Section, TrainingSection


def _section_problems(config: Section, sections: tuple[type[Section], ...]) -> list[Problem]:
    found: list[Problem] = []
    for section in sections:
        found.extend(section.problems(config))
    return found


class TrainConfig(TrainingSection, MethodSection, DataSection, ModelSection):
    """``ftkit train``: model + data + method + training sections.

    The bases are listed in reverse so that the fields (and the resolved config ``ftkit validate`` prints)
    read model, data, method, training: pydantic orders fields from the last base to the first.
    """

    _sections = (ModelSection, DataSection, MethodSection, TrainingSection)

    @property
    def quantization_bits(self) -> int | None:
        """The bits the base is loaded in: ``qlora`` means 4 unless quantization_bit says otherwise."""
        if self.quantization_bit is None and self.finetuning_type == "qlora":
            return 4
        return self.quantization_bit

    @property
    def uses_lora(self) -> bool:
        return self.finetuning_type in ("lora", "qlora")

    @property
    def names_model_modules(self) -> bool:
        """Whether lora_target (for a new adapter) or the freeze_* keys name modules of the model."""
        return (self.uses_lora and not self.adapter_name_or_path) or self.finetuning_type == "freeze"

    @property
    def uses_packing(self) -> bool:
        if self.packing is None:
            return self.stage == "pt" or self.neat_packing
        return self.packing or self.neat_packing

    def problems(self) -> list[Problem]:
        found = _section_problems(self, self._sections)
        if not self.dataset:
            found.append(("dataset", "dataset is required: name datasets from dataset_info.json (e.g. identity) "
                          "or give a file path."))
        if self.quantization_bit is not None and self.finetuning_type in ("full", "freeze"):
            found.append(("quantization_bit", f"quantization_bit {self.quantization_bit} cannot be used with "
                          f"finetuning_type {self.finetuning_type}: quantized weights cannot be updated; use "
                          "finetuning_type lora (QLoRA) or remove quantization_bit."))
        if self.deepspeed is not None:
            found.append(("deepspeed", "deepspeed: multi-device training is not available in this ftkit version "
                          "yet; remove the key to train on one device."))
        if self.stage == "pt" and (self.train_on_prompt or self.mask_history):
            key = "train_on_prompt" if self.train_on_prompt else "mask_history"
            found.append((key, f"{key} only applies to stage sft; pre-training trains on every token."))
        if self.replay_ratio and self.stage == "pt":
            found.append(("replay_ratio", "replay_ratio only applies to stage sft: pre-training data has no "
                          "conversations to replay; remove it."))
        if self.eval_strategy in ("steps", "epoch") and not self.val_size and not self.eval_dataset:
            found.append(("eval_strategy", f"eval_strategy {self.eval_strategy} needs an evaluation set: set "
                          "val_size (e.g. 0.1) or eval_dataset, or remove eval_strategy."))
        if self.adapter_name_or_path and not self.uses_lora:
            found.append(("adapter_name_or_path", "adapter_name_or_path continues LoRA training and needs "
                          f"finetuning_type lora, not {self.finetuning_type}; merge the adapter first "
                          "(ftkit merge-lora) to fine-tune the merged model fully."))
        return found


class MergeConfig(ModelSection):
    """``ftkit merge-lora``: fold adapters into the base and export a standalone model."""

    export_dir: str = Field(..., description="Where the merged model is written.")
    export_size: float = Field(5, gt=0, description="Largest safetensors shard, in GB.")
    export_dtype: Literal["auto", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Data type of the exported weights (auto: the base model's own)."
    )
    overwrite: bool = Field(False, description="Replace an existing non-empty export_dir.")
    ollama_modelfile: bool = Field(True, description="Also write an Ollama Modelfile next to the export.")

    def problems(self) -> list[Problem]:
        found = ModelSection.problems(self)
        if not self.adapter_name_or_path:
            found.append(("adapter_name_or_path", "adapter_name_or_path is required: the LoRA adapter directory "
                          "(or several, comma-separated) to merge."))
        if self.quantization_bit is not None:
            found.append(("quantization_bit", "quantization_bit cannot be used for merging: adapters are merged "
                          "into full-precision weights; remove the key (ftkit quantize exports quantized models)."))
        return found


STAGE_SCHEMAS: dict[str, type[Section]] = {"train": TrainConfig, "merge-lora": MergeConfig}
