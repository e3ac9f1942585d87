"""Peak memory of ``ftkit merge-lora`` on the embedded model, against the size of the fp32 model + adapter.

    OMP_NUM_THREADS=1 .venv/bin/python bench/merge_memory.py [--adapter DIR]

Makes a LoRA adapter (rank 16 on every linear layer, as the quickstart trains; random non-zero weights)
unless one is given, then runs each merge in a fresh subprocess that reports its own peak RSS
(``ru_maxrss``) and its RSS after importing torch, transformers and peft (the interpreter baseline, which
does not grow with the model). The budget is peak < 1.3 x (fp32 model + adapter); both the whole-process
ratio and the ratio above the baseline are printed, since on a 135M model the baseline is most of it.

Three cases: the embedded checkpoint (stored fp32) exported as fp32 (its ``auto``) and as bf16, and a bf16
copy of it exported as bf16 (its ``auto``; how most hub models are stored). A checkpoint whose dtype is the
load dtype (fp32) is memory-mapped, so its pages stay mapped until the last tensor is cast: an fp32
checkpoint exported in half precision briefly holds the fp32 pages and the bf16 copy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MAKE_ADAPTER = r"""
import sys, torch
from ftkit.data.templates import apply_chat_template_to_tokenizer
from ftkit.models import apply_lora, find_lora_targets, load_model, load_tokenizer, resolve_model_source, sync_special_tokens
source = resolve_model_source("smollm2-135m-instruct")
tokenizer = load_tokenizer(source)
apply_chat_template_to_tokenizer(tokenizer, "auto")
model = load_model(source, dtype=torch.float32)
sync_special_tokens(model, tokenizer)
model = apply_lora(model, rank=16, alpha=32, targets=find_lora_targets(model, ["all"]), gradient_checkpointing=False)
generator = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.005)
model.save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
"""

SAVE_BF16_COPY = r"""
import sys, torch
from ftkit.models import load_model, load_tokenizer, resolve_model_source
source = resolve_model_source("smollm2-135m-instruct")
load_model(source, dtype=torch.bfloat16).save_pretrained(sys.argv[1])
load_tokenizer(source).save_pretrained(sys.argv[1])
"""

MEASURED_MERGE = r"""
import json, resource, sys
import psutil, torch, transformers, peft  # imported by any merge; counted in the baseline
baseline = psutil.Process().memory_info().rss
from ftkit.cli import main
sys.argv = ["ftkit", "merge-lora", *sys.argv[1:]]
status = 0
try:
    main()
except SystemExit as exit_:
    status = exit_.code or 0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
print(json.dumps({"baseline": baseline, "peak": peak, "status": status}))
"""


def safetensors_fp32_bytes(directory: Path) -> int:
    """Size of every tensor in the directory's safetensors files if stored in fp32 (4 bytes per value)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118
                shape = weights.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += 4 * count
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, help="An adapter of smollm2-135m-instruct (default: make one).")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    from ftkit.models import ensure_embedded_model

    model_bytes = safetensors_fp32_bytes(ensure_embedded_model())
    with tempfile.TemporaryDirectory(prefix="ftkit-merge-bench-") as scratch:
        adapter = args.adapter
        if adapter is None:
            adapter = Path(scratch) / "adapter"
            subprocess.run([sys.executable, "-c", MAKE_ADAPTER, str(adapter)], check=True, env=env,
                           capture_output=True)
        bf16_base = Path(scratch) / "bf16" / "smollm2-135m-instruct"  # same name: the adapter's base check passes
        subprocess.run([sys.executable, "-c", SAVE_BF16_COPY, str(bf16_base)], check=True, env=env, capture_output=True)
        adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
        budget = model_bytes + adapter_bytes
        print(f"fp32 model {model_bytes / 1e6:.0f} MB + adapter {adapter_bytes / 1e6:.1f} MB = {budget / 1e6:.0f} MB")
        cases = [("fp32 checkpoint -> fp32 (auto)", "smollm2-135m-instruct", "auto"),
                 ("fp32 checkpoint -> bf16", "smollm2-135m-instruct", "bf16"),
                 ("bf16 checkpoint -> bf16 (auto)", str(bf16_base), "auto")]
        for index, (label, base, dtype) in enumerate(cases):
            run = subprocess.run(
                [sys.executable, "-c", MEASURED_MERGE, "--base", base, "--adapter", str(adapter),
                 "--out", str(Path(scratch) / f"merged-{index}"), f"export_dtype={dtype}"],
                capture_output=True, text=True, env=env,
            )
            report = json.loads(run.stdout.strip().splitlines()[-1]) if run.stdout.strip() else {"status": 1}
            if run.returncode != 0 or report["status"]:
                sys.exit(f"merge {label} failed:\n{run.stderr}")
            peak, baseline = report["peak"], report["baseline"]
            print(f"{label:31s} peak RSS {peak / 1e6:5.0f} MB = {peak / budget:.2f}x model + adapter; above the "
                  f"{baseline / 1e6:.0f} MB interpreter baseline {(peak - baseline) / 1e6:4.0f} MB = "
                  f"{(peak - baseline) / budget:.2f}x")

if __name__ == "__main__":
    main()
