"""The merge recipe, top to bottom: checks -> tokenizer + template -> fp32 base -> adapters -> reference
logits -> merge in place -> cast in place -> save to a staging directory -> read back and compare -> publish.

Memory: one model is alive at a time. The base is loaded once, in fp32 whatever the adapter was trained in
(a QLoRA adapter too: it is merged into full-precision weights, never into 4/8-bit ones); peft merges in
place and the cast to the export dtype is done parameter by parameter. The merged model is freed before the
export is loaded back (in its own dtype, memory-mapped) for the self-check (``ftkit.merge.verify``), so the
check covers the files and two full copies never coexist. Where memory still peaks above one fp32 copy:
transformers keeps a checkpoint memory-mapped while it converts it to fp32 (a bf16 base: 1.5x), and a base
stored in fp32 stays mapped until its last tensor is cast (a half-precision export of it: 1.5x). Everything
is written into a hidden sibling of export_dir that is renamed into place only after the check passed; any
failure removes it, and a replaced export is deleted only once the new one is in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from ftkit.config import LoadedConfig, MergeConfig
from ftkit.errors import FtkitError
from ftkit.export import checks as export_checks
from ftkit.export import verify
from ftkit.export.card import AdapterTraining, model_card, read_adapter_training
from ftkit.export.modelfile import MODELFILE_NAME, ollama_modelfile
from ftkit.export.staging import release_freed_memory, save_export, staged_export
from ftkit.merge import checks

console = Console(stderr=True, highlight=False)


@dataclass
class MergeResult:
    """Where the export is and how well it matched base + adapter."""

    export_dir: Path
    dtype: torch.dtype
    verification: verify.Verification
    shards: int
    files: list[str]


def _say(message: str) -> None:
    console.print(f"[bold cyan]ftkit[/] {message}", soft_wrap=True)


def run_merge(loaded: LoadedConfig) -> MergeResult:
    """Run ``ftkit merge-lora`` for a validated config; raise FtkitError (leaving nothing behind) on failure."""
    from transformers.utils import logging as transformers_logging

    from ftkit.models import adapter_dirs_from_config, model_source_from_config

    config: MergeConfig = loaded.config
    export_dir = Path(config.export_dir).expanduser()
    export_checks.check_export_dir(export_dir, overwrite=config.overwrite)
    source = model_source_from_config(config)
    adapter_dirs = adapter_dirs_from_config(config)  # an adapter listed twice is refused: it would merge twice
    base_path = source.path / source.gguf_file if source.gguf_file else source.path  # a GGUF base is its file
    inputs = [("adapter", directory) for directory in adapter_dirs] + [("base model", base_path)]
    export_checks.check_export_dir_is_not_an_input(export_dir, inputs)
    trainings = [read_adapter_training(directory) for directory in adapter_dirs]
    for training in trainings:
        checks.check_adapter_base(training.directory, config.model_name_or_path, source, training.base_name)

    transformers_logging.disable_progress_bar()
    tokenizer, template_origin = _export_tokenizer(config, source, trainings)
    dtype = _export_dtype(config, source)
    with staged_export(export_dir) as staging:
        result = _merge_into(staging, config, source, trainings, tokenizer, template_origin, dtype)
    result.export_dir = export_dir
    _say(f"[green]done[/]: {escape(str(export_dir))}/ ({', '.join(result.files)})")
    _say(f"try it: ftkit chat --model {escape(str(export_dir))}")
    return result


def _merge_into(
    staging: Path, config: MergeConfig, source, trainings: list[AdapterTraining], tokenizer, template_origin: str,
    dtype: torch.dtype,
) -> MergeResult:
    from ftkit.models import (
        LoadOptions,
        attach_adapter,
        cast_weights,
        is_quantized,
        load_adapters,
        load_for_inference,
    )

    for training in trainings:
        if training.quantization_bits:
            _say(f"adapter {escape(str(training.directory))} was trained with QLoRA on a {training.quantization_bits}-"
                 "bit base: it is merged into the full-precision base weights (loaded in fp32, dequantised), never "
                 "into 4/8-bit ones")
    # The base alone first (on the CPU, in fp32): a base stored quantized is refused before any adapter touches it.
    model = load_for_inference(source, dtype=torch.float32, device=torch.device("cpu"),
                               options=LoadOptions.from_config(config).full_precision(), tokenizer=tokenizer).model
    if is_quantized(model):
        raise FtkitError(f"Base model {source} is stored quantized ({type(model.hf_quantizer).__name__}); adapters are "
                         "merged into full-precision weights only: pass the original full-precision base.")
    shards = export_checks.check_shard_plan(model, dtype, config.export_size)
    export_checks.check_free_space(staging, sum(size for _, size in export_checks.tensor_sizes(model, dtype)))
    names = ", ".join(str(t.directory) for t in trainings)
    _say(f"base {escape(str(source))} (fp32) + adapter{'s' if len(trainings) > 1 else ''} {escape(names)} -> "
         f"{verify.dtype_name(dtype)} export, {shards} shard{'s' if shards > 1 else ''}")

    was_tied = _embeddings_tied(model)
    model = load_adapters(model, [t.directory for t in trainings[:-1]], trainable=False)
    peft_model = attach_adapter(model, trainings[-1].directory)
    prompts = verify.render_prompts(tokenizer)
    reference = verify.score(peft_model, prompts)
    verify.check_reference(reference, trainings[-1].directory)
    model = peft_model.merge_and_unload()
    del peft_model
    merged = verify.compare(reference, verify.score(model, prompts), torch.float32)
    if not merged.passed:
        raise FtkitError(f"Merge verification failed: merging changed the logits of base + adapter by up to "
                         f"{merged.max_difference:.3g} (tolerance {merged.tolerance:.3g}); nothing was exported.")
    _keep_embeddings_tied(model, was_tied)
    cast_weights(model, dtype)
    in_memory = verify.score(model, prompts)  # in the export dtype: what the files must reproduce exactly
    save_export(model, tokenizer, staging, config.export_size)
    del model
    release_freed_memory()

    verification = verify.verify_export_on_disk(staging, prompts, reference, in_memory, dtype)
    _say(f"verified: merged weights within {merged.max_difference:.2e} of base + adapter (fp32); the export on disk: "
         f"{verification.describe()}")
    (staging / "README.md").write_text(model_card(
        base=config.model_name_or_path, adapters=trainings, dtype_name=verify.dtype_name(dtype), shards=shards,
        template_origin=template_origin, verification=verification.describe()), encoding="utf-8")
    if config.ollama_modelfile:
        modelfile = ollama_modelfile(tokenizer)
        if modelfile is None:
            _say("no Ollama Modelfile: this chat template does not split into per-message pieces Ollama's TEMPLATE "
                 "can express; write its TEMPLATE by hand")
        else:
            (staging / MODELFILE_NAME).write_text(modelfile, encoding="utf-8")
    return MergeResult(staging, dtype, verification, shards, sorted(p.name for p in staging.iterdir()))


def _export_tokenizer(config: MergeConfig, source, trainings: list[AdapterTraining]):
    """The tokenizer and chat template the (last) adapter was trained with; returns it and where the template came from.

    ``ftkit train`` saves the tokenizer with its chat template next to the adapter; adapters without one
    get the base's tokenizer and the template their training config names. ``template`` in the merge
    config overrides both; ``default_system`` is written into the template.
    """
    from ftkit.data.templates import apply_chat_template_to_tokenizer
    from ftkit.models import adapter_tokenizer_source, load_tokenizer

    last = trainings[-1]
    saved = adapter_tokenizer_source(source, [last.directory])
    if saved is not None:
        tokenizer = load_tokenizer(saved, trust_remote_code=config.trust_remote_code)
        origin = f"the one adapter {last.directory} was trained with"
        name = config.template
    else:
        tokenizer = load_tokenizer(source, trust_remote_code=config.trust_remote_code)
        trained = last.template if last.template and last.template != "auto" else None
        name = config.template if config.template != "auto" else trained or "auto"
        origin = f"'{name}' (the adapter's training template)" if trained and name == trained else "the base model's"
    if config.template != "auto":
        origin = f"'{config.template}' (set by template)"
        if last.template and last.template not in ("auto", config.template):
            _say(f"note: template {escape(config.template)} differs from the adapter's training template "
                 f"{escape(last.template)}; the export will be prompted differently from how it was trained")
    resolved = apply_chat_template_to_tokenizer(tokenizer, name)
    if resolved.note:
        _say(escape(resolved.note))
    if config.default_system is not None:
        tokenizer.chat_template = _with_default_system(tokenizer.chat_template, config.default_system)
        origin += ", with default_system"
    return tokenizer, origin


def _with_default_system(template: str, system: str) -> str:
    """Prepend a system message to conversations that have none (what LLaMA-Factory's export does)."""
    import json

    return ("{%- if not messages or messages[0]['role'] != 'system' -%}"
            f"{{%- set messages = [{{'role': 'system', 'content': {json.dumps(system)}}}] + messages -%}}"
            "{%- endif -%}" + template)


def _export_dtype(config: MergeConfig, source) -> torch.dtype:
    from ftkit.models import checkpoint_dtype, parse_dtype

    return parse_dtype(config.export_dtype, auto=checkpoint_dtype(source.path))


def _embeddings_tied(model) -> bool:
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embeddings is not None and head.weight is embeddings.weight


def _keep_embeddings_tied(model, was_tied: bool) -> None:
    """A tied head stays tied; one the adapter trained apart from the embeddings is exported untied (peft may
    already have set ``tie_word_embeddings`` false; either way the config must say what the weights are)."""
    if not was_tied:
        return
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head.weight is embeddings.weight or torch.equal(head.weight, embeddings.weight)
    if tied:
        head.weight = embeddings.weight
    else:
        _say("note: the adapter trained the output head apart from the input embeddings; the export unties them")
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = tied
