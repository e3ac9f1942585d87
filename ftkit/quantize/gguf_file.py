"""Write a GGUF file for llama.cpp and Ollama with the ``gguf`` package alone (no llama.cpp checkout or binary).

What llama.cpp's ``convert_hf_to_gguf.py`` does for a Llama-architecture model, in the same order: the
architecture's hyper-parameters as ``llama.*`` metadata; the byte-level BPE tokenizer as
``tokenizer.ggml.*`` (tokens by id, token types, merges, special token ids, whether to add BOS) and the
chat template as ``tokenizer.chat_template``; then every tensor under llama.cpp's name (``gguf``'s own
``TensorNameMap``), with the query and key projections permuted into llama.cpp's rotary layout. Weight
matrices are quantized with ``gguf.quants`` (pure numpy, the same block formats llama.cpp reads); norms stay
F32, and modules in ``exclude_modules`` (by default the embeddings and output head) are kept in F16 (BF16
for a bf16 file). A matrix whose rows do not split into whole quantization blocks falls back to F16, as
llama.cpp's converter does. k-quants (q4_k, ...) need llama.cpp's own quantizer and are not offered.

Limits, said rather than guessed: only ``model_type`` llama (Llama, SmolLM, TinyLlama, ...) and BPE
tokenizers; llama.cpp picks its pre-tokenizer regex by name (``tokenizer.ggml.pre``), which ftkit sets to
``smollm`` for SmolLM's tokenizer and ``default`` otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ftkit.errors import FtkitError
from ftkit.quantize.methods import is_excluded

GGUF_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
                   "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1"}
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5


def gguf_file_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


def write_gguf(model: Any, tokenizer: Any, path: Path, gguf_type: str, *, excluded: list[str], name: str) -> dict:
    """Write ``model`` (a full-precision Llama) and its tokenizer to ``path``; returns per-type tensor counts."""
    import gguf

    config = model.config
    if getattr(config, "model_type", None) != "llama":
        raise FtkitError(f"method gguf writes Llama-architecture models (model_type llama) in this ftkit version; "
                         f"this model is {getattr(config, 'model_type', 'unknown')!r}: export it with llama.cpp's "
                         "convert_hf_to_gguf.py instead.")
    writer = gguf.GGUFWriter(str(path), "llama")
    _write_hyperparameters(writer, config, gguf_type, name)
    _write_tokenizer(writer, tokenizer, model.get_input_embeddings().weight.shape[0])
    counts = _write_tensors(writer, model, gguf_type, excluded)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def _write_hyperparameters(writer: Any, config: Any, gguf_type: str, name: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, GGUF_FILE_TYPES[gguf_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tokenizer(writer: Any, tokenizer: Any, rows: int) -> None:
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state.get("model", {})
    if model.get("type") != "BPE":
        raise FtkitError(f"method gguf writes byte-level BPE tokenizers in this ftkit version; this tokenizer is "
                         f"{model.get('type')!r}: export it with llama.cpp's convert_hf_to_gguf.py instead.")
    vocab = tokenizer.get_vocab()
    by_id = {index: token for token, index in vocab.items()}
    special = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    added = {token.content for token in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for index in range(rows):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(_TOKEN_UNUSED)
            continue
        tokens.append(token)
        types.append(_TOKEN_CONTROL if token in special else _TOKEN_USER_DEFINED if token in added else _TOKEN_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokens))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(token_id, int):
            getattr(writer, f"add_{kind}_token_id" if kind != "unk" else "add_unk_token_id")(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_add_space_prefix(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer_name(tokens: list[str]) -> str:
    """llama.cpp's name for the pre-tokenizer regex; SmolLM's vocabulary starts with these three tokens."""
    return "smollm" if tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] else "default"


def _write_tensors(writer: Any, model: Any, gguf_type: str, excluded: list[str]) -> dict[str, int]:
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    tied = getattr(config, "tie_word_embeddings", False)
    counts: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp uses token_embd for the output when there is no output.weight
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise FtkitError(f"method gguf does not know where the weight {hf_name} goes in a llama GGUF file; "
                             "export this model with llama.cpp's convert_hf_to_gguf.py instead.")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, heads, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, heads, kv_heads)
        module = hf_name.rsplit(".", 1)[0]
        qtype = _tensor_type(data, gguf_type, excluded=is_excluded(module, excluded))
        written = data if qtype == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(data, qtype)
        writer.add_tensor(name, written, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    return counts


def _tensor_type(data: np.ndarray, gguf_type: str, *, excluded: bool):
    import gguf

    types = gguf.GGMLQuantizationType
    if data.ndim == 1 or gguf_type == "f32":
        return types.F32
    high = types.BF16 if gguf_type == "bf16" else types.F16
    if excluded:
        return high
    wanted = getattr(types, gguf_type.upper())
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    return wanted if data.shape[-1] % block == 0 else high


def _permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k (``LlamaModel.permute`` in convert_hf_to_gguf.py)."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))
