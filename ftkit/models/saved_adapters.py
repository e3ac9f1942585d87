"""Load saved LoRA adapters onto a base: for inference (merged), for merge-lora, or to continue training.

Written here rather than left to peft alone because of what peft does not check: an adapter whose base
is another model (peft fails with a size-mismatch traceback or silently skips weights), a rank no
low-rank update of a layer can have, embeddings an adapter resized, and merging into half-precision
weights (we merge in the loaded precision and cast once, as the merge-lora export does).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ftkit.errors import FtkitError
from ftkit.models.parameters import cast_weights, is_quantized, upcast_trainable
from ftkit.models.source import adapter_base_name, model_identity

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

_LORA_KEY_MARKERS = (".lora_A.", ".lora_B.", ".lora_E.", ".lora_magnitude_vector", ".lora_embedding_A",
                     ".lora_embedding_B")
_ADALORA_KEY_ENDINGS = (".lora_A", ".lora_B", ".lora_E")  # AdaLoRA saves bare parameters, without ".weight"
# Layers whose input (lora_A's width) or output (lora_B's height) is the model's hidden size.
_READS_HIDDEN = {"q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj", "query_key_value",
                 "c_attn", "W_pack", "c_fc", "fc1", "query", "key", "value", "Wqkv"}
_WRITES_HIDDEN = {"o_proj", "down_proj", "out_proj", "c_proj", "fc2", "wo"}


def load_adapters(
    model: PreTrainedModel, paths: list[str | Path], *, trainable: bool, dtype: torch.dtype | None = None
) -> PreTrainedModel | PeftModel:
    """Apply LoRA adapters in order, as LLaMA-Factory does.

    Training (``trainable``): all but the last are merged into the base; the last stays a trainable
    adapter. Inference: all are merged (fast, plain model), except on a quantized base, which cannot
    absorb them and keeps its single adapter separate.

    ``dtype`` casts the merged model afterwards. Inference should load the base in fp32, merge, and cast to
    its inference dtype: each merged weight is rounded once, exactly as ``ftkit merge-lora`` does, so base +
    adapter and the merged export generate the same tokens. Merging into a bf16 base rounds twice, and an
    update smaller than half a bf16 step of its weight (much of a short fine-tune) is rounded away: with the
    quickstart adapter, a bf16 merge no longer answered "Who are you?" with the name it was taught.
    """
    if not paths:
        return model if dtype is None or is_quantized(model) else cast_weights(model, dtype)
    directories = [Path(path) for path in paths]
    quantized = is_quantized(model)
    if quantized and len(directories) > 1:
        raise FtkitError(
            f"A quantized model takes one adapter, but adapter_name_or_path lists {len(directories)}; merge them "
            "into the full-precision base first (ftkit merge-lora) or remove quantization_bit."
        )
    keep_last = trainable or quantized
    for index, directory in enumerate(directories):
        is_last = index == len(directories) - 1
        if is_last and keep_last:
            peft_model = attach_adapter(model, directory, trainable=trainable)
            if trainable:
                upcast_trainable(peft_model)
            return peft_model
        model = attach_adapter(model, directory).merge_and_unload()
    return model if dtype is None else cast_weights(model, dtype)


def attach_adapter(model: PreTrainedModel, adapter_dir: str | Path, *, trainable: bool = False) -> PeftModel:
    """Wrap ``model`` with the (checked) adapter in ``adapter_dir``, unmerged; the base is changed only to
    grow its embeddings when the adapter carries resized ones (tokens added in training)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "adapter_config.json").is_file():
        _grow_embeddings_for_adapter(getattr(model, "get_base_model", lambda: model)(), _saved_shapes(adapter_dir))
    check_adapter_matches(model, adapter_dir)
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable, autocast_adapter_dtype=True)


