"""Keys ftkit does not define itself but accepts: LLaMA-Factory's and transformers' names.

ftkit promises LLaMA-Factory users that their YAML files carry over: every key LLaMA-Factory accepts is
either honoured or accepted with a one-line note saying how ftkit treats it; only keys nobody knows are
errors. ``ftkit.config.loading`` classifies each key that is not a field of the stage schema with three
tables, checked in this order:

``KEY_ALIASES``
    Another tool's name for an ftkit field with exactly the same meaning (``evaluation_strategy`` is
    transformers' old name for ``eval_strategy``). The value is read as the ftkit field, with a note.
``FOREIGN_KEYS``
    Every other LLaMA-Factory key (model, data, fine-tuning, generating, evaluation and its own training
    arguments), plus the transformers ``TrainingArguments`` fields ftkit cannot simply pass on, each with
    a one-line ``note`` and LLaMA-Factory's ``default``. With ``refuse_other_values`` the key is accepted
    (with its note) only at that default: a different value is an error quoting the note, because ftkit
    cannot honour it and ignoring it would train something other than what the user asked for. Without
    it any value is accepted and the note says how ftkit treats it (usually: ignored, and why that is
    harmless).
``TRAINING_ARGUMENT_TYPES``
    transformers ``TrainingArguments`` / ``Seq2SeqTrainingArguments`` fields that ftkit passes through
    unchanged (``config.extra_training_args``), with a simple type (``bool``, ``int``, ``float``, ``str``,
    ``list``, ``dict`` or a ``|`` union) checked before any heavy import. Train stages only.

A key appears in at most one table and never in a stage schema (the schema fields are honoured directly).

Where the lists come from:

* LLaMA-Factory v0.9.x, ``src/llamafactory/hparams/``: ``model_args.py``, ``data_args.py``,
  ``finetuning_args.py``, ``generating_args.py``, ``training_args.py`` (Ray, profiler and FP8 arguments),
  ``evaluation_args.py``, from v0.9.0 to the v0.9.6 development branch, including keys later renamed or
  removed (``image_resolution``, ``image_dir``, ``new_special_tokens``, ``use_cache``, ``train_mm_proj_only``).
  Left out: ``MegatronBridgeArguments`` (``tensor_model_parallel_size``, ...) and mcore_adapter's training
  arguments, which LLaMA-Factory parses only under ``USE_MEGATRON_BRIDGE=1`` / ``USE_MCA=1``.
* transformers 5.24 ``Seq2SeqTrainingArguments`` (``dataclasses.fields``), plus the fields of the
  transformers 4.41-4.57 releases that LLaMA-Factory v0.9.x ran on and transformers 5 removed
  (``evaluation_strategy``, ``no_cuda``, ``save_safetensors``, ...).

Regenerating ``TRAINING_ARGUMENT_TYPES``: list the ``Seq2SeqTrainingArguments`` fields ftkit does not
define, flatten each annotation to the simple names above (``None`` dropped, enums and ``Literal`` as
``str``), then review by hand: a field that would fight ftkit's own handling, or means nothing to it,
moves to ``FOREIGN_KEYS`` with a note instead::

    import dataclasses, typing
    from transformers import Seq2SeqTrainingArguments as Args
    from ftkit.config import MergeConfig, TrainConfig

    ours, hints = set(TrainConfig.model_fields) | set(MergeConfig.model_fields), typing.get_type_hints(Args)
    for f in dataclasses.fields(Args):
        if f.init and f.name not in ours:
            print(f.name, hints[f.name])

``tests/test_foreign_keys.py`` fails when a transformers upgrade adds a field no table covers. The
tables are literals: this module imports nothing heavy, so validation runs before torch is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ForeignKey:
    """A key another tool accepts: how ftkit treats it, in one line."""

    note: str
    default: Any = None
    refuse_other_values: bool = False


def _ignored(note: str, default: Any = None) -> ForeignKey:
    """Accepted with any value; the note says why ignoring it is harmless."""
    return ForeignKey(note, default)


def _refused(note: str, default: Any = None) -> ForeignKey:
    """Accepted only at LLaMA-Factory's default; any other value is an error quoting the note."""
    return ForeignKey(note, default, refuse_other_values=True)


# ---- notes shared by a family of keys ---------------------------------------------------------------

_MULTI_DEVICE = ("ftkit spreads a run over devices with deepspeed: (ZeRO 0-3, offload) or fsdp: (full or gradient "
                 "sharding), data parallel; use one of those keys instead.")
_PIPELINE = ("ftkit does not pipeline layers across devices (the model would need cutting into stages); "
             "deepspeed: ds_z3 or fsdp: full_shard split a model with no rewrite.")
