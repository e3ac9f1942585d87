"""``ftkit data list`` and ``ftkit data preview``: see what the model will be trained on.

The preview renders encoded examples with trained tokens highlighted (green) and masked ones dimmed,
then prints per-dataset counts (kept, skipped by reason, truncated, dropped), token statistics and
the padding waste of plain, length-grouped and packed batching. It is a command of its own (not part of
``ftkit.data``): it shows the forgetting guard's replay too, which needs the model.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ftkit.data.registry import load_registry, spec_from_entry

# Wide enough for the statistics tables when piped to a file (rich assumes 80 columns there).
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)


def print_registry(dataset_dir: str) -> None:
    """A table of the datasets registered in ``dataset_dir``'s dataset_info.json."""
    registry_file, entries = load_registry(dataset_dir)
    table = Table(title=f"datasets in {registry_file}", title_justify="left")
    for column in ("name", "source", "format", "location", "available"):
        table.add_column(column)
    for name in sorted(entries):
        spec = spec_from_entry(name, entries[name], registry_file)
        available = Path(spec.location).exists() if spec.source == "file" else "needs hub or cache"
        shown = str(Path(spec.location).name) if spec.source == "file" else spec.location
        table.add_row(name, spec.source, spec.formatting + (" (ranking)" if spec.ranking else ""), shown,
                      "yes" if available is True else ("MISSING" if available is False else available))
    console.print(table)


def highlighted(tokenizer: Any, input_ids: list[int], labels: list[int]) -> Text:
    """The decoded example, trained spans in green and masked spans dimmed."""
    from ftkit.data.encoding import trained_spans

    text = Text()
    for piece, trained in trained_spans(tokenizer, input_ids, labels):
        text.append(piece, style="bold green" if trained else "dim")
    return text


def preview_dataset(config: Any, *, num_examples: int = 3) -> None:
    """Encode the config's datasets (through the cache) and show examples and statistics."""
    from ftkit.data.dataset import encode_dataset
    from ftkit.data.options import DataOptions
    from ftkit.data.packing import padding_stats
    from ftkit.data.templates import apply_chat_template_to_tokenizer
    from ftkit.guard import plan_replay, system_prompt_variants
    from ftkit.models import load_tokenizer, model_source_from_config

    source = model_source_from_config(config)
    tokenizer = load_tokenizer(source, trust_remote_code=config.trust_remote_code)
    template = apply_chat_template_to_tokenizer(tokenizer, config.template)
    console.print(f"[bold]model[/] {source.display}   [bold]template[/] {template.name} ({template.source})   "
                  f"[bold]stage[/] {config.stage}   [bold]cutoff_len[/] {config.cutoff_len}")
    if template.note:
        console.print(f"[dim]note: {template.note}[/]")
    console.print("[dim]legend:[/] [dim]masked (label -100)[/]  [bold green]trained[/]\n")

    stats_table = Table(title="datasets", title_justify="left")
    for column in ("dataset", "examples", "skipped", "truncated", "dropped", "tokens", "trained", "length min/mean/max"):
        stats_table.add_column(column, justify="right" if column not in ("dataset", "skipped") else "left")
    all_lengths: list[int] = []
    options = DataOptions.from_config(config)
    variants, _ = system_prompt_variants(config, options)
    user_examples = 0
    for name in [*config.dataset, *(config.eval_dataset or [])]:
        training = name in config.dataset
        examples, stats = encode_dataset(name, options, tokenizer, variants=variants if training else None)
        user_examples += len(examples) if training else 0
        if stats.detected_format:
            console.print(f"[dim]dataset {name}: detected {stats.detected_format} format[/]")
        all_lengths.extend(_show(tokenizer, name, examples, stats, num_examples, stats_table))
    plan = plan_replay(config, user_examples)
    if plan is not None:
        all_lengths.extend(_preview_replay(config, options, tokenizer, template, plan, variants, num_examples,
                                           stats_table))
    console.print()
    console.print(stats_table)
    if all_lengths:
        waste = padding_stats(all_lengths, config.per_device_train_batch_size, packing=True,
                              cutoff_len=config.cutoff_len)
        _print_padding(waste, config)


