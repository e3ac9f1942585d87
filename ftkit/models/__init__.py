"""The one model loader every stage stands on: resolve a source, load it, decide what trains.

Flow: ``resolve_model_source`` (alias, directory, .gguf, Hugging Face, ModelScope) -> ``load_tokenizer``
(with the pad-token fix) and ``load_model`` (dtype from ``precision``, optional 4/8-bit) ->
``sync_special_tokens`` -> ``prepare_model_for_training`` (train), or ``load_for_inference`` (base +
merged adapters + tokenizer: chat, the forgetting guard's check, merge, serve, evaluate, quantize). transformers, peft, bitsandbytes and modelscope are imported inside the functions that
need them, so importing this package costs only torch.
"""

from ftkit.models.adapters import (
    apply_freeze,
    apply_full,
    apply_lora,
    decoder_layers,
    enable_gradient_checkpointing,
    find_lora_targets,
    linear_module_names,
    prepare_model_for_training,
    trainable_parameter_summary,
)
from ftkit.models.embedded import EMBEDDED_ALIAS, embedded_gguf_path, ensure_embedded_model
from ftkit.models.inference import (
    InferenceModel,
    LazyModel,
    LoadOptions,
    adapter_tokenizer_source,
    load_for_inference,
)
from ftkit.models.loader import (
    PadTokenFix,
    ensure_pad_token,
    load_model,
    load_tokenizer,
    quantization_config,
    stop_token_ids,
    sync_special_tokens,
)
from ftkit.models.parameters import cast_weights, is_quantized, upcast_trainable
from ftkit.models.precision import (
    MixedPrecision,
    checkpoint_dtype,
    cpu_has_fast_bf16,
    default_device,
    inference_dtype,
    parse_dtype,
    resolve_load_dtype,
    resolve_mixed_precision,
)
from ftkit.models.saved_adapters import (
    adapter_key_with_marker_dot,
    attach_adapter,
    check_adapter_matches,
    load_adapters,
)
from ftkit.models.source import (
    ModelSource,
    adapter_base_name,
    adapter_dirs_from_config,
    hub_offline,
    model_source_from_config,
    resolve_adapter_dir,
    resolve_model_source,
    wants_modelscope,
)

__all__ = [
    "adapter_key_with_marker_dot",
    "EMBEDDED_ALIAS",
    "InferenceModel",
    "LazyModel",
    "LoadOptions",
    "MixedPrecision",
    "ModelSource",
    "PadTokenFix",
    "adapter_base_name",
    "adapter_dirs_from_config",
    "adapter_tokenizer_source",
    "apply_freeze",
    "apply_full",
    "apply_lora",
    "attach_adapter",
    "cast_weights",
    "check_adapter_matches",
    "checkpoint_dtype",
    "cpu_has_fast_bf16",
    "decoder_layers",
    "default_device",
    "embedded_gguf_path",
    "enable_gradient_checkpointing",
    "ensure_embedded_model",
    "ensure_pad_token",
    "find_lora_targets",
    "hub_offline",
    "inference_dtype",
    "is_quantized",
    "linear_module_names",
    "load_adapters",
    "load_for_inference",
    "load_model",
    "load_tokenizer",
    "model_source_from_config",
    "parse_dtype",
    "prepare_model_for_training",
    "quantization_config",
    "resolve_adapter_dir",
    "resolve_load_dtype",
    "resolve_mixed_precision",
    "resolve_model_source",
    "stop_token_ids",
    "sync_special_tokens",
    "trainable_parameter_summary",
    "upcast_trainable",
    "wants_modelscope",
]
