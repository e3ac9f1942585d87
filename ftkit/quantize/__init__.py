"""``ftkit quantize``: int8/int4 weights (torchao), static int8 with calibration, bitsandbytes, and GGUF export,
each measured against the original in the same run (``quantize_report.json`` and a terminal table)."""

from ftkit.quantize.run import QuantizeResult, run_quantize

__all__ = ["QuantizeResult", "run_quantize"]
