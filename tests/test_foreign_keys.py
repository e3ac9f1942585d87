"""LLaMA-Factory's and transformers' keys: honoured, passed through, noted or refused, never silently dropped."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftkit.config import MergeConfig, TrainConfig, load_stage_config
from ftkit.config.foreign_keys import FOREIGN_KEYS, KEY_ALIASES, TRAINING_ARGUMENT_TYPES
from ftkit.errors import FtkitError

SCHEMA_FIELDS = set(TrainConfig.model_fields) | set(MergeConfig.model_fields)
TYPE_NAMES = {"bool", "int", "float", "str", "list", "dict"}

# ---- LLaMA-Factory's own example configs, verbatim but for the model, template and dataset ------------
# (LLaMA-Factory's deepspeed paths resolve to ftkit's shipped configs where the file is not there).

# examples/train_lora/llama3_lora_sft.yaml
LORA_SFT = """\
### model
model_name_or_path: smollm2-135m-instruct
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity
template: auto
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000

### eval
# val_size: 0.1
# per_device_eval_batch_size: 1
# eval_strategy: steps
# eval_steps: 500
"""

# examples/train_qlora/llama3_lora_sft_bnb_npu.yaml
QLORA_BNB_SFT = """\
### model
model_name_or_path: smollm2-135m-instruct
quantization_bit: 4
quantization_method: bnb
double_quantization: false
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity
template: auto
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000

### eval
# val_size: 0.1
# per_device_eval_batch_size: 1
# eval_strategy: steps
# eval_steps: 500
"""

# examples/train_qlora/llama3_lora_sft_otfq.yaml
QLORA_OTFQ_SFT = """\
### model
model_name_or_path: smollm2-135m-instruct
quantization_bit: 4
quantization_method: bitsandbytes  # choices: [bitsandbytes (4/8), hqq (2/3/4/5/6/8), eetq (8)]

### method
stage: sft
do_train: true
finetuning_type: lora
lora_target: all

### dataset
dataset: identity
template: auto
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""

# examples/train_full/llama3_full_sft.yaml
FULL_SFT = """\
### model
model_name_or_path: smollm2-135m-instruct
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: full
deepspeed: examples/deepspeed/ds_z3_config.json

### dataset
dataset: identity
template: auto
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/llama3-8b/full/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 2
learning_rate: 1.0e-5
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000

### eval
# val_size: 0.1
# per_device_eval_batch_size: 1
# eval_strategy: steps
# eval_steps: 500
"""

# examples/train_lora/qwen3_lora_sft.yaml (the current layout of LLaMA-Factory's examples)
QWEN3_LORA_SFT = """\
### model
model_name_or_path: smollm2-135m-instruct
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity
template: auto
cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/qwen3-4b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
# eval_dataset: alpaca_en_demo
# val_size: 0.1
# per_device_eval_batch_size: 1
# eval_strategy: steps
# eval_steps: 500
"""

# examples/train_lora/llama3_lora_sft_ray.yaml
LORA_SFT_RAY = """\
### model
model_name_or_path: smollm2-135m-instruct  # or use local absolute path
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity
dataset_dir: REMOTE:llamafactory/demo_data  # or use local absolute path
template: auto
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: tmp_dir
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### ray
ray_run_name: llama3_8b_sft_lora
ray_storage_path: ./saves
ray_num_workers: 4  # Number of GPUs to use.
placement_strategy: PACK
resources_per_worker:
  GPU: 1
# ray_init_kwargs:
#   runtime_env:
#     env_vars:
#       <YOUR-ENV-VAR-HERE>: "<YOUR-ENV-VAR-HERE>"
#     pip:
#       - emoji

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
# eval_dataset: alpaca_en_demo
# val_size: 0.1
# per_device_eval_batch_size: 1
# eval_strategy: steps
# eval_steps: 500
"""

# examples/train_lora/qwen3moe_lora_sft_kt.yaml: KTransformers, which ftkit refuses
QWEN3MOE_LORA_SFT_KT = """\
### model
model_name_or_path: smollm2-135m-instruct
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity
template: auto
cutoff_len: 512
max_samples: 100000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/Kllama_Qwen3MoE_235bA22b
logging_steps: 10
save_steps: 200
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### ktransformers
use_kt: true # use KTransformers as LoRA sft backend
kt_optimize_rule: examples/kt_optimize_rules/Qwen3Moe-sft-amx.yaml
cpu_infer: 32
chunk_size: 8192

### eval
# eval_dataset: alpaca_en_demo
# val_size: 0.1
# per_device_eval_batch_size: 1
# eval_strategy: steps
# eval_steps: 500
"""

