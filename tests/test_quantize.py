"""``ftkit quantize`` on the tiny random Llama: every method that runs here writes an output that the shared
loader (chat, serve, evaluate) loads back and generates with; the report's fields are present and its sizes
are the files' sizes; excluded modules stay in high precision; the GGUF file's metadata and tensors are
what llama.cpp reads. The embedded-model checks (one int8 method, GGUF q8_0) are marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_bad_input_paths import save_adapter

from ftkit.config import QuantizeConfig, load_stage_config
from ftkit.engine.cpu_weights import can_pack
from ftkit.models import ModelSource, load_for_inference
from ftkit.quantize import run_quantize
from ftkit.quantize.report import REPORT_NAME

FAST = {"bench_new_tokens": 2, "eval_max_tokens": 48, "calibration_samples": 32, "calibration_batch_size": 16}
MEASURED = ("peak_memory_bytes", "load_seconds", "prompt_tokens_per_s", "generation_tokens_per_s",
            "latency_per_sample_s", "perplexity")


def quantize(model: Path | str, out: Path, method: str, **keys):
    config = load_stage_config(QuantizeConfig, None, {"model_name_or_path": str(model), "method": method,
                                                      "export_dir": str(out), **FAST, **keys}).config
    return run_quantize(config)


def output_source(out: Path) -> ModelSource:
    ggufs = sorted(out.glob("*.gguf"))
    if ggufs:
        return ModelSource("gguf", out, gguf_file=ggufs[0].name, display=str(ggufs[0]))
    return ModelSource("local", out, display=str(out))


def generates(out: Path) -> list[int]:
    """Load the output as ftkit chat/serve/evaluate do and generate three greedy tokens."""
    loaded = load_for_inference(output_source(out), device=torch.device("cpu"))
    ids = loaded.tokenizer("The sea is", return_tensors="pt").input_ids
    with torch.inference_mode():
        output = loaded.model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    return output[0, ids.shape[1]:].tolist()


def check_report(out: Path, method: str) -> dict:
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["method"] == method
    files = {p.name: p.stat().st_size for p in out.iterdir() if p.name != REPORT_NAME}
    assert report["quantized"]["files"] == files
    weights = sum(size for name, size in files.items() if name.endswith((".safetensors", ".gguf")))
    assert report["quantized"]["size_bytes"] == weights
    assert report["ratios"]["size"] == pytest.approx(weights / report["original"]["size_bytes"])
    for entry in (report["original"], report["quantized"]):
        for key in MEASURED:
            assert entry[key] > 0, key
    assert 0.0 <= report["quantized"]["top1_agreement"] <= 1.0
    assert report["quantized"]["max_abs_logit_diff"] >= 0.0
    assert report["eval"]["scored_tokens"] == report["quantized"]["scored_tokens"] > 0
    return report


TORCHAO_AND_BNB = ["int8", "int8-dynamic", "int8-static", "bnb-int8", "bnb-nf4", "bnb-fp4"]


@pytest.mark.parametrize("method", TORCHAO_AND_BNB)
def test_checkpoint_methods_write_an_output_that_loads_generates_and_is_reported(tiny_llama_dir, tmp_path, method):
    out = tmp_path / "out"
    result = quantize(tiny_llama_dir, out, method)
    report = check_report(out, method)
    assert result.report == report
    assert report["quantized_modules"] == 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head excluded
    assert {"model.embed_tokens", "lm_head"} <= set(report["high_precision_modules"])
    assert not any(".layers." in name for name in report["high_precision_modules"])
    assert report["quantized"]["top1_agreement"] >= 0.9  # a random tiny model: logits are small and close
    assert (report["calibration"] is not None) == (method == "int8-static")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == ("torchao" if method.startswith("int") else "bitsandbytes")
    assert len(generates(out)) == 3


def test_excluded_modules_stay_in_high_precision(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    report = quantize(tiny_llama_dir, out, "int8", exclude_modules=["lm_head", "embed_tokens", "down_proj"]).report
    assert report["quantized_modules"] == 12
    loaded = load_for_inference(output_source(out), device=torch.device("cpu")).model
    for name, module in loaded.named_modules():
        if isinstance(module, torch.nn.Linear):
            plain = type(module.weight) in (torch.Tensor, torch.nn.Parameter)
            assert plain == (name.endswith("down_proj") or name == "lm_head"), name
    assert sorted(n for n in report["high_precision_modules"] if "down_proj" in n) == [
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_static_int8_stores_one_calibrated_activation_scale_per_layer(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    quantize(tiny_llama_dir, out, "int8-static")
    model = load_for_inference(output_source(out), device=torch.device("cpu")).model
    weight = model.model.layers[0].mlp.down_proj.weight
    assert type(weight).__name__ == "Int8Tensor"
    assert weight.act_quant_scale.numel() == 1 and float(weight.act_quant_scale) > 0
    q_scale = float(model.model.layers[0].self_attn.q_proj.weight.act_quant_scale)
    assert q_scale != float(weight.act_quant_scale)  # each layer its own calibrated scale
    assert weight.act_pre_scale.shape == (128,)  # SmoothQuant: one smoothing factor per input channel


def test_adapter_is_merged_in_fp32_before_quantizing(tiny_llama_dir, tmp_path):
    adapter = save_adapter(tiny_llama_dir, tmp_path / "ad")
    out = tmp_path / "out"
    report = quantize(tiny_llama_dir, out, "gguf", gguf_type="f32", adapter_name_or_path=[str(adapter)]).report
    assert report["adapters"] == [str(adapter)]
    # f32 GGUF of base + merged adapter: the original (base + adapter) is reproduced to float rounding
    assert report["quantized"]["top1_agreement"] == 1.0
    assert report["quantized"]["max_abs_logit_diff"] < 1e-3


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0", "f16"])
def test_gguf_file_has_llama_metadata_tokenizer_template_and_tensors(tiny_llama_dir, tmp_path, gguf_type):
    """q8_0 is measured and read back through ftkit's loader (transformers' GGUF loading, as chat, serve and
    evaluate load it); the other types check the file itself (reading a GGUF tokenizer back takes ~10 s)."""
    import gguf
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    full = gguf_type == "q8_0"
    report = quantize(tiny_llama_dir, out, "gguf", gguf_type=gguf_type, report=full).report
    if full:
        check_report(out, "gguf")
    path = out / f"model-{gguf_type}.gguf"
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()
              if name not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert fields["general.architecture"] == "llama"
    assert fields["llama.context_length"] == 2048  # LlamaConfig's default max_position_embeddings
    assert fields["llama.block_count"] == 2 and fields["llama.embedding_length"] == 64
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "smollm"
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 49152 and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{part}.weight" for i in range(2) for part in
        ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(types) == expected  # tied embeddings: no output.weight
    assert types["token_embd.weight"] == "F16"  # excluded: kept in high precision
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == gguf_type.upper()
    modelfile = (out / "Modelfile").read_text()
    assert f"FROM ./model-{gguf_type}.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    if full:
        assert report["quantized"]["top1_agreement"] >= 0.98
        assert len(generates(out)) == 3


@pytest.mark.slow
def test_embedded_model_int8_and_gguf_q8_0(tmp_path):
    """The real embedded model: int8 and GGUF q8_0 write outputs that load back and still answer; agreement is
    guarded at 93% (measured on 510 tokens: int8 95.9%, q8_0 97.1%; the issue's 98% target is missed, see
    bench/README.md)."""
    from ftkit.models import EMBEDDED_ALIAS

    int8 = quantize(EMBEDDED_ALIAS, tmp_path / "int8", "int8", bench_new_tokens=4, eval_max_tokens=256).report
    assert int8["quantized"]["top1_agreement"] >= 0.93
    from ftkit.models import cpu_has_fast_bf16

    # The embeddings stay in bf16 (0.304x of fp32), or in fp32 on a CPU without native bf16 (0.410x).
    assert int8["ratios"]["size"] < (0.31 if cpu_has_fast_bf16() else 0.42)
    q8 = quantize(EMBEDDED_ALIAS, tmp_path / "q8", "gguf", gguf_type="q8_0", bench_new_tokens=4,
                  eval_max_tokens=256).report
    assert q8["quantized"]["top1_agreement"] >= 0.93
    loaded = load_for_inference(output_source(tmp_path / "q8"), device=torch.device("cpu"))
    from ftkit.data.templates import render_conversation

    prompt = render_conversation(loaded.tokenizer, [{"role": "user", "content": "What is the capital of France?"}],
                                 add_generation_prompt=True)
    ids = loaded.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.inference_mode():
        answer = loaded.model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    assert "Paris" in loaded.tokenizer.decode(answer)


@pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16),
                    reason="this CPU has no oneDNN bf16 support, so the engine never packs weights")
def test_engine_weight_packing_leaves_torchao_weights_alone(tiny_llama_dir, tmp_path):
    from ftkit.engine.cpu_weights import pack_linear_weights

    out = tmp_path / "out"
    quantize(tiny_llama_dir, out, "int8", report=False)
    model = load_for_inference(output_source(out), dtype=torch.bfloat16, device=torch.device("cpu")).model
    pack_linear_weights(model, batch_hint=1)
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        assert model(input_ids=ids).logits.shape == (1, 3, 49152)


@pytest.mark.parametrize("method", ["int8", "int8-static"])
def test_ftkit_serve_answers_from_a_torchao_output_in_bf16(tiny_llama_dir, tmp_path, method):
    import httpx

    from ftkit.config import ServeConfig
    from ftkit.http_server import BackgroundServer
    from ftkit.serve.app import create_app
    from ftkit.serve.run import build_state

    out = tmp_path / "out"
    quantize(tiny_llama_dir, out, method, report=False)
    config = ServeConfig(model_name_or_path=str(out), served_model_name="q", infer_dtype="bf16", device="cpu")
    with BackgroundServer(create_app(build_state(config))) as server:
        reply = httpx.post(f"{server.url}/chat/completions", timeout=60, json={
            "model": "q", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("method", ["int8-static", "bnb-nf4"])
def test_ftkit_evaluate_loads_the_output(tiny_llama_dir, tmp_path, method):
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    quantize(tiny_llama_dir, out, method, report=False)
    result = subprocess.run([sys.executable, "-m", "ftkit.cli", "evaluate", "--model", str(out), "--benchmark",
                             "general", "--limit", "1", "--output", str(tmp_path / "eval")], capture_output=True,
                            text=True, env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["model"] == str(out)
