"""Training throughput and peak memory: ftkit vs. a plain trl SFTTrainer, same model, data and settings.

Both run one epoch of LoRA (r=16, alpha=32, every linear layer but the head, no dropout) on the
embedded SmolLM2-135M-Instruct over the same conversations (identity + alpaca_en_demo + sharegpt_demo),
batch 8, learning rate 1e-4, gradient checkpointing on (trl's default), each in a fresh process. trl
runs with its defaults otherwise (``use_cpu=True`` on CPU, where its default ``bf16=True`` means bf16
autocast). ftkit runs with its defaults (bf16 where the CPU is fast at it, padding-free batches,
logits only at trained positions).

Useful tokens/s = the real (non-padding) tokens of the examples each tool trained on, divided by the
wall time of ``trainer.train()``. Peak RSS = the process's maximum resident set size.

    python bench/train_throughput.py            # both, then the ratio
    python bench/train_throughput.py --only ftkit
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATASETS = "identity,alpaca_en_demo,sharegpt_demo"
BATCH, RANK, LR = 8, 16, 1e-4
FTKIT_OPTIONS = json.loads(os.environ.get("FTKIT_BENCH_OPTIONS", "{}"))  # e.g. {"disable_gradient_checkpointing": false}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def conversations() -> list[list[dict[str, str]]]:
    """The benchmark data, normalised by ftkit's own readers so both tools see the same conversations."""
    from ftkit.config import TrainConfig
    from ftkit.data.formats import records_to_conversations
    from ftkit.data.readers import read_records
    from ftkit.data.registry import resolve_dataset

    config = TrainConfig(output_dir="unused", dataset=DATASETS, dataset_dir=str(ROOT / "data"))
    result = []
    for name in config.dataset:
        spec = resolve_dataset(name, config.dataset_dir)
        convs, _ = records_to_conversations(read_records(spec), spec, replacements={
            "{{name}}": config.identity_name, "{{author}}": config.identity_author})
        result.extend(convs)
    return result


def run_trl(workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from ftkit.models.embedded import ensure_embedded_model

    model_dir = ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = Dataset.from_list([{"messages": c} for c in conversations()])
    args = SFTConfig(output_dir=str(workdir / "trl"), per_device_train_batch_size=BATCH, num_train_epochs=1,
                     learning_rate=LR, use_cpu=True, logging_steps=5, save_strategy="no", report_to=[],
                     seed=42, max_length=1024, disable_tqdm=True)
    peft_config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    return {"tool": "trl SFTTrainer", "tokens": tokens, "seconds": seconds, "steps": output.global_step,
            "loss": output.training_loss, "peak_rss_mb": peak_rss_mb()}


def run_ftkit(workdir: Path) -> dict:
    from ftkit.config import LoadedConfig, TrainConfig
    from ftkit.train import run_training

    config = TrainConfig(
        output_dir=str(workdir / "ftkit"), dataset=DATASETS, dataset_dir=str(ROOT / "data"), finetuning_type="lora",
        lora_rank=RANK, lora_target="all", per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=LR,
        logging_steps=5, save_strategy="no", cutoff_len=1024, plot_loss=False,
        # the forgetting guard adds data and generation trl does not do; bench/forgetting.py measures it
        replay_ratio=0, system_prompt_variants=False, general_check=False, **FTKIT_OPTIONS,
    )
    result = run_training(LoadedConfig(config=config, path=None))
    metrics = result.metrics
    return {"tool": "ftkit", "tokens": metrics["tokens_this_process"], "seconds": metrics["train_runtime_seconds"],
            "steps": metrics["global_step"], "loss": metrics["train_loss"], "peak_rss_mb": peak_rss_mb()}


def child(tool: str) -> None:
    os.environ.setdefault("FTKIT_HOME", str(Path.home() / ".cache" / "ftkit"))
    with tempfile.TemporaryDirectory() as tmp:
        result = (run_trl if tool == "trl" else run_ftkit)(Path(tmp))
    result["tokens_per_second"] = result["tokens"] / result["seconds"]
    print("RESULT " + json.dumps(result), flush=True)


def measure(tool: str) -> dict:
    process = subprocess.run([sys.executable, __file__, "--child", tool], capture_output=True, text=True)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        sys.stderr.write(process.stderr[-3000:])
        raise SystemExit(f"{tool} run failed")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["trl", "ftkit"], help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=["trl", "ftkit"])
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    tools = [args.only] if args.only else ["trl", "ftkit"]
    results = {tool: measure(tool) for tool in tools}
    print(f"{'tool':<16}{'useful tok/s':>14}{'tokens':>10}{'train s':>10}{'steps':>7}{'loss':>9}{'peak RSS MB':>13}")
    for r in results.values():
        print(f"{r['tool']:<16}{r['tokens_per_second']:>14.1f}{r['tokens']:>10}{r['seconds']:>10.1f}{r['steps']:>7}"
              f"{r['loss']:>9.4f}{r['peak_rss_mb']:>13.0f}")
    if len(results) == 2:
        speed = results["ftkit"]["tokens_per_second"] / results["trl"]["tokens_per_second"]
        memory = results["ftkit"]["peak_rss_mb"] / results["trl"]["peak_rss_mb"]
        print(f"ftkit / trl: {speed:.2f}x useful tokens/s, {memory:.2f}x peak RSS")


if __name__ == "__main__":
    main()