def _show(tokenizer: Any, name: str, examples: list, stats: Any, num_examples: int, table: Table,
          label: str = "", planned: str = "") -> list[int]:
    """Print the first examples of one dataset and add its row to the statistics table; returns lengths."""
    for index, example in enumerate(examples[:num_examples]):
        trained = sum(1 for t in example.labels if t != -100)
        console.rule(f"{label}{name} #{index}: {len(example.input_ids)} tokens, {trained} trained")
        console.print(highlighted(tokenizer, example.input_ids, example.labels))
    lengths = [len(e.input_ids) for e in examples]
    reasons = stats.conversion.skipped.most_common()
    # The table names each reason briefly; the sentence with the first record and the fix goes below it.
    skipped = ", ".join(f"{n} {reason.split(' (first: ')[0]}" for reason, n in reasons) or "-"
    for reason, n in reasons:
        console.print(f"[yellow]{name}: skipped {n} record{'s' if n > 1 else ''} with {reason}[/]", soft_wrap=True)
    table.add_row(
        name, planned or f"{stats.encoded:,}/{stats.conversion.total:,}", skipped, str(stats.truncated),
        str(stats.dropped_no_trained_tokens), f"{stats.tokens:,}", f"{stats.trained_tokens:,}",
        f"{min(lengths)}/{sum(lengths) / len(lengths):.0f}/{max(lengths)}" if lengths else "-",
    )
    return lengths


def _preview_replay(config: Any, options: Any, tokenizer: Any, template: Any, plan: Any, variants: Any,
                    num_examples: int, table: Table) -> list[int]:
    """Show the replay examples a run mixes in, marked as replay.

    Self-replay answers come from the answer cache; when it lacks them, only the few shown are generated
    now (loading the model as ``ftkit train`` loads it, so the cache is the one training reads), the rest
    at train time.
    """
    from ftkit.data.dataset import DatasetStats, encode_conversations
    from ftkit.data.formats import ConversionReport
    from ftkit.guard import BaseModelAnswers, replay_conversations
    from ftkit.models import (
        LazyModel,
        LoadOptions,
        default_device,
        model_source_from_config,
        resolve_load_dtype,
        resolve_mixed_precision,
    )

    device = default_device()
    dtype = resolve_load_dtype(resolve_mixed_precision(config.bf16, config.fp16, device), config.finetuning_type)
    source, load_options = model_source_from_config(config), LoadOptions.from_config(config)
    answers = BaseModelAnswers(config, source, template.jinja, load_options, dtype, tokenizer,
                               LazyModel.of(source, dtype=dtype, device=device, options=load_options),
                               report=lambda m: console.print(f"[dim]{m}[/]"), device=device)
    if plan.is_self:
        cached = answers.self_replay_cached(plan.count)
        conversations = cached if len(cached) >= min(num_examples, plan.count) else answers.self_replay(num_examples)[0]
        planned = f"{plan.count:,} planned, {len(cached):,} cached"
    else:
        conversations, _ = replay_conversations(config, plan, None)
        planned = f"{len(conversations):,} planned"
    name = f"replay ({plan.source})"
    stats = DatasetStats(name=name, conversion=ConversionReport(dataset=name, total=len(conversations),
                                                                kept=len(conversations)))
    examples = encode_conversations(conversations, options, tokenizer, stats, variants=variants, name="replay")
    console.print(f"[dim]{plan.notice(plan.count)}[/]")
    return _show(tokenizer, name, examples, stats, num_examples, table, label="[REPLAY] ", planned=planned)


def _print_padding(waste: dict[str, Any], config: Any) -> None:
    table = Table(title=f"padding waste (batch size {config.per_device_train_batch_size})", title_justify="left")
    table.add_column("batching")
    table.add_column("padding tokens", justify="right")
    for key, value in waste.items():
        if isinstance(value, float):
            table.add_row(key.replace("_", " "), f"{value:.1%}")
    console.print(table)
    mode = ("packing" if config.uses_packing else
            "padding-free batches" if config.padding_free else
            "length-grouped batches" if config.group_by_length else "plain padded batches")
    console.print(f"[dim]this config trains with {mode}[/]")
