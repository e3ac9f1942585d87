"""load_tokenizer / load_model / sync_special_tokens and the precision rules: pad fix, quantization, errors."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from ftkit.errors import FtkitError
from ftkit.models import (
    ModelSource,
    checkpoint_dtype,
    cpu_has_fast_bf16,
    default_device,
    ensure_pad_token,
    inference_dtype,
    load_model,
    load_tokenizer,
    parse_dtype,
    resolve_load_dtype,
    resolve_mixed_precision,
    resolve_model_source,
    sync_special_tokens,
)

CPU = torch.device("cpu")


def local(path) -> ModelSource:
    return ModelSource("local", path, display=str(path))


@pytest.fixture
def broken_copy(tmp_path, tiny_llama_dir):
    """A writable copy of the tiny checkpoint for tests that damage it."""
    return shutil.copytree(tiny_llama_dir, tmp_path / "model")


# ---- pad token and end-of-turn ---------------------------------------------------------------------------------


def test_smollm2_pad_becomes_endoftext_not_eos():
    lines: list[str] = []
    tokenizer = load_tokenizer(resolve_model_source("smollm2-135m-instruct"), report=lines.append)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert lines == ["pad token was <|im_end|> (the eos token); using <|endoftext|> (id 0) so padding never looks "
                     "like an end of reply"]


def test_llama3_style_pad_equal_to_eot_moves_to_an_existing_token(llama3_tokenizer):
    tokenizer = copy.deepcopy(llama3_tokenizer)
    fix = ensure_pad_token(tokenizer)
    assert fix is not None and not fix.added
    assert (fix.previous, tokenizer.pad_token) == ("<|eot_id|>", "<|endoftext|>")


def test_tokenizer_with_a_distinct_pad_is_left_alone(qwen_tokenizer):
    tokenizer = copy.deepcopy(qwen_tokenizer)
    assert ensure_pad_token(tokenizer) is None
    assert tokenizer.pad_token == "<|endoftext|>"


def test_pad_is_added_only_when_no_candidate_exists_and_embeddings_grow(base_tokenizer, tiny_llama_dir):
    tokenizer = copy.deepcopy(base_tokenizer)  # eos = unk = pad = <|endoftext|>: no candidate left
    fix = ensure_pad_token(tokenizer)
    assert fix is not None and fix.added and fix.token == "<|pad|>" and fix.token_id == 49152
    assert "resized" in fix.describe()
    model = load_model(local(tiny_llama_dir))
    sync_special_tokens(model, tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == 49153
    assert model.config.pad_token_id == 49152


def test_sync_special_tokens_sets_pad_and_stop_ids(tiny_llama_dir):
    source = local(tiny_llama_dir)
    tokenizer, model = load_tokenizer(source), load_model(source)
    sync_special_tokens(model, tokenizer)
    assert model.config.pad_token_id == 0 and model.generation_config.pad_token_id == 0
    assert model.generation_config.eos_token_id == 2


def test_stop_ids_include_the_end_of_turn_when_it_differs_from_eos(smollm2_tokenizer, tiny_llama_dir):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.eos_token = "<|endoftext|>"  # a base-model eos; the template still ends turns with <|im_end|>
    ensure_pad_token(tokenizer)
    model = load_model(local(tiny_llama_dir))
    sync_special_tokens(model, tokenizer)
    assert set(model.generation_config.eos_token_id) == {0, 2}


# ---- loading, dtypes, quantization ----------------------------------------------------------------------------


def test_load_model_in_bf16_with_sdpa(tiny_llama_dir):
    model = load_model(local(tiny_llama_dir), dtype=torch.bfloat16, attn_implementation="sdpa")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(("flash_attn", "expected"), [("auto", "sdpa"), ("disabled", "eager"), ("eager", "eager")])
def test_attention_accepts_the_flash_attn_config_values(tiny_llama_dir, flash_attn, expected):
    assert load_model(local(tiny_llama_dir), attn_implementation=flash_attn).config._attn_implementation == expected


def test_4bit_loading_uses_bnb_linear4bit_nf4_double_quant(tiny_llama_dir):
    import bitsandbytes as bnb

    model = load_model(local(tiny_llama_dir), dtype=torch.bfloat16, quantization_bits=4, device=CPU)
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.q_proj, bnb.nn.Linear4bit) and isinstance(model.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert attention.q_proj.weight.quant_type == "nf4" and attention.q_proj.compute_dtype == torch.bfloat16
    assert model.config.quantization_config.bnb_4bit_use_double_quant is True
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 49152)


def test_8bit_loading_uses_bnb_linear8bitlt(tiny_llama_dir):
    import bitsandbytes as bnb

    model = load_model(local(tiny_llama_dir), quantization_bits=8, device=CPU)
    assert isinstance(model.model.layers[0].self_attn.v_proj, bnb.nn.Linear8bitLt)
    assert model.is_loaded_in_8bit


def test_fp4_without_double_quantization(tiny_llama_dir):
    model = load_model(local(tiny_llama_dir), quantization_bits=4, quantization_type="fp4", double_quantization=False)
    assert model.model.layers[0].mlp.up_proj.weight.quant_type == "fp4"
    assert model.config.quantization_config.bnb_4bit_use_double_quant is False


# ---- every error a user can cause ----------------------------------------------------------------------------


def test_truncated_safetensors_names_the_path(broken_copy):
    weights = broken_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(FtkitError) as error:
        load_model(local(broken_copy))
    assert str(error.value).startswith(f"The weights in {broken_copy} are unreadable or truncated (")
    assert "re-download the model or save it again" in str(error.value)


def test_config_json_that_is_not_json(broken_copy):
    (broken_copy / "config.json").write_text("{not json")
    with pytest.raises(FtkitError) as error:
        load_model(local(broken_copy))
    assert str(error.value) == (f"config.json in {broken_copy} is not valid JSON; restore the file (re-download "
                                "or re-save the model).")


def test_missing_weights(broken_copy):
    (broken_copy / "model.safetensors").unlink()
    with pytest.raises(FtkitError, match=r"has no weights \(model.safetensors or pytorch_model.bin\)") as error:
        load_model(local(broken_copy))
    assert str(broken_copy) in str(error.value)


def test_checkpoint_lacking_some_weights(broken_copy):
    from safetensors.torch import load_file, save_file

    weights = load_file(broken_copy / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, broken_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FtkitError, match=r"lacks 1 weights its architecture needs \(model.layers.1.mlp.down_proj.weight\)"):
        load_model(local(broken_copy))


def test_config_of_another_size(broken_copy):
    config = json.loads((broken_copy / "config.json").read_text())
    config["intermediate_size"] = 96
    (broken_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(FtkitError, match="do not match the shapes its config.json describes"):
        load_model(local(broken_copy))


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"model_type": "frobnicator", "architectures": ["FrobForCausalLM"]}, "an architecture this transformers version does not know"),
        ({"model_type": "t5"}, "is not a causal language model"),
    ],
)
def test_unsupported_architectures(broken_copy, config, expected):
    (broken_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(FtkitError, match=expected) as error:
        load_model(local(broken_copy))
    assert str(broken_copy) in str(error.value)


def test_missing_tokenizer_names_the_directory(broken_copy):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (broken_copy / name).unlink()
    with pytest.raises(FtkitError, match="could not be loaded from .* needs tokenizer.json") as error:
        load_tokenizer(local(broken_copy))
    assert str(broken_copy) in str(error.value)


def test_bitsandbytes_missing(tiny_llama_dir, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(FtkitError, match=r"quantization_bit 4 needs the bitsandbytes package; install it with `pip install bitsandbytes`"):
        load_model(local(tiny_llama_dir), quantization_bits=4)


@pytest.mark.parametrize("name", ["fa2", "flash_attention_2"])
def test_flash_attention_2_without_cuda(tiny_llama_dir, name):
    with pytest.raises(FtkitError, match="flash_attn fa2 needs the flash-attn package and a CUDA GPU.*use flash_attn: sdpa"):
        load_model(local(tiny_llama_dir), attn_implementation=name, device=CPU)


def test_quantizing_a_gguf_file_is_refused():
    gguf = ModelSource("gguf", Path("/models"), gguf_file="m.gguf", display="m.gguf")
    with pytest.raises(FtkitError, match="quantization_bit 4 cannot be applied to the GGUF file m.gguf"):
        load_model(gguf, quantization_bits=4)


def test_programming_errors_still_raise(tiny_llama_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    def broken(*args, **kwargs):
        raise TypeError("a bug, not a user mistake")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(TypeError, match="a bug"):
        load_model(local(tiny_llama_dir))


# ---- precision -------------------------------------------------------------------------------------------------


def test_device_and_cpu_bf16_detection():
    assert default_device() == CPU  # this machine has no GPU
    flags = Path("/proc/cpuinfo").read_text()
    assert cpu_has_fast_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_mixed_precision_rules(monkeypatch):
    import ftkit.models.precision as precision

    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert resolve_mixed_precision("auto", False, CPU) == "bf16"
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert resolve_mixed_precision("auto", False, CPU) == "no"
    assert resolve_mixed_precision(True, False, CPU) == "bf16"
    assert resolve_mixed_precision(False, False, CPU) == "no"
    with pytest.raises(FtkitError, match="fp16 mixed precision needs a CUDA GPU but this run is on cpu; use bf16 \\(auto\\) on CPU"):
        resolve_mixed_precision("auto", True, CPU)


def test_load_dtype_rules():
    assert resolve_load_dtype("bf16", "lora") == torch.bfloat16
    assert resolve_load_dtype("bf16", "qlora") == torch.bfloat16
    assert resolve_load_dtype("fp16", "lora") == torch.float16
    assert resolve_load_dtype("no", "lora") == torch.float32
    assert resolve_load_dtype("bf16", "full") == torch.float32
    assert resolve_load_dtype("bf16", "freeze") == torch.float32
    with pytest.raises(TypeError):  # a caller passing its config object is a bug, not a silent fp32
        resolve_load_dtype(object(), "bf16")  # type: ignore[arg-type]


def test_inference_dtype_on_cpu_follows_native_bf16(monkeypatch):
    import ftkit.models.precision as precision

    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert inference_dtype(CPU) == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert inference_dtype(CPU) == torch.float32


def test_parse_dtype_and_checkpoint_dtype(tiny_llama_dir):
    assert parse_dtype("bf16") == parse_dtype("bfloat16") == torch.bfloat16
    assert parse_dtype("fp16") == parse_dtype("float16") == torch.float16
    assert parse_dtype("FP32") == parse_dtype("float32") == torch.float32
    assert parse_dtype("auto", auto=torch.bfloat16) == torch.bfloat16
    with pytest.raises(FtkitError, match="Unknown dtype 'int3'; use one of auto, bf16, fp16, fp32"):
        parse_dtype("int3")
    assert checkpoint_dtype(tiny_llama_dir) == torch.float32


# ---- the real embedded model (slow) ----------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_answers_paris_greedily():
    source = resolve_model_source("smollm2-135m-instruct")
    tokenizer, model = load_tokenizer(source), load_model(source)
    sync_special_tokens(model, tokenizer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_gguf_file_loads_like_the_converted_alias(embedded_gguf_model):
    source, gguf_model = embedded_gguf_model
    tokenizer = load_tokenizer(source)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 2)
    assert gguf_model.hf_quantizer is None and not hasattr(gguf_model.config, "quantization_config")
    alias_model = load_model(resolve_model_source("smollm2-135m-instruct"))
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        torch.testing.assert_close(gguf_model(ids).logits, alias_model(ids).logits)