_COMPILE = "ignored: ftkit's loss calls the decoder and head itself, so a compiled model would never run; no faster on CPU."
_TEXT_ONLY = "ignored: ftkit trains text-only models, so image, video and audio settings have no effect."
_MULTIMODAL_FREEZE = "ignored: ftkit trains text-only models, which have no vision tower or multimodal projector."
_NEW_TOKENS = "ftkit does not add tokens to the tokenizer or resize embeddings; use a model whose vocabulary has them."
_INFER_ENGINE = "ignored by train and merge-lora: an inference-engine setting; ftkit serve has its own engine options."
_KT = "ignored: only used with use_kt (KTransformers), which ftkit does not support."
_EXPORT_QUANT = "ignored: only used with export_quantization_bit; merge-lora exports full precision (ftkit quantize makes quantized exports)."
_GENERATION = "ignored by train and merge-lora: a generation setting for chat and serve (training computes loss only)."
_GEN_LENGTH = "ignored by train and merge-lora: a generation length for chat and serve; the training sequence length is cutoff_len."
_LF_EVAL = "ignored: a `llamafactory-cli eval` (MMLU, C-Eval, CMMLU) setting; ftkit evaluate takes its own config."
_PREFERENCE = "ignored: a reward-model, PPO, DPO or KTO setting; ftkit train runs stages pt and sft."
_OFT = "ignored: an OFT setting; ftkit's finetuning_type is lora, qlora, full or freeze."
_GALORE = "ignored: only used with use_galore; transformers' galore_* optimizers take optim_target_modules and optim_args."
_APOLLO = "ignored: only used with use_apollo; transformers' apollo_* optimizers take optim_target_modules and optim_args."
_BADAM = "ignored: only used with use_badam, which ftkit does not support."
_SWANLAB = "ignored: only used with use_swanlab, which ftkit does not support."
_OWN_OPTIMIZERS = "ftkit only offers the optimizers transformers has (the optim key); this one is not among them."
_STANDARD_LOSS = "ftkit trains with the standard token cross-entropy loss; DFT, ASFT and EAFT losses are not supported."
_RAY = "ignored: a Ray launcher setting (LLaMA-Factory with USE_RAY=1); ftkit does not launch through Ray."
_PROFILER = "ignored: only used with enable_torch_profiler; ftkit has no built-in torch profiler."
_FP8 = "ignored: only used with fp8, which ftkit does not support."
_HUB = "ignored: only used when pushing to the Hugging Face Hub, which ftkit does not do."
_TRACKIO = "ignored: a Trackio logger setting; ftkit passes report_to: trackio to transformers without settings."
_CHECKPOINTING_KWARGS = (
    "ignored: ftkit decides on non-reentrant checkpointing itself (see gradient_checkpointing) and passes no "
    "kwargs."
)
_BEST_MODEL = "ignored: only used with load_best_model_at_end, which ftkit does not support."
_NO_METRICS = "ignored: ftkit computes no custom metrics; evaluation during training reports eval loss only."
_USE_CPU = "ftkit picks the device itself; to train on the CPU, hide the GPUs with CUDA_VISIBLE_DEVICES=''."
_GENERATE_ONLY = "ignored: only used with predict_with_generate, which ftkit train does not do."
_AMP = "ignored: transformers 5 always uses torch autocast for mixed precision (bf16 or fp16)."


