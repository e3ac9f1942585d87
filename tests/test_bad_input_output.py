"""Issue 23, output folders: a refused run never costs the previous one, and nothing of the user's is deleted.

The catalogue runs the real ``ftkit train`` in a fresh folder holding a copy of the tiny Llama (``model``)
and, where a case needs one, a copy of a real finished run (trained once per module for one step). The
focused tests below it show the mechanism: which folders are ftkit's, the previous run moved aside and
put back when the new one fails before its first step (or was killed there), and the lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from bad_input import BadInput, check_bad_input

from ftkit.config import TrainConfig, load_stage_config
from ftkit.train import run_training
from ftkit.train.checkpoints import LOCK_FILE, MANIFEST_FILE, PREVIOUS_RUN_DIR, foreign_entries
from ftkit.train.output_dir import RunFolder

TRAIN_KEYS = {"model_name_or_path": "model", "dataset": "identity", "max_samples": 4, "cutoff_len": 64,
              "max_steps": 1, "per_device_train_batch_size": 4, "save_strategy": "no", "replay_ratio": 0,
              "general_check": False, "output_dir": "out"}
CONFIG = "".join(f"{key}: {json.dumps(value)}\n" for key, value in TRAIN_KEYS.items())
TRAIN = ["train", "{tmp}/cfg.yaml"]
OVERWRITE = [*TRAIN, "overwrite_output_dir=true"]
ASSETS: dict[str, Path] = {}  # "model": the tiny Llama, "run": a finished run of it (filled once per module)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module", autouse=True)
def assets(tiny_llama_dir, tmp_path_factory):
    """A finished one-step LoRA run of the tiny Llama with a checkpoint, a log and a plot."""
    ASSETS["model"] = tiny_llama_dir
    run = tmp_path_factory.mktemp("finished") / "run"
    keys = {**TRAIN_KEYS, "model_name_or_path": str(tiny_llama_dir), "output_dir": str(run), "logging_steps": 1,
            "save_strategy": "steps", "save_steps": 1}
    run_training(load_stage_config(TrainConfig, None, keys))
    ASSETS["run"] = run
    return ASSETS


def copies(*, then: dict[str, str] | None = None, **targets: str) -> Callable[[Path], None]:
    """A setup copying the model and assets into the case's folder (``copies(out="run")`` puts the finished run
    at ``out``), then writing the files in ``then``."""
    def setup(folder: Path) -> None:
        shutil.copytree(ASSETS["model"], folder / "model")
        for target, asset in targets.items():
            shutil.copytree(ASSETS[asset], folder / target)
        for name, text in (then or {}).items():
            (folder / name).write_text(text)
    return setup


def read_only(name: str) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        copies()(folder)
        (folder / name).mkdir()
        (folder / name).chmod(0o555)
    return setup


def contents(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


ROWS = json.dumps([{"instruction": "Say hi", "input": "", "output": "Hi"}])
ROOT_SKIP = pytest.mark.skipif(IS_ROOT, reason="root writes into read-only folders, so the refusal cannot be seen")

CASES = [
    # A copy of a finished run, replaced by a run that is refused later: the old run stays byte for byte.
    BadInput("overwrite-then-bad-lora-target", [*OVERWRITE, "lora_target=nonexistent_proj"],
             mentions=["lora_target", "nonexistent_proj"], files={"cfg.yaml": CONFIG}, setup=copies(out="run")),
    BadInput("overwrite-then-optimizer-the-trainer-rejects", [*OVERWRITE, "optim=not_an_optimizer"],
             mentions=["TrainingArguments", "not_an_optimizer"], files={"cfg.yaml": CONFIG}, setup=copies(out="run")),
    # Folders that are not ftkit's runs, or are the run's own inputs.
    BadInput("output-dir-is-a-project-folder", [*OVERWRITE, "output_dir=.", "model_name_or_path=smollm2-135m-instruct"],
             mentions=["output_dir .", "README.md", "cfg.yaml", "config.json", "runs", "did not write"],
             files={"cfg.yaml": CONFIG, "README.md": "# my project\n", "config.json": "{}", "runs/tb/events": "x"}),
    BadInput("output-dir-is-the-model", [*OVERWRITE, "output_dir=model"],
             mentions=["output_dir model is the model being trained", "model_name_or_path"],
             files={"cfg.yaml": CONFIG}, setup=copies()),
    BadInput("output-dir-is-the-adapter-being-continued", [*OVERWRITE, "output_dir=ad", "adapter_name_or_path=ad"],
             mentions=["output_dir ad is the adapter being continued", "adapter_name_or_path"],
             files={"cfg.yaml": CONFIG}, setup=copies(ad="run")),
    BadInput("output-dir-contains-the-dataset", [*OVERWRITE, "output_dir=data", "dataset=data/rows.json"],
             mentions=["output_dir data contains the data file", "data/rows.json"],
             files={"cfg.yaml": CONFIG, "data/rows.json": ROWS}, setup=copies()),
    BadInput("run-folder-holding-a-file-of-the-users", OVERWRITE, mentions=["out", "notes.txt", "did not write"],
             files={"cfg.yaml": CONFIG}, setup=copies(out="run", then={"out/notes.txt": "mine"})),
    # Folders that cannot be written: refused before the tokenizer, data or model, creating nothing.
    BadInput("output-dir-is-a-file", TRAIN, mentions=["output_dir out is a file"],
             files={"cfg.yaml": CONFIG, "out": "a file\n"}, setup=copies()),
    BadInput("output-dir-under-a-file", [*TRAIN, "output_dir=f/out"], mentions=["{tmp}/f is a file"],
             files={"cfg.yaml": CONFIG, "f": "a file\n"}, setup=copies()),
    BadInput("output-dir-read-only", [*TRAIN, "output_dir=ro"], mentions=["output_dir ro is not writable"],
             files={"cfg.yaml": CONFIG}, setup=read_only("ro")),
    BadInput("output-dir-under-a-read-only-folder", [*TRAIN, "output_dir=ro/out"],
             mentions=["output_dir ro/out is not writable", "read-only"], files={"cfg.yaml": CONFIG},
             setup=read_only("ro")),
]


@pytest.mark.parametrize("case", [pytest.param(c, marks=ROOT_SKIP) if "read-only" in c.id else c for c in CASES],
                         ids=str)
def test_bad_input_is_one_clear_sentence_and_loses_nothing(case, tmp_path):
    check_bad_input(case, tmp_path)
    if case.id.startswith("overwrite-then-"):
        assert contents(tmp_path / "out") == contents(ASSETS["run"]), "the refused run changed the old one"


def test_live_lock_of_another_process_is_refused_naming_it(tmp_path):
    """A real second process holds the lock (its own pid, this host) for as long as it sleeps."""
    holder: list[subprocess.Popen] = []

    def setup(folder: Path) -> None:
        copies()(folder)
        (folder / "out").mkdir()
        script = ("import json, os, socket, time\n"
                  f"open({str(folder / 'out' / LOCK_FILE)!r}, 'w').write(json.dumps("
                  "{'pid': os.getpid(), 'host': socket.gethostname(), 'started': 'now'}))\n"
                  "time.sleep(120)\n")
        holder.append(subprocess.Popen([sys.executable, "-c", script]))
        lock, deadline = folder / "out" / LOCK_FILE, time.monotonic() + 30
        while not (lock.exists() and lock.read_text().endswith("}")):
            assert time.monotonic() < deadline, "the holder never wrote its lock"
            time.sleep(0.05)

    try:
        case = BadInput("live-lock", TRAIN, mentions=["in use by another ftkit run"], files={"cfg.yaml": CONFIG},
                        setup=setup)
        result = check_bad_input(case, tmp_path)
        assert f"process {holder[0].pid}" in result.stderr
    finally:
        for process in holder:
            process.kill()
            process.wait()


def test_successful_overwrite_replaces_the_old_run_and_records_the_new_one(tmp_path, monkeypatch):
    copies(out="run")(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = run_training(load_stage_config(TrainConfig, None, {**TRAIN_KEYS, "overwrite_output_dir": True,
                                                                "max_steps": 2}))
    out = tmp_path / "out"
    assert result.metrics["global_step"] == 2
    assert not (out / "checkpoint-1").exists(), "the old run's checkpoint goes with it"
    assert not (out / PREVIOUS_RUN_DIR).exists() and not (out / LOCK_FILE).exists()
    recorded = json.loads((out / MANIFEST_FILE).read_text())["files"]
    assert recorded == sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert "train_results.json" in recorded and "adapter_model.safetensors" in recorded


def test_failure_before_the_first_step_puts_the_moved_aside_run_back(tmp_path, monkeypatch):
    from ftkit.train.trainer import FtkitTrainer

    copies(out="run")(tmp_path)
    monkeypatch.chdir(tmp_path)
    seen_aside: list[bool] = []

    def fails(self, *args, **kwargs):
        seen_aside.append((tmp_path / "out" / PREVIOUS_RUN_DIR).is_dir())
        raise RuntimeError("out of memory in the first step")

    monkeypatch.setattr(FtkitTrainer, "compute_loss", fails)
    with pytest.raises(RuntimeError, match="out of memory in the first step"):
        run_training(load_stage_config(TrainConfig, None, {**TRAIN_KEYS, "overwrite_output_dir": True}))
    assert seen_aside == [True], "the old run should have been moved aside when training started"
    assert contents(tmp_path / "out") == contents(ASSETS["run"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in ASSETS["run"].iterdir())


@pytest.mark.parametrize("killed", ["after-the-move", "in-the-middle-of-the-move"])
def test_a_start_killed_after_moving_the_old_run_aside_is_put_back_by_the_next_run(tmp_path, monkeypatch, killed):
    import ftkit.train.output_dir as output_dir_module

    out = shutil.copytree(ASSETS["run"], tmp_path / "out")
    interrupted = RunFolder(out, report=print, overwrite=True)
    interrupted.claim()
    if killed == "in-the-middle-of-the-move":
        moves, real_replace = [], os.replace

        def replace_then_die(source, target):  # the journal, .ftkit-previous, two files: then the process dies
            if len(moves) == 4:
                raise SystemExit("killed")
            moves.append(source)
            real_replace(source, target)

        monkeypatch.setattr(output_dir_module.os, "replace", replace_then_die)
    with pytest.raises(SystemExit) if killed == "in-the-middle-of-the-move" else contextlib.nullcontext():
        interrupted.start("model_name_or_path: other\n")  # killed: no release, no first step
    monkeypatch.undo()
    aside = sorted(p.name for p in (out / PREVIOUS_RUN_DIR).iterdir())
    assert aside == ([".ftkit-moving.json", MANIFEST_FILE, "README.md"] if killed == "in-the-middle-of-the-move"
                     else sorted(p.name for p in ASSETS["run"].iterdir()))
    (out / LOCK_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))

    notes: list[str] = []
    folder = RunFolder(out, report=notes.append, overwrite=True)
    folder.claim()
    folder.release()
    assert contents(out) == contents(ASSETS["run"])
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ASSETS["run"].iterdir())
    assert any("no longer running" in note for note in notes) and any("put back the previous run" in n for n in notes)


def test_stale_lock_is_reclaimed_with_a_note_and_released(tmp_path):
    dead = _dead_pid()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "x"}))
    notes: list[str] = []
    folder = RunFolder(tmp_path, report=notes.append, overwrite=False)
    folder.claim()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    folder.release()
    assert not (tmp_path / LOCK_FILE).exists()
    assert notes == [f"note: output_dir {tmp_path} was locked by process {dead}, which is no longer running (the run "
                     "was killed); taking the lock over"]


def test_unwritable_folders_are_named_with_the_one_that_is_read_only(tmp_path, monkeypatch):
    """The read-only catalogue cases cannot be seen as root; this shows the sentences wherever the tests run."""
    import ftkit.train.output_dir as output_dir_module
    from ftkit.errors import FtkitError

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(output_dir_module.os, "access", lambda path, mode: Path(path) != tmp_path / "ro")
    expected = {tmp_path / "ro": "it is read-only", tmp_path / "ro" / "a" / "b": f"{tmp_path / 'ro'} is read-only"}
    for output_dir, where in expected.items():
        with pytest.raises(FtkitError) as error:
            output_dir_module.check_writable_folder(output_dir)
        assert str(error.value) == (f"output_dir {output_dir} is not writable for this user ({where}); choose a folder "
                                    "you can write to.")


def test_a_refused_run_removes_the_folders_it_created(tmp_path):
    folder = RunFolder(tmp_path / "a" / "b" / "out", report=print, overwrite=False)
    folder.claim()
    assert (tmp_path / "a" / "b" / "out" / LOCK_FILE).is_file()
    folder.release()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("entries", "foreign"), [
    ({}, []),
    ({LOCK_FILE: "{}"}, []),  # a run killed before it wrote anything else
    ({"ftkit_config.yaml": "", "checkpoint-3/": "", "trainer_log.jsonl": "", ".ftkit-staging/": ""}, []),  # pre-manifest
    ({MANIFEST_FILE: json.dumps({"files": ["vocab.json"]}), "vocab.json": "", "checkpoint-9/": ""}, []),
    ({MANIFEST_FILE: json.dumps({"files": []}), "adapter_model.safetensors": "", "notes.txt": ""}, ["notes.txt"]),
    ({"config.json": "", "model.safetensors": "", "tokenizer.json": "", "README.md": ""},  # a model, never a run
     ["README.md", "config.json", "model.safetensors", "tokenizer.json"]),
    ({"ftkit_config.yaml": "", "trainer_state.json": "", "all_results.json": ""},  # another trainer's run
     ["all_results.json", "trainer_state.json"]),
])
def test_which_entries_are_ftkits(tmp_path, entries, foreign):
    for name, text in entries.items():
        if name.endswith("/"):
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_text(text)
    assert foreign_entries(tmp_path) == foreign


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid
