"""The ``ftkit`` command: parse arguments, load and validate the stage config, call one stage function.

Nothing else happens here. Heavy libraries (torch, transformers) are imported inside the stage
functions, after the config has been validated, so a config mistake is reported in well under a second.
A user mistake (``FtkitError``) is printed as one block of sentences and exits with status 1; it
never shows a traceback.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from ftkit import __version__
from ftkit.errors import FtkitError

console = Console(stderr=True, highlight=False)
app = typer.Typer(
    name="ftkit",
    help="Config-driven fine-tuning for large language models. Each command reads a YAML stage config; "
    "add key=value pairs after it to override keys (ftkit train cfg.yaml learning_rate=1e-4).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
data_app = typer.Typer(help="Inspect datasets: list the registry, preview encoded examples and loss masks.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")

ConfigArg = Annotated[Path, typer.Argument(help="The stage config (YAML, LLaMA-Factory key names).",
                                           show_default=False)]
OverridesArg = Annotated[list[str] | None, typer.Argument(help="key=value overrides applied on top of the config "
                                                               "(each key at most once).", show_default=False)]


def _load(schema_name: str, config: Path | None, overrides: list[str] | None):
    """Load and validate a stage config; a train config is also checked against its datasets and model."""
    from ftkit.config import STAGE_SCHEMAS, load_stage_config
    from ftkit.data.registry import dataset_problems

    checks = (dataset_problems, _model_problems) if schema_name == "train" else ()
    loaded = load_stage_config(STAGE_SCHEMAS[schema_name], config, list(overrides or []), checks=checks)
    # The launcher of a multi-process run has said them; its processes (and ranks above 0 of any launch) do not.
    if int(os.environ.get("RANK", "0") or 0) == 0 and not os.environ.get("FTKIT_LAUNCHED"):
        for note in loaded.notes:
            console.print(f"[dim]note: {escape(note)}[/]", soft_wrap=True)
    return loaded


def _model_problems(config) -> list[tuple[str, str]]:
    """``lora_target`` / ``freeze_*`` against the model's module names (torch is imported only when they matter)."""
    if not config.names_model_modules:
        return []
    from ftkit.models.structure import training_target_problems

    return training_target_problems(config)


def _version(value: bool) -> None:
    if value:
        print(f"ftkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Config-driven fine-tuning for large language models."""


@app.command()
def train(config: ConfigArg, overrides: OverridesArg = None) -> None:
    """Fine-tune a model (sft or pt; lora, qlora, full or freeze) as the config describes.

    Resumes automatically from the last complete checkpoint in output_dir; writes the adapter or
    model, train_results.json, trainer_log.jsonl, training_loss.png and the resolved config there.
    """
    loaded = _load("train", config, overrides)
    from ftkit.train import launch_training, run_training
    from ftkit.train.launch import wants_launch

    if wants_launch(loaded.config):
        launch_training(loaded, ["train", str(config), *(overrides or [])])
    else:
        run_training(loaded)


@app.command()
def validate(
    config: ConfigArg,
    overrides: OverridesArg = None,
    stage: Annotated[str, typer.Option(help="Which schema to check against: train, merge-lora or quantize (default: "
                                            "guessed from the keys).")] = "",
) -> None:
    """Check a stage config (every problem at once) and print it with all defaults filled in."""
    from ftkit.config import dump_resolved_config
    from ftkit.config.loading import read_yaml_mapping

    if not stage:
        keys, _ = read_yaml_mapping(config)
        stage = "quantize" if "method" in keys else "merge-lora" if "export_dir" in keys else "train"
    if stage not in ("train", "merge-lora", "quantize"):
        raise FtkitError(f"--stage {stage} is not a stage with a config; use train, merge-lora or quantize.")
    loaded = _load(stage, config, overrides)
    console.print(f"[green]{escape(str(config))} is a valid {stage} config.[/] Resolved, with defaults:",
                  soft_wrap=True)
    print(dump_resolved_config(loaded.config), end="")


def _finite(value: float) -> float:
    """Refuse inf and nan, which typer's ranges let through, as a usage error naming the option."""
    if not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number.")
    return value


@app.command()
def chat(
    model: Annotated[str, typer.Option(help="Model: a local dir, hub id, ms://id, .gguf file or "
                                            "smollm2-135m-instruct.")] = "smollm2-135m-instruct",
    adapter: Annotated[list[str] | None, typer.Option(help="LoRA adapter directory (repeat for several).")] = None,
    prompt: Annotated[str | None, typer.Option(help="Answer this one prompt and exit (otherwise interactive).")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    template: Annotated[str, typer.Option(help="Chat template (auto = the tokenizer's own).")] = "auto",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest answer, in tokens (at least 1).")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, callback=_finite, help="0 = greedy (deterministic); "
                                               "above 0 samples (finite, not negative).")] = 0.0,
) -> None:
    """Talk to a model (with optional LoRA adapters) in the terminal."""
    from ftkit.chat import run_chat

    run_chat(model=model, adapters=adapter or [], prompt=prompt, system=system, template=template,
             max_new_tokens=max_new_tokens, temperature=temperature)


