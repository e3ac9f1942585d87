"""ftkit quantize on the embedded model: every method that runs here, one table, the issue's targets checked.

Each method is one ``ftkit quantize`` run (``run_quantize``, the same code the command runs): the original
(fp32) and the output are measured back to back in the same process, so each row's ratios compare like with
like even when the machine's load drifts between runs. Methods whose backend cannot run here (int4 in
torchao 0.18, gptq, awq: CUDA) are listed with the reason.

    python bench/quantize.py                         # every method, embedded model
    python bench/quantize.py --methods int8 gguf:q8_0 --model DIR

Targets (issue 18): int8 methods size <= 0.30x fp32, perplexity within +1%, top-1 agreement >= 98%; 4-bit
methods size <= 0.20x, perplexity within +10%; the method recommended for CPU inference generates >= 1.5x as
fast as fp32; GGUF q8_0 read back through transformers agrees top-1 >= 98%.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_METHODS = ["int8", "int8@fp32", "int8-dynamic", "int8-static", "bnb-int8", "bnb-nf4", "bnb-fp4", "gguf:f16",
                   "gguf:bf16", "gguf:q8_0", "gguf:q5_0", "gguf:q4_0", "int4", "gptq", "awq"]
"""``method``, ``gguf:TYPE`` for a GGUF type, ``method@DTYPE`` for another export_dtype (default auto: bf16 here)."""
RECOMMENDED_FOR_CPU = "int8"


def targets(method: str, report: dict) -> list[str]:
    """The issue's targets this row is held to, each 'met' or 'missed' with the measured value."""
    ratio, quantized = report["ratios"], report["quantized"]
    checks: list[tuple[str, bool]] = []
    method = method.partition("@")[0]
    eight_bit = method in ("int8", "int8-dynamic", "int8-static", "bnb-int8", "gguf:q8_0")
    four_bit = method in ("bnb-nf4", "bnb-fp4", "gguf:q4_0", "gguf:q5_0")
    if eight_bit:
        checks += [(f"size {ratio['size']:.2f}x <= 0.30x", ratio["size"] <= 0.30),
                   (f"ppl {ratio['perplexity_change_percent']:+.2f}% <= +1%", ratio["perplexity_change_percent"] <= 1),
                   (f"top-1 {100 * quantized['top1_agreement']:.1f}% >= 98%", quantized["top1_agreement"] >= 0.98)]
    if four_bit:
        checks += [(f"size {ratio['size']:.2f}x <= 0.20x", ratio["size"] <= 0.20),
                   (f"ppl {ratio['perplexity_change_percent']:+.2f}% <= +10%",
                    ratio["perplexity_change_percent"] <= 10)]
    if method == RECOMMENDED_FOR_CPU:
        checks.append((f"gen {ratio['generation_speedup']:.2f}x >= 1.5x", ratio["generation_speedup"] >= 1.5))
    return [f"{text}: {'met' if ok else 'MISSED'}" for text, ok in checks]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="method or gguf:TYPE")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=512)
    parser.add_argument("--json", type=Path, help="Also write every report here.")
    args = parser.parse_args()
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

    import torch
    from rich.console import Console

    from ftkit.config import QuantizeConfig, load_stage_config
    from ftkit.errors import FtkitError
    from ftkit.quantize import run_quantize
    from ftkit.quantize.report import table_rows

    quiet = Console(stderr=True, quiet=True)
    import ftkit.quantize.run as run_module

    run_module.console = quiet  # the bench prints its own table
    reports, refused, rows = {}, {}, []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="ftkit-bench-quantize-") as workdir:
        for entry in args.methods:
            spec, _, export_dtype = entry.partition("@")
            method, _, gguf_type = spec.partition(":")
            keys = {"model_name_or_path": args.model, "method": method, "export_dir": f"{workdir}/{entry}",
                    "bench_new_tokens": args.new_tokens, "eval_max_tokens": args.eval_tokens}
            if export_dtype:
                keys["export_dtype"] = export_dtype
            if gguf_type:
                keys["gguf_type"] = gguf_type
            print(f"[{time.time() - started:6.0f} s] {entry} ...", file=sys.stderr, flush=True)
            try:
                report = run_quantize(load_stage_config(QuantizeConfig, None, keys).config).report
            except FtkitError as error:
                refused[entry] = str(error)
                continue
            reports[entry] = report
            original, quantized = table_rows(report)
            if not rows:
                rows.append(original + [""])
            quantized[0] += f" [{entry}]" if "@" in entry else ""
            rows.append(quantized + ["; ".join(targets(entry, report))])
    header = ["method", "size MB", "peak mem MB", "prompt tok/s", "gen tok/s", "latency/sample s", "perplexity",
              "top-1 agree", "max |Δlogit|", "targets (issue 18)"]
    print(f"ftkit quantize on {args.model}: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.new_tokens} generated tokens x 3 prompts, {args.eval_tokens} held-out tokens\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    originals = [r["original"]["generation_tokens_per_s"] for r in reports.values()]
    if originals:
        print(f"\nThe original, re-measured before each method: generation {min(originals):.1f}-{max(originals):.1f} "
              "tokens/s (run-to-run spread; each row's ratio is against its own run's original).")
    for entry, reason in refused.items():
        print(f"- {entry}: not run here: {reason}")
    if args.json:
        args.json.write_text(json.dumps({"reports": reports, "refused": refused}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
