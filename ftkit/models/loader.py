"""Load a resolved model source into a tokenizer and a ``PreTrainedModel`` ready for any stage.

One loader serves train, merge-lora, serve, evaluate and quantize, so they agree on three things a
library leaves to the caller:

* **The pad token.** Many chat models ship with ``pad == eos`` (SmolLM2: both ``<|im_end|>``). Training
  then masks or confuses the end-of-reply token with padding, and batched generation cannot tell a
  finished row from padding. We pick another special token the tokenizer already has (no new embedding
  row), and add ``<|pad|>`` only when none exists.
* **Stopping.** ``generation_config.eos_token_id`` also holds the chat template's end-of-turn token, so
  generation stops at the end of a reply even where the template's turn end is not the eos token.
* **Errors.** Every failure a user can cause (missing or truncated weights, a config.json that is not
  JSON, an architecture transformers does not know, bitsandbytes missing) becomes one ``FtkitError``
  sentence naming the path; programming errors still raise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from safetensors import SafetensorError

from ftkit.errors import FtkitError
from ftkit.models.precision import default_device
from ftkit.models.source import ModelSource

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

AttnImplementation = Literal["auto", "sdpa", "eager", "flash_attention_2", "disabled", "fa2"]
"""transformers' names, plus the config key ``flash_attn``'s own spellings (disabled = eager, fa2)."""

PAD_TOKEN_CANDIDATES = ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "<|pad|>")
"""Existing special tokens preferred as pad, in order (the unk token comes after these)."""
ADDED_PAD_TOKEN = "<|pad|>"

_ATTENTION_NAMES: dict[str, str] = {
    "auto": "auto", "disabled": "eager", "eager": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2",
    "flash_attention_2": "flash_attention_2",
}
_LOAD_ERRORS = (OSError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError)
"""What ``from_pretrained`` raises for a broken or unsupported checkpoint (json errors are ValueErrors)."""


@dataclass(frozen=True)
class PadTokenFix:
    """What ``ensure_pad_token`` changed: the old pad token, the new one, and whether it was added."""

    previous: str | None
    token: str
    token_id: int
    added: bool

    def describe(self) -> str:
        """One line for the console."""
        was = f"was {self.previous} (the eos token)" if self.previous else "was unset"
        if self.added:
            return (f"pad token {was}; added {self.token} (id {self.token_id}), so the model's embeddings are "
                    "resized by one row")
        return f"pad token {was}; using {self.token} (id {self.token_id}) so padding never looks like an end of reply"


def _turn_end_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The chat template's end-of-turn token (None without a template); ``ftkit.data.templates`` owns the rule."""
    from ftkit.data.templates import end_of_turn_token, tokenizer_chat_template

    if tokenizer_chat_template(tokenizer) is None:
        return None
    try:
        return end_of_turn_token(tokenizer)
    except FtkitError:  # a template that ends turns with no token, on a tokenizer without eos
        return None


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PadTokenFix | None:
    """Give the tokenizer a pad token distinct from eos and the end-of-turn token; None if it had one."""
    previous = tokenizer.pad_token
    if previous is not None and previous != tokenizer.eos_token:
        return None
    excluded = {tokenizer.eos_token, _turn_end_token(tokenizer)} - {None}
    vocab = tokenizer.get_vocab()
    for candidate in (*PAD_TOKEN_CANDIDATES, tokenizer.unk_token):
        if candidate and candidate not in excluded and candidate in vocab:
            tokenizer.pad_token = candidate
            return PadTokenFix(previous, candidate, vocab[candidate], added=False)
    tokenizer.add_special_tokens({"pad_token": ADDED_PAD_TOKEN})
    return PadTokenFix(previous, ADDED_PAD_TOKEN, tokenizer.convert_tokens_to_ids(ADDED_PAD_TOKEN), added=True)


def load_tokenizer(
    source: ModelSource, *, trust_remote_code: bool = False, report: Callable[[str], None] | None = None
) -> PreTrainedTokenizerBase:
    """Load the tokenizer of ``source`` with a usable pad token; ``report`` receives a line if it changed."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(source.path), trust_remote_code=trust_remote_code, **source.load_kwargs
        )
    except (OSError, ValueError, json.JSONDecodeError) as error:
        raise FtkitError(
            f"The tokenizer of {source} could not be loaded from {source.path} ({_first_line(error)}); the "
            "directory needs tokenizer.json (or the tokenizer files of its base model) next to config.json."
        ) from error
    fix = ensure_pad_token(tokenizer)
    if fix is not None and report is not None:
        report(fix.describe())
    return tokenizer


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an answer: eos and the chat template's end-of-turn token."""
    ids = {tokenizer.eos_token_id}
    turn_end = _turn_end_token(tokenizer)
    if turn_end is not None:
        turn_end_id = tokenizer.convert_tokens_to_ids(turn_end)
        if isinstance(turn_end_id, int) and turn_end_id != tokenizer.unk_token_id:
            ids.add(turn_end_id)
    return sorted(i for i in ids if i is not None)