@app.command("merge-lora")
def merge_lora(
    config: Annotated[Path | None, typer.Argument(help="A merge config (model_name_or_path, adapter_name_or_path, "
                                                       "export_dir, ...).", show_default=False)] = None,
    overrides: OverridesArg = None,
    base: Annotated[str | None, typer.Option(help="Base model (instead of a config).")] = None,
    adapter: Annotated[list[str] | None, typer.Option(help="Adapter directory (repeat to merge several in order).")] = None,
    out: Annotated[str | None, typer.Option(help="Export directory.")] = None,
) -> None:
    """Fold LoRA adapters into their base model and export a standalone model.

    Writes safetensors shards, tokenizer, chat template, README and Ollama Modelfile, checked against base + adapter.
    """
    flags = {"model_name_or_path": base, "adapter_name_or_path": adapter or None, "export_dir": out}
    config, given = _flag_overrides(config, overrides, flags)
    if config is None and not given:
        raise FtkitError("Pass a merge config (ftkit merge-lora CONFIG.yaml) or --base, --adapter and --out.")
    loaded = _load("merge-lora", config, given)
    from ftkit.merge import run_merge

    run_merge(loaded)


@app.command()
def serve(
    config: Annotated[Path | None, typer.Argument(help="A serve config (or use the flags).", show_default=False)] = None,
    overrides: OverridesArg = None,
    model: Annotated[str | None, typer.Option("--model", "--model_name_or_path", help="Base model (local dir, hub "
                                              "id, .gguf, smollm2-135m-instruct).")] = None,
    adapter: Annotated[list[str] | None, typer.Option("--adapter", "--adapter_name_or_path", help="LoRA adapter "
                                                      "as NAME=PATH, served as model NAME (repeat for several).")] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000; 0: any free port).")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", "--api_key", help="Require 'Authorization: Bearer "
                                                "KEY' (default: $FTKIT_API_KEY).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N.")] = None,
    backend: Annotated[str | None, typer.Option("--backend", "--infer_backend", help="ftkit (built-in engine) "
                                                "or vllm.")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", "--infer_dtype", help="auto, bf16, fp16 or fp32.")] = None,
    template: Annotated[str | None, typer.Option(help="Chat template (auto = the tokenizer's own).")] = None,
    served_model_name: Annotated[str | None, typer.Option("--served-model-name", help="The base's name in "
                                                          "the API.")] = None,
    shutdown_timeout: Annotated[float | None, typer.Option("--shutdown-timeout", help="Seconds in-flight "
                                                           "requests get to finish on SIGTERM.")] = None,
) -> None:
    """Serve a model behind an OpenAI-compatible API (/v1/chat/completions, /v1/completions), LoRA adapters by name.

    Continuous batching on a paged KV cache, adapters side by side without merging, /metrics for Prometheus;
    --backend vllm hands the same settings to vLLM.
    """
    flags = {"model_name_or_path": model, "adapter_name_or_path": adapter or None, "host": host, "port": port,
             "api_key": api_key, "device": device, "infer_backend": backend, "infer_dtype": dtype,
             "template": template, "served_model_name": served_model_name, "shutdown_timeout": shutdown_timeout}
    config, given = _flag_overrides(config, overrides, flags)
    loaded = _load("serve", config, given)
    from ftkit.serve import run_serve

    run_serve(loaded)


def _flag_overrides(config: Path | None, overrides: list[str] | None, flags: dict) -> tuple[Path | None, list[str]]:
    """The config path (None when only key=value pairs were given) and the overrides, flags last (as JSON)."""
    import json

    given = list(overrides or [])
    if config is not None and "=" in config.name and not config.exists():  # only overrides, no config file
        given, config = [str(config), *given], None
    given += [f"{key}={json.dumps(value)}" for key, value in flags.items()
              if value is not None and value is not False]  # JSON is YAML
    return config, given