# examples/merge_lora/llama3_lora_sft.yaml
MERGE_LORA = """\
### Note: DO NOT use quantized model or quantization_bit when merging lora adapters

### model
model_name_or_path: smollm2-135m-instruct
adapter_name_or_path: saves/llama3-8b/lora/sft
template: auto
trust_remote_code: true

### export
export_dir: output/llama3_lora_sft
export_size: 2
export_device: cpu
export_legacy_format: false
"""

MINIMAL_TRAIN = {"output_dir": "saves/test", "dataset": "identity"}
MINIMAL_MERGE = {"adapter_name_or_path": "saves/test", "export_dir": "output/test"}


def write_config(tmp_path: Path, text_or_values: str | dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    text = text_or_values if isinstance(text_or_values, str) else yaml.safe_dump(text_or_values, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def noted_keys(notes: list[str]) -> set[str]:
    """The config keys the loader wrote notes about ("file.yaml:12: key: note" or "... key is ...")."""
    keys = set()
    for note in notes:
        _, _, rest = note.partition(": ")
        keys.add(re.match(r"\w+", rest).group(0))
    return keys


def load_error(schema, path: Path, overrides=None) -> FtkitError:
    with pytest.raises(FtkitError) as caught:
        load_stage_config(schema, path, overrides)
    return caught.value


# ---- the tables themselves ------------------------------------------------------------------------


def test_tables_do_not_overlap_each_other_or_the_stage_schemas():
    foreign, aliases, passthrough = set(FOREIGN_KEYS), set(KEY_ALIASES), set(TRAINING_ARGUMENT_TYPES)
    assert not foreign & aliases
    assert not foreign & passthrough
    assert not aliases & passthrough
    assert not (foreign | aliases | passthrough) & SCHEMA_FIELDS


def test_aliases_name_an_ftkit_field():
    from ftkit.config import STAGE_SCHEMAS

    every_field = {name for schema in STAGE_SCHEMAS.values() for name in schema.model_fields}
    for alias, target in KEY_ALIASES.items():
        assert target in every_field, f"{alias} -> {target}"


def test_every_note_is_one_line_sentence():
    for key, foreign in FOREIGN_KEYS.items():
        assert foreign.note and "\n" not in foreign.note, key
        assert foreign.note.endswith("."), key
        assert len(foreign.note) <= 160, key


def test_refused_defaults_are_plain_yaml_scalars():
    for key, foreign in FOREIGN_KEYS.items():
        if foreign.refuse_other_values:
            assert foreign.default is None or isinstance(foreign.default, (bool, int, float, str)), key


def test_passthrough_types_are_simple_type_names():
    for key, expected in TRAINING_ARGUMENT_TYPES.items():
        assert set(expected.split("|")) <= TYPE_NAMES, f"{key}: {expected}"


def test_every_transformers_training_argument_is_honoured_passed_noted_or_refused():
    from transformers import Seq2SeqTrainingArguments

    fields = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments) if f.init}
    covered = SCHEMA_FIELDS | set(FOREIGN_KEYS) | set(KEY_ALIASES) | set(TRAINING_ARGUMENT_TYPES)
    assert fields - covered == set(), "a transformers upgrade added fields: classify them in foreign_keys.py"
    assert set(TRAINING_ARGUMENT_TYPES) <= fields


def test_the_tables_import_nothing_heavy():
    code = "import sys, ftkit.config.foreign_keys; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---- every foreign key, at LLaMA-Factory's default, is accepted with its note -------------------------


@pytest.mark.parametrize(("schema", "required"), [(TrainConfig, MINIMAL_TRAIN), (MergeConfig, MINIMAL_MERGE)])
def test_every_foreign_key_at_its_default_is_accepted_with_a_note(tmp_path, schema, required):
    defaults = {key: foreign.default for key, foreign in FOREIGN_KEYS.items()}
    path = write_config(tmp_path, {**required, **defaults})
    loaded = load_stage_config(schema, path)
    assert noted_keys(loaded.notes) == set(FOREIGN_KEYS)
    assert f"{path}:3: adapter_folder: {FOREIGN_KEYS['adapter_folder'].note}" in loaded.notes