FOREIGN_KEYS: dict[str, ForeignKey] = {
    # ---- LLaMA-Factory model_args.py: BaseModelArguments ------------------------------------------
    "adapter_folder": _refused("ftkit loads each adapter from the directory named in adapter_name_or_path; put the full path there."),
    "use_fast_tokenizer": _refused("ftkit always uses the fast (tokenizers) tokenizer; slow tokenizers are not supported.", True),
    "resize_vocab": _refused(_NEW_TOKENS, False),
    "split_special_tokens": _refused("ftkit encodes special tokens as single tokens, as the chat template expects; splitting them is not supported.", False),
    "add_tokens": _refused(_NEW_TOKENS),
    "add_special_tokens": _refused(_NEW_TOKENS),
    "new_special_tokens": _refused(_NEW_TOKENS),  # LLaMA-Factory <= 0.9.2's name for add_special_tokens
    "new_special_tokens_config": _refused(_NEW_TOKENS),
    "init_special_tokens": _ignored("ignored: only used when adding tokens, which ftkit does not do.", "vocab_mean_noise"),
    "freeze_original_embeddings": _ignored("ignored: only used with resize_vocab, which ftkit does not do.", False),
    "low_cpu_mem_usage": _ignored("ignored: transformers 5 always loads weights memory-efficiently and dropped this option.", True),
    "rope_scaling": _refused("ftkit keeps the model's own RoPE settings; context extension (linear, dynamic, yarn, llama3) is not supported."),
    "shift_attn": _refused("ftkit does not implement LongLoRA's shift short attention (S^2-Attn).", False),
    "mixture_of_depths": _refused("ftkit does not convert or load mixture-of-depths models."),
    "use_unsloth": _ignored("ignored: ftkit does not use Unsloth; training runs on plain transformers and peft.", False),
    "use_unsloth_gc": _ignored("ignored: ftkit uses transformers' gradient checkpointing (see disable_gradient_checkpointing).", False),
    "enable_liger_kernel": _ignored("ignored: ftkit does not patch in Liger kernels itself; use_liger_kernel: true asks transformers to (needs liger-kernel).", False),
    "moe_aux_loss_coef": _refused("ftkit leaves a mixture-of-experts model's router loss as its config sets it; another coefficient is not supported."),
    "use_reentrant_gc": _ignored("ignored: ftkit always uses non-reentrant checkpointing; the gradients are the same either way.", True),
    "upcast_layernorm": _refused("ftkit keeps layer norms in the training dtype; upcasting them to fp32 is not supported.", False),
    "upcast_lmhead_output": _refused("ftkit keeps the output head's logits in the training dtype; upcasting them to fp32 is not supported.", False),
    "train_from_scratch": _refused("ftkit fine-tunes the pretrained weights; random initialisation is not supported.", False),
    "infer_backend": _ignored("ignored by train and merge-lora: ftkit serve picks its engine (built-in or vLLM) itself.", "huggingface"),
    "offload_folder": _ignored("ignored: ftkit does not offload weights to disk.", "offload"),
    "use_kv_cache": _ignored("ignored by train and merge-lora: a generation setting; training never uses the KV cache.", True),
    "use_cache": _ignored("ignored: training runs with the KV cache off; LLaMA-Factory <= 0.9.1 used this key for generation only.", True),
    "use_v1_kernels": _ignored("ignored: ftkit does not swap in LLaMA-Factory's fused kernels; the model runs transformers' own.", False),
    "infer_dtype": _refused("train has no inference dtype and merge-lora reads export_dtype (same values); rename the key to export_dtype for merge-lora.", "auto"),
    "om_hub_token": _ignored("ignored: ftkit downloads from Hugging Face or ModelScope (use_modelscope), not from Modelers.", None),
    "print_param_status": _ignored("ignored: a LLaMA-Factory debugging printout of every parameter.", False),
    # ---- model_args.py: QuantizationArguments (quantization_bit/method/type, double_quantization are fields)
    "quantization_device_map": _ignored("ignored: an inference device map for 4-bit models; ftkit places the model itself."),
    "fp8": _refused("ftkit does not train in FP8; use bf16 or fp16 mixed precision.", False),
    "fp8_backend": _ignored(_FP8, "auto"),
    "fp8_enable_fsdp_float8_all_gather": _ignored(_FP8, False),
    # ---- model_args.py: ProcessorArguments ---------------------------------------------------------
    "image_max_pixels": _ignored(_TEXT_ONLY, 768 * 768),
    "image_min_pixels": _ignored(_TEXT_ONLY, 32 * 32),
    "image_do_pan_and_scan": _ignored(_TEXT_ONLY, False),
    "crop_to_patches": _ignored(_TEXT_ONLY, False),
    "video_max_pixels": _ignored(_TEXT_ONLY, 256 * 256),
    "video_min_pixels": _ignored(_TEXT_ONLY, 16 * 16),
    "video_fps": _ignored(_TEXT_ONLY, 2.0),
    "video_maxlen": _ignored(_TEXT_ONLY, 128),
    "use_audio_in_video": _ignored(_TEXT_ONLY, False),
    "audio_sampling_rate": _ignored(_TEXT_ONLY, 16000),
    "image_resolution": _ignored(_TEXT_ONLY, 512 * 512),  # LLaMA-Factory 0.9.1
    "video_resolution": _ignored(_TEXT_ONLY, 128 * 128),  # LLaMA-Factory 0.9.1
    # ---- model_args.py: ExportArguments (export_dir, export_size are merge-lora fields) ---------------
    "export_device": _ignored("ignored: ftkit chooses the device for merging itself.", "cpu"),
    "export_quantization_bit": _refused("merge-lora exports full-precision weights; make a quantized export with ftkit quantize."),
    "export_quantization_dataset": _ignored(_EXPORT_QUANT),
    "export_quantization_nsamples": _ignored(_EXPORT_QUANT, 128),
    "export_quantization_maxlen": _ignored(_EXPORT_QUANT, 1024),
    "export_legacy_format": _refused("ftkit writes safetensors only; .bin exports are not supported.", False),
    "export_hub_model_id": _refused("ftkit does not push to the Hugging Face Hub; upload export_dir yourself (huggingface-cli upload)."),
    # ---- model_args.py: VllmArguments, SGLangArguments ----------------------------------------------
    "vllm_maxlen": _ignored(_INFER_ENGINE, 4096),
    "vllm_gpu_util": _ignored(_INFER_ENGINE, 0.7),
    "vllm_enforce_eager": _ignored(_INFER_ENGINE, False),
    "vllm_max_lora_rank": _ignored(_INFER_ENGINE, 32),
    "vllm_config": _ignored(_INFER_ENGINE),
    "sglang_maxlen": _ignored(_INFER_ENGINE, 4096),
    "sglang_mem_fraction": _ignored(_INFER_ENGINE, 0.7),
    "sglang_tp_size": _ignored(_INFER_ENGINE, -1),
    "sglang_config": _ignored(_INFER_ENGINE),
    "sglang_lora_backend": _ignored(_INFER_ENGINE, "triton"),
    # ---- model_args.py: KTransformersArguments (both generations of its keys) -----------------------
    "use_kt": _refused("ftkit does not use KTransformers; training runs on plain transformers and peft.", False),
    "kt_optimize_rule": _ignored(_KT),
    "cpu_infer": _ignored(_KT, 32),
    "chunk_size": _ignored(_KT, 8192),
    "mode": _ignored(_KT, "normal"),
    "kt_maxlen": _ignored(_KT, 4096),
    "kt_use_cuda_graph": _ignored(_KT, True),
    "kt_mode": _ignored(_KT, "normal"),
    "kt_force_think": _ignored(_KT, False),
    "kt_cpu_activation": _ignored(_KT),
    "kt_weight_path": _ignored(_KT),
    "kt_non_expert_weight_path": _ignored(_KT),
    "kt_expert_checkpoint_path": _ignored(_KT),
    "kt_use_lora_experts": _ignored(_KT),
    "kt_lora_expert_num": _ignored(_KT),
    "kt_lora_expert_intermediate_size": _ignored(_KT),
    "kt_config": _ignored(_KT),
    # ---- LLaMA-Factory data_args.py ------------------------------------------------------------------
    "media_dir": _ignored(_TEXT_ONLY),
    "image_dir": _ignored(_TEXT_ONLY),  # LLaMA-Factory 0.9.1's name for media_dir
    "streaming": _refused("ftkit tokenises each dataset once and caches it; streaming is not supported (max_samples keeps a big dataset small).", False),
    "buffer_size": _ignored("ignored: only used with streaming, which ftkit does not support.", 16384),
    "preprocessing_batch_size": _ignored("ignored: ftkit batches tokenisation its own way; the encoded examples are the same.", 1000),
    "eval_num_beams": _ignored(_GENERATE_ONLY),
    "ignore_pad_token_for_loss": _refused("ftkit never computes the loss on padding tokens.", True),
    "eval_on_each_dataset": _ignored("ignored: ftkit reports one eval loss over all eval datasets together.", False),
    "tool_format": _refused("ftkit renders tool calls with the chat template's own format; a separate tool_format is not supported."),
    "tokenized_path": _ignored("ignored: ftkit caches tokenised datasets itself (overwrite_cache: true rebuilds them); this path is neither read nor written."),
    "enable_thinking": _refused("ftkit renders reasoning models' conversations in the template's default thinking mode; changing it is not supported yet.", True),
    "reasoning_effort": _refused("ftkit renders conversations with the template's default reasoning effort; changing it is not supported yet.", "xhigh"),
    "preserve_thinking": _refused("ftkit keeps the template's default handling of earlier turns' thinking; overriding it is not supported yet."),
    "packing_strategy": _refused("ftkit packs examples by length only; semantic_aware packing is not supported.", "length"),
    "packing_similarity_threshold": _ignored("ignored: only used with packing_strategy semantic_aware, which ftkit does not support.", 0.7),
    "packing_embedding_model": _ignored(
        "ignored: only used with packing_strategy semantic_aware, which ftkit does not support.",
        "sentence-transformers/all-MiniLM-L6-v2",
    ),
    "data_shared_file_system": _ignored("ignored: ftkit tokenises in a single process, so there is no shared cache to coordinate.", False),
    # ---- LLaMA-Factory finetuning_args.py: LoraArguments --------------------------------------------
    # loraplus_lr_ratio, loraplus_lr_embedding, pissa_init, pissa_iter, pissa_convert are MethodSection fields
    "create_new_adapter": _refused(
        "with adapter_name_or_path ftkit keeps training that adapter; to start a new one on top, merge it first (ftkit merge-lora).",
        False,
    ),
    # ---- finetuning_args.py: OFTArguments -------------------------------------------------------------
    "module_dropout": _ignored(_OFT, 0.0),
    "oft_rank": _ignored(_OFT, 0),
    "oft_block_size": _ignored(_OFT, 32),
    "oft_target": _ignored(_OFT, "all"),
    # ---- finetuning_args.py: RLHFArguments ------------------------------------------------------------
    "pref_beta": _ignored(_PREFERENCE, 0.1),
    "pref_ftx": _ignored(_PREFERENCE, 0.0),
    "pref_bco_weight": _ignored(_PREFERENCE, 0.0),
    "pref_loss": _ignored(_PREFERENCE, "sigmoid"),
    "dpo_label_smoothing": _ignored(_PREFERENCE, 0.0),
    "kto_chosen_weight": _ignored(_PREFERENCE, 1.0),
    "kto_rejected_weight": _ignored(_PREFERENCE, 1.0),
    "simpo_gamma": _ignored(_PREFERENCE, 0.5),
    "ppo_buffer_size": _ignored(_PREFERENCE, 1),
    "ppo_epochs": _ignored(_PREFERENCE, 4),
    "ppo_score_norm": _ignored(_PREFERENCE, False),
    "ppo_target": _ignored(_PREFERENCE, 6.0),
    "ppo_whiten_rewards": _ignored(_PREFERENCE, False),
    "ref_model": _ignored(_PREFERENCE),
    "ref_model_adapters": _ignored(_PREFERENCE),
    "ref_model_quantization_bit": _ignored(_PREFERENCE),
    "reward_model": _ignored(_PREFERENCE),
    "reward_model_adapters": _ignored(_PREFERENCE),
    "reward_model_quantization_bit": _ignored(_PREFERENCE),
    "reward_model_type": _ignored(_PREFERENCE, "lora"),
    "ld_alpha": _ignored(_PREFERENCE),
    # ---- finetuning_args.py: GaloreArguments, ApolloArguments, BAdamArgument ------------------------
    "use_galore": _refused("ftkit has no GaLore switch; optim: galore_adamw with optim_target_modules gives transformers' GaLore (needs galore-torch).", False),
    "galore_target": _ignored(_GALORE, "all"),
    "galore_rank": _ignored(_GALORE, 16),
    "galore_update_interval": _ignored(_GALORE, 200),
    "galore_scale": _ignored(_GALORE, 2.0),
    "galore_proj_type": _ignored(_GALORE, "std"),
    "galore_layerwise": _ignored(_GALORE, False),
    "use_apollo": _refused("ftkit has no APOLLO switch; optim: apollo_adamw with optim_target_modules gives transformers' APOLLO (needs apollo-torch).", False),
    "apollo_target": _ignored(_APOLLO, "all"),
    "apollo_rank": _ignored(_APOLLO, 16),
    "apollo_update_interval": _ignored(_APOLLO, 200),
    "apollo_scale": _ignored(_APOLLO, 32.0),
    "apollo_proj": _ignored(_APOLLO, "random"),
    "apollo_proj_type": _ignored(_APOLLO, "std"),
    "apollo_scale_type": _ignored(_APOLLO, "channel"),
    "apollo_layerwise": _ignored(_APOLLO, False),
    "apollo_scale_front": _ignored(_APOLLO, False),
    "use_badam": _refused(_OWN_OPTIMIZERS, False),
    "badam_mode": _ignored(_BADAM, "layer"),
    "badam_start_block": _ignored(_BADAM),
    "badam_switch_mode": _ignored(_BADAM, "ascending"),
    "badam_switch_interval": _ignored(_BADAM, 50),
    "badam_update_ratio": _ignored(_BADAM, 0.05),
    "badam_mask_mode": _ignored(_BADAM, "adjacent"),
    "badam_verbose": _ignored(_BADAM, 0),
    # ---- finetuning_args.py: SwanLabArguments ---------------------------------------------------------
    "use_swanlab": _refused("ftkit logs to tensorboard or wandb (report_to); SwanLab is not supported.", False),
    "swanlab_project": _ignored(_SWANLAB, "llamafactory"),
    "swanlab_workspace": _ignored(_SWANLAB),
    "swanlab_run_name": _ignored(_SWANLAB),
    "swanlab_mode": _ignored(_SWANLAB, "cloud"),
    "swanlab_api_key": _ignored(_SWANLAB),
    "swanlab_logdir": _ignored(_SWANLAB),
    "swanlab_lark_webhook_url": _ignored(_SWANLAB),
    "swanlab_lark_secret": _ignored(_SWANLAB),
    # ---- finetuning_args.py: FinetuningArguments (stage, finetuning_type, plot_loss are fields) -------
    "pure_bf16": _refused("ftkit uses bf16 as mixed precision (bf16: true); training pure bf16 weights is not supported.", False),
    "use_llama_pro": _refused("ftkit does not expand blocks (LLaMA Pro); to train chosen layers only, use finetuning_type: freeze.", False),
    "use_adam_mini": _refused(_OWN_OPTIMIZERS, False),
    "use_muon": _refused(_OWN_OPTIMIZERS, False),
    "use_mca": _refused("ftkit does not train with Megatron-Core; training runs on transformers, with DeepSpeed or FSDP across devices.", False),
    "use_megatron_bridge": _refused("ftkit does not train with Megatron Bridge; training runs on transformers, with DeepSpeed or FSDP across devices.", False),
    "use_hyper_parallel": _refused(_MULTI_DEVICE, False),
    "hyper_parallel_args": _ignored("ignored: only used with use_hyper_parallel, which ftkit refuses."),
    "hyper_parallel_cp_size": _ignored("ignored: only used with use_hyper_parallel, which ftkit refuses.", 1),
    "use_dft_loss": _refused(_STANDARD_LOSS, False),
    "use_asft_loss": _refused(_STANDARD_LOSS, False),
    "asft_alpha": _ignored("ignored: only used with use_asft_loss, which ftkit does not support.", 0.1),
    "use_eaft_loss": _refused(_STANDARD_LOSS, False),
    "eaft_alpha": _ignored("ignored: only used with use_eaft_loss, which ftkit does not support.", 1.0),
    "freeze_vision_tower": _ignored(_MULTIMODAL_FREEZE, True),
    "freeze_multi_modal_projector": _ignored(_MULTIMODAL_FREEZE, True),
    "freeze_language_model": _ignored(_MULTIMODAL_FREEZE, False),
    "train_mm_proj_only": _ignored(_MULTIMODAL_FREEZE, False),  # LLaMA-Factory <= 0.9.1
    "num_mtp_layers": _refused("ftkit does not train multi-token-prediction (MTP) layers.", 0),
    "mtp_loss_weight": _ignored("ignored: only used with num_mtp_layers, which ftkit does not support.", 0.0),
    "compute_accuracy": _ignored(_NO_METRICS, False),
    "disable_shuffling": _refused("ftkit always shuffles the training set (seeded, so resume is exact); training in file order is not supported.", False),
    "early_stopping_steps": _refused("ftkit has no early stopping; bound the run with max_steps or num_train_epochs."),
    "include_effective_tokens_per_second": _ignored("ignored: ftkit always reports tokens per second (non-padding tokens) in its run summary.", False),
    # ---- LLaMA-Factory generating_args.py --------------------------------------------------------------
    "do_sample": _ignored(_GENERATION, True),
    "temperature": _ignored(_GENERATION, 0.95),
    "top_p": _ignored(_GENERATION, 0.7),
    "top_k": _ignored(_GENERATION, 50),
    "num_beams": _ignored(_GENERATION, 1),
    "max_length": _ignored(_GEN_LENGTH, 1024),
    "max_new_tokens": _ignored(_GEN_LENGTH, 1024),
    "repetition_penalty": _ignored(_GENERATION, 1.0),
    "length_penalty": _ignored(_GENERATION, 1.0),
    "skip_special_tokens": _ignored(_GENERATION, True),
    # ---- LLaMA-Factory evaluation_args.py (seed is a field) -------------------------------------------
    "task": _ignored(_LF_EVAL),
    "task_dir": _ignored(_LF_EVAL, "evaluation"),
    "batch_size": _ignored("ignored: `llamafactory-cli eval`'s batch size; training uses per_device_train_batch_size.", 4),
    "lang": _ignored(_LF_EVAL, "en"),
    "n_shot": _ignored(_LF_EVAL, 5),
    "save_dir": _ignored(_LF_EVAL),
    "download_mode": _ignored(_LF_EVAL, "reuse_dataset_if_exists"),
    # ---- LLaMA-Factory training_args.py: RayArguments, ProfilerArguments ------------------------------
    "ray_run_name": _ignored(_RAY),
    "ray_storage_path": _ignored(_RAY, "./saves"),
    "ray_storage_filesystem": _ignored(_RAY),
    "ray_num_workers": _ignored(_RAY, 1),
    "ray_num_cpus_per_worker": _ignored(_RAY, 10),
    "resources_per_worker": _ignored(_RAY, {"GPU": 1}),
    "placement_strategy": _ignored(_RAY, "PACK"),
    "ray_init_kwargs": _ignored(_RAY),
    "enable_torch_profiler": _ignored("ignored: ftkit has no built-in torch profiler.", False),
    "profiler_output_dir": _ignored(_PROFILER),
    "profiler_wait_steps": _ignored(_PROFILER, 1),
    "profiler_warmup_steps": _ignored(_PROFILER, 1),
    "profiler_active_steps": _ignored(_PROFILER, 1),
    "profiler_repeat": _ignored(_PROFILER, 1),
    "profiler_record_shapes": _ignored(_PROFILER, True),
    "profiler_profile_memory": _ignored(_PROFILER, True),
    "profiler_with_stack": _ignored(_PROFILER, True),
    "profile_modules": _ignored(_PROFILER),
    # ---- transformers 5.24 (Seq2Seq)TrainingArguments fields ftkit does not pass through -------------
    "gradient_checkpointing_kwargs": _ignored(_CHECKPOINTING_KWARGS),
    "activation_checkpointing_kwargs": _ignored(_CHECKPOINTING_KWARGS),
    "label_smoothing_factor": _refused("ftkit's loss is plain token cross-entropy; label smoothing is not supported.", 0.0),
    "disable_tqdm": _ignored("ignored: ftkit replaces transformers' tqdm bars with its own progress line.", False),
    "load_best_model_at_end": _refused(
        "ftkit keeps the last weights as the result; to use an earlier checkpoint-N directory, load it as the adapter or model.", False
    ),
    "metric_for_best_model": _ignored(_BEST_MODEL),
    "greater_is_better": _ignored(_BEST_MODEL),
    "project": _ignored(_TRACKIO, "huggingface"),
    "trackio_space_id": _ignored(_TRACKIO),
    "trackio_bucket_id": _ignored(_TRACKIO),
    "trackio_static_space_id": _ignored(_TRACKIO),
    "prediction_loss_only": _ignored("accepted; ftkit's evaluation during training computes eval loss only, whatever this says.", False),
    "include_for_metrics": _ignored(_NO_METRICS, []),
    "batch_eval_metrics": _ignored(_NO_METRICS, False),
    "save_only_model": _refused(
        "exact resume needs the optimizer, scheduler and RNG state in every checkpoint, so ftkit always saves them.", False
    ),
    "push_to_hub": _refused("ftkit does not push to the Hugging Face Hub; upload output_dir yourself (huggingface-cli upload).", False),
    "hub_token": _ignored(_HUB),
    "hub_private_repo": _ignored(_HUB),
    "hub_model_id": _ignored(_HUB),
    "hub_strategy": _ignored(_HUB, "every_save"),
    "hub_always_push": _ignored(_HUB, False),
    "hub_revision": _ignored(_HUB),
    "ignore_data_skip": _refused("ftkit resumes exactly, so it always skips the batches a checkpoint has already trained on.", False),
    "use_cpu": _refused(_USE_CPU, False),
    "parallelism_config": _refused(_MULTI_DEVICE),
    "remove_unused_columns": _ignored("ignored: ftkit builds every batch itself from encoded examples, so there are no unused columns.", True),
    "label_names": _ignored("ignored: ftkit's batches always carry their targets as `labels`."),
    "train_sampling_strategy": _refused(
        "ftkit picks the sampler itself: random, or length-grouped with group_by_length when padding_free and packing are off.",
        "random",
    ),
    "length_column_name": _ignored("ignored: ftkit measures example lengths for group_by_length itself.", "length"),
    "do_eval": _ignored(
        "accepted; ftkit evaluates whenever there is an eval set (val_size or eval_dataset), on the eval_strategy schedule.", False
    ),
    "do_predict": _refused("ftkit train does not generate predictions; generating on a test set belongs to ftkit evaluate.", False),
    "local_rank": _ignored("ignored: set by the multi-process launcher that ftkit train starts itself (nproc_per_node, nnodes).", -1),
    "sortish_sampler": _ignored("ignored: transformers no longer uses it (it only ever applied to seq2seq models).", False),
    "predict_with_generate": _refused(
        "ftkit's evaluation during training computes loss only (LLaMA-Factory refuses it while training too); "
        "generation metrics belong to ftkit evaluate.",
        False,
    ),
    "generation_max_length": _ignored(_GENERATE_ONLY),
    "generation_num_beams": _ignored(_GENERATE_ONLY),
    "generation_config": _ignored(_GENERATE_ONLY),
    # ---- transformers 4.41-4.57 TrainingArguments fields removed in transformers 5 -------------------
    "adafactor": _refused("transformers 5 removed this switch; write optim: adafactor instead.", False),
    "dispatch_batches": _ignored("ignored: removed from transformers; multi-device batch dispatch now lives in accelerator_config."),
    "split_batches": _ignored("ignored: removed from transformers; multi-device batch splitting now lives in accelerator_config."),
    "fp16_backend": _ignored(_AMP, "auto"),
    "half_precision_backend": _ignored(_AMP, "auto"),
    "fp16_opt_level": _ignored("ignored: an apex setting; transformers 5 always uses torch autocast.", "O1"),
    "fsdp_min_num_params": _refused("transformers 5 reads it from fsdp_config: write fsdp_config: {min_num_params: N}.", 0),
    "fsdp_transformer_layer_cls_to_wrap": _refused(
        "transformers 5 reads it from fsdp_config: write fsdp_config: {transformer_layer_cls_to_wrap: [ClassName]}.", None),
    "include_inputs_for_metrics": _ignored(_NO_METRICS, False),
    "include_tokens_per_second": _ignored("ignored: removed in transformers 5; include_num_input_tokens_seen counts tokens instead.", False),
    "jit_mode_eval": _ignored("ignored: removed in transformers 5 (TorchScript evaluation).", False),
    "mp_parameters": _ignored("ignored: a SageMaker model-parallel setting, removed in transformers 5.", ""),
    "no_cuda": _refused(_USE_CPU, False),
    "past_index": _ignored("ignored: removed in transformers 5 (only Transformer-XL and XLNet used it).", -1),
    "push_to_hub_model_id": _ignored(_HUB),
    "push_to_hub_organization": _ignored(_HUB),
    "push_to_hub_token": _ignored(_HUB),
    "ray_scope": _ignored("ignored: a Ray Tune hyperparameter-search setting; ftkit does not run hyperparameter searches.", "last"),
    "save_safetensors": _refused("ftkit always saves safetensors; .bin checkpoints are not supported.", True),
    "torchdynamo": _ignored(_COMPILE),
    "torch_compile": _ignored(_COMPILE, False),
    "torch_compile_backend": _ignored(_COMPILE),
    "torch_compile_mode": _ignored(_COMPILE),


    "pipeline_parallel_size": _refused(_PIPELINE, 1),
    "pipeline_model_parallel_size": _refused(_PIPELINE, 1),
    "tpu_metrics_debug": _ignored("ignored: ftkit does not train on TPUs.", False),
    "tpu_num_cores": _ignored("ignored: ftkit does not train on TPUs."),
    "use_ipex": _ignored("ignored: ftkit does not use Intel Extension for PyTorch (transformers 5 dropped this option).", False),
    "use_legacy_prediction_loop": _ignored("ignored: removed in transformers 5.", False),
    "use_mps_device": _ignored("ignored: transformers uses Apple MPS automatically when it is available.", False),
}


