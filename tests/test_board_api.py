"""``ftkit board``'s API on a real server on loopback, talked to with httpx, over run folders made in-test.

Covers what the page stands on: the status file every run keeps, the runs table, the log read from a
cursor (bad lines skipped, a replaced log read again), paths outside the root refused (``..``, absolute,
symlinks), the token, writes only as JSON from the board's own origin, a config with problems starting
nothing, a deleted run disappearing, the Data tab's preview and the Try box. Launching, stopping and
resuming real runs from the page are in test_board_browser.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from board_runs import append_log, write_run, write_status

from ftkit.board import build_board
from ftkit.board.app import create_app
from ftkit.config import TrainConfig, load_stage_config
from ftkit.errors import FtkitError
from ftkit.http_server import BackgroundServer
from ftkit.run_files import RUN_STATUS_FILE, TRAINER_LOG_FILE, read_run_status
from ftkit.train import run_training

REPO = Path(__file__).resolve().parents[1]


def tiny_run_keys(model_dir: Path, output_dir: Path, **overrides) -> dict:
    keys = {"model_name_or_path": str(model_dir), "dataset": "identity", "dataset_dir": str(REPO / "data"),
            "max_samples": 8, "cutoff_len": 128, "output_dir": str(output_dir), "max_steps": 4, "logging_steps": 1,
            "learning_rate": 5e-3, "per_device_train_batch_size": 8, "save_strategy": "no", "seed": 0,
            "replay_ratio": 0, "general_check": False, "learned_check": False}
    keys.update(overrides)
    return keys


@pytest.fixture
def board(tmp_path):
    """A board over ``tmp_path/saves`` (the Data tab on the shipped registry); yields (client, root)."""
    root = tmp_path / "saves"
    state = build_board(root, dataset_dir=REPO / "data", configs_dir=None, workdir=tmp_path)
    with BackgroundServer(create_app(state)) as server, httpx.Client(base_url=server.root, timeout=60) as client:
        yield client, root, state


def _dead_pid() -> int:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    return finished.pid


# -- the status file ------------------------------------------------------------------------------------------

def test_a_run_writes_its_status_running_then_finished(tiny_llama_dir, tmp_path, monkeypatch):
    (tmp_path / "board_watch_callbacks.py").write_text(
        "from transformers import TrainerCallback\n"
        "from ftkit.run_files import read_run_status\n"
        "seen = []\n"
        "class Watch(TrainerCallback):\n"
        "    def on_step_end(self, args, state, control, **kwargs):\n"
        "        seen.append(read_run_status(args.output_dir))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run_training(load_stage_config(TrainConfig, None, tiny_run_keys(
        tiny_llama_dir, tmp_path / "run", callbacks="board_watch_callbacks:Watch")))
    import board_watch_callbacks

    seen = board_watch_callbacks.seen
    assert len(seen) == 4 and all(s["status"] == "running" and s["pid"] == os.getpid() for s in seen)
    final = read_run_status(tmp_path / "run")
    assert final["status"] == "finished" and final["step"] == 4 and final["max_steps"] == 4
    assert final["ended"] >= final["started"] and final["message"] is None


def test_a_run_that_fails_or_is_interrupted_says_so(tiny_llama_dir, tmp_path, monkeypatch):
    (tmp_path / "board_stop_callbacks.py").write_text(
        "from transformers import TrainerCallback\n"
        "class Fail(TrainerCallback):\n"
        "    def on_step_end(self, args, state, control, **kwargs):\n"
        "        if state.global_step == 2:\n"
        "            raise RuntimeError('disk on fire')\n"
        "class CtrlC(TrainerCallback):\n"
        "    def on_step_end(self, args, state, control, **kwargs):\n"
        "        if state.global_step == 2:\n"
        "            raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, error, expected in (("Fail", RuntimeError, "failed"), ("CtrlC", KeyboardInterrupt, "interrupted")):
        output_dir = tmp_path / name
        with pytest.raises(error):
            run_training(load_stage_config(TrainConfig, None, tiny_run_keys(
                tiny_llama_dir, output_dir, callbacks=f"board_stop_callbacks:{name}", save_strategy="steps",
                save_steps=1)))
        status = read_run_status(output_dir)
        assert status["status"] == expected and status["step"] >= 1
        assert status["message"] == ("RuntimeError: disk on fire" if name == "Fail" else "stopped with Ctrl-C")


# -- the runs table and the log -------------------------------------------------------------------------------

def test_the_runs_table_reads_each_runs_status_without_guessing(board, tmp_path):
    client, root, _ = board
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_run(root / "done", steps=30)
        write_run(root / "group" / "live", steps=12, status="running", pid=sleeper.pid)
        write_run(root / "killed", steps=7, status="running", pid=_dead_pid())
        write_run(root / "stale", steps=7, status="running", pid=sleeper.pid)
        write_status(root / "stale", "running", pid=sleeper.pid, heartbeat_age=600)  # the pid went to another program
        write_run(root / "broken", steps=5, status="failed")
        write_status(root / "broken", "failed", step=5, message="RuntimeError: disk on fire")
        legacy = write_run(root / "legacy", steps=3, status="interrupted")
        (legacy / RUN_STATUS_FILE).unlink()
        write_run(root / ".hidden", steps=3)
        outside = write_run(tmp_path / "elsewhere" / "run", steps=3)
        (root / "link-out").symlink_to(outside.parent, target_is_directory=True)
        (root / "loop-a").symlink_to(root / "loop-b")  # a link loop
        (root / "loop-b").symlink_to(root / "loop-a")
        rows = {row["id"]: row for row in client.get("/api/runs").json()["runs"]}
        assert client.get("/api/run", params={"id": "loop-a"}).status_code == 404
    finally:
        sleeper.kill()
        sleeper.wait()
    assert set(rows) == {"done", "group/live", "killed", "stale", "broken", "legacy"}
    assert {key: rows[key]["status"] for key in rows} == {
        "done": "finished", "group/live": "running", "killed": "interrupted", "stale": "interrupted",
        "broken": "failed", "legacy": "unknown"}
    assert "ended without saying so" in rows["killed"]["detail"]
    assert "no heartbeat for 600 s" in rows["stale"]["detail"]
    assert rows["broken"]["detail"] == "RuntimeError: disk on fire"
    done = rows["done"]
    assert (done["step"], done["general_kept"], done["learned"], done["method"], done["dataset"]) == \
        (30, "20/21", "35/40", "sft lora", "identity")
    assert done["loss"] == json.loads((root / "done" / TRAINER_LOG_FILE).read_text().splitlines()[-1])["loss"]


def test_the_log_is_read_from_a_cursor_skipping_half_written_lines(board):
    client, root, _ = board
    folder = write_run(root / "run", steps=10, eval_every=5)
    with open(folder / TRAINER_LOG_FILE, "a") as log:
        log.write('{"step": 11, "loss": oops}\n')  # a garbled line
        log.write('{"step": 12, "loss": 1.5')  # a run killed mid-write: no newline yet
    full = client.get("/api/log", params={"id": "run"}).json()
    assert full["train"]["step"] == list(range(1, 11)) and full["eval"]["step"] == [5, 10]
    records = [json.loads(line) for line in (folder / TRAINER_LOG_FILE).read_text().splitlines()[:12]]
    assert full["train"]["loss"] == [r["loss"] for r in records if "loss" in r]
    assert full["eval"]["eval_loss"] == [r["eval_loss"] for r in records if "eval_loss" in r]
    with open(folder / TRAINER_LOG_FILE, "a") as log:
        log.write(', "learning_rate": 1e-5}\n')  # the half-written line completes
    append_log(folder, range(13, 15))
    new = client.get("/api/log", params={"id": "run", "cursor": full["cursor"]}).json()
    assert not new["reset"] and new["train"]["step"] == [12, 13, 14]
    assert client.get("/api/log", params={"id": "run"}).json()["train"]["step"] == [*range(1, 11), 12, 13, 14]
    # a resumed run rewrites the log (a new file): read again from the start
    replaced = folder / "replacement.jsonl"
    replaced.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2)))
    os.replace(replaced, folder / TRAINER_LOG_FILE)
    again = client.get("/api/log", params={"id": "run", "cursor": new["cursor"]}).json()
    assert again["reset"] and again["train"]["step"] == [1, 2]
    assert client.get("/api/log", params={"id": "run"}).json()["train"]["step"] == [1, 2]


@pytest.mark.parametrize("given", ["../secret", "/etc", "run/../../secret", "link-out", "link-out/run",
                                   "run/checkpoint-1/../../../secret", "..", "", "run\x00"])
def test_only_runs_under_the_root_are_read(board, tmp_path, given):
    client, root, _ = board
    write_run(root / "run")
    write_run(tmp_path / "secret")
    outside = write_run(tmp_path / "elsewhere" / "run")
    (root / "link-out").symlink_to(outside.parent, target_is_directory=True)
    for route in ("/api/run", "/api/log", "/api/events"):
        response = client.get(route, params={"id": given})
        assert response.status_code == 404, (route, given, response.text)
        assert "root" in response.json()["error"] or "no run" in response.json()["error"].lower()
    assert client.post("/api/stop", json={"id": given}).status_code in (400, 404)


def test_percent_encoded_dots_are_refused_too(board, tmp_path):
    client, root, _ = board
    write_run(root / "run")
    write_run(tmp_path / "secret")
    for raw in ("id=%2e%2e%2fsecret", "id=%2E%2E/secret", "id=run%2f..%2f..%2fsecret", "id=%2fetc"):
        response = client.get(httpx.URL(str(client.base_url).rstrip("/") + f"/api/run?{raw}"))
        assert response.status_code == 404 and "root" in response.json()["error"], raw


def test_files_linked_into_a_run_folder_are_not_read(board, tmp_path):
    client, root, _ = board
    secret = tmp_path / "private.yaml"
    secret.write_text("api_key: hunter2-secret\n")
    folder = write_run(root / "run")
    (folder / "ftkit_config.yaml").unlink()
    (folder / "ftkit_config.yaml").symlink_to(secret)
    (folder / "train_results.json").unlink()
    (folder / "train_results.json").symlink_to(secret)
    elsewhere = tmp_path / "elsewhere-eval"
    elsewhere.mkdir()
    (elsewhere / "results.json").write_text(json.dumps({"secret": "hunter2-secret"}))
    (folder / "eval").symlink_to(elsewhere, target_is_directory=True)
    shown = client.get("/api/run", params={"id": "run"})
    assert shown.status_code == 200 and "hunter2" not in shown.text
    assert shown.json()["evaluations"] == [] and shown.json()["config_text"] == ""
    assert "hunter2" not in client.get("/api/runs").text
    assert client.get("/api/configs").json()["configs"] == ["run: run"]
    assert "hunter2" not in client.get("/api/config", params={"name": "run: run"}).text


def test_static_files_stay_in_the_package(board):
    client, _, _ = board
    assert client.get("/static/board.js").status_code == 200
    for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2f..%2fruns.py", "/static//etc/passwd"):
        assert client.get(path).status_code == 404, path


def test_curves_of_runs_not_looked_at_lately_are_read_again_when_needed(tmp_path):
    from ftkit.board.runs import Curves

    curves = Curves()
    curves.KEPT_RUNS = 2
    folders = [write_run(tmp_path / f"run{i}", steps=5 + i) for i in range(3)]
    assert [curves.full(f)["train"]["step"][-1] for f in folders] == [5, 6, 7]  # run0 is dropped from memory
    append_log(folders[0], range(6, 9))
    assert curves.full(folders[0])["train"]["step"] == list(range(1, 9))
    assert curves.full(folders[2])["train"]["step"] == list(range(1, 8))


def test_nan_and_infinity_in_a_log_read_as_null(board):
    client, root, _ = board
    folder = write_run(root / "run", steps=2, status="running")
    with open(folder / TRAINER_LOG_FILE, "a") as log:
        log.write('{"step": 3, "loss": NaN, "grad_norm": Infinity, "learning_rate": 1e-4}\n')
    (folder / "train_results.json").write_text('{"train_loss": NaN, "global_step": 3}')
    assert client.get("/api/runs").json()["runs"][0]["loss"] is None
    log = client.get("/api/log", params={"id": "run"}).json()
    assert log["train"]["loss"][-1] is None and log["train"]["grad_norm"][-1] is None
    assert client.get("/api/run", params={"id": "run"}).json()["results"]["train_loss"] is None
    with client.stream("GET", "/api/events", params={"id": "run"}) as stream:
        data = next(line for line in stream.iter_lines() if line.startswith("data: "))
    assert json.loads(data[6:])["train"]["loss"] == [log["train"]["loss"][0], log["train"]["loss"][1], None]


def test_a_reconnecting_event_stream_continues_from_its_last_event(board):
    client, root, _ = board
    folder = write_run(root / "run", steps=10, status="running")
    with client.stream("GET", "/api/events", params={"id": "run"}) as stream:
        event_id = next(line for line in stream.iter_lines() if line.startswith("id: "))[4:]
    append_log(folder, range(11, 14))
    with client.stream("GET", "/api/events", params={"id": "run"}, headers={"Last-Event-ID": event_id}) as stream:
        data = next(line for line in stream.iter_lines() if line.startswith("data: "))
    assert json.loads(data[6:])["train"]["step"] == [11, 12, 13]


def test_compare_lines_up_curves_and_marks_the_keys_that_differ(board):
    client, root, _ = board
    write_run(root / "a", steps=5, config={"learning_rate": 1e-4})
    write_run(root / "b", steps=8, config={"learning_rate": 3e-4, "lora_rank": 16})
    body = client.get("/api/compare", params=[("id", "a"), ("id", "b")]).json()
    assert [c["step"] for c in body["curves"]] == [list(range(1, 6)), list(range(1, 9))]
    differs = {row["key"] for row in body["config"] if row["differs"]}
    assert differs == {"learning_rate", "lora_rank", "output_dir"}
    assert client.get("/api/compare", params={"id": "a"}).status_code == 400


# -- security ---------------------------------------------------------------------------------------------------

def test_off_loopback_the_board_needs_a_token(tmp_path, monkeypatch):
    monkeypatch.delenv("FTKIT_BOARD_TOKEN", raising=False)
    with pytest.raises(FtkitError, match="--host 0.0.0.0 lets other machines reach the board"):
        build_board(tmp_path / "saves", host="0.0.0.0", workdir=tmp_path)
    cli = subprocess.run([sys.executable, "-m", "ftkit", "board", "--host", "0.0.0.0", "--root", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 1 and "Traceback" not in cli.stderr
    assert "pass --token SECRET (or set FTKIT_BOARD_TOKEN)" in cli.stderr
    monkeypatch.setenv("FTKIT_BOARD_TOKEN", "correct-horse-battery")
    assert build_board(tmp_path / "saves", host="0.0.0.0", workdir=tmp_path).token == "correct-horse-battery"
    with pytest.raises(FtkitError, match="--token is shorter than 8 characters"):
        build_board(tmp_path / "saves", token="abc", workdir=tmp_path)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FtkitError, match="--root a-file is a file"):
        build_board("a-file", workdir=tmp_path)


def test_with_a_token_every_request_carries_it(tmp_path):
    root = tmp_path / "saves"
    write_run(root / "run")
    state = build_board(root, token="correct-horse-battery", configs_dir=None, workdir=tmp_path)
    with BackgroundServer(create_app(state)) as server:
        with httpx.Client(base_url=server.root) as client:
            for path in ("/", "/api/runs", "/api/run?id=run", "/static/board.js", "/api/events?id=run"):
                assert client.get(path).status_code == 401, path
            assert client.get("/api/runs", headers={"Authorization": "Bearer wrong-token-here"}).status_code == 401
            assert client.get("/api/runs", params={"token": "wrong-token-here"}).status_code == 401
            assert client.post("/api/launch", json={"yaml": "x: 1"}).status_code == 401
            ok = client.get("/api/runs", headers={"Authorization": "Bearer correct-horse-battery"})
            assert ok.status_code == 200 and ok.json()["runs"][0]["id"] == "run"
        with httpx.Client(base_url=server.root) as browser:  # the page opened as /?token=: a cookie from then on
            assert browser.get("/", params={"token": "correct-horse-battery"}).status_code == 200
            assert browser.get("/api/runs").status_code == 200


def test_without_a_token_only_loopback_names_reach_the_board(board):
    client, root, _ = board
    port = client.base_url.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "[::1]:7860", "localhost"):
        assert client.get("/api/runs", headers={"Host": host}).status_code == 200, host
    for host in (f"evil.example:{port}", "attacker.test", f"192.168.1.5:{port}"):
        refused = client.get("/", headers={"Host": host})
        assert refused.status_code == 403 and "loopback" in refused.json()["error"], host
        assert refused.headers["X-Frame-Options"] == "DENY" and refused.headers["X-Content-Type-Options"] == "nosniff"
    page = client.get("/").headers
    assert (page["X-Frame-Options"], page["Content-Security-Policy"], page["X-Content-Type-Options"]) == (
        "DENY", "frame-ancestors 'none'", "nosniff")


def test_stop_signals_only_ftkit_train_processes(board):
    client, root, _ = board
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_run(root / "run", status="running", pid=other.pid)
        refused = client.post("/api/stop", json={"id": "run"})
        assert refused.status_code == 409 and other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_a_failed_multi_process_run_is_recorded_as_failed(tmp_path):
    from ftkit.train.run_status import record_failure

    write_run(tmp_path / "run", status="interrupted")
    record_failure(tmp_path / "run", "training process 1 stopped with exit code 1")
    status = read_run_status(tmp_path / "run")
    assert status["status"] == "failed" and status["message"] == "training process 1 stopped with exit code 1"
    write_run(tmp_path / "done", status="finished")
    record_failure(tmp_path / "done", "late")
    assert read_run_status(tmp_path / "done")["status"] == "finished"


def test_writes_must_be_json_from_the_boards_own_page(board):
    client, root, _ = board
    write_run(root / "run")
    form = client.post("/api/stop", data={"id": "run"})
    assert form.status_code == 403 and "JSON" in form.json()["error"]
    for origin in ("https://evil.example", "null"):
        foreign = client.post("/api/stop", json={"id": "run"}, headers={"Origin": origin})
        assert foreign.status_code == 403 and "another site" in foreign.json()["error"]


def test_bad_requests_get_a_4xx_and_one_sentence(board):
    client, root, _ = board
    write_run(root / "run")
    cases = [client.post("/api/launch", content=b"{not json", headers={"Content-Type": "application/json"}),
             client.post("/api/launch", json={"yaml": 12}), client.post("/api/stop", json={}),
             client.post("/api/chat", json={"id": "run", "messages": "hi"}),
             *(client.post(route, content=body, headers={"Content-Type": "application/json"})  # lone surrogates
               for route, body in (("/api/stop", rb'{"id": "\ud800"}'), ("/api/validate", rb'{"yaml": "a: \ud800"}'))),
             client.post("/api/chat", json={"id": "run", "messages": [{"role": "user", "content": "hi"}],
                                            "max_new_tokens": True}),
             client.get("/api/nothing-here"), client.get("/api/config", params={"name": "../../etc/passwd"}),
             client.get("/api/datasets/preview", params={"name": "identity", "model": "/etc"}),
             client.get("/api/datasets/preview", params={"name": "no-such-set"}),
             client.get("/api/datasets/preview", params={"name": "identity", "template": "vicuna"})]
    for response in cases:
        assert 400 <= response.status_code < 500, response.text
        assert response.json()["error"]
    assert client.get("/api/runs").status_code == 200  # still serving


# -- launching: refused configs ----------------------------------------------------------------------------------

def test_a_config_with_problems_shows_each_at_its_line_and_starts_nothing(board, tmp_path):
    client, root, _ = board
    text = ("model_name_or_path: smollm2-135m-instruct\n"
            "stage: sft\n"
            "dataset: no_such_dataset\n"
            f"dataset_dir: {REPO / 'data'}\n"
            "learning_rate: fast\n"
            "lora_rnak: 8\n"
            f"output_dir: {root / 'bad'}\n")
    checked = client.post("/api/validate", json={"yaml": text}).json()
    assert not checked["ok"]
    by_key = {p["key"]: p for p in checked["problems"]}
    assert set(by_key) >= {"learning_rate", "lora_rnak"}
    assert by_key["learning_rate"]["line"] == 5 and by_key["lora_rnak"]["line"] == 6
    assert "did you mean 'lora_rank'" in by_key["lora_rnak"]["message"]
    launched = client.post("/api/launch", json={"yaml": text})
    assert launched.status_code == 400 and launched.json()["problems"] == checked["problems"]
    # the dataset problem comes once the keys themselves are valid
    fixed = text.replace("learning_rate: fast\n", "").replace("lora_rnak", "lora_rank")
    problems = client.post("/api/launch", json={"yaml": fixed}).json()["problems"]
    assert [(p["key"], p["line"]) for p in problems] == [("dataset", 3)]
    outside = fixed.replace("no_such_dataset", "identity").replace(str(root / "bad"), str(tmp_path / "outside"))
    problems = client.post("/api/launch", json={"yaml": outside}).json()["problems"]
    assert [(p["key"], p["line"]) for p in problems] == [("output_dir", 6)]
    assert "not under the board's root" in problems[0]["message"]
    assert not (root / "bad").exists() and not (tmp_path / "outside").exists()
    assert client.get("/api/runs").json()["runs"] == []  # nothing started
    assert not list((root / ".ftkit-board").glob("launches/*")) and not list((root / ".ftkit-board").glob("configs/*"))


# -- a run deleted while watched, the Data tab, the Try box --------------------------------------------------------

def test_a_deleted_run_disappears_and_its_event_stream_says_gone(board):
    client, root, _ = board
    folder = write_run(root / "run", steps=3, status="running")
    events = []
    with client.stream("GET", "/api/events", params={"id": "run"}) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
                if events == ["log", "status"]:
                    import shutil

                    shutil.rmtree(folder)
                if events[-1] == "gone":
                    break
    assert events == ["log", "status", "gone"]
    assert client.get("/api/runs").json()["runs"] == []
    assert client.get("/api/run", params={"id": "run"}).status_code == 404


def test_the_data_tab_previews_trained_spans(board, tmp_path, tiny_llama_dir):
    client, root, _ = board
    listed = client.get("/api/datasets").json()
    assert {"identity", "alpaca_en_demo"} <= {d["name"] for d in listed["datasets"]}
    write_run(root / "run", config={"model_name_or_path": str(tiny_llama_dir)})
    models = client.get("/api/datasets").json()["models"]
    assert models == ["smollm2-135m-instruct", str(tiny_llama_dir)]
    shown = client.get("/api/datasets/preview", params={"name": "identity", "model": str(tiny_llama_dir)}).json()
    first = shown["examples"][0]
    trained = "".join(text for text, is_trained in first["spans"] if is_trained)
    masked = "".join(text for text, is_trained in first["spans"] if not is_trained)
    records = json.loads((REPO / "data" / "identity.json").read_text())
    assert records[0]["instruction"] in masked and records[0]["instruction"] not in trained
    assert trained.startswith(records[0]["output"].replace("{{name}}", "Ftkit")[:12])
    assert shown["stats"]["examples"] == len(records)
    # another template: the same records in its prompt format, and only the reply trained
    assert client.get("/api/datasets").json()["templates"][:2] == ["auto", "alpaca"]
    shown = client.get("/api/datasets/preview", params={"name": "identity", "model": str(tiny_llama_dir),
                                                        "template": "alpaca"}).json()
    first = shown["examples"][0]
    masked = "".join(text for text, is_trained in first["spans"] if not is_trained)
    trained = "".join(text for text, is_trained in first["spans"] if is_trained)
    assert shown["template"] == "alpaca" and f"### Instruction:\n{records[0]['instruction']}" in masked
    assert "###" not in trained and trained.startswith(records[0]["output"].replace("{{name}}", "Ftkit")[:12])
    # a template whose special tokens this tokenizer lacks: the sentence that says so, as training would
    refused = client.get("/api/datasets/preview", params={"name": "identity", "model": str(tiny_llama_dir),
                                                          "template": "llama3"})
    assert refused.status_code == 400 and "which this tokenizer does not have" in refused.json()["error"]


def test_the_try_box_answers_with_the_runs_adapter(board, tiny_llama_dir):
    client, root, _ = board
    run_training(load_stage_config(TrainConfig, None, tiny_run_keys(tiny_llama_dir, root / "tiny")))
    messages = [{"role": "user", "content": "Who are you?"}]
    reply = client.post("/api/chat", json={"id": "tiny", "messages": messages, "max_new_tokens": 8})
    assert reply.status_code == 200, reply.text
    from ftkit.engine.replies import generate_replies
    from ftkit.models import load_for_inference

    loaded = load_for_inference(str(tiny_llama_dir), [root / "tiny"])
    expected = generate_replies(loaded.model, loaded.tokenizer, [messages], max_new_tokens=8)[0].text
    assert reply.json()["reply"] == expected
    write_run(root / "live", status="running")
    refused = client.post("/api/chat", json={"id": "live", "messages": messages})
    assert refused.status_code == 409 and "finished" in refused.json()["error"]
    assert client.post("/api/chat", json={"id": "tiny", "messages": [{"role": "assistant", "content": "x"}]}
                       ).status_code == 400
