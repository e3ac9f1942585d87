"""The quantize recipe, top to bottom: checks -> tokenizer + texts -> the original (fp32, adapters merged),
measured -> quantize or write GGUF into a staging folder -> load the output back the way chat/serve/evaluate
load it, measured -> report -> publish.

Adapters are merged into the fp32 base first (``load_for_inference``, as ``ftkit merge-lora`` does); the
quantized weights are made from those merged weights, never the other way round. The original and the
output are measured in the same process, one after the other (``ftkit.quantize.measure``), so the table
compares like with like. Everything is written into a hidden sibling of export_dir that is renamed into
place only at the end (``ftkit.export.staging``): a failure, or a full disk, leaves no half-written output.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from ftkit.config import QuantizeConfig
from ftkit.errors import FtkitError
from ftkit.export import checks as export_checks
from ftkit.export import verify
from ftkit.export.modelfile import MODELFILE_NAME, ollama_modelfile
from ftkit.export.staging import release_freed_memory, staged_export
from ftkit.quantize import gguf_file, texts, weights
from ftkit.quantize.measure import Measurement, Scores, eval_chunks, measure
from ftkit.quantize.methods import DEFAULT_GROUP_SIZE, check_group_size, check_method_available
from ftkit.quantize.report import REPORT_NAME, file_sizes, model_entry, print_table, ratios, weights_bytes

console = Console(stderr=True, highlight=False)


@dataclass
class QuantizeResult:
    """Where the output is and what the report says."""

    export_dir: Path
    report: dict[str, Any]


def _say(message: str) -> None:
    console.print(f"[bold cyan]ftkit[/] {message}", soft_wrap=True)


def run_quantize(config: QuantizeConfig) -> QuantizeResult:
    """Run ``ftkit quantize`` for a validated config; raise FtkitError (leaving nothing behind) on failure."""
    from transformers.utils import logging as transformers_logging

    from ftkit.models import adapter_dirs_from_config, model_source_from_config
    from ftkit.torchao_gate import enable_torchao

    enable_torchao()  # transformers writes and reads the torchao methods' checkpoints

    export_dir = Path(config.export_dir).expanduser()
    export_checks.check_export_dir(export_dir, overwrite=config.overwrite)
    device = torch.device("cuda") if config.method == "int4" and torch.cuda.is_available() else torch.device("cpu")
    check_method_available(config.method, device)
    source = model_source_from_config(config)
    adapter_dirs = adapter_dirs_from_config(config)
    base_path = source.path / source.gguf_file if source.gguf_file else source.path
    inputs = [("adapter", directory) for directory in adapter_dirs] + [("base model", base_path)]
    export_checks.check_export_dir_is_not_an_input(export_dir, inputs)
    refuse_quantized_source(source)

    transformers_logging.disable_progress_bar()
    tokenizer = _tokenizer(config, source, adapter_dirs)
    calibration = (texts.calibration_texts(config.calibration_dataset, config.dataset_dir, tokenizer,
                                           config.calibration_samples) if config.method == "int8-static" else None)
    with staged_export(export_dir) as staging:
        report = _quantize_into(staging, config, source, adapter_dirs, tokenizer, calibration, device)
    if config.report:
        print_table(report, console)
    _say(f"[green]done[/]: {escape(str(export_dir))}/ ({', '.join(sorted(report['quantized']['files']))}, "
         f"{REPORT_NAME})")
    return QuantizeResult(export_dir, report)


def refuse_quantized_source(source: Any) -> None:
    """A checkpoint stored quantized (its config.json has a quantization_config) cannot be quantized again."""
    if source.gguf_file:
        return  # transformers dequantises a GGUF file while loading it: full-precision weights
    try:
        saved = json.loads((source.path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    quantization = saved.get("quantization_config") if isinstance(saved, dict) else None
    if quantization:
        kind = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
        raise FtkitError(f"Model {source} is already quantized ({kind} quantization_config in its config.json); "
                         "quantize the original full-precision model instead.")


def _tokenizer(config: QuantizeConfig, source: Any, adapter_dirs: list[Path]) -> Any:
    from ftkit.data.templates import apply_chat_template_to_tokenizer
    from ftkit.models import adapter_tokenizer_source, load_tokenizer

    tokenizer = load_tokenizer(adapter_tokenizer_source(source, adapter_dirs) or source,
                               trust_remote_code=config.trust_remote_code)
    apply_chat_template_to_tokenizer(tokenizer, config.template)
    return tokenizer


def _quantize_into(staging: Path, config: QuantizeConfig, source: Any, adapter_dirs: list[Path], tokenizer: Any,
                   calibration: list[str] | None, device: torch.device) -> dict[str, Any]:
    from ftkit.models import LoadOptions, cpu_has_fast_bf16, load_for_inference, parse_dtype

    options = LoadOptions.from_config(config).full_precision()
    fast_bf16 = cpu_has_fast_bf16() or config.method == "int4"  # int4's CUDA kernel (tinygemm) takes bf16 only
    dtype = parse_dtype(config.export_dtype, auto=torch.bfloat16 if fast_bf16 else torch.float32)
    chunks = eval_chunks(tokenizer, texts.eval_text(config.eval_data), config.eval_max_tokens)
    prompts = verify.render_prompts(tokenizer).token_ids

    def load_original() -> Any:
        return load_for_inference(source, adapter_dirs, dtype=torch.float32, device=device, options=options,
                                  tokenizer=tokenizer).model

    names = ", ".join(str(d) for d in adapter_dirs)
    _say(f"original: {escape(str(source))}" + (f" + {escape(names)} (merged in fp32)" if adapter_dirs else "")
         + (", measured" if config.report else ""))
    original_measure, original_scores, model = _measure_or_load(config, load_original, tokenizer, chunks, prompts)
    original_size = _fp32_bytes(model)

    label, output_dtype, quantized, notes = _write_output(staging, config, model, tokenizer, calibration, dtype,
                                                          source, adapter_dirs)
    del model
    release_freed_memory()

    output_source = _output_source(staging, config)

    def load_output() -> Any:
        return load_for_inference(output_source, dtype=output_dtype, device=device, tokenizer=tokenizer).model

    output_measure, kept = None, []
    if config.report:  # report: false writes the output without loading it back
        _say(f"{label}: written, loading it back to measure")
        output_measure, _, output = measure(load_output, tokenizer, chunks, prompts, config.bench_new_tokens,
                                            original_scores)
        kept = _high_precision_modules(output)
        del output
        release_freed_memory()

    files = file_sizes(staging)
    original_entry = model_entry("original (fp32)", original_size, original_measure)
    output_entry = model_entry(label, weights_bytes(files), output_measure, files=files,
                               dtype=verify.dtype_name(output_dtype))
    report = {
        "method": config.method, "method_label": label,
        "gguf_type": config.gguf_type if config.method == "gguf" else None,
        "model": config.model_name_or_path, "adapters": [str(d) for d in adapter_dirs],
        "quantized_modules": len(quantized), "exclude_modules": config.exclude_modules,
        "high_precision_modules": kept,
        "group_size": (config.group_size or DEFAULT_GROUP_SIZE) if config.method == "int4" else config.group_size,
        "per_channel": config.per_channel,
        "calibration": ({"dataset": config.calibration_dataset, "samples": len(calibration),
                         "batch_size": config.calibration_batch_size, "max_length": config.calibration_max_length}
                        if calibration is not None else None),
        "eval": {"data": config.eval_data or "ftkit/resources/quantize/heldout.txt",
                 "scored_tokens": original_measure.scored_tokens if original_measure else 0,
                 "generation_prompts": len(prompts), "new_tokens": config.bench_new_tokens},
        "device": str(device), "threads": torch.get_num_threads(),
        "original": original_entry, "quantized": output_entry, "ratios": ratios(original_entry, output_entry),
        "notes": notes,
    }
    (staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _measure_or_load(config: QuantizeConfig, load: Any, tokenizer: Any, chunks: list, prompts: list,
                     reference: Scores | None = None) -> tuple[Measurement | None, Scores | None, Any]:
    if not config.report:
        return None, None, load()
    return measure(load, tokenizer, chunks, prompts, config.bench_new_tokens, reference)


def _write_output(staging: Path, config: QuantizeConfig, model: Any, tokenizer: Any, calibration: list[str] | None,
                  dtype: torch.dtype, source: Any, adapter_dirs: list[Path]) -> tuple[str, torch.dtype, list[str], list[str]]:
    """Quantize ``model`` (or write its GGUF file) into ``staging``: (label, the dtype it loads in, quantized
    module or tensor names, notes)."""
    from ftkit.models import cast_weights

    method, excluded = config.method, config.exclude_modules
    if method == "gguf":
        name = gguf_file.gguf_file_name(config.gguf_type)
        counts = gguf_file.write_gguf(model, tokenizer, staging / name, config.gguf_type, excluded=excluded,
                                      name=Path(str(config.model_name_or_path)).name)
        _write_modelfile(staging, tokenizer, name, config)
        notes = [f"GGUF tensor types: {counts}", "measured as ftkit chat, serve and evaluate load it: through "
                 "transformers' GGUF loading, which dequantises the file to fp32, so its speed and memory are those "
                 "of fp32 weights, not llama.cpp's"]
        return f"gguf {config.gguf_type}", torch.float32, [f"{k}: {v}" for k, v in counts.items()], notes
    if method == "int4":
        check_group_size(model, config.group_size or DEFAULT_GROUP_SIZE, excluded)
    if method.startswith("bnb-"):
        return _write_bnb(staging, config, model, tokenizer, dtype, source, adapter_dirs)
    amax = None
    if method == "int8-static":
        assert calibration is not None
        layer_names = weights.quantized_linear_names(model, excluded)
        _say(f"calibrating activation scales of {len(layer_names)} layers on {len(calibration)} samples")
        amax = weights.calibrate_activation_amax(model, tokenizer, calibration, layer_names,
                                                 batch_size=config.calibration_batch_size,
                                                 max_length=config.calibration_max_length)
    cast_weights(model, dtype)
    quantized = weights.quantize_with_torchao(model, method, excluded=excluded, per_channel=config.per_channel,
                                              group_size=config.group_size, act_amax=amax)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    return f"{method} (torchao, {verify.dtype_name(dtype)})", dtype, quantized, []


def _write_bnb(staging: Path, config: QuantizeConfig, model: Any, tokenizer: Any, dtype: torch.dtype, source: Any,
               adapter_dirs: list[Path]) -> tuple[str, torch.dtype, list[str], list[str]]:
    """bitsandbytes quantizes while loading: from the source checkpoint itself, or from the merged fp32 model
    saved to a temporary folder beside the staging folder (adapters, GGUF sources)."""
    with tempfile.TemporaryDirectory(dir=staging.parent, prefix=".ftkit-quantize-fp32-") as temporary:
        checkpoint = source.path
        if adapter_dirs or source.gguf_file:
            checkpoint = Path(temporary)
            model.save_pretrained(checkpoint)
        quantized_model = weights.load_with_bnb(checkpoint, config.method, excluded=config.exclude_modules,
                                                dtype=dtype)
        quantized = weights.bnb_quantized_names(quantized_model)
        quantized_model.save_pretrained(staging)
        output_dtype = quantized_model.dtype
        del quantized_model
    tokenizer.save_pretrained(staging)
    return f"{config.method} (bitsandbytes)", output_dtype, quantized, []


def _write_modelfile(staging: Path, tokenizer: Any, gguf_name: str, config: QuantizeConfig) -> None:
    if not config.ollama_modelfile:
        return
    text = ollama_modelfile(tokenizer)
    if text is None:
        _say("no Ollama Modelfile: this chat template does not split into per-message pieces Ollama's TEMPLATE can "
             "express; write its TEMPLATE by hand")
        return
    text = text.replace("written by ftkit merge-lora", "written by ftkit quantize").replace(
        "\nFROM .\n", f"\nFROM ./{gguf_name}\n", 1)
    (staging / MODELFILE_NAME).write_text(text, encoding="utf-8")


def _output_source(staging: Path, config: QuantizeConfig) -> Any:
    from ftkit.models import ModelSource

    if config.method == "gguf":
        name = gguf_file.gguf_file_name(config.gguf_type)
        return ModelSource("gguf", staging, gguf_file=name, display=str(staging / name))
    return ModelSource("local", staging, display=str(staging))


def _fp32_bytes(model: Any) -> int:
    """The original's size as an fp32 checkpoint (each tensor once: a tied head shares the embeddings)."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * 4
    return total


def _high_precision_modules(model: Any) -> list[str]:
    """Linear and embedding modules of the loaded output whose weights are plain floating-point tensors."""
    kept = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        plain = type(module) in (torch.nn.Linear, torch.nn.Embedding) and type(weight) in (torch.Tensor,
                                                                                        torch.nn.Parameter)
        if plain and weight.is_floating_point():
            kept.append(name)
    return kept

