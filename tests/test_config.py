"""The config system as the user meets it: YAML files and key=value overrides in, one clear error out.

Every error sentence here is the spec: it names the file and line (or the command line), the key, the
value and what would be right. The CLI tests run the real ``ftkit`` command in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftkit.config import (
    MergeConfig,
    QuantizeConfig,
    TrainConfig,
    dump_resolved_config,
    load_stage_config,
    parse_overrides,
)
from ftkit.config.loading import read_yaml_mapping
from ftkit.errors import FtkitError

REPO = Path(__file__).resolve().parents[1]
MINIMAL = "dataset: identity\noutput_dir: out\n"


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(schema, path, overrides=None) -> list[str]:
    with pytest.raises(FtkitError) as caught:
        load_stage_config(schema, path, overrides)
    return caught.value.problems


def load(tmp_path: Path, text: str = MINIMAL, overrides=None) -> TrainConfig:
    return load_stage_config(TrainConfig, write(tmp_path, text), overrides).config


# ---- reading the file ----------------------------------------------------------------------------------


def test_malformed_yaml_reports_file_line_and_column(tmp_path):
    path = write(tmp_path, "output_dir: out\ndataset: identity\n  lora_rank: 8\n")
    with pytest.raises(FtkitError) as caught:
        load_stage_config(TrainConfig, path)
    assert str(caught.value) == f"{path}:3:12: invalid YAML: mapping values are not allowed here."


def test_unclosed_flow_list_reports_where_the_parser_stopped(tmp_path):
    path = write(tmp_path, "dataset: [identity, alpaca_en_demo\noutput_dir: out\n")
    with pytest.raises(FtkitError, match=rf"^{path}:2:11: invalid YAML: expected ',' or '\]', but got ':'\.$"):
        load_stage_config(TrainConfig, path)


def test_a_yaml_list_is_not_a_stage_config(tmp_path):
    path = write(tmp_path, "- dataset: identity\n- output_dir: out\n")
    with pytest.raises(FtkitError) as caught:
        load_stage_config(TrainConfig, path)
    assert str(caught.value) == f"{path}: a stage config must be a mapping of keys to values, not a list."


def test_non_utf8_config_names_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("output_dir: out\nidentity_author: Caf\xe9 Team\n".encode("latin-1"))
    with pytest.raises(FtkitError) as caught:
        load_stage_config(TrainConfig, path)
    assert str(caught.value) == f"{path}:2: not UTF-8 text (byte 36); save the config as UTF-8."


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load_stage_config(TrainConfig, path).config.dataset == ["identity"]


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(FtkitError) as caught:
        load_stage_config(TrainConfig, path)
    assert str(caught.value) == f"Config file {path} does not exist; pass the path to a YAML stage config."


def test_a_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(FtkitError, match=r"does not exist \(it is a directory\)"):
        load_stage_config(TrainConfig, tmp_path)


def test_a_key_set_twice_is_an_error_not_a_silent_overwrite(tmp_path):
    path = write(tmp_path, "lora_rank: 8\noutput_dir: out\nlora_rank: 16\n")
    with pytest.raises(FtkitError) as caught:
        load_stage_config(TrainConfig, path)
    assert str(caught.value) == f"{path}:3: lora_rank is set twice (also on line 1); keep one."


def test_empty_file_reports_the_required_keys(tmp_path):
    path = write(tmp_path, "# nothing yet\n")
    assert problems_of(TrainConfig, path) == [
        f"{path}: output_dir: required key, not set; add it to the config or pass it as key=value",
        f"{path}: dataset is required: name datasets from dataset_info.json (e.g. identity) or give a file path.",
    ]


def test_key_lines_are_read_for_error_messages(tmp_path):
    values, lines = read_yaml_mapping(write(tmp_path, "# comment\ndataset: identity\n\noutput_dir: out\n"))
    assert values == {"dataset": "identity", "output_dir": "out"}
    assert lines == {"dataset": 2, "output_dir": 4}


# ---- keys and values -----------------------------------------------------------------------------------


def test_unknown_key_suggests_the_closest_one(tmp_path):
    path = write(tmp_path, MINIMAL + "lora_rnak: 16\n")
    assert problems_of(TrainConfig, path) == [f"{path}:3: lora_rnak: unknown key; did you mean 'lora_rank'?"]


def test_unknown_key_without_a_close_match(tmp_path):
    path = write(tmp_path, MINIMAL + "zqxv_wibble: 1\n")
    assert problems_of(TrainConfig, path) == [
        f"{path}:3: zqxv_wibble: unknown key; ftkit, LLaMA-Factory and transformers have no such key "
        "(check the spelling)."
    ]


def test_a_train_key_in_a_merge_config_is_named_as_such(tmp_path):
    path = write(tmp_path, "adapter_name_or_path: saves/a\nexport_dir: out\nlearning_rate: 1.0e-4\n")
    assert problems_of(MergeConfig, path) == [
        f"{path}:3: learning_rate is a key of the train config, not of the merge-lora config; remove it."
    ]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("finetuning_type: lorra", "finetuning_type: input should be 'lora', 'qlora', 'full' or 'freeze' (got 'lorra')"),
        ("lora_rank: 0", "lora_rank: input should be greater than or equal to 1 (got 0)"),
        ("lora_rank: 2048", "lora_rank: input should be less than or equal to 1024 (got 2048)"),
        ("lora_rank: 1.5", "lora_rank: input should be a valid integer, got a number with a fractional part (got 1.5)"),
        ("lora_rank: true", "lora_rank: expected a number, not the boolean true (got True)"),
        ("learning_rate: abc",
         "learning_rate: input should be a valid number, unable to parse string as a number (got 'abc')"),
        ("learning_rate: 2", "learning_rate: input should be less than or equal to 1 (got 2)"),
        ("cutoff_len: 4", "cutoff_len: input should be greater than or equal to 8 (got 4)"),
        ("quantization_bit: 3", "quantization_bit: input should be 4 or 8 (got 3)"),
        ("bf16: maybe", "bf16: input should be a valid boolean or 'auto' (got 'maybe')"),
        ("report_to: tensorboard, mlfow", "report_to: input should be 'none', 'tensorboard', 'wandb', 'swanlab', 'mlflow', 'trackio', 'comet_ml' or 'clearml' (got 'mlfow')"),
        ("stage: dpo", "stage: input should be 'sft' or 'pt' (got 'dpo')"),
    ],
)
def test_wrong_value_names_key_value_and_what_is_allowed(tmp_path, line, problem):
    path = write(tmp_path, MINIMAL + line + "\n")
    assert problems_of(TrainConfig, path) == [f"{path}:3: {problem}"]


def test_several_mistakes_are_reported_together_in_file_order(tmp_path):
    path = write(
        tmp_path,
        "dataset: identity\n"  # 1
        "finetuning_type: lorra\n"  # 2
        "lora_rnak: 16\n"  # 3
        "lora_rank: 0\n"  # 4
        "learning_rate: abc\n"  # 5
        "output_dir: out\n"  # 6
        "bf16: true\n"  # 7
        "fp16: true\n"  # 8
        "fsdp_config: {version: 2}\n",  # 9
    )
    with pytest.raises(FtkitError) as caught:
        load_stage_config(TrainConfig, path)
    assert str(caught.value).splitlines()[0] == f"{path} has 6 problems:"
    assert caught.value.problems == [
        f"{path}:2: finetuning_type: input should be 'lora', 'qlora', 'full' or 'freeze' (got 'lorra')",
        f"{path}:3: lora_rnak: unknown key; did you mean 'lora_rank'?",
        f"{path}:4: lora_rank: input should be greater than or equal to 1 (got 0)",
        f"{path}:5: learning_rate: input should be a valid number, unable to parse string as a number (got 'abc')",
        f"{path}:8: bf16 and fp16 are both on; choose one mixed-precision mode.",
        f"{path}:9: fsdp_config has no effect without fsdp; set fsdp (for example fsdp: full_shard) or remove "
        "fsdp_config.",
    ]


def test_a_missing_required_key_does_not_hide_the_cross_field_rules(tmp_path):
    path = write(tmp_path, "dataset: identity\nbf16: true\nfp16: true\n")
    assert problems_of(TrainConfig, path) == [
        f"{path}:3: bf16 and fp16 are both on; choose one mixed-precision mode.",
        f"{path}: output_dir: required key, not set; add it to the config or pass it as key=value",
    ]


def test_another_tools_name_for_a_key_is_read_with_a_note(tmp_path):
    path = write(tmp_path, MINIMAL + "val_size: 0.1\nevaluation_strategy: steps\n")
    loaded = load_stage_config(TrainConfig, path)
    assert loaded.config.eval_strategy == "steps"
    assert f"{path}:4: evaluation_strategy is read as ftkit's eval_strategy." in loaded.notes


def test_a_key_and_its_other_name_with_different_values(tmp_path):
    path = write(tmp_path, MINIMAL + "evaluation_strategy: steps\neval_strategy: epoch\nval_size: 0.1\n")
    assert problems_of(TrainConfig, path) == [
        f"{path}:3: evaluation_strategy is another name for eval_strategy, which is also set ('epoch' vs 'steps'); "
        "keep one of them."
    ]


# ---- YAML quirks and list values -----------------------------------------------------------------------


def test_yaml11_exponent_without_dot_is_still_a_float(tmp_path):
    # PyYAML reads 1e-4 (no dot) as the string "1e-4"; the schema turns it into a float.
    assert yaml.safe_load("learning_rate: 1e-4") == {"learning_rate": "1e-4"}
    config = load(tmp_path, MINIMAL + "learning_rate: 1e-4\n")
    assert config.learning_rate == 1e-4
    assert isinstance(config.learning_rate, float)


def test_yaml11_unquoted_no_is_the_strategy_no(tmp_path):
    # PyYAML reads an unquoted `no` as false.
    config = load(tmp_path, MINIMAL + "save_strategy: no\neval_strategy: no\n")
    assert (config.save_strategy, config.eval_strategy) == ("no", "no")


def test_yaml11_float_for_a_passed_through_training_argument(tmp_path):
    config = load(tmp_path, MINIMAL + "adam_epsilon: 1e-8\n")
    assert config.extra_training_args == {"adam_epsilon": 1e-8}


@pytest.mark.parametrize(
    ("line", "key", "expected"),
    [
        ("dataset: identity, alpaca_en_demo", "dataset", ["identity", "alpaca_en_demo"]),
        ("dataset: identity,alpaca_en_demo,", "dataset", ["identity", "alpaca_en_demo"]),
        ("dataset: [identity, alpaca_en_demo]", "dataset", ["identity", "alpaca_en_demo"]),
        ("lora_target: q_proj,v_proj", "lora_target", ["q_proj", "v_proj"]),
        ("report_to: tensorboard, wandb", "report_to", ["tensorboard", "wandb"]),
        ("adapter_name_or_path: saves/a, saves/b", "adapter_name_or_path", ["saves/a", "saves/b"]),
    ],
)
def test_comma_separated_strings_become_lists(tmp_path, line, key, expected):
    config = load(tmp_path, "output_dir: out\n" + ("" if key == "dataset" else "dataset: identity\n") + line + "\n")
    assert getattr(config, key) == expected


# ---- key=value overrides -------------------------------------------------------------------------------


def test_overrides_are_read_as_yaml_scalars():
    assert parse_overrides(
        ["lora_rank=16", "learning_rate=2.0e-4", "packing=true", "dataset=a, b", "default_system=", "run_name=x=y"]
    ) == {
        "lora_rank": 16,
        "learning_rate": 2.0e-4,
        "packing": True,
        "dataset": "a, b",
        "default_system": None,
        "run_name": "x=y",
    }


def test_override_wins_over_the_file(tmp_path):
    config = load(tmp_path, MINIMAL + "lora_rank: 8\nlearning_rate: 1.0e-4\n",
                  ["lora_rank=32", "learning_rate=1e-5", "dataset=alpaca_en_demo,identity"])
    assert config.lora_rank == 32
    assert config.learning_rate == 1e-5
    assert config.dataset == ["alpaca_en_demo", "identity"]


def test_override_alone_without_a_file():
    config = load_stage_config(TrainConfig, None, ["dataset=identity", "output_dir=out"]).config
    assert config.output_dir == "out"


@pytest.mark.parametrize("bad", ["foo", "=3"])
def test_override_without_key_and_equals_sign(tmp_path, bad):
    with pytest.raises(FtkitError) as caught:
        load_stage_config(TrainConfig, write(tmp_path, MINIMAL), [bad])
    assert str(caught.value) == f"Override '{bad}' is not key=value (for example learning_rate=1e-4)."


def test_bad_override_value_is_reported_from_the_command_line(tmp_path):
    path = write(tmp_path, MINIMAL + "lora_rank: 8\n")
    assert problems_of(TrainConfig, path, ["lora_rank=0"]) == [
        "command line: lora_rank: input should be greater than or equal to 1 (got 0)"
    ]


# ---- cross-field rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["finetuning_type=full", "quantization_bit=4"],
         "quantization_bit 4 cannot be used with finetuning_type full: quantized weights cannot be updated; use "
         "finetuning_type lora (QLoRA) or remove quantization_bit."),
        (["finetuning_type=freeze", "quantization_bit=8"],
         "quantization_bit 8 cannot be used with finetuning_type freeze: quantized weights cannot be updated; use "
         "finetuning_type lora (QLoRA) or remove quantization_bit."),
        (["bf16=true", "fp16=true"], "bf16 and fp16 are both on; choose one mixed-precision mode."),
        (["deepspeed=ds_z3.json", "fsdp=full_shard"],
         "deepspeed and fsdp are both set; they are two ways of sharding a run, choose one."),
        (["nnodes=2", "node_rank=2"], "node_rank 2 is not below nnodes 2; number the nodes 0 to 1."),
        (["finetuning_type=full", "adapter_name_or_path=saves/lora"],
         "adapter_name_or_path continues LoRA training and needs finetuning_type lora, not full; merge the adapter "
         "first (ftkit merge-lora) to fine-tune the merged model fully."),
        (["stage=pt", "train_on_prompt=true"], "train_on_prompt only applies to stage sft; pre-training trains on "
         "every token."),
        (["mask_history=true", "train_on_prompt=true"],
         "mask_history and train_on_prompt cannot both be on: mask_history trains only the last reply, "
         "train_on_prompt every token; choose one."),
        (["eval_strategy=steps"], "eval_strategy steps needs an evaluation set: set val_size (e.g. 0.1) or "
         "eval_dataset, or remove eval_strategy."),
        (["report_to=none,wandb"], "report_to lists 'none' together with a logger; keep one or the other."),
        (["val_size=2.5"], "val_size 2.5 must be a fraction below 1 or a whole number of examples."),
        (["interleave_probs=0.5,0.5"], "interleave_probs only applies with mix_strategy interleave_under or "
         "interleave_over; remove it or change mix_strategy."),
        (["mix_strategy=interleave_under", "interleave_probs=0.5,0.3,0.2"],
         "interleave_probs has 3 weights but dataset names 1 datasets; give one weight per dataset."),
        (["freeze_trainable_layers=0"], "freeze_trainable_layers must not be 0: give the number of last layers to "
         "train (or a negative number for the first layers)."),
    ],
)
def test_cross_field_rule(tmp_path, overrides, problem):
    assert problems_of(TrainConfig, write(tmp_path, MINIMAL), overrides) == [f"command line: {problem}"]


@pytest.mark.parametrize(
    ("overrides", "bits"),
    [(["finetuning_type=qlora"], 4), (["finetuning_type=qlora", "quantization_bit=8"], 8),
     (["finetuning_type=lora"], None), (["finetuning_type=lora", "quantization_bit=4"], 4)],
)
def test_qlora_means_4_bits_unless_quantization_bit_says_otherwise(tmp_path, overrides, bits):
    config = load(tmp_path, MINIMAL, overrides)
    assert config.quantization_bits == bits
    assert config.uses_lora


def test_eval_strategy_with_a_validation_split_is_fine(tmp_path):
    assert load(tmp_path, MINIMAL, ["eval_strategy=steps", "val_size=0.1"]).eval_strategy == "steps"


def test_merge_config_rules(tmp_path):
    path = write(tmp_path, "export_dir: merged\nquantization_bit: 4\n")
    assert problems_of(MergeConfig, path) == [
        f"{path}:2: quantization_bit cannot be used for merging: adapters are merged into full-precision weights; "
        "remove the key (ftkit quantize exports quantized models).",
        f"{path}: adapter_name_or_path is required: the LoRA adapter directory (or several, comma-separated) to "
        "merge.",
    ]


# ---- the resolved config -------------------------------------------------------------------------------


def test_resolved_config_round_trips(tmp_path):
    original = load(
        tmp_path,
        "model_name_or_path: smollm2-135m-instruct\ndataset: identity, alpaca_en_demo\noutput_dir: out\n"
        "finetuning_type: qlora\nlora_rank: 16\nlearning_rate: 1e-4\nbf16: auto\nsave_strategy: no\n"
        "report_to: tensorboard\nval_size: 0.1\nadam_epsilon: 1e-8\n",
    )
    dumped = dump_resolved_config(original)
    assert dumped.startswith("model_name_or_path: smollm2-135m-instruct\n")  # model, data, method, training
    reloaded = load_stage_config(TrainConfig, write(tmp_path, dumped, "resolved.yaml")).config
    assert reloaded == original
    assert dump_resolved_config(reloaded) == dumped


def test_merge_config_round_trips(tmp_path):
    original = load_stage_config(MergeConfig, write(tmp_path, "adapter_name_or_path: a,b\nexport_dir: m\n")).config
    reloaded = load_stage_config(MergeConfig, write(tmp_path, dump_resolved_config(original), "r.yaml")).config
    assert reloaded == original
    assert reloaded.adapter_name_or_path == ["a", "b"]


@pytest.mark.parametrize("shipped", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid_and_round_trip(tmp_path, shipped):
    keys, _ = read_yaml_mapping(shipped)
    schema = QuantizeConfig if "method" in keys else MergeConfig if "export_dir" in keys else TrainConfig
    original = load_stage_config(schema, shipped).config
    reloaded = load_stage_config(schema, write(tmp_path, dump_resolved_config(original))).config
    assert reloaded == original


# ---- the command line ----------------------------------------------------------------------------------


def ftkit(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "ftkit.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=60)


def test_cli_validate_prints_the_resolved_config(tmp_path):
    path = write(tmp_path, MINIMAL + "lora_rank: 16\n")
    result = ftkit("validate", str(path), "learning_rate=1e-5")
    assert result.returncode == 0, result.stderr
    assert f"{path} is a valid train config." in result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["lora_rank"] == 16
    assert resolved["learning_rate"] == 1e-5
    assert resolved["cutoff_len"] == 2048  # defaults are filled in
    expected = load(tmp_path, MINIMAL, ["lora_rank=16", "learning_rate=1e-5"])
    assert result.stdout == dump_resolved_config(expected)


def test_cli_validate_guesses_a_merge_config(tmp_path):
    path = write(tmp_path, "adapter_name_or_path: saves/a\nexport_dir: merged\n")
    result = ftkit("validate", str(path))
    assert result.returncode == 0, result.stderr
    assert "is a valid merge-lora config." in result.stderr
    assert yaml.safe_load(result.stdout)["export_dir"] == "merged"


def test_cli_bad_config_exits_1_with_every_problem_and_no_traceback(tmp_path):
    path = write(tmp_path, "dataset: identity\nlora_rnak: 16\nlora_rank: 0\n")
    result = ftkit("validate", str(path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: {path} has 3 problems:",
        f"  - {path}:2: lora_rnak: unknown key; did you mean 'lora_rank'?",
        f"  - {path}:3: lora_rank: input should be greater than or equal to 1 (got 0)",
        f"  - {path}: output_dir: required key, not set; add it to the config or pass it as key=value",
    ]


def test_cli_missing_config_file_is_one_line(tmp_path):
    result = ftkit("validate", str(tmp_path / "missing.yaml"))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: Config file {tmp_path / 'missing.yaml'} does not exist; pass the path to a YAML stage config."
    ]


def test_cli_quantize_without_config_or_flags_says_what_to_pass():
    result = ftkit("quantize")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "error: Pass a quantize config (ftkit quantize CONFIG.yaml) or flags, e.g. ftkit quantize --model MODEL "
        "--method int8 --out DIR."
    ]


@pytest.mark.parametrize(
    ("args", "problem"),
    [((), "Usage:"), (("validate",), "Missing argument 'config'"), (("bogus",), "No such command 'bogus'"),
     (("validate", "cfg.yaml", "--bogus"), "No such option: --bogus")],
    ids=["no-arguments", "missing-argument", "unknown-command", "unknown-option"],
)
def test_cli_usage_errors_exit_2_without_traceback(args, problem):
    result = ftkit(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert problem in result.stdout + result.stderr  # with no arguments, the help goes to stdout


@pytest.mark.parametrize(
    ("command", "purpose"),
    [
        ((), "Config-driven fine-tuning for large language models"),
        (("train",), "Fine-tune a model (sft or pt; lora, qlora, full or freeze)"),
        (("validate",), "Check a stage config (every problem at once)"),
        (("chat",), "Talk to a model (with optional LoRA adapters) in the terminal"),
        (("merge-lora",), "Fold LoRA adapters into their base model"),
        (("serve",), "Serve a model behind an OpenAI-compatible API"),
        (("evaluate",), "Evaluate a model on GSM8K"),
        (("quantize",), "Quantize a model (INT8/INT4, GGUF export)"),
        (("data",), "Inspect datasets"),
        (("data", "list"), "List the datasets registered in dataset_info.json"),
        (("data", "preview"), "Show encoded examples"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, tuple) else None,
)
def test_cli_help_exits_0_and_says_what_the_command_is_for(command, purpose):
    result = ftkit(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert purpose in result.stdout


def test_cli_version():
    result = ftkit("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("ftkit ")
