"""Endpoint mode against a real ``ftkit serve`` on loopback (the same raw outputs as evaluating the model
locally), against a small OpenAI-compatible test server for the failure cases, and ``--resume`` after a
real kill.

The test server answers ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``: the right GSM8K
answer for even items, a wrong one for odd items, each followed by a next "Question:" the client must cut
off (the server ignores ``stop``, as some do). It can fail its first requests with 503, fail always, or
hang on one question: the kill test waits until the items before it are in samples.jsonl, kills the
run with SIGKILL, and resumes against a healthy server; the result must equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_evaluate_run import REPO, read_samples, write_gsm8k


class FakeOpenAI:
    """A loopback server; ``fail_first`` 503s, ``always_fail``, and ``hang_on`` (a question that never returns)."""

    def __init__(self, fail_first: int = 0, always_fail: bool = False, hang_on: str | None = None) -> None:
        self.fail_first, self.always_fail, self.hang_on = fail_first, always_fail, hang_on
        self.release = threading.Event()
        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(body)
                if owner.always_fail or len(owner.requests) <= owner.fail_first:
                    self._send(503, {"error": "busy"})
                    return
                prompt = body.get("prompt") or body["messages"][-1]["content"]
                question = prompt.rsplit("Question: ", 1)[-1]
                if owner.hang_on and owner.hang_on in question:
                    owner.release.wait(60)
                number = int(re.search(r"question (\d+)", question).group(1))
                answer = 2 * number if number % 2 == 0 else 2 * number + 1
                text = f" {number} + {number} = {answer}\n#### {answer}\n\nQuestion: and now?"
                if "messages" in body:
                    self._send(200, {"choices": [{"message": {"role": "assistant", "content": text},
                                                  "finish_reason": "length"}]})
                else:
                    self._send(200, {"choices": [{"text": text, "finish_reason": "length"}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve():
    started: list[FakeOpenAI] = []

    def start(**kwargs) -> FakeOpenAI:
        started.append(FakeOpenAI(**kwargs))
        return started[-1]

    yield start
    for server in started:
        server.close()


def command(url: str, data: Path, output: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ftkit.cli", "evaluate", "max_concurrency=1", "--endpoint", url, "--data", str(data),
            "--num-fewshot", "2", "--limit", "4", "--output", output, *extra]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_endpoint_mode_against_ftkit_serve_gives_the_local_runs_outputs(tiny_llama_dir, tmp_path):
    from ftkit.config import ServeConfig
    from ftkit.http_server import BackgroundServer
    from ftkit.serve.app import create_app
    from ftkit.serve.run import build_state

    data = write_gsm8k(tmp_path / "gsm8k", n_test=3)
    config = ServeConfig(model_name_or_path=str(tiny_llama_dir), served_model_name="tiny", infer_dtype="fp32",
                         device="cpu")
    with BackgroundServer(create_app(build_state(config))) as server:
        remote = run(command(server.url, data, "remote", "--model", "tiny", "--limit", "3"), tmp_path)
    assert remote.returncode == 0, remote.stderr
    local = run([sys.executable, "-m", "ftkit.cli", "evaluate", "--model", str(tiny_llama_dir), "--dtype", "fp32",
                 "--data", str(data), "--num-fewshot", "2", "--limit", "3", "--output", "local"], tmp_path)
    assert local.returncode == 0, local.stderr

    def rows(folder: str) -> list[tuple]:
        samples = sorted(read_samples(tmp_path / folder / "samples.jsonl"), key=lambda s: s["doc_id"])
        return [(s["doc_id"], s["prompt"], s["output"], s["filters"]) for s in samples]

    assert len(rows("remote")) == 3 and rows("remote") == rows("local")


def test_endpoint_run_scores_cut_answers_and_retries_5xx(serve, tmp_path):
    data = write_gsm8k(tmp_path / "gsm8k", n_test=4)
    server = serve(fail_first=2)
    done = run(command(server.url, data, "out"), tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    samples = sorted(read_samples(tmp_path / "out" / "samples.jsonl"), key=lambda s: s["doc_id"])
    assert results["endpoint"] == server.url and results["model"] == "fake-model"
    assert results["scores"]["strict-match"]["exact_match"] == 0.5  # items 0 and 2 right
    assert [s["filters"]["strict-match"]["correct"] for s in samples] == [True, False, True, False]
    assert all("Question:" not in s["output"] for s in samples)
    sent = [r for r in server.requests if "prompt" in r]
    assert sent[-1]["temperature"] == 0.0 and sent[-1]["stop"] == ["Question:", "</s>", "<|im_end|>"]


def test_endpoint_that_keeps_failing_is_one_clear_error(serve, tmp_path):
    data = write_gsm8k(tmp_path / "gsm8k", n_test=4)
    server = serve(always_fail=True)
    done = run(command(server.url, data, "out", "--model", "fake-model"), tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"Endpoint {server.url} failed 5 times (HTTP 503)" in done.stderr
    assert "--resume" in done.stderr


def test_resume_after_a_kill_loses_nothing_and_equals_an_uninterrupted_run(serve, tmp_path):
    data = write_gsm8k(tmp_path / "gsm8k", n_test=4)
    hanging = serve(hang_on="test question 2:")
    process = subprocess.Popen(command(hanging.url, data, "killed"), cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    samples = tmp_path / "killed" / "samples.jsonl"
    deadline = time.monotonic() + 90
    while not (samples.is_file() and len(samples.read_text().splitlines()) == 2):  # items 0 and 1 done, 2 hangs
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert json.loads((tmp_path / "killed" / "results.json").read_text())["status"] == "running"
    refused = run(command(hanging.url, data, "killed"), tmp_path)
    assert refused.returncode == 1 and "--resume" in refused.stderr

    healthy = serve()
    resumed = run(command(healthy.url, data, "killed", "--resume"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: 2 items already" in resumed.stdout
    assert len([r for r in healthy.requests if "prompt" in r]) == 2  # only items 2 and 3 were asked again
    whole = run(command(healthy.url, data, "whole"), tmp_path)
    assert whole.returncode == 0, whole.stderr

    def comparable(folder: str) -> tuple[dict, list]:
        results = json.loads((tmp_path / folder / "results.json").read_text())
        rows = sorted(read_samples(tmp_path / folder / "samples.jsonl"), key=lambda s: s["doc_id"])
        return {k: results[k] for k in ("scores", "n", "settings", "model")}, rows

    assert comparable("killed") == comparable("whole")
