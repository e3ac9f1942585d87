"""The train stage end to end on a tiny random Llama: each method trains, and leaves files plain libraries load.

Every run goes through the real entry point, ``run_training(load_stage_config(TrainConfig, None, keys))``.
The tiny model (hidden 64, 2 layers, SmolLM2's tokenizer) trains a dozen steps in a few seconds; the
learning rates are high so the loss visibly falls in that time.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ftkit.config import TrainConfig, load_stage_config
from ftkit.errors import FtkitError
from ftkit.train import run_training
from ftkit.train.callbacks import read_log, truncate_log
from ftkit.train.trainer import SeededLengthGroupedSampler

RESULT_KEYS = {
    "train_loss", "global_step", "epoch", "train_runtime_seconds", "tokens_per_second", "tokens_this_process",
    "train_examples", "resumed_from_step", "total_seconds", "replay_examples",
    "learned_answers", "learned_checked", "learned_answers_missed",  # the learned check, every sft run
}
LOG_KEYS = {"step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second", "elapsed_seconds"}


def tiny_keys(model_dir: Path, output_dir: Path, **overrides) -> dict:
    """A short, fast run of the tiny model on a slice of the shipped identity dataset.

    One batch holds the whole slice, so every step sees the same examples and the loss curve is smooth.
    """
    keys = {
        "model_name_or_path": str(model_dir), "dataset": "identity", "max_samples": 8, "cutoff_len": 128,
        "output_dir": str(output_dir), "max_steps": 10, "logging_steps": 1, "learning_rate": 5e-3,
        "per_device_train_batch_size": 8, "save_strategy": "no", "seed": 0,
        # a random tiny model answers nothing: the forgetting guard is tested in test_forgetting.py
        "replay_ratio": 0, "general_check": False,
    }
    keys.update(overrides)
    return keys


def train(model_dir: Path, output_dir: Path, **overrides):
    return run_training(load_stage_config(TrainConfig, None, tiny_keys(model_dir, output_dir, **overrides)))


def losses(output_dir: Path) -> list[float]:
    return [record["loss"] for record in read_log(output_dir) if "loss" in record]


def assert_loss_fell(output_dir: Path, by: float) -> None:
    values = losses(output_dir)
    assert len(values) >= 5, values
    first, last = sum(values[:2]) / 2, sum(values[-2:]) / 2
    assert last < first - by, f"loss did not fall by {by}: {values}"


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


@pytest.fixture(scope="module")
def lora_run(tiny_llama_dir, tmp_path_factory):
    """One LoRA run whose output several tests read."""
    output_dir = tmp_path_factory.mktemp("lora") / "out"
    result = train(tiny_llama_dir, output_dir, lora_dropout=0.1)
    return output_dir, result


# ---- methods -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lora_loss_falls_and_the_adapter_loads_with_plain_peft(lora_run, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output_dir, result = lora_run
    assert result.metrics["global_step"] == 10
    assert_loss_fell(output_dir, by=0.1)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), output_dir)
    lora_b = {name: p for name, p in model.named_parameters() if "lora_B" in name}
    assert lora_b and all(p.abs().max() > 0 for p in lora_b.values()), "every lora_B should have trained away from 0"
    assert {name.split(".")[-4] for name in lora_b} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.slow
def test_qlora_4bit_trains_on_cpu_and_its_adapter_loads_on_the_full_precision_base(tiny_llama_dir, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train(tiny_llama_dir, tmp_path, finetuning_type="qlora", max_steps=12)
    assert "qlora" in capsys.readouterr().err
    assert_loss_fell(tmp_path, by=0.1)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path)
    assert all(p.abs().max() > 0 for name, p in model.named_parameters() if "lora_B" in name)


@pytest.mark.slow
def test_full_fine_tuning_changes_every_layer_and_saves_a_plain_checkpoint(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    train(tiny_llama_dir, tmp_path, finetuning_type="full", learning_rate=1e-3)
    assert_loss_fell(tmp_path, by=0.5)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.use_cache is True, "the saved config must not keep use_cache off from training"
    base, trained = weights(tiny_llama_dir), weights(tmp_path)
    assert set(trained) == set(base)
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        assert not torch.equal(base[name], trained[name]), f"{name} did not change"


@pytest.mark.slow
def test_freeze_trains_only_the_last_layers(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    train(tiny_llama_dir, tmp_path, finetuning_type="freeze", freeze_trainable_layers=1, learning_rate=1e-2)
    assert_loss_fell(tmp_path, by=0.05)
    AutoModelForCausalLM.from_pretrained(tmp_path)
    base, trained = weights(tiny_llama_dir), weights(tmp_path)
    changed = {name for name in base if not torch.equal(base[name], trained[name])}
    assert changed, "freeze trained nothing"
    assert all(name.startswith("model.layers.1.") for name in changed), sorted(changed)
    assert any(name.startswith("model.layers.1.mlp.") for name in changed)


# ---- what a run leaves behind -------------------------------------------------------------------------------


@pytest.mark.slow
def test_output_files_of_a_run(lora_run, tiny_llama_dir):
    output_dir, result = lora_run
    results = json.loads((output_dir / "train_results.json").read_text())
    assert set(results) == RESULT_KEYS
    assert results == result.metrics
    assert results["global_step"] == 10 and results["resumed_from_step"] is None
    assert results["train_examples"] == 8 and results["tokens_per_second"] > 0

    lines = (output_dir / "trainer_log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == list(range(1, 11))  # logging_steps 1: one line per step
    for record in records:
        assert set(record) == LOG_KEYS
        assert record["grad_norm"] > 0 and record["tokens_per_second"] > 0
    rates = [r["learning_rate"] for r in records]
    assert rates[0] == pytest.approx(5e-3) and rates == sorted(rates, reverse=True)  # cosine, no warmup
    assert [r["elapsed_seconds"] for r in records] == sorted(r["elapsed_seconds"] for r in records)
    assert results["train_loss"] == pytest.approx(sum(r["loss"] for r in records) / 10, abs=1e-4)

    assert (output_dir / "training_loss.png").stat().st_size > 1000

    from ftkit.train.small_sets import small_set_defaults

    saved = load_stage_config(TrainConfig, output_dir / "ftkit_config.yaml")
    expected = load_stage_config(TrainConfig, None, tiny_keys(tiny_llama_dir, output_dir, lora_dropout=0.1))
    # the resolved config records what the run used: 8 examples are a small set, so lora_rank 16 was filled in
    assert saved.config == small_set_defaults(expected.config, small=True)[0]
    assert saved.config.lora_rank == 16
    assert yaml.safe_load((output_dir / "ftkit_config.yaml").read_text())["lora_dropout"] == 0.1


@pytest.mark.slow
def test_saved_tokenizer_keeps_the_chat_template_and_a_pad_token_that_is_not_eos(lora_run, tiny_llama_dir):
    from transformers import AutoTokenizer, GenerationConfig

    output_dir, _ = lora_run
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    base = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert tokenizer.chat_template == base.chat_template and tokenizer.chat_template
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tokenizer.apply_chat_template(conversation) == base.apply_chat_template(conversation)
    assert tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token
    assert tokenizer.pad_token_id != tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation = GenerationConfig.from_pretrained(output_dir)
    stops = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    assert generation.pad_token_id == tokenizer.pad_token_id
    assert generation.pad_token_id not in stops
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops


@pytest.mark.slow
def test_checkpoints_are_complete_rotated_and_record_the_loss_so_far(tiny_llama_dir, tmp_path):
    from ftkit.train.checkpoints import list_checkpoints

    train(tiny_llama_dir, tmp_path, max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert [c.step for c in list_checkpoints(tmp_path)] == [4, 6]
    assert not (tmp_path / ".ftkit-staging").exists()
    state = json.loads((tmp_path / "checkpoint-4" / "ftkit_state.json").read_text())
    assert state["global_step"] == 4
    assert state["loss_sum"] == pytest.approx(sum(losses(tmp_path)[:4]), abs=1e-4)


# ---- stages, evaluation, loggers ----------------------------------------------------------------------------


@pytest.mark.slow
def test_pt_stage_packs_pt_demo_and_trains(tiny_llama_dir, tmp_path, capsys):
    result = train(tiny_llama_dir, tmp_path, stage="pt", dataset="pt_demo", max_samples=None, cutoff_len=256,
                   max_steps=10, finetuning_type="full", learning_rate=2e-3)
    assert "packed rows" in capsys.readouterr().err
    assert_loss_fell(tmp_path, by=0.3)
    assert result.metrics["global_step"] == 10
    assert (tmp_path / "model.safetensors").is_file()


@pytest.mark.slow
def test_val_size_reports_eval_loss_and_tensorboard_writes_event_files(tiny_llama_dir, tmp_path):
    result = train(tiny_llama_dir, tmp_path, max_samples=32, val_size=0.25, eval_steps=5, report_to="tensorboard")
    results = json.loads((tmp_path / "train_results.json").read_text())
    assert results["eval_loss"] == result.metrics["eval_loss"] and 0 < results["eval_loss"] < 20
    assert results["train_examples"] == 24  # 32 examples less a quarter held out
    evals = [r for r in read_log(tmp_path) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [5, 10], "the final weights are evaluated once, not twice"
    assert evals[-1]["eval_loss"] == results["eval_loss"]
    events = list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)


# ---- refusals: before anything heavy ------------------------------------------------------------------------


def refused(keys: dict, overrides: dict | None = None) -> str:
    """Run the train stage expecting a refusal; return its message.

    A refusal comes before the model is loaded and before output_dir is written to (no resolved config there).
    """
    started = time.perf_counter()
    with pytest.raises(FtkitError) as caught:
        run_training(load_stage_config(TrainConfig, None, {**keys, **(overrides or {})}))
    assert time.perf_counter() - started < 15, "the refusal should come before the model is loaded"
    assert not (Path(keys["output_dir"]) / "ftkit_config.yaml").exists()
    return str(caught.value)


def test_quantization_bit_with_full_or_freeze_is_a_config_error(tmp_path):
    for method in ("full", "freeze"):
        with pytest.raises(FtkitError) as caught:
            load_stage_config(TrainConfig, None, {"dataset": "identity", "output_dir": str(tmp_path),
                                                  "finetuning_type": method, "quantization_bit": 4})
        assert (f"quantization_bit 4 cannot be used with finetuning_type {method}: quantized weights cannot be "
                "updated; use finetuning_type lora (QLoRA) or remove quantization_bit.") in str(caught.value)


def test_a_finished_run_is_not_overwritten_without_overwrite_output_dir(tiny_llama_dir, tmp_path):
    (tmp_path / "train_results.json").write_text("{}")
    message = refused(tiny_keys(tiny_llama_dir, tmp_path))
    assert message == (f"output_dir {tmp_path} already holds a finished run (train_results.json); choose another "
                       "output_dir, or set overwrite_output_dir: true to replace it.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_results.json"]


@pytest.mark.slow
def test_overwrite_output_dir_replaces_a_finished_run_and_refuses_a_folder_with_foreign_files(tiny_llama_dir, tmp_path):
    (tmp_path / "train_results.json").write_text('{"old": true}')
    (tmp_path / "trainer_log.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    (tmp_path / "checkpoint-99").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    message = refused(tiny_keys(tiny_llama_dir, tmp_path, overwrite_output_dir=True))
    assert "holds files ftkit did not write (notes.txt)" in message
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "checkpoint-99").is_dir()
    (tmp_path / "notes.txt").unlink()
    train(tiny_llama_dir, tmp_path, overwrite_output_dir=True, max_steps=3)
    assert "old" not in json.loads((tmp_path / "train_results.json").read_text())
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]
    assert not (tmp_path / "checkpoint-99").exists()


def test_a_dataset_with_no_usable_example_is_refused_before_output_dir_is_touched(tiny_llama_dir, tmp_path):
    broken = [{"conversations": [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "hi"}]}] * 3
    data_file = tmp_path / "broken.json"
    data_file.write_text(json.dumps(broken))
    output_dir = tmp_path / "out"
    message = refused(tiny_keys(tiny_llama_dir, output_dir, dataset=str(data_file), max_samples=None))
    assert message == (f"Dataset '{data_file}' has no usable examples (3 with broken role order (first: record 1 has "
                       "'gpt' (assistant) as turn 1, where the user must speak; fix the record (turns alternate user, "
                       "assistant), or, if 'gpt' is the user here, register the file in dataset_info.json with "
                       "\"formatting\": \"sharegpt\" and \"tags\": {\"user_tag\": \"gpt\", \"assistant_tag\": \"human\"}))."
                       )
    assert not output_dir.exists()


def test_resume_from_a_missing_checkpoint_is_refused(tiny_llama_dir, tmp_path):
    missing = tmp_path / "checkpoint-5"
    message = refused(tiny_keys(tiny_llama_dir, tmp_path), {"resume_from_checkpoint": str(missing)})
    assert message == (f"resume_from_checkpoint {missing} is not a directory; give a checkpoint-N folder "
                       "(found: none).")


def test_resume_from_an_incomplete_checkpoint_is_refused(tiny_llama_dir, tmp_path):
    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    for name in ("adapter_model.safetensors", "trainer_state.json", "optimizer.pt", "scheduler.pt"):
        (checkpoint / name).write_text("x")
    message = refused(tiny_keys(tiny_llama_dir, tmp_path), {"resume_from_checkpoint": str(checkpoint)})
    assert message == (f"resume_from_checkpoint {checkpoint} cannot be resumed (rng_state.pth missing); pick an "
                       "earlier checkpoint.")


def test_resume_true_without_a_checkpoint_is_refused(tiny_llama_dir, tmp_path):
    message = refused(tiny_keys(tiny_llama_dir, tmp_path), {"resume_from_checkpoint": True})
    assert message == (f"resume_from_checkpoint is true but output_dir {tmp_path} holds no complete checkpoint; "
                       "remove one of the two keys.")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_report_to_wandb_without_wandb_is_refused_and_an_earlier_run_survives(tiny_llama_dir, tmp_path):
    (tmp_path / "train_results.json").write_text('{"old": true}')
    (tmp_path / "checkpoint-3").mkdir()
    message = refused(tiny_keys(tiny_llama_dir, tmp_path), {"report_to": "wandb", "overwrite_output_dir": True})
    assert message == ("report_to wandb needs the wandb package; install it (`pip install wandb`) or set "
                       "report_to: none.")
    assert (tmp_path / "train_results.json").read_text() == '{"old": true}'
    assert (tmp_path / "checkpoint-3").is_dir()


# ---- pieces --------------------------------------------------------------------------------------------------


def test_length_grouped_sampler_is_a_seeded_permutation_that_changes_per_epoch():
    lengths = [(i * 37) % 101 + 1 for i in range(200)]
    sampler = SeededLengthGroupedSampler(lengths, batch_size=4, seed=3, megabatch_factor=5)
    first = list(sampler)
    assert sorted(first) == list(range(200))
    assert list(SeededLengthGroupedSampler(lengths, batch_size=4, seed=3, megabatch_factor=5)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(200))
    # batches hold similar lengths: each batch lies within one sorted mega-batch
    batches = [first[i:i + 4] for i in range(0, 200, 4)]
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 30  # about 60 for batches of 4 drawn at random


def test_truncate_log_drops_lines_after_the_checkpoint_and_a_line_cut_by_a_kill(tmp_path):
    lines = [json.dumps({"step": step, "loss": 1.0}) for step in range(1, 6)]
    (tmp_path / "trainer_log.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "lo')
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4, 5]
    truncate_log(tmp_path, 3)
    assert (tmp_path / "trainer_log.jsonl").read_text() == "\n".join(lines[:3]) + "\n"
