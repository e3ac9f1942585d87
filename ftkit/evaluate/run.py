"""The evaluate stage, top to bottom: benchmark -> output files -> model or endpoint -> samples -> scores.

1. resolve the benchmark and read its data (a bad file is reported before any model is loaded);
2. check the output files (another run's results are refused unless --overwrite or --resume);
3. load the model (base + adapters, fp32 on CPU by default) onto the engine, or connect to the endpoint;
4. generate greedily, appending each finished item to samples.jsonl as it finishes (with --resume only
   the items not there yet);
5. aggregate every sample into results.json (scores with lm-eval's standard errors, n, model, settings,
   versions, timing) and print a table.
"""

from __future__ import annotations

import platform
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from ftkit import __version__
from ftkit.config import EvaluateConfig
from ftkit.evaluate.backends import Generation
from ftkit.evaluate.benchmarks import resolve_benchmark
from ftkit.evaluate.outputs import OutputFiles

BF16_NOTE = ("weights in {dtype}: answers may differ from an fp32 run (and from lm-eval in fp32) where two "
             "tokens are nearly tied")


def run_evaluation(config: EvaluateConfig, console: Console | None = None) -> dict[str, Any]:
    """Evaluate the config's model (or endpoint) on its benchmark; returns what results.json holds."""
    console = console or Console(highlight=False)
    benchmark = resolve_benchmark(config.benchmark, data=config.data, dataset_dir=config.dataset_dir,
                                  num_fewshot=config.num_fewshot, limit=config.limit,
                                  chat=config.apply_chat_template, cutoff_len=config.cutoff_len,
                                  max_new_tokens=config.max_new_tokens,
                                  identity=(config.identity_name, config.identity_author), contains=config.contains)
    outputs = OutputFiles.at(config.output, config.output_file, default_dir=f"saves/evaluate/{_slug(benchmark.name)}")
    outputs.check(overwrite=config.overwrite, resume=config.resume)
    benchmark.load()
    backend = _backend(config)
    described = backend.describe()
    settings = {**benchmark.settings(), "dtype": described["dtype"]}
    outputs.start({"model": described["model"], "adapters": described["adapters"], "settings": settings},
                  overwrite=config.overwrite, resume=config.resume)
    resumed = len(outputs.done)
    started = time.monotonic()

    def on_done(generation: Generation) -> None:
        outputs.append(benchmark.score(generation))

    if hasattr(benchmark, "prepare"):
        benchmark.prepare(backend, set(outputs.done))
    requests = [r for r in benchmark.requests() if r.key not in outputs.done]
    if resumed:
        console.print(f"resuming: {resumed} items already in {outputs.samples}, {len(requests)} to go")
    stop = benchmark.stop()
    if stop and hasattr(backend, "eos_texts"):
        stop = stop + backend.eos_texts()  # lm-eval adds the EOS token's text to `until`
    backend.generate(requests, max_tokens=benchmark.max_tokens, stop=stop, on_done=on_done)
    if hasattr(benchmark, "score_directly"):
        benchmark.score_directly(backend, set(outputs.done), outputs.append)
    seconds = time.monotonic() - started
    samples = [outputs.done[k] for k in sorted(outputs.done)]
    results = _results(benchmark, described, settings, samples, seconds, resumed)
    outputs.finish(results)
    _print_table(console, results, outputs)
    return results


def _backend(config: EvaluateConfig) -> Any:
    if config.endpoint:
        from ftkit.evaluate.endpoint import EndpointBackend

        model = config.model_name_or_path if "model_name_or_path" in config.model_fields_set else None
        return EndpointBackend(config.endpoint, model=model, api_key=config.api_key,
                               max_concurrency=config.max_concurrency)
    from ftkit.evaluate.backends import LocalBackend

    return LocalBackend(config.model_name_or_path, config.adapter_name_or_path or [], dtype=config.dtype,
                        template=config.template, trust_remote_code=config.trust_remote_code)


def _results(benchmark: Any, described: dict[str, Any], settings: dict[str, Any], samples: list[dict[str, Any]],
             seconds: float, resumed: int) -> dict[str, Any]:
    import torch
    import transformers

    generated = len(samples) - resumed
    results: dict[str, Any] = {
        "status": "complete", "benchmark": benchmark.name, "n": len(samples), "scores": benchmark.aggregate(samples),
        **described, "settings": settings,
        "versions": {"ftkit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "timing": {"seconds": round(seconds, 3), "items_this_run": generated, "items_resumed": resumed,
                   "items_per_minute": round(generated / seconds * 60, 2) if seconds > 0 and generated else None},
    }
    if described["dtype"] in ("bfloat16", "float16"):
        results["note"] = BF16_NOTE.format(dtype=described["dtype"])
    return results


def _print_table(console: Console, results: dict[str, Any], outputs: OutputFiles) -> None:
    table = Table(title=f"{results['benchmark']} — {results['model']} (n={results['n']}, {results['dtype']})")
    for column in ("filter / group", "metric", "value", "stderr"):
        table.add_column(column)
    for group, metrics in results["scores"].items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{metric}_stderr", "")
            table.add_row(group, metric, _fmt(value), _fmt(stderr))
    console.print(table)
    if "note" in results:
        console.print(f"note: {results['note']}")
    console.print(f"results: {outputs.results}\nsamples: {outputs.samples}")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.strip("/").split("/")[-1]) or "dataset"