KEY_ALIASES: dict[str, str] = {
    "activation_checkpointing": "gradient_checkpointing",  # transformers 5's new name
    # transformers < 4.46 (LLaMA-Factory <= 0.9.1 examples wrote it)
    "evaluation_strategy": "eval_strategy",
    # transformers' deprecated per-GPU names, removed in transformers 5
    "per_gpu_train_batch_size": "per_device_train_batch_size",
    "per_gpu_eval_batch_size": "per_device_eval_batch_size",
    # TRL's SFTConfig names
    "max_seq_length": "cutoff_len",
    "dataset_num_proc": "preprocessing_num_workers",
    # AdaLoRA's switch in scripts written for peft (LLaMA-Factory has none)
    "use_adalora": "adaptive_rank",
    # the quantization seed's name for the modules kept in high precision (ftkit quantize)
    "modules_to_keep_fp16": "exclude_modules",
}


# transformers 5.24 (Seq2Seq)TrainingArguments fields passed through unchanged (generated, then reviewed).
TRAINING_ARGUMENT_TYPES: dict[str, str] = {
    # optimizer and schedule
    "lr_scheduler_kwargs": "dict|str",
    "optim_args": "str",
    "adam_beta1": "float",
    "adam_beta2": "float",
    "adam_epsilon": "float",
    "optim_target_modules": "str|list",
    "average_tokens_across_devices": "bool",
    "neftune_noise_alpha": "float",
    "auto_find_batch_size": "bool",
    # precision, compilation, memory
    "bf16_full_eval": "bool",
    "fp16_full_eval": "bool",
    "tf32": "bool",
    "use_liger_kernel": "bool",
    "liger_kernel_config": "dict",
    "torch_empty_cache_steps": "int",
    # logging
    "logging_strategy": "str",
    "logging_first_step": "bool",
    "log_on_each_node": "bool",
    "logging_nan_inf_filter": "bool",
    "include_num_input_tokens_seen": "str|bool",
    "log_level": "str",
    "log_level_replica": "str",
    "skip_memory_metrics": "bool",
    "debug": "str|list",
    # evaluation
    "eval_delay": "float",
    "eval_on_start": "bool",
    "eval_do_concat_batches": "bool",
    "eval_use_gather_object": "bool",
    "eval_accumulation_steps": "int",
    # checkpoints and reproducibility
    "save_on_each_node": "bool",
    "enable_jit_checkpoint": "bool",
    "restore_callback_states_from_checkpoint": "bool",
    "full_determinism": "bool",
    # data loading
    "accelerator_config": "dict|str",
    "dataloader_drop_last": "bool",
    "dataloader_pin_memory": "bool",
    "dataloader_persistent_workers": "bool",
    "dataloader_prefetch_factor": "int",
    "dataloader_multiprocessing_context": "str",
    "dataloader_in_order": "bool",
    # distributed data parallel (nproc_per_node > 1, deepspeed, fsdp)
    "ddp_find_unused_parameters": "bool",
    "ddp_bucket_cap_mb": "int",
    "ddp_broadcast_buffers": "bool",
    "ddp_static_graph": "bool",
    "ddp_backend": "str",
}
