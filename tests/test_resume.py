"""Kill-and-resume: a run killed at any moment and started again ends exactly where an uninterrupted one does.

The runs are real ``ftkit train`` processes (``python -m ftkit.cli train cfg.yaml``) on the tiny Llama,
killed with SIGKILL. The config makes exactness hard on purpose: LoRA dropout, shuffled length-grouped
batches, gradient accumulation, and a resume that crosses an epoch boundary (10 optimizer steps per epoch,
12 in all). Every process runs with one thread so the arithmetic is identical between runs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ftkit.errors import FtkitError
from ftkit.train.callbacks import read_log
from ftkit.train.checkpoints import (
    STAGING_DIR,
    is_complete_checkpoint,
    list_checkpoints,
    plan_resume,
)

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 12
SAVE_STEPS = 3
LOG_FIELDS = ("step", "epoch", "loss", "learning_rate", "grad_norm")  # all but the timing fields


@pytest.fixture(scope="module")
def config_file(tiny_llama_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resume-config") / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny_llama_dir), "dataset": "identity", "max_samples": 40, "cutoff_len": 128,
        "finetuning_type": "lora", "lora_dropout": 0.1, "max_steps": MAX_STEPS, "save_steps": SAVE_STEPS,
        "logging_steps": 1, "learning_rate": 5e-3, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2, "seed": 7, "output_dir": "set-per-test",
        "replay_source": "alpaca_en_demo", "replay_ratio": 0.5, "general_check": False,  # replay must resume exactly too
    }))
    return path


def _command(config_file: Path, output_dir: Path) -> list[str]:
    return [sys.executable, "-m", "ftkit.cli", "train", str(config_file), f"output_dir={output_dir}"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_train(config_file: Path, output_dir: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(_command(config_file, output_dir), capture_output=True, text=True, env=_env(),
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def start_train(config_file: Path, output_dir: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as sink:  # a file, not a pipe: nobody reads while it runs, and a full pipe would block it
        return subprocess.Popen(_command(config_file, output_dir), stdout=sink, stderr=subprocess.STDOUT,
                                env=_env(), cwd=REPO)


def wait_until(condition, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"training ended (status {process.returncode}) before the moment to kill it:\n"
                        + log.read_text()[-3000:])
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("timed out waiting for the moment to kill the run")
        time.sleep(0.002)


def kill(process: subprocess.Popen) -> None:
    assert process.poll() is None, "the run finished before it could be killed"
    process.kill()  # SIGKILL: no cleanup, no atexit, exactly like a lost machine
    process.wait(timeout=30)


def adapter(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "adapter_model.safetensors"))


def assert_same_run(output_dir: Path, reference: Path) -> None:
    """Same final step and adapter weights (to 1e-5), same train loss, and the same log, line by line."""
    results, expected = (json.loads((d / "train_results.json").read_text()) for d in (output_dir, reference))
    assert results["global_step"] == expected["global_step"] == MAX_STEPS
    assert results["train_loss"] == pytest.approx(expected["train_loss"], abs=1e-4)
    got, want = adapter(output_dir), adapter(reference)
    assert got.keys() == want.keys()
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= 1e-5, f"adapter differs from the uninterrupted run by up to {worst}"
    log, expected_log = read_log(output_dir), read_log(reference)
    assert [r["step"] for r in log] == list(range(1, MAX_STEPS + 1))
    for record, expected_record in zip(log, expected_log, strict=True):
        assert {k: record[k] for k in LOG_FIELDS} == pytest.approx({k: expected_record[k] for k in LOG_FIELDS},
                                                                   abs=1e-5)
    for checkpoint in output_dir.glob("checkpoint-*"):
        assert is_complete_checkpoint(checkpoint), f"{checkpoint.name} is incomplete"
    assert not (output_dir / STAGING_DIR).exists()


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory) -> Path:
    """The uninterrupted run every resumed run must match."""
    output_dir = tmp_path_factory.mktemp("resume-reference") / "out"
    run_train(config_file, output_dir)
    assert sorted(c.step for c in list_checkpoints(output_dir)) == [3, 6, 9, 12]
    return output_dir


# ---- killed runs ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_after_a_checkpoint_resumes_to_the_same_adapter(config_file, reference, tmp_path):
    output_dir, log = tmp_path / "out", tmp_path / "first.log"
    process = start_train(config_file, output_dir, log)
    wait_until(lambda: any(is_complete_checkpoint(c) for c in output_dir.glob("checkpoint-*")), process, log)
    delay = random.uniform(0.0, 0.3)  # any moment after the first checkpoint: between or during later saves
    time.sleep(delay)
    kill(process)
    assert not (output_dir / "train_results.json").exists()
    last = list_checkpoints(output_dir)[-1]
    assert last.step < MAX_STEPS, f"killed {delay:.2f} s after the first checkpoint, too late to test resuming"

    second = run_train(config_file, output_dir)
    assert f"resuming from checkpoint-{last.step} (step {last.step})" in second.stderr, second.stderr[-2000:]
    assert json.loads((output_dir / "train_results.json").read_text())["resumed_from_step"] == last.step
    assert_same_run(output_dir, reference)


@pytest.mark.slow
def test_killed_in_the_middle_of_a_save_resumes_from_the_previous_complete_checkpoint(config_file, reference,
                                                                                     tmp_path):
    output_dir, log = tmp_path / "out", tmp_path / "first.log"
    staged = output_dir / STAGING_DIR / f"checkpoint-{2 * SAVE_STEPS}"
    process = start_train(config_file, output_dir, log)
    # The second checkpoint is being written: its weights are in the staging folder, the rest not yet.
    wait_until(lambda: (staged / "adapter_model.safetensors").exists(), process, log)
    kill(process)
    assert staged.is_dir(), "the kill should have landed while checkpoint-6 was still being staged"
    assert not (output_dir / f"checkpoint-{2 * SAVE_STEPS}").exists()
    assert [c.step for c in list_checkpoints(output_dir)] == [SAVE_STEPS]

    second = run_train(config_file, output_dir)
    assert f"resuming from checkpoint-{SAVE_STEPS} (step {SAVE_STEPS})" in second.stderr, second.stderr[-2000:]
    assert_same_run(output_dir, reference)


@pytest.mark.slow
def test_incomplete_checkpoints_and_staging_leftovers_are_never_resumed(config_file, reference, tmp_path):
    """checkpoint-12 lost its rng_state.pth and a leftover staging folder holds a 'checkpoint-15': the run
    resumes from checkpoint-9, the last complete one, and still ends exactly like the reference."""
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    for step in (3, 6, 9, 12):
        shutil.copytree(reference / f"checkpoint-{step}", output_dir / f"checkpoint-{step}")
    shutil.copy(reference / "trainer_log.jsonl", output_dir / "trainer_log.jsonl")  # lines past step 9 must go
    (output_dir / "checkpoint-12" / "rng_state.pth").unlink()
    shutil.copytree(reference / "checkpoint-12", output_dir / STAGING_DIR / "checkpoint-15")

    assert [c.step for c in list_checkpoints(output_dir)] == [3, 6, 9]
    result = run_train(config_file, output_dir)
    assert "resuming from checkpoint-9 (step 9)" in result.stderr, result.stderr[-2000:]
    assert_same_run(output_dir, reference)


@pytest.mark.slow
def test_killed_while_writing_the_final_model_finishes_from_the_last_checkpoint(config_file, reference, tmp_path):
    """Every step ran and checkpoint-12 is complete, but the final files were not all written."""
    output_dir = tmp_path / "out"
    shutil.copytree(reference, output_dir)
    for name in ("train_results.json", "adapter_model.safetensors", "training_loss.png"):
        (output_dir / name).unlink()
    (output_dir / ".ftkit-final").mkdir()
    (output_dir / ".ftkit-final" / "adapter_model.safetensors").write_bytes(b"cut short")

    result = run_train(config_file, output_dir)
    assert f"resuming from checkpoint-{MAX_STEPS}" in result.stderr, result.stderr[-2000:]
    assert not (output_dir / ".ftkit-final").exists()
    assert (output_dir / "training_loss.png").is_file()
    assert_same_run(output_dir, reference)


# ---- what counts as a checkpoint (no training) ---------------------------------------------------------------


def _fake_checkpoint(directory: Path, step: int, *, without: str | None = None) -> Path:
    path = directory / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        if name != without:
            (path / name).write_text("x")
    if without != "trainer_state.json":
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


@pytest.mark.parametrize("missing", ["rng_state.pth", "optimizer.pt", "scheduler.pt", "trainer_state.json",
                                     "adapter_model.safetensors"])
def test_a_checkpoint_missing_any_resume_file_is_skipped(tmp_path, missing):
    _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 4, without=missing)
    _fake_checkpoint(tmp_path / STAGING_DIR, 6)
    assert [c.step for c in list_checkpoints(tmp_path)] == [2]
    assert plan_resume(tmp_path, None, overwrite=False).step == 2


def test_overwrite_output_dir_with_an_explicit_checkpoint_inside_it_is_refused_without_deleting(tmp_path):
    checkpoint = _fake_checkpoint(tmp_path, 3)
    with pytest.raises(FtkitError, match="is inside output_dir, which overwrite_output_dir: true would empty"):
        plan_resume(tmp_path, str(checkpoint), overwrite=True)
    assert is_complete_checkpoint(checkpoint)


def test_resume_false_with_checkpoints_needs_overwrite(tmp_path):
    _fake_checkpoint(tmp_path, 3)
    with pytest.raises(FtkitError) as caught:
        plan_resume(tmp_path, False, overwrite=False)
    assert str(caught.value) == (f"output_dir {tmp_path} holds checkpoints but resume_from_checkpoint is false; "
                                 "set overwrite_output_dir: true to start over, or drop the key to resume.")
    assert plan_resume(tmp_path, False, overwrite=True) is None
    assert (tmp_path / "checkpoint-3").is_dir(), "planning alone deletes nothing"


def test_resuming_with_changed_training_settings_is_named(tmp_path):
    from ftkit.train.checkpoints import changed_training_keys

    saved = tmp_path / "ftkit_config.yaml"
    saved.write_text(yaml.safe_dump({"learning_rate": 1e-4, "dataset": ["identity"], "logging_steps": 5}))
    current = {"learning_rate": 2e-4, "dataset": ["identity"], "logging_steps": 10, "new_key": 1}
    # logging_steps does not change what is trained; a key the old config lacked is not compared.
    assert changed_training_keys(saved, current) == ["learning_rate: 0.0001 -> 0.0002"]
    assert changed_training_keys(tmp_path / "missing.yaml", current) == []