def sync_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the model agree with the (fixed) tokenizer: pad id, stop ids, and embedding rows."""
    embeddings = model.get_input_embeddings()
    if embeddings is not None and len(tokenizer) > embeddings.weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    pad_id = tokenizer.pad_token_id
    model.config.pad_token_id = pad_id
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if text_config is not model.config:
        text_config.pad_token_id = pad_id
    generation = getattr(model, "generation_config", None)
    if generation is None:
        return
    generation.pad_token_id = pad_id
    stop_ids = generation.eos_token_id
    stop_ids = [] if stop_ids is None else [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
    turn_end = _turn_end_token(tokenizer)
    for token_id in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(turn_end) if turn_end else None):
        if token_id is not None and token_id not in stop_ids:
            stop_ids.append(token_id)
    if stop_ids:
        generation.eos_token_id = stop_ids[0] if len(stop_ids) == 1 else stop_ids


def quantization_config(
    bits: int, *, quantization_type: str = "nf4", double_quantization: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> BitsAndBytesConfig:
    """The bitsandbytes config for loading in 4 bits (nf4/fp4, optional double quantization) or 8 bits."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise FtkitError(
            f"quantization_bit {bits} needs the bitsandbytes package; install it with `pip install bitsandbytes` "
            "or remove quantization_bit."
        )
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization_type,
            bnb_4bit_use_double_quant=double_quantization,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    raise FtkitError(f"quantization_bit {bits} is not supported; use 4 or 8.")