# ---- LLaMA-Factory's example configs validate ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected_notes", "expected"),
    [
        (LORA_SFT, set(), {"finetuning_type": "lora", "lora_target": ["all"], "quantization_bits": None}),
        (QLORA_BNB_SFT, {"save_only_model"}, {"quantization_bits": 4, "double_quantization": False}),
        (QLORA_OTFQ_SFT, set(), {"quantization_method": "bitsandbytes", "val_size": 0.1, "eval_strategy": "steps"}),
        (FULL_SFT, set(), {"finetuning_type": "full", "learning_rate": 1e-5, "gradient_accumulation_steps": 2,
                           "deepspeed": "examples/deepspeed/ds_z3_config.json"}),
        (QWEN3_LORA_SFT, {"save_only_model"}, {"dataloader_num_workers": 4, "resume_from_checkpoint": None}),
        (
            LORA_SFT_RAY,
            {"save_only_model", "ray_run_name", "ray_storage_path", "ray_num_workers", "placement_strategy",
             "resources_per_worker"},
            {"dataset_dir": "REMOTE:llamafactory/demo_data", "output_dir": "tmp_dir"},
        ),
    ],
    ids=["train_lora", "train_qlora_bnb_npu", "train_qlora_otfq", "train_full", "train_lora_qwen3", "train_lora_ray"],
)
def test_llama_factory_train_examples_validate(tmp_path, text, expected_notes, expected):
    loaded = load_stage_config(TrainConfig, write_config(tmp_path, text))
    assert noted_keys(loaded.notes) == expected_notes
    config = loaded.config
    assert (config.model_name_or_path, config.template, config.dataset) == ("smollm2-135m-instruct", "auto", ["identity"])
    assert config.ddp_timeout == 180000000 and config.bf16 is True and config.plot_loss is True
    for name, value in expected.items():
        assert getattr(config, name) == value, name
    assert config.extra_training_args == {}


def test_save_only_model_false_in_the_qlora_example_is_noted_on_its_line(tmp_path):
    path = write_config(tmp_path, QLORA_BNB_SFT)
    loaded = load_stage_config(TrainConfig, path)
    assert loaded.notes == [f"{path}:30: save_only_model: {FOREIGN_KEYS['save_only_model'].note}"]


def test_a_llama_factory_example_ftkit_cannot_honour_is_refused_on_its_key_alone(tmp_path):
    path = write_config(tmp_path, QWEN3MOE_LORA_SFT_KT)
    error = load_error(TrainConfig, path)
    assert error.problems == [f"{path}:42: use_kt: True is not supported: {FOREIGN_KEYS['use_kt'].note}"]


def test_llama_factory_merge_example_validates(tmp_path):
    path = write_config(tmp_path, MERGE_LORA)
    loaded = load_stage_config(MergeConfig, path)
    assert loaded.notes == [
        f"{path}:12: export_device: {FOREIGN_KEYS['export_device'].note}",
        f"{path}:13: export_legacy_format: {FOREIGN_KEYS['export_legacy_format'].note}",
    ]
    config = loaded.config
    assert config.adapter_name_or_path == ["saves/llama3-8b/lora/sft"]
    assert (config.export_dir, config.export_size) == ("output/llama3_lora_sft", 2)


# ---- refused values, pass-through, aliases -------------------------------------------------------


def test_a_refused_value_is_an_error_naming_the_key_and_line(tmp_path):
    path = write_config(tmp_path, {**MINIMAL_TRAIN, "use_galore": True, "save_only_model": True})
    error = load_error(TrainConfig, path)
    assert error.problems == [
        f"{path}:3: use_galore: True is not supported: {FOREIGN_KEYS['use_galore'].note}",
        f"{path}:4: save_only_model: True is not supported: exact resume needs the optimizer, scheduler and RNG "
        "state in every checkpoint, so ftkit always saves them.",
    ]


