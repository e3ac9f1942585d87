"""One schema per stage, each the union of the sections it needs, plus the rules that span sections.

``TrainConfig`` serves ``ftkit train``, ``ftkit data preview`` and ``ftkit validate``; ``MergeConfig``
serves ``ftkit merge-lora``; ``EvaluateConfig``, ``ServeConfig`` and ``QuantizeConfig`` serve ``ftkit evaluate``,
``ftkit serve`` and ``ftkit quantize``, each on ``ModelSection``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ftkit.config.sections import (
    DataSection,
    IdentitySection,
    MethodSection,
    ModelSection,
    Problem,
    Section,
    TrainingSection,
    split_names,
)


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
        if self.stage == "pt" and (self.train_on_prompt or self.mask_history):
            key = "train_on_prompt" if self.train_on_prompt else "mask_history"
            found.append((key, f"{key} only applies to stage sft; pre-training trains on every token."))
        if self.replay_ratio and self.stage == "pt":
            found.append(("replay_ratio", "replay_ratio only applies to stage sft: pre-training data has no "
                          "conversations to replay; remove it."))
        if self.eval_strategy in ("steps", "epoch") and not self.val_size and not self.eval_dataset:
            found.append(("eval_strategy", f"eval_strategy {self.eval_strategy} needs an evaluation set: set "
                          "val_size (e.g. 0.1) or eval_dataset, or remove eval_strategy."))
        if self.pissa_init and self.quantization_bits is not None:
            found.append(("pissa_init", f"pissa_init cannot be used on a {self.quantization_bits}-bit base: PiSSA "
                          "moves the principal part of each weight into the adapter and leaves the residual in the "
                          "base, which peft cannot do to quantized weights; use finetuning_type lora without "
                          "quantization_bit, or remove pissa_init."))
        new_adapter_keys = [key for key, on in (("adaptive_rank", self.adaptive_rank), ("pissa_init", self.pissa_init))
                            if on]
        if self.adapter_name_or_path and new_adapter_keys:
            found.append((new_adapter_keys[0], f"{new_adapter_keys[0]} sets up a new adapter, but "
                          "adapter_name_or_path continues an existing one; remove one of them (merge the old "
                          "adapter first with ftkit merge-lora to start a new one on top)."))
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


class EvaluateConfig(IdentitySection, ModelSection):
    """``ftkit evaluate``: a model (or an endpoint) on GSM8K, the general check or the user's own dataset."""

    benchmark: str = Field("gsm8k", description="gsm8k, general, a dataset from dataset_info.json, or a path "
                           "(a GSM8K folder, or a dataset file).")
    data: str | None = Field(None, description="GSM8K data: a folder (or test file) in openai/gsm8k's jsonl format.")
    dataset_dir: str = Field("data", description="Folder holding dataset_info.json (for a dataset benchmark).")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N items.")
    num_fewshot: int | None = Field(None, ge=0, le=64, description="Few-shot examples (GSM8K default: 5).")
    apply_chat_template: bool = Field(False, description="Prompt through the chat template (few-shot as turns).")
    max_new_tokens: int = Field(256, ge=1, le=32768, description="Longest generated answer (GSM8K: always 256).")
    cutoff_len: int = Field(2048, ge=8, description="Longest encoded example of a dataset benchmark, in tokens.")
    contains: list[str] | None = Field(None, description="A dataset benchmark's `contains` score: the answer names "
                                       "any of these (default: the dataset's whole reply).")
    dtype: Literal["auto", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights' dtype (auto: fp32 on CPU, so answers agree with lm-eval in fp32).")
    endpoint: str | None = Field(None, description="An OpenAI-compatible server URL (http://127.0.0.1:8000/v1).")
    api_key: str | None = Field(None, description="API key for the endpoint.")
    max_concurrency: int = Field(8, ge=1, le=1024, description="Endpoint requests in flight at once.")
    output: str | None = Field(None, description="Folder for results.json and samples.jsonl "
                               "(default saves/evaluate/<benchmark>).")
    output_file: str | None = Field(None, description="The results file (samples are written beside it).")
    overwrite: bool = Field(False, description="Replace another run's results in the output folder.")
    resume: bool = Field(False, description="Continue an interrupted run from its samples.jsonl.")

    def problems(self) -> list[Problem]:
        found = ModelSection.problems(self)
        if self.overwrite and self.resume:
            found.append(("resume", "resume and overwrite contradict each other; pass one of them."))
        if self.output and self.output_file:
            found.append(("output_file", "output and output_file both say where results go; keep one of them."))
        if self.endpoint and self.adapter_name_or_path:
            found.append(("adapter_name_or_path", "an endpoint serves its own weights; load the adapter in the "
                          "server (ftkit serve --adapter) and remove adapter_name_or_path here."))
        if self.endpoint and not self.endpoint.startswith(("http://", "https://")):
            found.append(("endpoint", f"endpoint {self.endpoint!r} is not a URL; give one like "
                          "http://127.0.0.1:8000/v1."))
        return found


class ServeConfig(ModelSection):
    """``ftkit serve``: the model behind an OpenAI-compatible API, its adapters served side by side by name.

    ``adapter_name_or_path`` entries are ``NAME=PATH`` (or a bare path, named after its folder); each is a
    ``model`` a request may ask for, never merged into the base.
    """

    infer_backend: Literal["ftkit", "huggingface", "vllm"] = Field(
        "ftkit", description="ftkit's engine (LLaMA-Factory's 'huggingface' means the same) or vllm (GPUs).")
    infer_dtype: Literal["auto", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights' dtype (auto: bf16 where the device is fast at it, else fp32).")
    host: str = Field("127.0.0.1", description="Address to listen on; beyond loopback only with an api_key.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0: any free port).")
    api_key: str | None = Field(None, description="Clients must send 'Authorization: Bearer <key>' "
                                "(default: the FTKIT_API_KEY environment variable).")
    device: str | None = Field(None, pattern=r"^(cpu|cuda|cuda:\d+|mps)$",
                               description="cpu, cuda or cuda:N (default: the first GPU, else cpu).")
    served_model_name: str | None = Field(None, description="The base model's name in the API (default: "
                                          "model_name_or_path as given).")
    max_num_seqs: int = Field(64, ge=1, le=4096, description="Sequences batched together at most.")
    max_num_batched_tokens: int = Field(2048, ge=1, le=1_048_576, description="Tokens in one engine step at most.")
    max_model_len: int | None = Field(None, ge=2, description="Longest prompt + reply (default: the model's).")
    kv_cache_memory: float | None = Field(None, gt=0, description="GiB for the KV cache (default: engine rule).")
    enable_prefix_caching: bool = Field(True, description="Reuse the KV cache of shared prompt prefixes.")
    scheduling_policy: Literal["fcfs", "priority"] = Field("fcfs", description="Order of waiting requests "
                                                           "(priority: a request's smaller priority first).")
    max_loras: int = Field(4, ge=1, le=256, description="Adapters resident at once (more are loaded on demand).")
    max_waiting: int = Field(256, ge=0, le=1_000_000, description="Sequences that may wait beyond max_num_seqs; "
                             "more get 429 at once.")
    shutdown_timeout: float = Field(30, ge=0, le=86400, description="On SIGTERM, seconds to let requests in "
                                    "flight finish before they are aborted.")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs to shard the model over (vllm backend).")

    def adapter_entries(self) -> list[tuple[str, str]]:
        """(name, path) per ``NAME=PATH`` entry; a bare path is named after its folder."""
        entries = []
        for entry in self.adapter_name_or_path or []:
            name, sep, path = entry.partition("=")
            if not sep:
                name, path = entry.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1], entry
            entries.append((name.strip(), path.strip()))
        return entries

    def adapter_names(self) -> dict[str, str]:
        """name -> adapter path."""
        return dict(self.adapter_entries())

    def problems(self) -> list[Problem]:
        import os

        from ftkit.http_server import is_loopback

        found = ModelSection.problems(self)
        names = [name for name, _ in self.adapter_entries()]
        if any(not name or not path for name, path in self.adapter_entries()):
            found.append(("adapter_name_or_path", "adapter_name_or_path entries are NAME=PATH (or a path); one "
                          "has an empty name or path."))
        elif twice := sorted({name for name in names if names.count(name) > 1}):
            found.append(("adapter_name_or_path", f"adapter_name_or_path names two adapters {twice[0]!r}; give "
                          "each its own name as NAME=PATH."))
        if not is_loopback(self.host) and not (self.api_key or os.environ.get("FTKIT_API_KEY")):
            found.append(("host", f"host {self.host} is reachable from other machines, and without an API key "
                          "anyone there could use the model; set api_key (or FTKIT_API_KEY) or listen on "
                          "127.0.0.1."))
        if self.tensor_parallel_size > 1 and self.infer_backend != "vllm":
            found.append(("tensor_parallel_size", "tensor_parallel_size needs infer_backend vllm; ftkit's engine "
                          "runs on one device."))
        return found


QUANTIZE_METHODS: dict[str, str] = {
    "int8": "int8 weights, per output channel (torchao Int8WeightOnlyConfig)",
    "int8-dynamic": "int8 weights, activations quantized per token at run time (torchao)",
    "int8-static": "int8 weights and activations, activation scales calibrated on calibration_dataset (torchao)",
    "int4": "4-bit weights in groups of group_size (torchao Int4WeightOnlyConfig; CUDA only in torchao 0.18)",
    "bnb-int8": "bitsandbytes LLM.int8() weights",
    "bnb-nf4": "bitsandbytes 4-bit NormalFloat weights",
    "bnb-fp4": "bitsandbytes 4-bit float weights",
    "gptq": "GPTQ 4-bit with calibration (gptqmodel, CUDA)",
    "awq": "AWQ 4-bit with calibration (autoawq, CUDA)",
    "gguf": "a GGUF file for llama.cpp and Ollama (gguf_type: f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, ...)",
}
"""``ftkit quantize`` methods and what each writes (``ftkit.quantize.methods`` owns how)."""

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
"""GGUF tensor types the ``gguf`` package can write in pure Python (k-quants need llama.cpp's quantizer)."""

_CALIBRATED = ("int8-static", "gptq", "awq")
_GROUPED = ("int4", "gptq", "awq")
MIN_CALIBRATION_SAMPLES = 32


class QuantizeConfig(ModelSection):
    """``ftkit quantize``: merge adapters (fp32), quantize or export to GGUF, then measure against the original."""

    method: str = Field(..., description="One of: " + ", ".join(QUANTIZE_METHODS) + ".")
    export_dir: str = Field(..., description="Where the quantized model (or GGUF file) and quantize_report.json go.")
    gguf_type: str = Field("q8_0", description="GGUF tensor type for method gguf: " + ", ".join(GGUF_TYPES) + ".")
    group_size: int | None = Field(None, ge=1, description="Weights per quantization group (int4: default 64; "
                                   "must divide every quantized layer's input width).")
    exclude_modules: list[str] = Field(default_factory=lambda: ["lm_head", "embed_tokens"], description="Modules "
                                       "kept in high precision (module names or their last part); the output head "
                                       "and embeddings by default.")
    per_channel: bool = Field(True, description="int8 methods: one weight scale per output channel (false: one "
                              "per tensor).")
    calibration_dataset: str = Field("general", description="Calibration text for int8-static/gptq/awq: 'general' "
                                     "(ftkit's 320 shipped prompts), a dataset from dataset_info.json, or a "
                                     ".txt/.json/.jsonl file.")
    calibration_samples: int = Field(256, ge=1, description="Calibration samples (at least "
                                     f"{MIN_CALIBRATION_SAMPLES}; 500-1,000 for a real model when the data has them).")
    calibration_batch_size: int = Field(8, ge=1, le=1024, description="Calibration samples per forward pass.")
    calibration_max_length: int = Field(256, ge=8, le=32768, description="Longest calibration sample, in tokens.")
    dataset_dir: str = Field("data", description="Folder holding dataset_info.json (for calibration_dataset).")
    eval_data: str | None = Field(None, description="Held-out text for perplexity and agreement (.txt or .jsonl; "
                                  "default: a text shipped with ftkit).")
    eval_max_tokens: int = Field(512, ge=16, le=65536, description="Tokens of eval_data scored.")
    bench_new_tokens: int = Field(32, ge=1, le=4096, description="Tokens generated per prompt when timing "
                                  "single-stream generation.")
    export_dtype: Literal["auto", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype of the weights left unquantized and of the activations (auto: bf16 where the "
        "CPU is fast at it, else fp32).")
    report: bool = Field(True, description="Measure the output against the original (false: write the output, "
                         "with a report of sizes only, without loading it back).")
    overwrite: bool = Field(False, description="Replace an existing non-empty export_dir.")
    ollama_modelfile: bool = Field(True, description="Write an Ollama Modelfile beside a GGUF file.")

    _split_excluded = field_validator("exclude_modules", mode="before")(split_names)

    def problems(self) -> list[Problem]:
        found = ModelSection.problems(self)
        if self.method not in QUANTIZE_METHODS:
            found.append(("method", f"method {self.method!r} is not a quantization method; use one of "
                          f"{', '.join(QUANTIZE_METHODS)}."))
            return found
        if self.quantization_bit is not None:
            found.append(("quantization_bit", "quantization_bit loads the base in 4/8 bits; ftkit quantize starts "
                          "from full-precision weights: remove it and choose method instead."))
        if self.method == "gguf" and self.gguf_type not in GGUF_TYPES:
            found.append(("gguf_type", f"gguf_type {self.gguf_type!r} is not one the gguf package can write; use "
                          f"one of {', '.join(GGUF_TYPES)}."))
        if self.group_size is not None and self.method not in _GROUPED:
            found.append(("group_size", f"group_size applies to {', '.join(_GROUPED)} (4-bit groups), not method "
                          f"{self.method}; remove it."))
        if self.method in _CALIBRATED and self.calibration_samples < MIN_CALIBRATION_SAMPLES:
            found.append(("calibration_samples", f"calibration_samples {self.calibration_samples} is too few to "
                          f"calibrate activation scales (they would fit a handful of prompts); use at least "
                          f"{MIN_CALIBRATION_SAMPLES} (500-1,000 recommended)."))
        if not self.per_channel and self.method not in ("int8", "int8-dynamic", "int8-static"):
            found.append(("per_channel", f"per_channel false applies to the torchao int8 methods, not {self.method}."))
        return found


STAGE_SCHEMAS: dict[str, type[Section]] = {"train": TrainConfig, "merge-lora": MergeConfig,
                                           "evaluate": EvaluateConfig, "serve": ServeConfig,
                                           "quantize": QuantizeConfig}