def load_model(
    source: ModelSource,
    *,
    dtype: torch.dtype = torch.float32,
    quantization_bits: int | None = None,
    quantization_type: str = "nf4",
    double_quantization: bool = True,
    attn_implementation: AttnImplementation = "auto",
    trust_remote_code: bool = False,
    device: torch.device | None = None,
    tensor_parallel: int = 1,
) -> PreTrainedModel:
    """Load a causal LM from ``source`` in ``dtype`` (or 4/8-bit bitsandbytes) on ``device`` (CPU if None).

    Quantized weights are placed on ``device`` (default: ``default_device()``) while loading, as
    bitsandbytes requires; other models load on CPU and move to ``device`` when one is given.
    ``tensor_parallel`` above 1 (inside a multi-process launch) splits the weights over that many processes by
    the model's tp_plan, the other processes sharding by FSDP (transformers' ``DistributedConfig``).
    """
    from transformers import AutoModelForCausalLM

    from ftkit.torchao_gate import defer_torchao, enable_torchao, uses_torchao

    defer_torchao()
    if not source.gguf_file and uses_torchao(source.path):
        enable_torchao()
    kwargs: dict[str, object] = {"dtype": dtype, "trust_remote_code": trust_remote_code, **source.load_kwargs}
    attention = _checked_attention(attn_implementation, device)
    if attention is not None:
        kwargs["attn_implementation"] = attention
    if quantization_bits is not None:
        if source.gguf_file:
            raise FtkitError(
                f"quantization_bit {quantization_bits} cannot be applied to the GGUF file {source}: it loads "
                "dequantised; convert it first (ftkit merge-lora or save it as a checkpoint) or remove quantization_bit."
            )
        target = device or default_device()
        half = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16 if target.type == "cpu" else dtype
        kwargs["quantization_config"] = quantization_config(
            quantization_bits, quantization_type=quantization_type,
            double_quantization=double_quantization, compute_dtype=half,
        )
        kwargs["device_map"] = {"": str(target)}
    elif device is not None and device.type != "cpu" and tensor_parallel == 1:  # a split model places its own shards
        kwargs["device_map"] = {"": str(device)}
    if _is_torchao_static_int8(source):
        return _load_torchao_static_int8(source, dtype)
    if tensor_parallel > 1:
        from transformers.distributed import DistributedConfig

        processes = int(os.environ.get("WORLD_SIZE", "1"))
        kwargs["distributed_config"] = DistributedConfig(tp_size=tensor_parallel,
                                                         fsdp_size=max(1, processes // tensor_parallel))
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(source.path), output_loading_info=True, **kwargs)
    except _LOAD_ERRORS as error:
        raise FtkitError(_describe_load_failure(source, error)) from error
    except RuntimeError as error:  # transformers' "set ignore_mismatched_sizes" is a user's wrong config.json
        if "mismatched_sizes" not in str(error):
            raise
        raise FtkitError(_describe_load_failure(source, error)) from error
    if source.gguf_file:  # dequantised already; the GGUF marker would only make save_pretrained refuse
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FtkitError(
            f"Model {source} at {source.path} lacks {len(missing)} weights its architecture needs ({shown}); the "
            "checkpoint is incomplete or saved for another architecture: re-download or re-save it."
        )
    return model


def _is_torchao_static_int8(source: ModelSource) -> bool:
    """A checkpoint ``ftkit quantize --method int8-static`` wrote (torchao int8 weights + calibrated activation scale)."""
    if source.gguf_file:
        return False
    try:
        quantization = json.loads((source.path / "config.json").read_text(encoding="utf-8")).get("quantization_config")
        return quantization["quant_type"]["default"]["_type"] == "Int8StaticActivationInt8WeightConfig"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _load_torchao_static_int8(source: ModelSource, dtype: torch.dtype) -> PreTrainedModel:
    """Load a torchao int8-static checkpoint with torchao's own deserializer.

    transformers 5.24 rebuilds torchao tensors from a fixed list of parts that lacks the activation scale
    of ``Int8StaticActivationInt8WeightConfig`` (``_weight_act_quant_scale``) and refuses the checkpoint, so the
    model is built from its config and the tensors are rebuilt by ``unflatten_tensor_state_dict``.
    """
    from safetensors import safe_open
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(source.path))
    quantization = config.quantization_config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state: dict[str, torch.Tensor] = {}
    for path in sorted(source.path.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
            rebuilt, leftover = unflatten_tensor_state_dict(tensors, handle.metadata())
        state.update(rebuilt)
        state.update(leftover)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [name for name in missing if name not in ("lm_head.weight",) or not config.tie_word_embeddings]
    if missing or unexpected:
        raise FtkitError(f"The int8-static checkpoint {source.path} does not match its config.json ({len(missing)} "
                         f"weights missing, {len(unexpected)} unexpected); write it again with ftkit quantize.")
    model.tie_weights()
    for param in model.parameters():  # the unquantized weights (norms, embeddings) in the dtype asked for
        if type(param.data) is torch.Tensor and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    model.config.quantization_config = quantization
    return model.eval()


def _checked_attention(requested: str, device: torch.device | None) -> str | None:
    """The ``attn_implementation`` passed to transformers (None lets it pick, which is sdpa where supported)."""
    from transformers.utils import is_flash_attn_2_available

    name = _ATTENTION_NAMES.get(requested)
    if name is None:
        raise FtkitError(f"Unknown attention implementation '{requested}'; use auto, sdpa, eager or fa2.")
    target = device or default_device()
    flash_ok = target.type == "cuda" and is_flash_attn_2_available()
    if name == "flash_attention_2" and not flash_ok:
        raise FtkitError(
            "flash_attn fa2 needs the flash-attn package and a CUDA GPU, which this machine lacks; "
            "use flash_attn: sdpa (or auto)."
        )
    if name == "auto":
        return "flash_attention_2" if flash_ok else None
    return name


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _describe_load_failure(source: ModelSource, error: BaseException) -> str:
    """One sentence for a failed ``from_pretrained``: what is wrong with which path, and the fix."""
    path, message = source.path, str(error)
    if "not a valid JSON" in message or isinstance(error, json.JSONDecodeError):
        return f"config.json in {path} is not valid JSON; restore the file (re-download or re-save the model)."
    if "no file named" in message or "does not appear to have a file named" in message:
        return (f"Model directory {path} has no weights (model.safetensors or pytorch_model.bin); re-download the "
                "model or save it again with save_pretrained.")
    if isinstance(error, (SafetensorError, pickle.UnpicklingError, EOFError)):
        return (f"The weights in {path} are unreadable or truncated ({_first_line(error)}); re-download the model "
                "or save it again.")
    if "mismatched_sizes" in message:
        return (f"The weights in {path} do not match the shapes its config.json describes; the config belongs to "
                "another model size: restore the checkpoint's own config.json.")
    if "Unrecognized configuration class" in message:
        return (f"Model {source} at {path} is not a causal language model (AutoModelForCausalLM cannot load its "
                "config); ftkit fine-tunes decoder-only models: pick one.")
    if "does not recognize this architecture" in message or "Unrecognized model" in message:
        return (f"Model {source} at {path} has an architecture this transformers version does not know; upgrade "
                "transformers, or set trust_remote_code: true if the model ships its own code.")
    if "trust_remote_code" in message:
        return (f"Model {source} at {path} ships its own modelling code; set trust_remote_code: true if you trust "
                "it.")
    return f"Model {source} could not be loaded from {path} ({_first_line(error)}); check that the checkpoint is complete."
