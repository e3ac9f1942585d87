"""Training throughput and peak memory: ftkit vs. trl's SFTTrainer (and LLaMA-Factory), same model, data and settings.

Every tool trains LoRA (r=16, alpha=32, every linear layer but the head, no dropout) at batch 8 and learning
rate 1e-4, each in a fresh process, in the precision this CPU is fast at (bf16 autocast where it has native
bf16, fp32 otherwise; the same for all). Otherwise each runs with its own defaults: trl and LLaMA-Factory
turn gradient checkpointing on, ftkit decides from the data. Two workloads:

- ``mix``: identity + alpaca_en_demo + sharegpt_demo, 220 conversations of up to ~500 tokens, one epoch;
- ``identity``: 60 short identity conversations under a system prompt (``bench/small_sets/id_sharegpt_sys``),
  6 epochs.

Three model sizes: the embedded SmolLM2-135M-Instruct, and random-initialised models built here from the
published configs of SmolLM2-360M and Llama-3.2-1B (throughput and memory need no trained weights; the
SmolLM2 tokenizer's ids fit both vocabularies). Above 135M every tool trains one epoch of the same
``--steps`` x 8 conversations, drawn once by a seeded shuffle, so the runs stay short and equal.

Useful tokens/s = the real (non-padding) tokens of the examples trained on (each example's tokens under the
model's chat template, times the epochs: the same for every tool) over the Trainer's own ``train_runtime``. Peak RSS = the training process's maximum resident set size. Ceiling = this machine's
matmul rate at the model's shapes in the training precision, over 4 x the linear layers' parameters per token
(forward, and the backward's input gradients; LoRA adds under 1%).

    python bench/train_throughput.py                                   # ftkit vs trl, mix, 135M (make bench)
    python bench/train_throughput.py --with-llamafactory ~/lf-venv     # + LLaMA-Factory 0.9.5 (installed there)
    python bench/train_throughput.py --sizes 135m,360m,1b --workloads identity,mix --with-llamafactory ~/lf-venv
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCH, RANK, LR = 8, 16, 1e-4
WORKLOADS = {  # name: (datasets, dataset_dir, epochs)
    "mix": ("identity,alpaca_en_demo,sharegpt_demo", ROOT / "data", 1),
    "identity": ("id_sharegpt_sys", ROOT / "bench" / "small_sets", 6),
}
# published configs (Llama architecture); 135m is the embedded model itself
SIZES = {
    "360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
             "num_key_value_heads": 5, "vocab_size": 49152, "rope_theta": 100000.0, "tie_word_embeddings": True,
             "max_position_embeddings": 8192, "rms_norm_eps": 1e-5},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0, "tie_word_embeddings": True,
           "max_position_embeddings": 131072, "rms_norm_eps": 1e-5},
}
LLAMA_FACTORY = "llamafactory==0.9.5"
TORCH = "torch==2.13.0"
FTKIT_OPTIONS = json.loads(os.environ.get("FTKIT_BENCH_OPTIONS", "{}"))  # e.g. {"disable_gradient_checkpointing": false}


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def fast_bf16() -> bool:
    from ftkit.models.precision import cpu_has_fast_bf16

    return cpu_has_fast_bf16()


# -- data and models ----------------------------------------------------------------------------------------
def conversations(workload: str, subset: int = 0) -> list[list[dict[str, str]]]:
    """The workload's conversations, normalised by ftkit's own readers so every tool sees the same ones;
    ``subset`` > 0: that many of them, drawn by a seeded shuffle."""
    from ftkit.config import TrainConfig
    from ftkit.data.formats import records_to_conversations
    from ftkit.data.readers import read_records
    from ftkit.data.registry import resolve_dataset

    datasets, folder, _ = WORKLOADS[workload]
    config = TrainConfig(output_dir="unused", dataset=datasets, dataset_dir=str(folder))
    result = []
    for name in config.dataset:
        spec = resolve_dataset(name, config.dataset_dir)
        convs, _ = records_to_conversations(read_records(spec), spec, replacements={
            "{{name}}": config.identity_name, "{{author}}": config.identity_author})
        result.extend(convs)
    if subset:
        import random

        random.Random(0).shuffle(result)
        result = result[:subset]
    return result


def write_dataset(convs: list, folder: Path) -> None:
    """``convs`` as a sharegpt-style dataset named ``bench`` (OpenAI messages), for ftkit and LLaMA-Factory."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.json").write_text(json.dumps([{"messages": c} for c in convs]))
    (folder / "dataset_info.json").write_text(json.dumps({"bench": {
        "file_name": "bench.json", "formatting": "sharegpt", "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "system_tag": "system"}}}))


def total_tokens(convs: list, model_dir: Path) -> int:
    """Real tokens of ``convs`` under the model's chat template (what every tool trains on, per epoch)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return sum(len(tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]) for c in convs)


def model_dir(size: str, cache: Path) -> Path:
    """The embedded model (135m), or a random Llama of a published config saved once under ``cache``."""
    from ftkit.models.embedded import ensure_embedded_model

    embedded = ensure_embedded_model()
    if size == "135m":
        return embedded
    folder = cache / f"random-{size}"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SIZES[size], bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                 "generation_config.json"):
        if (embedded / name).is_file():
            shutil.copy(embedded / name, folder / name)
    return folder


def linear_parameters(folder: Path) -> int:
    """Parameters of every matmul a token passes through: the decoder's linear layers and the output head."""
    config = json.loads((folder / "config.json").read_text())
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    attention = h * h * 2 + h * kv * 2  # q, o; k, v
    return layers * (attention + 3 * h * i) + config["vocab_size"] * h


def matmul_gflops(folder: Path, bf16: bool) -> float:
    """This machine's matmul rate at the model's MLP shapes (a batch of 8 x 64 tokens), in the training dtype."""
    import torch

    config = json.loads((folder / "config.json").read_text())
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(512, config["hidden_size"], dtype=dtype)
    b = torch.randn(config["hidden_size"], config["intermediate_size"], dtype=dtype)
    for _ in range(3):
        a @ b
    repeats, start = 50, time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] * repeats / (time.perf_counter() - start) / 1e9


# -- the tools, each in its own process -----------------------------------------------------------------------
def run_trl(job: dict, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    dataset = Dataset.from_list([{"messages": c} for c in conversations(job["workload"], job["subset"])])
    args = SFTConfig(output_dir=str(workdir / "trl"), per_device_train_batch_size=BATCH, learning_rate=LR,
                     num_train_epochs=job["epochs"], use_cpu=True, bf16=job["bf16"],
                     logging_steps=5, save_strategy="no", report_to=[], seed=42, max_length=1024, disable_tqdm=True)
    peft_config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    output = trainer.train()
    return {"seconds": output.metrics["train_runtime"], "steps": output.global_step, "loss": output.training_loss,
            "peak_rss_mb": peak_rss_mb()}


def run_ftkit(job: dict, workdir: Path) -> dict:
    from ftkit.config import LoadedConfig, TrainConfig
    from ftkit.train import run_training

    datasets, folder, _ = WORKLOADS[job["workload"]]
    if job["subset"]:
        datasets, folder = "bench", workdir / "data"
        write_dataset(conversations(job["workload"], job["subset"]), folder)
    config = TrainConfig(
        model_name_or_path=str(job["model"]), output_dir=str(workdir / "ftkit"), dataset=datasets,
        dataset_dir=str(folder), finetuning_type="lora", lora_rank=RANK, lora_target="all",
        per_device_train_batch_size=BATCH, num_train_epochs=job["epochs"],
        learning_rate=LR, bf16=job["bf16"], logging_steps=5, save_strategy="no", cutoff_len=1024, plot_loss=False,
        # the forgetting guard adds data and generation the others do not do; bench/forgetting.py measures it
        replay_ratio=0, system_prompt_variants=False, general_check=False, learned_check=False, **FTKIT_OPTIONS,
    )
    metrics = run_training(LoadedConfig(config=config, path=None)).metrics
    return {"seconds": metrics["train_runtime_seconds"], "steps": metrics["global_step"],
            "loss": metrics["train_loss"], "peak_rss_mb": peak_rss_mb()}


def run_llamafactory(job: dict, workdir: Path) -> dict:
    """``llamafactory-cli train`` from its own venv on the same conversations (OpenAI-style messages)."""
    data = workdir / "data"
    write_dataset(conversations(job["workload"], job["subset"]), data)
    output = workdir / "llamafactory"
    settings = {
        "model_name_or_path": str(job["model"]), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": RANK, "lora_alpha": 2 * RANK, "lora_dropout": 0.0, "lora_target": "all",
        "dataset": "bench", "dataset_dir": str(data), "template": "smollm2", "cutoff_len": 1024,
        "output_dir": str(output), "per_device_train_batch_size": BATCH, "gradient_accumulation_steps": 1,
        "learning_rate": LR, "num_train_epochs": job["epochs"],
        "lr_scheduler_type": "cosine", "bf16": job["bf16"], "logging_steps": 5, "save_strategy": "no",
        "report_to": "none", "seed": 42, "overwrite_output_dir": True, "preprocessing_num_workers": 1,
        "use_cpu": True,
    }
    config = workdir / "llamafactory.yaml"
    config.write_text(json.dumps(settings))  # JSON is YAML
    cli = Path(job["llamafactory"]) / "bin" / "llamafactory-cli"
    env = {**os.environ, "DISABLE_VERSION_CHECK": "1", "CUDA_VISIBLE_DEVICES": ""}
    process = subprocess.run([str(cli), "train", str(config)], capture_output=True, text=True, env=env)
    if process.returncode != 0:
        sys.stderr.write(process.stderr[-4000:])
        raise SystemExit("LLaMA-Factory run failed")
    results = json.loads((output / "train_results.json").read_text())
    state = json.loads((output / "trainer_state.json").read_text())
    return {"seconds": results["train_runtime"], "steps": state["global_step"], "loss": results["train_loss"],
            "peak_rss_mb": peak_rss_mb(resource.RUSAGE_CHILDREN)}


RUNNERS = {"trl": run_trl, "ftkit": run_ftkit, "llamafactory": run_llamafactory}
NAMES = {"trl": "trl SFTTrainer", "ftkit": "ftkit", "llamafactory": "LLaMA-Factory"}


def child(job: dict) -> None:
    os.environ.setdefault("FTKIT_HOME", str(Path.home() / ".cache" / "ftkit"))
    with tempfile.TemporaryDirectory() as tmp:
        result = RUNNERS[job["tool"]](job, Path(tmp))
    print("RESULT " + json.dumps(result), flush=True)


def measure(job: dict) -> dict:
    process = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        sys.stderr.write(process.stderr[-3000:])
        raise SystemExit(f"{job['tool']} run failed ({job['size']}, {job['workload']})")
    return json.loads(lines[-1][len("RESULT "):])


def install_llamafactory(venv: Path) -> None:
    """LLaMA-Factory 0.9.5 in its own venv, torch pinned first (an unpinned one resolves to a CUDA build).

    Its CUDA torchvision and torchaudio's native libraries break its import on a CPU machine, so the first is
    uninstalled and the second's ``lib/*.so`` moved aside."""
    python = venv / "bin" / "python"
    if not (venv / "bin" / "llamafactory-cli").exists():
        print(f"installing {LLAMA_FACTORY} into {venv} ...", flush=True)
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", TORCH], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", TORCH, LLAMA_FACTORY], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision"], capture_output=True)
    for library in venv.glob("lib/python*/site-packages/torchaudio/lib/*.so"):
        library.rename(library.with_suffix(".so.moved-aside"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=["trl", "ftkit", "llamafactory"])
    parser.add_argument("--with-llamafactory", metavar="VENV", type=Path,
                        help=f"also measure {LLAMA_FACTORY}, installed into VENV if it is not there")
    parser.add_argument("--sizes", default="135m", help="comma-separated, from 135m, 360m, 1b (default: 135m)")
    parser.add_argument("--workloads", default="mix", help="comma-separated, from mix, identity (default: mix)")
    parser.add_argument("--steps", type=int, default=6,
                        help="above 135M, train one epoch of this many batches of the workload (default: 6)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ftkit-bench-models",
                        help="where the random models are saved (reused)")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    tools = ["trl", "ftkit"] + (["llamafactory"] if args.with_llamafactory else [])
    if args.only:
        tools = [args.only]
    if "llamafactory" in tools:
        if not args.with_llamafactory:
            parser.error("--only llamafactory needs --with-llamafactory VENV")
        install_llamafactory(args.with_llamafactory.expanduser().resolve())
    bf16 = fast_bf16()
    print(f"precision: {'bf16 autocast' if bf16 else 'fp32 (no native bf16 on this CPU)'} for every tool", flush=True)
    rows = []
    for size in args.sizes.split(","):
        folder = model_dir(size, args.cache)
        gflops = matmul_gflops(folder, bf16)
        ceiling = gflops * 1e9 / (4 * linear_parameters(folder))
        for workload in args.workloads.split(","):
            subset = args.steps * BATCH if size != "135m" else 0
            epochs = WORKLOADS[workload][2] if not subset else 1
            tokens = total_tokens(conversations(workload, subset), folder) * epochs
            results = {}
            for tool in tools:
                job = {"tool": tool, "size": size, "workload": workload, "model": str(folder), "bf16": bf16,
                       "epochs": epochs, "subset": subset,
                       "llamafactory": str(args.with_llamafactory.expanduser().resolve())
                       if args.with_llamafactory else None}
                result = measure(job)
                result.update(tool=tool, tokens=tokens, tokens_per_second=tokens / result["seconds"])
                results[tool] = result
                print(f"  {size} {workload} {NAMES[tool]}: {result['tokens_per_second']:.1f} tok/s, "
                      f"{result['peak_rss_mb']:.0f} MB", flush=True)
            rows.append((size, workload, gflops, ceiling, results))
    report(rows)


def report(rows: list) -> None:
    print(f"\n{'size':<6}{'workload':<10}{'tool':<16}{'useful tok/s':>13}{'train s':>9}{'steps':>7}{'loss':>8}"
          f"{'peak RSS MB':>13}{'of ceiling':>12}")
    for size, workload, _, ceiling, results in rows:
        for r in results.values():
            print(f"{size:<6}{workload:<10}{NAMES[r['tool']]:<16}{r['tokens_per_second']:>13.1f}{r['seconds']:>9.1f}"
                  f"{r['steps']:>7}{r['loss']:>8.4f}{r['peak_rss_mb']:>13.0f}{r['tokens_per_second'] / ceiling:>12.0%}")
    print()
    for size, workload, gflops, ceiling, results in rows:
        if "ftkit" not in results or len(results) < 2:
            continue
        ours = results["ftkit"]
        peers = [t for t in results if t != "ftkit"]
        ratios = ", ".join(f"{ours['tokens_per_second'] / results[t]['tokens_per_second']:.2f}x {NAMES[t]}'s speed, "
                           f"{ours['peak_rss_mb'] / results[t]['peak_rss_mb']:.2f}x its memory" for t in peers)
        print(f"{size} {workload}: ftkit {ratios}; ceiling {ceiling:.0f} tok/s ({gflops:.0f} GFLOP/s matmuls)")


if __name__ == "__main__":
    main()