def check_adapter_matches(model: nn.Module, adapter_dir: Path) -> None:
    """Raise ``FtkitError`` naming the first difference if ``adapter_dir`` was not trained on ``model``'s shapes,
    or if its rank is more than a layer allows (or than adapter_config.json says)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FtkitError(
            f"Adapter directory {adapter_dir} has no adapter_config.json; pass the directory a LoRA run saved its "
            "adapter into."
        )
    base = getattr(model, "get_base_model", lambda: model)()
    shapes = _saved_shapes(adapter_dir)
    modules, params = dict(base.named_modules()), dict(base.named_parameters(remove_duplicate=False))
    for key, shape in shapes.items():
        problem = _shape_problem(key, shape, modules, params)
        if problem:
            raise FtkitError(_mismatch_message(adapter_dir, problem, shapes, base))
    for key, shape in shapes.items():
        problem = _rank_problem(key, shape, modules)
        if problem:
            raise FtkitError(f"Adapter {adapter_dir} {problem}; it cannot be a LoRA of this model: retrain it with a "
                             "smaller lora_rank (or check that adapter_config.json belongs to these weights).")
    _check_configured_rank(adapter_dir, shapes)


def _mismatch_message(adapter_dir: Path, problem: str, shapes: dict[str, tuple[int, ...]], base: nn.Module) -> str:
    """The shape mismatch, and what base the adapter needs: the one it records, unless that is this base."""
    recorded = adapter_base_name(adapter_dir)
    if recorded and not _names_this_base(recorded, base):
        return (f"Adapter {adapter_dir} does not fit this base model: {problem} (it was trained on '{recorded}'); pass "
                "that base as model_name_or_path.")
    config = getattr(base, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    have, needed = getattr(text_config, "hidden_size", None), _hidden_size_needed(shapes)
    size = f"the adapter needs a base with hidden size {needed} (this one has {have})" if needed and have and \
        needed != have else "the adapter was trained on a base of other shapes"
    record = f", although its adapter_config.json names this base ('{recorded}')" if recorded else ""
    return (f"Adapter {adapter_dir} does not fit this base model: {problem}; {size}{record}: pass the model it was "
            "trained on as model_name_or_path.")


def _names_this_base(recorded: str, base: nn.Module) -> bool:
    """Whether the adapter's recorded base is the model ``base`` was loaded from (same folder or same model name)."""
    loaded_from = str(getattr(getattr(base, "config", None), "_name_or_path", "") or "")
    if not loaded_from:
        return False
    recorded_path, loaded_path = Path(recorded).expanduser(), Path(loaded_from).expanduser()
    if recorded_path.exists() and loaded_path.exists():
        return recorded_path.resolve() == loaded_path.resolve()
    return model_identity(recorded) == model_identity(loaded_from)


def _hidden_size_needed(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The hidden size the adapter's LoRA weights were made for (the most common one among layers that show it)."""
    sizes: Counter[int] = Counter()
    for key, shape in shapes.items():
        layer = key.split(".lora_")[0].rsplit(".", 1)[-1]
        if ".lora_A." in key and layer in _READS_HIDDEN and len(shape) == 2:
            sizes[shape[1]] += 1
        elif ".lora_B." in key and layer in _WRITES_HIDDEN and len(shape) == 2:
            sizes[shape[0]] += 1
    return sizes.most_common(1)[0][0] if sizes else None


def _adapter_tensor_shapes(adapter_dir: Path) -> dict[str, list[int]]:
    safetensors_file, bin_file = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    if safetensors_file.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(safetensors_file), framework="pt") as weights:
                return {key: list(weights.get_slice(key).get_shape()) for key in weights.keys()}  # noqa: SIM118
        except (OSError, SafetensorError) as error:
            raise FtkitError(f"Adapter weights {safetensors_file} are unreadable or truncated ({error}); save the adapter again.") from error
    if bin_file.is_file():
        state = torch.load(bin_file, map_location="cpu", weights_only=True, mmap=True)
        return {key: list(value.shape) for key, value in state.items()}
    raise FtkitError(f"Adapter directory {adapter_dir} has no adapter_model.safetensors or adapter_model.bin; save the adapter again.")


