"""The serve recipe, top to bottom: check the address -> bind it -> load the base -> build the engine -> load the
adapters by name -> the app -> uvicorn until SIGTERM/SIGINT -> drain -> exit 0.

The socket is bound before the model is loaded, so a port in use is reported at once, and port 0 picks a
free one (the log line says which). SIGTERM or SIGINT drains: requests in flight get ``shutdown_timeout``
seconds, the rest are aborted (their clients get what was generated so far), and the process exits 0
(``ftkit.http_server``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from rich.console import Console
from rich.markup import escape

from ftkit.config import LoadedConfig, ServeConfig
from ftkit.http_server import HttpServer, bind_socket

console = Console(stderr=True, highlight=False)


def _say(message: str) -> None:
    console.print(f"[bold cyan]ftkit[/] {escape(message)}", soft_wrap=True)


def build_state(config: ServeConfig) -> Any:
    """Load the model and adapters and build everything the app serves (``ftkit.serve.app.ServerState``)."""
    import torch

    from ftkit.engine import EngineOptions, LLMEngine
    from ftkit.engine.async_engine import AsyncEngine
    from ftkit.models import (
        LoadOptions,
        load_for_inference,
        model_source_from_config,
        parse_dtype,
        resolve_adapter_dir,
    )
    from ftkit.serve.app import ServerState
    from ftkit.serve.generation import Generation
    from ftkit.serve.metrics import ServerMetrics
    from ftkit.serve.served_models import ServedModels

    source = model_source_from_config(config)
    adapters = {name: resolve_adapter_dir(path) for name, path in config.adapter_names().items()}  # before loading
    device = torch.device(config.device) if config.device else None
    dtype = None if config.infer_dtype == "auto" else parse_dtype(config.infer_dtype)
    loaded = load_for_inference(source, template=config.template, dtype=dtype, device=device,
                                options=LoadOptions.from_config(config))
    options = EngineOptions(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                            max_model_len=config.max_model_len, kv_cache_memory=config.kv_cache_memory,
                            enable_prefix_caching=config.enable_prefix_caching,
                            scheduling_policy=config.scheduling_policy, max_loras=config.max_loras,
                            pack_weights=True)
    engine = LLMEngine.from_inference_model(loaded, options)
    models = ServedModels(config.served_model_name or config.model_name_or_path, source, loaded.tokenizer,
                          template=config.template, trust_remote_code=config.trust_remote_code)
    for name, adapter_dir in adapters.items():
        models.add_adapter(engine, name, str(adapter_dir))
    front = AsyncEngine(engine)
    metrics = ServerMetrics(engine)
    generation = Generation(front, models, metrics, max_waiting=config.max_waiting)
    api_key = config.api_key or os.environ.get("FTKIT_API_KEY") or None
    return ServerState(front, models, metrics, generation, api_key)


def run_serve(loaded: LoadedConfig) -> None:
    """Run ``ftkit serve`` for a validated config until SIGTERM or SIGINT."""
    config: ServeConfig = loaded.config
    if config.infer_backend == "vllm":
        from ftkit.serve.vllm_backend import run_vllm

        run_vllm(config)
        return
    started = time.monotonic()
    sock = bind_socket(config.host, config.port)
    try:
        from ftkit.serve.app import create_app

        state = build_state(config)
        engine = state.front.engine
        host, port = sock.getsockname()[:2]
        names = ", ".join(n.name for n in state.models.names)
        _say(f"serving {names} | {engine.device.type}, {str(engine.dtype).removeprefix('torch.')}, "
             f"{engine.num_blocks} KV blocks of {engine.options.block_size} tokens, max_model_len "
             f"{engine.max_model_len}" + (" | API key required" if state.api_key else ""))
        url_host = f"[{host}]" if ":" in host else host
        _say(f"ready in {time.monotonic() - started:.1f} s: http://{url_host}:{port}/v1 (OpenAI API), /health, "
             "/metrics; Ctrl-C or SIGTERM stops it")
        HttpServer(create_app(state), shutdown_timeout=config.shutdown_timeout,
                on_timeout=state.generation.abort_all).serve(sock)
    finally:
        sock.close()
    _say("stopped")
