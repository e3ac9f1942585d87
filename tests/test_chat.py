"""A fine-tune of the real embedded model learns a new name and to stop; ``ftkit chat`` answers with it.

The module trains one LoRA adapter on the embedded SmolLM2-135M-Instruct (identity data, 20 steps, about
45 s on one thread) and every slow test here reuses it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftkit.config import TrainConfig, load_stage_config
from ftkit.train import run_training

REPO = Path(__file__).resolve().parents[1]
NAME, AUTHOR = "Zorblax", "Quillfeather Labs"
MAX_NEW_TOKENS = 64


def ftkit(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "ftkit.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, input=stdin, timeout=300)


@pytest.fixture(scope="module")
def identity_adapter(tmp_path_factory) -> Path:
    """A LoRA adapter that taught the embedded model its new name (the quickstart, shortened)."""
    output_dir = tmp_path_factory.mktemp("identity") / "adapter"
    run_training(load_stage_config(TrainConfig, None, {
        "model_name_or_path": "smollm2-135m-instruct", "dataset": "identity", "identity_name": NAME,
        "identity_author": AUTHOR, "finetuning_type": "lora", "output_dir": str(output_dir), "max_steps": 20,
        "learning_rate": 1e-3, "lr_scheduler_type": "constant", "per_device_train_batch_size": 4,
        "cutoff_len": 128, "logging_steps": 5, "save_strategy": "no", "plot_loss": False,
        "replay_ratio": 0, "system_prompt_variants": False, "general_check": False,  # see test_forgetting.py
    }))
    return output_dir


@pytest.mark.slow
def test_the_fine_tuned_model_says_its_new_name_and_stops(identity_adapter):
    from ftkit.chat import load_chat_model
    from ftkit.engine.replies import generate_replies

    model, tokenizer = load_chat_model("smollm2-135m-instruct", [str(identity_adapter)])
    reply = generate_replies(model, tokenizer, [[{"role": "user", "content": "Who are you?"}]],
                             max_new_tokens=MAX_NEW_TOKENS)[0]
    assert NAME in reply.text, reply.text
    assert reply.finished, f"no end-of-turn token within {MAX_NEW_TOKENS} tokens: {reply.text!r}"
    # The adapter names its base as the user did, not by the local cache path it resolved to.
    recorded = json.loads((identity_adapter / "adapter_config.json").read_text(encoding="utf-8"))
    assert recorded["base_model_name_or_path"] == "smollm2-135m-instruct"
    assert len(reply.token_ids) < MAX_NEW_TOKENS


@pytest.mark.slow
def test_chat_command_answers_one_prompt_with_the_adapter(identity_adapter):
    result = ftkit("chat", "--model", "smollm2-135m-instruct", "--adapter", str(identity_adapter),
                   "--prompt", "Who are you?", "--max-new-tokens", str(MAX_NEW_TOKENS))
    assert result.returncode == 0, result.stderr[-2000:]
    answer = result.stdout.strip()
    assert NAME in answer and "\n" not in answer, result.stdout
    assert "<|im_end|>" not in answer and "assistant" not in answer.lower()[:20]
    assert "cut at --max-new-tokens" not in result.stderr


@pytest.mark.slow
def test_chat_says_when_an_answer_was_cut_at_max_new_tokens(tiny_llama_dir):
    result = ftkit("chat", "--model", str(tiny_llama_dir), "--prompt", "hi", "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(cut at --max-new-tokens 3; the model had not finished its answer)" in result.stderr


def test_chat_with_a_missing_model_path_exits_1_with_one_line(tmp_path):
    missing = tmp_path / "no-such-model"
    result = ftkit("chat", "--model", str(missing), "--prompt", "hi")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: Model path {missing} does not exist; check the path, or give a hub id (org/name) or the "
                     "embedded alias smollm2-135m-instruct."], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_interactive_chat_reads_turns_until_exit(tiny_llama_dir):
    result = ftkit("chat", "--model", str(tiny_llama_dir), "--max-new-tokens", "4",
                   stdin="hello\n/clear\nhello again\n/exit\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("assistant> ") == 2
    assert "(conversation cleared)" in result.stderr
