"""``quantize_report.json`` and the terminal table: the original and the quantized model side by side.

The table reads like the quantization seed's (method, memory, latency per sample, quality) with this run's
own figures: size on disk, peak memory while loading and generating, prompt and generation speed, latency
per sample, perplexity on the held-out text, top-1 agreement and the largest logit difference.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ftkit.quantize.measure import Measurement

REPORT_NAME = "quantize_report.json"
WEIGHT_SUFFIXES = (".safetensors", ".gguf")
MB = 1024 * 1024


def file_sizes(directory: Path) -> dict[str, int]:
    """Every file in ``directory`` (the report excepted: it cannot hold its own size) and its size in bytes."""
    return {path.name: path.stat().st_size for path in sorted(directory.iterdir())
            if path.is_file() and path.name != REPORT_NAME}


def weights_bytes(files: dict[str, int]) -> int:
    """Size on disk of the weights: the safetensors shards or the GGUF file."""
    return sum(size for name, size in files.items() if name.endswith(WEIGHT_SUFFIXES))


def model_entry(label: str, size_bytes: int, measurement: Measurement | None, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"label": label, "size_bytes": size_bytes, **extra}
    if measurement is not None:
        entry.update(asdict(measurement))
    return entry


def ratios(original: dict[str, Any], quantized: dict[str, Any]) -> dict[str, float]:
    """Quantized over original: size, generation speed; perplexity change in percent."""
    found = {"size": quantized["size_bytes"] / original["size_bytes"]}
    if "generation_tokens_per_s" in original and "generation_tokens_per_s" in quantized:
        found["generation_speedup"] = quantized["generation_tokens_per_s"] / original["generation_tokens_per_s"]
        found["prompt_speedup"] = quantized["prompt_tokens_per_s"] / original["prompt_tokens_per_s"]
        found["perplexity_change_percent"] = 100 * (quantized["perplexity"] / original["perplexity"] - 1)
    return found


def print_table(report: dict[str, Any], console: Console) -> None:
    """The report as a rich table, one row per model."""
    table = Table(title=f"ftkit quantize: {report['method_label']} vs the original (same run, this machine)")
    for column in ("model", "size MB", "peak mem MB", "prompt tok/s", "gen tok/s", "latency/sample s",
                   "perplexity", "top-1 agree", "max |Δlogit|"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in table_rows(report):
        table.add_row(*row)
    console.print(table)


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """The table's cells as text (also used by bench/quantize.py for its markdown table)."""
    original, quantized, ratio = report["original"], report["quantized"], report["ratios"]
    rows = []
    for entry in (original, quantized):
        is_original = entry is original
        size = f"{entry['size_bytes'] / MB:.1f}" + ("" if is_original else f" ({ratio['size']:.2f}x)")
        if "perplexity" not in entry:
            rows.append([entry["label"], size] + ["-"] * 7)
            continue
        speed = f"{entry['generation_tokens_per_s']:.1f}" + (
            "" if is_original else f" ({ratio['generation_speedup']:.2f}x)")
        ppl = f"{entry['perplexity']:.3f}" + ("" if is_original else f" ({ratio['perplexity_change_percent']:+.2f}%)")
        agree = "-" if entry.get("top1_agreement") is None else f"{100 * entry['top1_agreement']:.1f}%"
        diff = "-" if entry.get("max_abs_logit_diff") is None else f"{entry['max_abs_logit_diff']:.3f}"
        rows.append([entry["label"], size, f"{entry['peak_memory_bytes'] / MB:.0f}",
                     f"{entry['prompt_tokens_per_s']:.0f}", speed, f"{entry['latency_per_sample_s']:.2f}", ppl,
                     agree, diff])
    return rows