@app.command()
def evaluate(
    config: Annotated[Path | None, typer.Argument(help="An evaluate config (or use the flags).",
                                                  show_default=False)] = None,
    overrides: OverridesArg = None,
    model: Annotated[str | None, typer.Option("--model", "--model_name_or_path", help="Model to evaluate (local dir, "
                                              "hub id, .gguf, smollm2-135m-instruct; with --endpoint: the served "
                                              "name).")] = None,
    adapter: Annotated[list[str] | None, typer.Option("--adapter", "--adapter_name_or_path",
                                                      help="LoRA adapter (repeat for several; no merge needed).")] = None,
    benchmark: Annotated[str | None, typer.Option(help="gsm8k, general, a registered dataset or a path.")] = None,
    data: Annotated[str | None, typer.Option(help="GSM8K data folder or file (openai/gsm8k jsonl).")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N items.")] = None,
    num_fewshot: Annotated[int | None, typer.Option("--num-fewshot", help="Few-shot examples (GSM8K: 5).")] = None,
    apply_chat_template: Annotated[bool, typer.Option("--apply-chat-template", help="Prompt through the chat "
                                                      "template, few-shot examples as turns.")] = False,
    output: Annotated[str | None, typer.Option(help="Folder for results.json and samples.jsonl.")] = None,
    output_file: Annotated[str | None, typer.Option("--output_file", "--output-file", help="The results file.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto (fp32 on CPU), bf16, fp16 or fp32.")] = None,
    endpoint: Annotated[str | None, typer.Option(help="OpenAI-compatible server URL, e.g. "
                                                 "http://127.0.0.1:8000/v1.")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", help="API key for the endpoint.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace another run's results in the output folder.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from its samples.jsonl.")] = False,
) -> None:
    """Evaluate a model on GSM8K (lm-evaluation-harness 0.4.13's answers), your own datasets or the general check.

    Writes results.json (scores with standard errors) and samples.jsonl (every item's prompt, output and answers).
    """
    flags = {"model_name_or_path": model, "adapter_name_or_path": adapter or None, "benchmark": benchmark,
             "data": data, "limit": limit, "num_fewshot": num_fewshot, "apply_chat_template": apply_chat_template,
             "output": output, "output_file": output_file, "dtype": dtype, "endpoint": endpoint, "api_key": api_key,
             "overwrite": overwrite, "resume": resume}
    config, given = _flag_overrides(config, overrides, flags)
    if config is None and not given:
        raise FtkitError("Pass an evaluate config (ftkit evaluate CONFIG.yaml) or flags, e.g. ftkit evaluate "
                         "--model MODEL --benchmark gsm8k.")
    loaded = _load("evaluate", config, given)
    from ftkit.evaluate import run_evaluation

    run_evaluation(loaded.config)


@app.command()
def quantize(
    config: Annotated[Path | None, typer.Argument(help="A quantize config (or use the flags).",
                                                  show_default=False)] = None,
    overrides: OverridesArg = None,
    model: Annotated[str | None, typer.Option("--model", "--model_name_or_path", help="Model to quantize (local "
                                              "dir, hub id, .gguf, smollm2-135m-instruct).")] = None,
    adapter: Annotated[list[str] | None, typer.Option("--adapter", "--adapter_name_or_path", help="LoRA adapter, "
                                                      "merged in fp32 first (repeat for several).")] = None,
    method: Annotated[str | None, typer.Option(help="int8, int8-dynamic, int8-static, int4, bnb-int8, bnb-nf4, "
                                               "bnb-fp4, gptq, awq or gguf.")] = None,
    out: Annotated[str | None, typer.Option("--out", "--export_dir", help="Output directory.")] = None,
    gguf_type: Annotated[str | None, typer.Option("--gguf-type", "--gguf_type", help="GGUF tensor type: f16, bf16, "
                                                  "q8_0, q4_0, q4_1, q5_0, q5_1 (method gguf).")] = None,
    group_size: Annotated[int | None, typer.Option("--group-size", "--group_size", help="Weights per 4-bit "
                                                   "group.")] = None,
    eval_data: Annotated[str | None, typer.Option("--eval-data", "--eval_data", help="Held-out text for perplexity "
                                                  "and agreement (.txt or .jsonl).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing non-empty output directory.")] = False,
) -> None:
    """Quantize a model (INT8/INT4, GGUF export) with a measured size/speed/quality report.

    Adapters are merged in fp32 first; writes the quantized checkpoint (or GGUF file + Ollama Modelfile) and
    quantize_report.json, measured against the original in the same run.
    """
    flags = {"model_name_or_path": model, "adapter_name_or_path": adapter or None, "method": method,
             "export_dir": out, "gguf_type": gguf_type, "group_size": group_size, "eval_data": eval_data,
             "overwrite": overwrite}
    config, given = _flag_overrides(config, overrides, flags)
    if config is None and not given:
        raise FtkitError("Pass a quantize config (ftkit quantize CONFIG.yaml) or flags, e.g. ftkit quantize "
                         "--model MODEL --method int8 --out DIR.")
    loaded = _load("quantize", config, given)
    from ftkit.quantize import run_quantize

    run_quantize(loaded.config)


@app.command()
def estimate(
    config: ConfigArg,
    overrides: OverridesArg = None,
    gpus: Annotated[int, typer.Option("--gpus", min=1, help="Devices per node.")] = 1,
    gpu_memory: Annotated[float | None, typer.Option("--gpu-memory", min=0.001, help="Memory of one device in GB "
                                                     "(10^9 bytes); marks which plans fit.")] = None,
    nodes: Annotated[int, typer.Option("--nodes", min=1, help="Nodes (machines).")] = 1,
    cpu: Annotated[bool, typer.Option("--cpu", help="Plan a run on CPU processes instead of GPUs.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Memory per device for this training config: weights, gradients, optimizer states and activations under
    no sharding, ZeRO-1/2/3 and CPU offload, for full, freeze, LoRA and QLoRA (reads config.json only)."""
    from ftkit.config import TrainConfig, load_stage_config

    loaded = load_stage_config(TrainConfig, config, list(overrides or []))
    from ftkit.estimate import run_estimate

    run_estimate(loaded.config, gpus=gpus, nodes=nodes, gpu_memory_gb=gpu_memory, cpu=cpu, as_json=as_json)


@app.command()
def board(
    root: Annotated[str, typer.Option(help="The folder the page shows: every run whose output_dir is under it.")] = "saves",
    host: Annotated[str, typer.Option(help="Address to listen on; any other than loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one).")] = 7860,
    token: Annotated[str | None, typer.Option(help="A secret every request must carry (default: "
                                                   "$FTKIT_BOARD_TOKEN); open the page as /?token=SECRET.")] = None,
    dataset_dir: Annotated[str, typer.Option("--dataset-dir", help="The dataset registry the Data tab shows.")] = "data",
    configs: Annotated[str, typer.Option(help="A folder of YAML configs the Launch tab offers.")] = "configs",
) -> None:
    """A web page to watch, compare and launch runs: live loss curves, configs side by side, datasets, a chat box.

    Reads only the files runs write under --root (no database); launched runs are ordinary `ftkit train`
    processes that keep running when the board stops.
    """
    from ftkit.board import run_board

    run_board(root, host=host, port=port, token=token, dataset_dir=dataset_dir, configs_dir=configs)


@data_app.command("list")
def data_list(
    dataset_dir: Annotated[str, typer.Option(help="Folder holding dataset_info.json.")] = "data",
) -> None:
    """List the datasets registered in dataset_info.json."""
    from ftkit.preview import print_registry

    print_registry(dataset_dir)


@data_app.command("preview")
def data_preview(
    config: ConfigArg,
    overrides: OverridesArg = None,
    num_examples: Annotated[int, typer.Option("-n", "--num-examples", min=0, help="How many examples to show per "
                                              "dataset (0: only the statistics; negative numbers are refused).")] = 3,
) -> None:
    """Show encoded examples with the trained-on tokens highlighted, plus length, truncation and padding stats."""
    loaded = _load("train", config, overrides)
    from ftkit.preview import preview_dataset

    preview_dataset(loaded.config, num_examples=num_examples)


def _usage_error_types() -> tuple[type[Exception], ...]:
    """Command-line usage errors: typer >= 0.16 vendors click (typer._click), older typer uses click itself."""
    types: list[type[Exception]] = [typer.TyperException] if hasattr(typer, "TyperException") else []
    try:
        import click

        types.append(click.ClickException)
    except ImportError:  # a typer that vendors click does not need it installed
        pass
    return tuple(types)


def main() -> None:
    """Console entry point: run the app, turn user mistakes into one clear message and exit code 1."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # peft 0.21 calls transformers' deprecated is_gradient_checkpointing on every model (train, merge, chat);
    # not actionable by users.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # bitsandbytes' CPU backend warns on import that the optional `kernels` package (which fetches a faster
    # 4-bit kernel from the hub) is missing; its own kernel works, so the note only confuses.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # transformers imports torchao (ftkit quantize's backend) on every model load; torchao then logs that its
    # CUDA-only extensions (mxfp8, cutlass) do not load on a CPU, and torch that torchao registers enums the
    # old way. Neither is about the user's run.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    # DeepSpeed's ZeRO calls a collective torch has renamed, once per step in every process.
    warnings.filterwarnings("ignore", message="`torch.distributed.* is deprecated", category=FutureWarning)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    try:
        status = app(standalone_mode=False)
    except FtkitError as err:
        process = f" (training process {os.environ['RANK']})" if "LOCAL_RANK" in os.environ and "RANK" in os.environ \
            else ""
        console.print(f"[bold red]error{process}:[/] {escape(str(err))}", soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except (typer.Abort, EOFError):
        sys.exit(1)
    except _usage_error_types() as err:  # a missing argument, an unknown command or option, no arguments
        if hasattr(err, "show"):
            err.show()
        else:
            console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)
        sys.exit(getattr(err, "exit_code", 2))
    # In standalone_mode=False, typer returns the code of a typer.Exit raised inside a command.
    if isinstance(status, int) and not isinstance(status, bool) and status:
        sys.exit(status)


if __name__ == "__main__":
    main()
