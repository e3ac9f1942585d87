"""The sections every stage config is assembled from, with LLaMA-Factory's key names.

A stage config is flat YAML (LLaMA-Factory style); each stage schema in ``ftkit.config.stages`` is
the union of the sections it needs. Each section validates its own fields (types, ranges, choices)
and owns the cross-field rules about them in ``problems()``, so a rule lives next to the field it
concerns. Defaults follow LLaMA-Factory unless noted in the field's description.
"""

from __future__ import annotations

import types
from datetime import timedelta
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ftkit.config.template_names import is_known_template, unknown_template_message

Problem = tuple[str, str]
"""A cross-field problem: (the key it concerns, one sentence saying what is wrong and what is right)."""


def problem_from_sentence(sentence: str, fields: Any, default_key: str) -> Problem:
    """A problem from an error sentence of another layer: its key is the sentence's first word when that is a
    config key (``lora_target q_prj matches no module ...``), else ``default_key``."""
    first_word = sentence.split(" ", 1)[0]
    return (first_word if first_word in fields else default_key, sentence)


def split_names(value: Any) -> Any:
    """Accept LLaMA-Factory's comma-separated strings (``dataset: a,b``) as well as YAML lists."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _is_number(annotation: Any) -> bool:
    """Whether a field annotation is int or float (optionally ``| None``, or ``| Literal["auto"]``)."""
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None) and get_origin(a) is not Literal]
    else:
        members = [annotation]
    members = [get_args(m)[0] if get_origin(m) is Annotated else m for m in members]
    return bool(members) and all(member in (int, float) for member in members)


def yaml11_no(value: Any) -> Any:
    """PyYAML (YAML 1.1) reads an unquoted ``no`` as false; ``save_strategy: no`` means the string."""
    return "no" if value is False else value


INT64_MAX = 2**63 - 1
"""The largest whole number torch, numpy and the tokenizers accept; larger ones overflow deep inside them."""


def fits_in_64_bits(value: int) -> bool:
    """Whether a whole number (not a boolean) fits in a signed 64-bit integer."""
    return not isinstance(value, bool) and -INT64_MAX - 1 <= value <= INT64_MAX

SEED_MAX = 2**32 - 1
"""numpy seeds (set by transformers' ``set_seed``) must lie in [0, 2**32 - 1]."""


class Section(BaseModel):
    """Base for every section: unknown keys are handled by the loader, types are strict enough.

    Numbers are finite (``.inf``, ``.nan`` and ``1e400`` are refused in every float field) and fit in 64
    bits, so no value reaches torch, numpy or the Trainer that overflows there.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1 for int and float fields; `lora_rank: true` is a mistake.
        if isinstance(value, bool) and info.field_name and _is_number(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, not the boolean {str(value).lower()}")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _fits_in_64_bits(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and not fits_in_64_bits(value):
            raise ValueError(f"input should be a whole number that fits in 64 bits (at most {INT64_MAX:,})")
        return value

    def problems(self) -> list[Problem]:
        """Cross-field rules of this section; empty when the section is consistent."""
        return []


class ModelSection(Section):
    """Which model, tokenizer and chat template a stage works on (shared by every stage)."""

    model_name_or_path: str = Field(
        "smollm2-135m-instruct",
        description="A local directory, a Hugging Face hub id, 'ms://org/name' (ModelScope), a .gguf file, "
        "or the embedded alias smollm2-135m-instruct.",
    )
    adapter_name_or_path: list[str] | None = Field(
        None, description="LoRA adapter directories (or hub ids), comma-separated; applied in order."
    )
    use_modelscope: bool = Field(False, description="Resolve hub ids on ModelScope instead of Hugging Face.")
    model_revision: str = Field("main", description="Branch, tag or commit of a hub model.")
    cache_dir: str | None = Field(None, description="Where hub downloads are cached (the hub's default if unset).")
    hf_hub_token: str | None = Field(None, description="Token for private Hugging Face models.")
    ms_hub_token: str | None = Field(None, description="Token for private ModelScope models.")
    trust_remote_code: bool = Field(False, description="Allow model code shipped with a hub model to run.")
    template: str = Field(
        "auto", description="Chat template: 'auto' (the tokenizer's own) or a named one (chatml, qwen, llama3, ...)."
    )
    default_system: str | None = Field(
        None, description="System prompt used when a conversation has none (overrides the template's default)."
    )
    quantization_bit: Literal[4, 8] | None = Field(None, description="Load the base weights in 4 or 8 bits (bitsandbytes).")
    quantization_method: Literal["bnb", "bitsandbytes"] = Field("bnb", description="Quantization backend for loading.")
    quantization_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quantization: bool = Field(True, description="Quantize the 4-bit quantization constants too.")
    flash_attn: Literal["auto", "disabled", "sdpa", "fa2", "eager"] = Field(
        "auto", description="Attention kernel: auto picks sdpa (fa2 when flash-attn is installed on CUDA)."
    )

    _split_adapters = field_validator("adapter_name_or_path", mode="before")(split_names)

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        if not is_known_template(value):
            raise ValueError(unknown_template_message(value))
        return value


class IdentitySection(Section):
    """What fills the placeholders of identity-style datasets (training them and evaluating on them)."""

    identity_name: str = Field("Ftkit", description="Fills {{name}} in identity-style datasets.")
    identity_author: str = Field("the ftkit team", description="Fills {{author}} in identity-style datasets.")


class DataSection(IdentitySection):
    """Which datasets, how they are rendered, masked, truncated and packed."""

    dataset: list[str] = Field(
        default_factory=list, description="Dataset names from dataset_info.json or file paths, comma-separated."
    )
    eval_dataset: list[str] | None = Field(None, description="Datasets used only for evaluation loss.")
    dataset_dir: str = Field(
        "data", description="Folder holding dataset_info.json; ftkit's shipped datasets are used when it has none."
    )
    cutoff_len: int = Field(2048, ge=8, description="Maximum tokens per example after encoding.")
    max_samples: int | None = Field(None, ge=1, description="Keep at most this many examples per dataset.")
    val_size: float = Field(
        0.0, ge=0, description="Hold out this fraction (< 1) or this many examples (>= 1) for eval loss."
    )
    train_on_prompt: bool = Field(False, description="Also train on system and user tokens.")
    mask_history: bool = Field(False, description="Train only on the last assistant turn of each conversation.")
    packing: bool | None = Field(
        None, description="Pack examples into rows of cutoff_len without cross-example attention "
        "(default: on for stage pt, off for sft)."
    )
    neat_packing: bool = Field(
        False, description="LLaMA-Factory's packing without cross-attention; ftkit's packing always is; implies packing."
    )
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = Field(
        "concat", description="How several datasets are combined."
    )
    interleave_probs: list[float] | None = Field(None, description="Sampling weights for interleave strategies.")
    overwrite_cache: bool = Field(False, description="Re-tokenise even when a matching cached copy exists.")
    preprocessing_num_workers: int | None = Field(None, ge=1, description="Worker processes for tokenisation.")
    replay_ratio: float | None = Field(
        None, ge=0, description="Replay examples mixed in per training example so general behaviour is kept "
        "(default: 0.5 for sft on up to 1,000 examples, else 0; 0 turns replay off)."
    )
    replay_source: str = Field(
        "self", min_length=1, description="Where replay comes from: self (the base model's own answers to ftkit's "
        "general prompts) or a dataset name or path."
    )
    system_prompt_variants: bool | None = Field(
        None, description="Train each conversation with its system prompt swapped in or out by a seeded coin, so "
        "behaviour holds with and without one (default: on for sft on up to 1,000 examples)."
    )
    general_check: bool = Field(
        True, description="Answer ftkit's held-out general questions before and after training and report "
        "'general answers kept: X/Y'."
    )
    learned_check: bool = Field(
        True, description="sft: answer up to 40 sampled training prompts before and after training and report "
        "'training answers learned: X/Y' (an answer learned says at least half of what its reply says and the "
        "base model's answer did not)."
    )

    _split_datasets = field_validator("dataset", "eval_dataset", mode="before")(split_names)

    @field_validator("interleave_probs", mode="before")
    @classmethod
    def _split_probs(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [float(p) for p in split_names(value)]
        return value

    def problems(self) -> list[Problem]:
        found: list[Problem] = []
        if self.interleave_probs is not None:
            if any(p < 0 for p in self.interleave_probs) or not sum(self.interleave_probs) > 0:
                found.append(("interleave_probs", f"interleave_probs {self.interleave_probs} must be weights of at "
                              "least 0 with a positive sum."))
            if self.mix_strategy == "concat":
                found.append(("interleave_probs", "interleave_probs only applies with mix_strategy interleave_under "
                              "or interleave_over; remove it or change mix_strategy."))
            elif len(self.interleave_probs) != len(self.dataset):
                found.append(("interleave_probs", f"interleave_probs has {len(self.interleave_probs)} weights but "
                              f"dataset names {len(self.dataset)} datasets; give one weight per dataset."))
        if self.val_size >= 1 and self.val_size != int(self.val_size):
            found.append(("val_size", f"val_size {self.val_size} must be a fraction below 1 or a whole number of "
                          "examples."))
        if self.mask_history and self.train_on_prompt:
            found.append(("mask_history", "mask_history and train_on_prompt cannot both be on: mask_history trains "
                          "only the last reply, train_on_prompt every token; choose one."))
        return found


LoraTarget = list[str]


class MethodSection(Section):
    """What is trained: the stage and the fine-tuning method."""

    stage: Literal["sft", "pt"] = Field("sft", description="sft: supervised on conversations; pt: raw-text pre-training.")
    finetuning_type: Literal["lora", "qlora", "full", "freeze"] = Field(
        "lora", description="lora | qlora (= lora with quantization_bit 4 by default) | full | freeze."
    )
    lora_rank: int = Field(8, ge=1, le=1024, description="LoRA rank r (default 8; 16 in sft on a small set, up "
                           "to 1,000 examples).")
    lora_alpha: int | None = Field(None, ge=1, description="LoRA alpha (default: 2 x lora_rank).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target: LoraTarget = Field(
        default_factory=lambda: ["all"], description="'all' (every linear layer but the output head) or module names."
    )
    additional_target: list[str] | None = Field(
        None, description="Modules trained fully and saved with the adapter (peft modules_to_save)."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    freeze_trainable_layers: int = Field(
        2, description="freeze: train the last N layers (a negative N trains the first |N| layers)."
    )
    freeze_trainable_modules: list[str] = Field(
        default_factory=lambda: ["all"], description="freeze: which modules inside those layers train ('all' or names)."
    )
    freeze_extra_modules: list[str] | None = Field(
        None, description="freeze: extra top-level modules to train too (e.g. embed_tokens)."
    )
    gradient_checkpointing: bool | None = Field(
        None, description="true/false force activation checkpointing on/off (transformers' name; the same as "
        "disable_gradient_checkpointing false/true); unset: ftkit decides from a memory estimate."
    )
    disable_gradient_checkpointing: bool | None = Field(
        None, description="true: never checkpoint activations; false: always; unset: checkpoint only when the "
        "largest batch's activations would take more than a fifth of free memory (ftkit prints the estimate)."
    )
    adaptive_rank: bool = Field(
        False, description="lora: train peft's AdaLoRA, which prunes each module's rank from init_r towards an "
        "average of target_r by importance (use_adalora is read as this key)."
    )
    init_r: int | None = Field(None, ge=1, le=1024, description="adaptive_rank: every module's starting rank "
                               "(default: 1.5 x target_r, rounded up).")
    target_r: int | None = Field(None, ge=1, le=1024, description="adaptive_rank: the average rank left at the end "
                                 "(default: lora_rank).")
    tinit: int | None = Field(None, ge=0, description="adaptive_rank: steps trained at init_r before pruning starts "
                              "(default: a tenth of the run's steps).")
    tfinal: int | None = Field(None, ge=0, description="adaptive_rank: last steps trained at the final ranks "
                               "(default: a fifth of the run's steps).")
    deltaT: int | None = Field(None, ge=1, description="adaptive_rank: steps between two rank reallocations "
                               "(default: a hundredth of the run's steps, at least 1).")
    orth_reg_weight: float = Field(0.5, ge=0.0, description="adaptive_rank: weight of AdaLoRA's orthogonality "
                                   "penalty on A and B, added to the loss.")
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, le=1e6, description="LoRA+: B matrices train at this multiple of learning_rate (A at "
        "learning_rate); the paper suggests 16."
    )
    loraplus_lr_embedding: float = Field(
        1e-6, gt=0, le=1.0, description="LoRA+: learning rate of LoRA weights on embedding layers."
    )
    pissa_init: bool = Field(
        False, description="Initialise LoRA from the principal singular values and vectors of each weight (PiSSA); "
        "the base keeps the residual, so the model's output is unchanged at step 0."
    )
    pissa_iter: int = Field(
        16, ge=-1, description="pissa_init: subspace iterations of the fast randomised SVD (-1: exact SVD)."
    )
    pissa_convert: bool = Field(
        True, description="pissa_init: save the final adapter converted to a plain LoRA of the original base "
        "(rank 2 x lora_rank), so any copy of the base loads it; false keeps PiSSA form. Default true, unlike "
        "LLaMA-Factory, because only the converted adapter loads correctly everywhere."
    )

    _split_lists = field_validator(
        "lora_target", "additional_target", "freeze_trainable_modules", "freeze_extra_modules", mode="before"
    )(split_names)

    @property
    def checkpointing_choice(self) -> bool | None:
        """True/False when the user forced activation checkpointing on/off, None to let ftkit decide."""
        if self.gradient_checkpointing is not None:
            return self.gradient_checkpointing
        return None if self.disable_gradient_checkpointing is None else not self.disable_gradient_checkpointing

    @property
    def resolved_lora_alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank

    def problems(self) -> list[Problem]:
        found: list[Problem] = []
        if (self.gradient_checkpointing is not None and self.disable_gradient_checkpointing is not None
                and self.gradient_checkpointing == self.disable_gradient_checkpointing):
            found.append(("disable_gradient_checkpointing", "gradient_checkpointing and disable_gradient_checkpointing "
                          "contradict each other; keep one of them."))
        found.extend(self._lora_variant_problems())
        if self.freeze_trainable_layers == 0:
            found.append(("freeze_trainable_layers", "freeze_trainable_layers must not be 0: give the number of last "
                          "layers to train (or a negative number for the first layers)."))
        return found

    @property
    def adalora_target_r(self) -> int:
        return self.target_r if self.target_r is not None else self.lora_rank

    @property
    def adalora_init_r(self) -> int:
        return self.init_r if self.init_r is not None else -(-3 * self.adalora_target_r // 2)

    def _lora_variant_problems(self) -> list[Problem]:
        """AdaLoRA, LoRA+ and PiSSA keys: only with LoRA, and not with what peft cannot combine them with."""
        found: list[Problem] = []
        lora = self.finetuning_type in ("lora", "qlora")
        variants = [("adaptive_rank", self.adaptive_rank), ("pissa_init", self.pissa_init),
                    ("loraplus_lr_ratio", self.loraplus_lr_ratio is not None)]
        for key, on in variants:
            if on and not lora:
                found.append((key, f"{key} only applies to LoRA; set finetuning_type lora or remove {key}."))
        adalora_keys = [key for key in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "orth_reg_weight")
                        if getattr(self, key) != MethodSection.model_fields[key].default]
        if adalora_keys and not self.adaptive_rank:
            found.append((adalora_keys[0], f"{adalora_keys[0]} only applies with adaptive_rank: true (AdaLoRA); "
                          "set it or remove the key."))
        if self.adaptive_rank:
            if self.adalora_target_r > self.adalora_init_r:
                found.append(("target_r", f"target_r {self.adalora_target_r} must not exceed init_r "
                              f"{self.adalora_init_r}: AdaLoRA only prunes ranks."))
            for key in ("use_dora", "use_rslora", "pissa_init"):
                if getattr(self, key):
                    found.append((key, f"{key} cannot be combined with adaptive_rank: peft's AdaLoRA has its own "
                                  "initialisation and scaling; remove one of them."))
        if self.pissa_init and self.use_dora:
            found.append(("pissa_init", "pissa_init cannot be combined with use_dora; remove one of them."))
        return found


# A per-device batch is bounded by what one device holds at once: 65,536 sequences is over half a million
# tokens per step even at the shortest cutoff_len (8), beyond any accelerator's memory for a real model, so a
# larger value is a typo. Bigger effective batches come from gradient_accumulation_steps.
MAX_BATCH_SIZE = 65_536
BATCH_SIZE_NOTE = "Sequences per device per step, 1 to 65,536 (use gradient_accumulation_steps for more)."
# The Trainer multiplies epochs by steps per epoch into a step count that its schedulers turn into floats
# (1e308 epochs overflow there); a million passes is more than any run finishes, so a larger value is a typo.
MAX_EPOCHS = 1_000_000
MAX_DDP_TIMEOUT = timedelta.max.days * 86_400  # transformers makes a timedelta of ddp_timeout


class TrainingSection(Section):
    """How the optimisation runs, where it writes, and how it reports (HF TrainingArguments names)."""

    output_dir: str = Field(..., description="Where checkpoints, the adapter or model, logs and plots are written.")
    overwrite_output_dir: bool = Field(False, description="Allow training into a directory that holds a finished run.")
    per_device_train_batch_size: int = Field(4, ge=1, le=MAX_BATCH_SIZE, description=BATCH_SIZE_NOTE)
    per_device_eval_batch_size: int = Field(8, ge=1, le=MAX_BATCH_SIZE, description=BATCH_SIZE_NOTE)
    gradient_accumulation_steps: int = Field(1, ge=1)
    num_train_epochs: Annotated[float, Field(gt=0, le=MAX_EPOCHS)] | Literal["auto"] = Field(
        "auto", description="Passes over the training data (at most a million; max_steps sets a step budget "
        "instead). auto: 3, except sft on a small set (up to 1,000 examples), which trains 3 epochs, then 2 more "
        "at a time (the learning rate restarting) until the learned check passes, at most 9."
    )
    learning_rate: float = Field(1e-4, gt=0, le=1.0, description="Peak learning rate (default 1e-4; 3e-4 for "
                                 "a new LoRA adapter in sft on a small set, up to 1,000 examples).")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps (-1: use num_train_epochs).")
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
        "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay",
    ] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    optim: str = Field("adamw_torch_fused", description=(
        "Any optimizer name transformers accepts (adamw_torch_fused, adamw_torch, adamw_8bit, ...); the default is "
        "transformers' own: one fused AdamW kernel per step, on CPU too."))
    logging_steps: int = Field(10, ge=1)
    save_strategy: Literal["steps", "epoch", "no"] = "steps"
    save_steps: int = Field(500, ge=1)
    save_total_limit: int | None = Field(None, ge=1)
    eval_strategy: Literal["no", "steps", "epoch"] | None = Field(
        None, description="When to compute eval loss (default: every eval_steps when an eval set exists)."
    )
    eval_steps: int | None = Field(None, ge=1)
    bf16: bool | Literal["auto"] = Field(
        "auto", description="bf16 mixed precision; auto = on where the device runs bf16 fast (CUDA Ampere+, AVX512-BF16/AMX CPUs)."
    )
    fp16: bool = Field(False, description="fp16 mixed precision (CUDA only).")
    seed: int = Field(42, ge=0, le=SEED_MAX, description="Random seed, 0 to 4,294,967,295 (numpy's range).")
    data_seed: int | None = Field(
        None, ge=0, le=SEED_MAX, description="Seed of the data order, 0 to 4,294,967,295 (default: seed)."
    )
    resume_from_checkpoint: str | bool | None = Field(
        None, description="A checkpoint directory, or false to start over; by default the last complete checkpoint "
        "in output_dir is resumed."
    )
    deepspeed: str | None = Field(
        None, description="DeepSpeed config: a JSON file, or a shipped one by name (ds_z0, ds_z2, ds_z2_offload, ds_z3, "
        "ds_z3_offload); `auto` values are filled from this config. Trains in nproc_per_node processes."
    )
    fsdp: str | None = Field(
        None, description="PyTorch FSDP2: a YAML file of transformers' fsdp_config keys, a shipped one by name "
        "(full_shard, full_shard_offload, shard_grad_op), or option words (e.g. 'full_shard auto_wrap')."
    )
    fsdp_config: dict[str, Any] | None = Field(
        None, description="transformers' fsdp_config keys, applied over those fsdp gives."
    )
    nproc_per_node: int | None = Field(
        None, ge=1, le=1024, description="Processes per node (default: the GPUs visible; required without GPUs)."
    )
    tp_size: int = Field(
        1, ge=1, le=1024, description="Tensor parallelism: split every layer's weights over this many processes "
        "(transformers' tp_plan; full or freeze fine-tuning); the processes beyond it shard by FSDP."
    )
    nnodes: int = Field(1, ge=1, le=4096, description="Nodes in the run (each runs `ftkit train` with its node_rank).")
    node_rank: int = Field(0, ge=0, description="This node's number, 0 to nnodes - 1; node 0 hosts the rendezvous.")
    master_addr: str = Field("127.0.0.1", description="Address of node 0, reachable from every node.")
    master_port: int | None = Field(
        None, ge=1, le=65535, description="Rendezvous port on node 0 (default: a free port on one node, 29500 on several)."
    )
    report_to: list[Literal["none", "tensorboard", "wandb", "swanlab", "mlflow", "trackio", "comet_ml", "clearml"]] = Field(
        default_factory=lambda: ["none"], description="none | tensorboard | wandb (comma-separated for several)."
    )
    run_name: str | None = None
    logging_dir: str | None = None
    plot_loss: bool = Field(True, description="Write training_loss.png after training.")
    dataloader_num_workers: int = Field(0, ge=0)
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together (less padding) when packing is off."
    )
    padding_free: bool | None = Field(
        None, description="Concatenate each batch into one row with per-example position ids (no padding at all) "
        "when packing is off; unset: on with flash-attention 2 (varlen kernels), off otherwise, where "
        "length-grouped padded batches are faster."
    )
    ddp_timeout: int = Field(
        1800, ge=1, le=MAX_DDP_TIMEOUT, description="Seconds before a multi-process collective times out (at most "
        "what a Python timedelta holds, about 2.7 million years: transformers makes one of it)."
    )
    callbacks: list[str] = Field(
        default_factory=list, description="Your own transformers.TrainerCallback classes, as 'package.module:Class' "
        "(comma-separated for several); each is created without arguments and added to the Trainer."
    )
    do_train: bool = Field(True, description="Accepted for LLaMA-Factory configs; `ftkit train` always trains.")
    extra_training_args: dict[str, Any] = Field(
        default_factory=dict, description="Other transformers.TrainingArguments keys, passed through unchanged."
    )

    _split_report = field_validator("report_to", "callbacks", mode="before")(split_names)

    @field_validator("callbacks")
    @classmethod
    def _callback_paths(cls, value: list[str]) -> list[str]:
        for entry in value:
            module, _, name = entry.partition(":")
            if not module or not name or not all(part.isidentifier() for part in [*module.split("."), name]):
                raise ValueError(f"callbacks entry '{entry}' must be 'package.module:ClassName'")
        return value
    _strategy_no = field_validator("save_strategy", "eval_strategy", mode="before")(yaml11_no)

    def problems(self) -> list[Problem]:
        found: list[Problem] = []
        if self.bf16 is True and self.fp16:
            found.append(("fp16", "bf16 and fp16 are both on; choose one mixed-precision mode."))
        if "none" in self.report_to and len(self.report_to) > 1:
            found.append(("report_to", "report_to lists 'none' together with a logger; keep one or the other."))
        if self.deepspeed and self.fsdp:
            found.append(("fsdp", "deepspeed and fsdp are both set; they are two ways of sharding a run, choose one."))
        if self.tp_size > 1 and (self.deepspeed or self.fsdp):
            found.append(("tp_size", f"tp_size {self.tp_size} splits the model itself and shards the remaining processes "
                          f"by FSDP; remove {'deepspeed' if self.deepspeed else 'fsdp'} (or set tp_size: 1)."))
        if self.fsdp_config is not None and not self.fsdp:
            found.append(("fsdp_config", "fsdp_config has no effect without fsdp; set fsdp (for example fsdp: "
                          "full_shard) or remove fsdp_config."))
        if self.node_rank >= self.nnodes:
            found.append(("node_rank", f"node_rank {self.node_rank} is not below nnodes {self.nnodes}; number the "
                          f"nodes 0 to {self.nnodes - 1}."))
        if not self.do_train:
            found.append(("do_train", "do_train: false has nothing to do in `ftkit train`; remove the key."))
        return found
