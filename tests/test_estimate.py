"""``ftkit estimate``: per-device memory plans, checked against DeepSpeed's own estimators, the seed's Adam
figure and a measured training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftkit.config import TrainConfig, load_stage_config
from ftkit.estimate import estimate
from ftkit.models.memory import GB, STRATEGIES, ModelShape, model_states

REPO = Path(__file__).resolve().parent.parent

# The published config of a ~1.5B Llama-architecture model (Qwen2.5-1.5B's sizes), built on the meta device.
BIG_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1536,
              "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
              "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 4096,
              "tie_word_embeddings": True, "rms_norm_eps": 1e-6}


def train_config(model: str | Path, **keys) -> TrainConfig:
    return load_stage_config(TrainConfig, None, {"model_name_or_path": str(model), "dataset": "identity",
                                                 "output_dir": "out", **keys}).config


@pytest.fixture(scope="module")
def big_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("big-config")
    (folder / "config.json").write_text(json.dumps(BIG_CONFIG), encoding="utf-8")
    return folder


def test_model_states_agree_with_deepspeeds_estimators(big_model_dir):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    for gpus, nodes in ((1, 1), (8, 1), (4, 2)):
        result = estimate(train_config(big_model_dir, finetuning_type="full"), gpus=gpus, nodes=nodes)
        shape = result.shapes["full"]
        assert shape.parameters == shape.trainable > 1.5e9
        plans = {plan.strategy: plan for plan in result.plans["full"]}
        for strategy, offload in (("zero2", False), ("zero2_offload", True)):
            cpu, gpu = estimate_zero2_model_states_mem_needs(shape.parameters, gpus, nodes, cpu_offload=offload)
            assert plans[strategy].model_states == pytest.approx(gpu, rel=0.05), (strategy, gpus, nodes)
            if offload:
                assert plans[strategy].cpu_offload_per_node == pytest.approx(cpu, rel=0.05)
        for strategy, offload in (("zero3", False), ("zero3_offload", True)):
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(shape.parameters, shape.largest_layer, gpus, nodes,
                                                                cpu_offload=offload, cpu_offload_params=offload)
            assert plans[strategy].model_states == pytest.approx(gpu, rel=0.05), (strategy, gpus, nodes)
            if offload:
                assert plans[strategy].cpu_offload_per_node == pytest.approx(cpu, rel=0.05)


def test_the_seeds_figure_adam_states_of_a_1_5b_model_are_18_gb_and_2_25_gb_each_under_zero1_on_8():
    shape = ModelShape(parameters=1_500_000_000, trainable=1_500_000_000)
    assert model_states(shape, "none", 8)[2] == pytest.approx(18 * GB)
    assert model_states(shape, "zero1", 8)[2] == pytest.approx(2.25 * GB)


def test_lora_and_qlora_train_a_sliver_and_qlora_stores_the_base_in_about_half_a_byte(big_model_dir):
    result = estimate(train_config(big_model_dir, lora_rank=16), gpus=8)
    full, lora, qlora = (result.shapes[m] for m in ("full", "lora", "qlora"))
    assert 0 < lora.trainable < 0.02 * full.parameters and lora.trainable == qlora.trainable
    assert qlora.frozen_bytes < 0.45 * lora.frozen_bytes  # 4-bit linear layers, the embedding in 16 bits
    first = {m: result.plans[m][0] for m in ("full", "lora")}
    assert first["lora"].optimizer < 0.02 * first["full"].optimizer
    totals = dict(zip(STRATEGIES, (plan.total for plan in result.plans["full"]), strict=True))
    assert totals["none"] > totals["zero1"] > totals["zero2"] > totals["zero3"]  # each stage splits more
    assert totals["zero2_offload"] < totals["zero2"] and totals["zero3_offload"] < totals["zero3"]
    assert result.shapes["freeze"].trainable < full.parameters


def run_cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftkit.cli", "estimate", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120, env={**os.environ, "COLUMNS": "120", **env})


def test_the_command_prints_every_method_and_strategy_and_what_fits(big_model_dir, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(f"model_name_or_path: {big_model_dir}\ndataset: identity\noutput_dir: out\n"
                      "finetuning_type: full\ncutoff_len: 1024\nper_device_train_batch_size: 2\n", encoding="utf-8")
    shown = run_cli(str(config), "--gpus", "8", "--gpu-memory", "24", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    out = " ".join(shown.stdout.split())
    for title in ("full (this config):", "freeze:", "lora:", "qlora:", "ZeRO-3+offload"):
        assert title in out
    assert "= 18.52 GB unsharded" in out and "18.52 / 8 = 2.32 GB each" in out
    assert "For full: ZeRO-1 (deepspeed: ds_z2), gradient checkpointing off." in out, out
    plan = json.loads(run_cli(str(config), "--gpus", "8", "--gpu-memory", "24", "--json", cwd=tmp_path).stdout)
    full = {p["strategy"]: p for p in plan["methods"]["full"]["plans"]}
    assert full["none"]["fits"] is False and full["zero3"]["fits"] is True  # 20 bytes x 1.5B does not fit in 24 GB
    assert plan["tokens_per_batch"] == 2048 and plan["devices"] == 8


def test_a_model_without_a_config_json_or_a_bad_flag_gets_one_sentence(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    config = tmp_path / "train.yaml"
    config.write_text(f"model_name_or_path: {gguf}\ndataset: identity\noutput_dir: out\n", encoding="utf-8")
    shown = run_cli(str(config), cwd=tmp_path)
    assert shown.returncode == 1 and "Traceback" not in shown.stderr
    assert "reads the model's config.json" in " ".join(shown.stderr.split())
    config.write_text("model_name_or_path: nobody/no-such-model\ndataset: identity\noutput_dir: out\n", encoding="utf-8")
    shown = run_cli(str(config), cwd=tmp_path, HF_HUB_OFFLINE="1")
    assert shown.returncode == 1 and "Traceback" not in shown.stderr
    assert "could not read config.json of model_name_or_path nobody/no-such-model" in " ".join(shown.stderr.split())
    shown = run_cli(str(config), "--gpus", "0", cwd=tmp_path)
    assert shown.returncode != 0 and "Traceback" not in shown.stderr and "--gpus" in shown.stderr


@pytest.mark.slow
def test_the_plan_is_within_a_quarter_of_a_measured_cpu_run(tmp_path):
    """A real LoRA run on the embedded model, packed rows so every micro-batch is full, no checkpointing.

    bf16 is set, so every CPU runs what the plan assumes, with or without native bf16 instructions (where
    ``bf16: auto`` trains in fp32 the plan is above the measured peak; README, Plan memory)."""
    keys = {"model_name_or_path": "smollm2-135m-instruct", "stage": "sft", "finetuning_type": "lora", "bf16": True,
            "lora_rank": 16, "dataset": "identity,alpaca_en_demo", "dataset_dir": str(REPO / "data"),
            "output_dir": str(tmp_path / "out"), "packing": True, "cutoff_len": 1024,
            "per_device_train_batch_size": 4, "max_steps": 2, "disable_gradient_checkpointing": True,
            "general_check": False, "learned_check": False, "replay_ratio": 0, "plot_loss": False,
            "save_strategy": "no"}
    config = tmp_path / "train.yaml"
    config.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in keys.items()) + "\n", encoding="utf-8")
    measure = ("import atexit, resource, sys; atexit.register(lambda: print('MAXRSS', resource.getrusage("
               "resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); from ftkit.cli import main; "
               f"sys.argv = ['ftkit', 'train', {str(config)!r}]; main()")
    run = subprocess.run([sys.executable, "-c", measure], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    measured = int(run.stderr.rsplit("MAXRSS", 1)[1].split()[0]) * 1024
    planned = estimate(train_config(**{k: v for k, v in keys.items() if k != "model_name_or_path"},
                                    model="smollm2-135m-instruct"), cpu=True).plans["lora"][0]
    assert planned.total_without_checkpointing == pytest.approx(measured, rel=0.25), (planned, measured)


def test_checkpointing_is_chosen_by_the_cpu_footprint_against_free_memory():
    """On CPU the activations' real footprint (about 3x the estimate) is weighed against a fifth of free
    memory: short rows of the embedded model stay fast, long rows of a 360M model checkpoint, a small machine
    checkpoints both; on a GPU the budget is also capped at three times the fp32 weights."""
    from transformers import LlamaConfig

    from ftkit.train.memory import decide_gradient_checkpointing

    small = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30)  # SmolLM2-135M's shapes
    medium = LlamaConfig(hidden_size=960, intermediate_size=2560, num_hidden_layers=32)  # SmolLM2-360M's shapes
    gib = 1024**3

    def decide(config, tokens, device, free, parameters):
        return decide_gradient_checkpointing(None, config, tokens, device, parameters, free_bytes=free * gib)

    roomy = decide(small, 848, "cpu", 20, 135_000_000)
    assert not roomy.enabled and "off (faster)" in roomy.reason and "848 tokens" in roomy.reason, roomy.reason
    assert decide(small, 848, "cpu", 6, 135_000_000).enabled
    assert decide(medium, 2_496, "cpu", 20, 362_000_000).enabled
    assert not decide(small, 848, "cuda", 80, 135_000_000).enabled
    assert decide(medium, 4_096, "cuda", 80, 362_000_000).enabled  # 6.4 GiB > 3 x 1.45 GB of fp32 weights
    forced = decide_gradient_checkpointing(False, medium, 2_496, "cpu", 362_000_000, free_bytes=gib)
    assert not forced.enabled and "set in the config" in forced.reason