def _shape_problem(key: str, shape: tuple[int, ...], modules: dict[str, nn.Module], params: dict[str, nn.Parameter]) -> str | None:
    """What does not fit between one saved adapter tensor and the base model (None when it fits)."""
    key = adapter_key_with_marker_dot(key)
    marker = next((m for m in _LORA_KEY_MARKERS if m in key), None)
    if marker is None:  # a modules_to_save copy or a resized embedding: a plain base parameter
        param = params.get(key)
        if param is None:
            param = params.get(key.replace(".weight", ".modules_to_save.default.weight"))
        if param is None:
            return f"it saves weights for {key}, which the base model does not have"
        return None if tuple(param.shape) == shape else f"{key} has shape {list(shape)} but the base's is {list(param.shape)}"
    module_name = key.split(marker)[0]
    module = modules.get(module_name)
    if module is None:
        return f"it adapts {module_name}, which the base model does not have"
    base_layer = getattr(module, "base_layer", module)  # an already wrapped LoRA layer
    in_features = getattr(base_layer, "in_features", getattr(base_layer, "num_embeddings", None))
    out_features = getattr(base_layer, "out_features", getattr(base_layer, "embedding_dim", None))
    if marker == ".lora_A." and in_features is not None and shape[-1] != in_features:
        return f"{module_name} takes {in_features} input features but the adapter expects {shape[-1]}"
    if marker in (".lora_B.", ".lora_magnitude_vector") and out_features is not None and shape[0] != out_features:
        return f"{module_name} has {out_features} output features but the adapter expects {shape[0]}"
    return None


def adapter_key_with_marker_dot(key: str) -> str:
    """AdaLoRA's ``....q_proj.lora_A`` as LoRA's ``....q_proj.lora_A.`` (``.weight`` follows in LoRA)."""
    return key + "." if key.endswith(_ADALORA_KEY_ENDINGS) else key


def _saved_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the adapter's saved tensors, keyed by the base model's parameter names."""
    return {key.removeprefix("base_model.model."): tuple(shape) for key, shape in _adapter_tensor_shapes(adapter_dir).items()}


def _grow_embeddings_for_adapter(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """Resize the input embeddings (and a tied head) when the adapter saved a larger vocabulary: tokens added
    in training. The new rows are placeholders; the adapter's saved rows replace them when it loads."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None or is_quantized(model):
        return
    name = next((n for n, module in model.named_modules() if module is embeddings), None)
    saved = shapes.get(f"{name}.weight") if name else None
    rows, width = embeddings.weight.shape
    if saved is not None and len(saved) == 2 and saved[1] == width and saved[0] > rows:
        model.resize_token_embeddings(saved[0], mean_resizing=False)  # the adapter's rows overwrite the new ones


def _rank_problem(key: str, shape: tuple[int, ...], modules: dict[str, nn.Module]) -> str | None:
    """A LoRA rank above min(inputs, outputs) of its layer is no low-rank update of it."""
    key = adapter_key_with_marker_dot(key)
    if ".lora_A." not in key and ".lora_embedding_A" not in key:
        return None
    module_name = key.split(".lora_A." if ".lora_A." in key else ".lora_embedding_A")[0]
    base_layer = getattr(modules.get(module_name), "base_layer", modules.get(module_name))
    in_features = getattr(base_layer, "in_features", getattr(base_layer, "num_embeddings", None))
    out_features = getattr(base_layer, "out_features", getattr(base_layer, "embedding_dim", None))
    if in_features is None or out_features is None or len(shape) < 2:
        return None
    rank, limit = shape[0], min(in_features, out_features)
    if rank <= limit:
        return None
    return (f"has rank {rank} on {module_name}, more than that layer allows (at most {limit} = min({in_features} "
            f"inputs, {out_features} outputs))")


def _check_configured_rank(adapter_dir: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """adapter_config.json's ``r`` must be the rank of the saved weights (peft otherwise fails with a traceback)."""
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise FtkitError(f"{adapter_dir / 'adapter_config.json'} is not valid JSON; save the adapter again.") from error
    rank = config.get("r") if isinstance(config, dict) else None
    if not isinstance(rank, int) or config.get("rank_pattern"):
        return
    saved = sorted({shape[0] for key, shape in shapes.items() if ".lora_A." in key and shape})
    if saved and saved != [rank]:
        raise FtkitError(
            f"Adapter {adapter_dir} is inconsistent: adapter_config.json says r={rank} but its weights have rank "
            f"{', '.join(map(str, saved))}; save the adapter again."
        )