def test_a_refused_value_from_the_command_line_is_an_error_too(tmp_path):
    path = write_config(tmp_path, MINIMAL_TRAIN)
    error = load_error(TrainConfig, path, ["use_llama_pro=true", "rope_scaling=yarn"])
    assert error.problems == [
        f"command line: use_llama_pro: True is not supported: {FOREIGN_KEYS['use_llama_pro'].note}",
        f"command line: rope_scaling: 'yarn' is not supported: {FOREIGN_KEYS['rope_scaling'].note}",
    ]


def test_an_ignored_key_accepts_any_value_with_its_note(tmp_path):
    path = write_config(tmp_path, {**MINIMAL_TRAIN, "use_unsloth_gc": False, "temperature": 0.2})
    loaded = load_stage_config(TrainConfig, path)
    assert loaded.notes == [
        f"{path}:3: use_unsloth_gc: {FOREIGN_KEYS['use_unsloth_gc'].note}",
        f"{path}:4: temperature: {FOREIGN_KEYS['temperature'].note}",
    ]


def test_transformers_gradient_checkpointing_key_is_honoured(tmp_path):
    path = write_config(tmp_path, {**MINIMAL_TRAIN, "gradient_checkpointing": False})
    assert load_stage_config(TrainConfig, path).config.checkpointing_choice is False
    path = write_config(tmp_path, {**MINIMAL_TRAIN, "activation_checkpointing": True})
    assert load_stage_config(TrainConfig, path).config.checkpointing_choice is True


def test_a_passthrough_key_with_the_wrong_type_is_an_error_naming_it(tmp_path):
    path = write_config(tmp_path, {**MINIMAL_TRAIN, "adam_beta1": "high", "tf32": "yes"})
    error = load_error(TrainConfig, path)
    assert error.problems == [
        f"{path}:3: adam_beta1: expected float, got 'high'.",
        f"{path}:4: tf32: expected bool, got 'yes'.",
    ]


def test_passthrough_keys_end_up_in_extra_training_args(tmp_path):
    values = {
        "adam_beta2": 0.95,
        "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
        "include_num_input_tokens_seen": "non_padding",
        "neftune_noise_alpha": 5,
        "dataloader_pin_memory": False,
    }
    path = write_config(tmp_path, {**MINIMAL_TRAIN, **values})
    loaded = load_stage_config(TrainConfig, path)
    assert loaded.config.extra_training_args == values
    assert f"{path}:3: adam_beta2 is passed to transformers.TrainingArguments as is." in loaded.notes
    assert noted_keys(loaded.notes) == set(values)


def test_transformers_old_name_is_read_as_the_ftkit_field(tmp_path):
    values = {**MINIMAL_TRAIN, "val_size": 0.1, "evaluation_strategy": "epoch", "per_gpu_train_batch_size": 2}
    path = write_config(tmp_path, values)
    loaded = load_stage_config(TrainConfig, path)
    assert (loaded.config.eval_strategy, loaded.config.per_device_train_batch_size) == ("epoch", 2)
    assert loaded.notes == [
        f"{path}:4: evaluation_strategy is read as ftkit's eval_strategy.",
        f"{path}:5: per_gpu_train_batch_size is read as ftkit's per_device_train_batch_size.",
    ]


def test_a_yaml_1_1_exponent_reaches_a_float_passthrough_as_a_float(tmp_path):
    # PyYAML reads `1e-8` (no dot) as a string; LLaMA-Factory's loader reads it as a float, and so does ftkit.
    path = write_config(tmp_path, "output_dir: saves/test\ndataset: identity\nadam_epsilon: 1e-8\n")
    assert load_stage_config(TrainConfig, path).config.extra_training_args == {"adam_epsilon": 1e-8}


def test_no_passthrough_key_collides_with_an_argument_the_train_stage_sets_itself():
    # ftkit/train/run.py calls TrainingArguments(..., **config.extra_training_args): a key it also sets
    # explicitly would crash with "got multiple values for keyword argument".
    import ast

    source = Path(__file__).resolve().parents[1] / "ftkit" / "train" / "run.py"
    calls = [
        node
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8")))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "TrainingArguments"
    ]
    assert calls, "the train stage no longer builds TrainingArguments in run.py; update this test"
    set_by_ftkit = {keyword.arg for call in calls for keyword in call.keywords if keyword.arg}
    assert set_by_ftkit & set(TRAINING_ARGUMENT_TYPES) == set()
