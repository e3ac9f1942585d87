"""The preprocessing cache: tokenised datasets are reused only when nothing that decides the ids changed.

Uses the embedded model's real tokenizer (``smollm2_tokenizer``) and ``FTKIT_HOME`` pointed into
``tmp_path``, so each test starts with an empty cache.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from ftkit.config import TrainConfig, load_stage_config
from ftkit.data.dataset import encode_dataset, tokenizer_fingerprint
from ftkit.data.options import DataOptions
from ftkit.guard import prepare_guarded_dataset

RECORDS = [
    {"instruction": "Who are you?", "input": "", "output": "I am {{name}}, made by {{author}}."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5."},
    {"instruction": "Name a primary colour.", "input": "", "output": "Red is a primary colour."},
]


@pytest.fixture
def home(tmp_path, monkeypatch, smollm2_tokenizer) -> Path:
    """An empty FTKIT_HOME (requested after the session tokenizer, which is loaded from the real one)."""
    home = tmp_path / "home"
    monkeypatch.setenv("FTKIT_HOME", str(home))
    return home


@pytest.fixture
def data_dir(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "demo.json").write_text(json.dumps(RECORDS), encoding="utf-8")
    (folder / "more.jsonl").write_text(
        "".join(json.dumps({"prompt": f"Count to {n}.", "completion": " ".join(map(str, range(1, n + 1)))}) + "\n"
                for n in range(1, 9)), encoding="utf-8")
    (folder / "dataset_info.json").write_text(
        json.dumps({"demo": {"file_name": "demo.json"},
                    "more": {"file_name": "more.jsonl", "columns": {"prompt": "prompt", "response": "completion"}}}),
        encoding="utf-8")
    return folder


def make_config(data_dir: Path, **values) -> TrainConfig:
    base = {"dataset": "demo", "dataset_dir": str(data_dir), "output_dir": str(data_dir.parent / "out"),
            "cutoff_len": 128, "replay_ratio": 0}  # replay is tested in test_forgetting.py
    return load_stage_config(TrainConfig, None, {**base, **values}).config


def cache_files(home: Path) -> list[Path]:
    return sorted((home / "datasets").glob("*.npz"))


def ids_and_labels(examples) -> list[tuple[list[int], list[int]]]:
    return [(e.input_ids, e.labels) for e in examples]


def test_second_encode_is_served_from_the_cache_with_identical_ids(home, data_dir, smollm2_tokenizer):
    config = make_config(data_dir)
    built, built_stats = encode_dataset("demo", DataOptions.from_config(config), smollm2_tokenizer)
    assert not built_stats.from_cache
    assert len(cache_files(home)) == 1
    cached, cached_stats = encode_dataset("demo", DataOptions.from_config(config), smollm2_tokenizer)
    assert cached_stats.from_cache
    assert ids_and_labels(cached) == ids_and_labels(built)
    assert cached_stats.summary() == built_stats.summary() + " [cached]"
    assert (cached_stats.encoded, cached_stats.tokens, cached_stats.trained_tokens) == (
        3, built_stats.tokens, built_stats.trained_tokens)


def test_prepare_dataset_twice_gives_the_same_rows_the_second_time_from_cache(home, data_dir, smollm2_tokenizer):
    config = make_config(data_dir, dataset="demo,more", val_size=2)
    first = prepare_guarded_dataset(config, smollm2_tokenizer)
    second = prepare_guarded_dataset(config, smollm2_tokenizer)
    assert [s.from_cache for s in first.stats] == [False, False]
    assert [s.from_cache for s in second.stats] == [True, True]
    assert (second.train, second.eval) == (first.train, first.eval)
    assert (len(first.train), len(first.eval)) == (9, 2)


def test_encode_without_cache_writes_nothing(home, data_dir, smollm2_tokenizer):
    encode_dataset("demo", DataOptions.from_config(make_config(data_dir)), smollm2_tokenizer, use_cache=False)
    assert cache_files(home) == []


# Each change takes (tokenizer, config, data_dir) and returns the changed (tokenizer, config).


def _added_special_token(tokenizer, config, data_dir):
    changed = copy.deepcopy(tokenizer)
    changed.add_special_tokens({"additional_special_tokens": ["<|ftkit_test|>"]})
    return changed, config


def _other_chat_template(tokenizer, config, data_dir):
    changed = copy.deepcopy(tokenizer)
    changed.chat_template = tokenizer.chat_template.replace("<|im_start|>system\n", "<|im_start|>system\n\n")
    return changed, config


def _one_byte_of_the_data_file(tokenizer, config, data_dir):
    path = data_dir / "demo.json"
    data = bytearray(path.read_bytes())
    data[data.index(b"Red")] = ord("B")  # "Red" -> "Bed": same size, same records, one byte different
    path.write_bytes(bytes(data))
    return tokenizer, config


def _registry_columns(tokenizer, config, data_dir):
    registry = data_dir / "dataset_info.json"
    entries = json.loads(registry.read_text(encoding="utf-8"))
    entries["demo"]["columns"] = {"prompt": "output", "response": "instruction"}
    registry.write_text(json.dumps(entries), encoding="utf-8")
    return tokenizer, config


def _config_key(**update):
    def change(tokenizer, config, data_dir):
        return tokenizer, config.model_copy(update=update)

    return change


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(_added_special_token, id="added-special-token"),
        pytest.param(_other_chat_template, id="chat-template"),
        pytest.param(_config_key(cutoff_len=64), id="cutoff_len"),
        pytest.param(_config_key(train_on_prompt=True), id="train_on_prompt"),
        pytest.param(_config_key(mask_history=True), id="mask_history"),
        pytest.param(_config_key(identity_name="Ember"), id="identity_name"),
        pytest.param(_config_key(identity_author="Hearth"), id="identity_author"),
        pytest.param(_config_key(default_system="Be brief."), id="default_system"),
        pytest.param(_config_key(max_samples=2), id="max_samples"),
        pytest.param(_config_key(stage="pt"), id="stage"),
        pytest.param(_one_byte_of_the_data_file, id="data-file-byte"),
        pytest.param(_registry_columns, id="registry-columns"),
    ],
)
def test_anything_that_changes_the_ids_changes_the_cache_key(home, data_dir, smollm2_tokenizer, change):
    config = make_config(data_dir)
    _, stats = encode_dataset("demo", DataOptions.from_config(config), smollm2_tokenizer)
    assert not stats.from_cache
    tokenizer, changed_config = change(smollm2_tokenizer, config, data_dir)
    _, changed_stats = encode_dataset("demo", DataOptions.from_config(changed_config), tokenizer)
    assert not changed_stats.from_cache  # a rebuild, not a hit
    assert len(cache_files(home)) == 2
    _, changed_again = encode_dataset("demo", DataOptions.from_config(changed_config), tokenizer)
    assert changed_again.from_cache


def test_unchanged_inputs_hit_even_with_a_copied_tokenizer(home, data_dir, smollm2_tokenizer):
    config = make_config(data_dir)
    encode_dataset("demo", DataOptions.from_config(config), smollm2_tokenizer)
    _, stats = encode_dataset("demo", DataOptions.from_config(make_config(data_dir)), copy.deepcopy(smollm2_tokenizer))
    assert stats.from_cache
    assert tokenizer_fingerprint(copy.deepcopy(smollm2_tokenizer)) == tokenizer_fingerprint(smollm2_tokenizer)


def test_identity_name_reaches_the_ids(home, data_dir, smollm2_tokenizer):
    plain, _ = encode_dataset("demo", DataOptions.from_config(make_config(data_dir)), smollm2_tokenizer)
    named, _ = encode_dataset("demo", DataOptions.from_config(make_config(data_dir, identity_name="Ember")), smollm2_tokenizer)
    assert "Ember" in smollm2_tokenizer.decode(named[0].input_ids)
    assert "Ember" not in smollm2_tokenizer.decode(plain[0].input_ids)


def test_overwrite_cache_rebuilds(home, data_dir, smollm2_tokenizer):
    encode_dataset("demo", DataOptions.from_config(make_config(data_dir)), smollm2_tokenizer)
    (cache_file,) = cache_files(home)
    before = cache_file.stat().st_mtime_ns
    examples, stats = encode_dataset("demo", DataOptions.from_config(make_config(data_dir, overwrite_cache=True)), smollm2_tokenizer)
    assert not stats.from_cache
    assert cache_files(home) == [cache_file]  # the same key, written again
    assert cache_file.stat().st_mtime_ns != before
    cached, cached_stats = encode_dataset("demo", DataOptions.from_config(make_config(data_dir)), smollm2_tokenizer)
    assert cached_stats.from_cache
    assert ids_and_labels(cached) == ids_and_labels(examples)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


def _inconsistent_arrays(path: Path) -> None:
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["lengths"] = arrays["lengths"] + 1  # more tokens claimed than stored
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _not_a_cache(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte, _inconsistent_arrays, _not_a_cache],
                         ids=["truncated", "flipped-byte", "inconsistent-arrays", "empty"])
def test_damaged_cache_file_is_rebuilt_not_trusted(home, data_dir, smollm2_tokenizer, damage):
    config = make_config(data_dir)
    fresh, _ = encode_dataset("demo", DataOptions.from_config(config), smollm2_tokenizer)
    (cache_file,) = cache_files(home)
    damage(cache_file)
    rebuilt, stats = encode_dataset("demo", DataOptions.from_config(config), smollm2_tokenizer)
    assert not stats.from_cache
    assert ids_and_labels(rebuilt) == ids_and_labels(fresh)
    _, again = encode_dataset("demo", DataOptions.from_config(config), smollm2_tokenizer)
    assert again.from_cache  # the rebuilt file is good


def test_detected_format_is_reported_also_from_the_cache(home, data_dir, smollm2_tokenizer):
    path = str(data_dir / "demo.json")
    config = make_config(data_dir, dataset=path)
    for expected_cache in (False, True):
        prepared = prepare_guarded_dataset(config, smollm2_tokenizer)
        assert prepared.stats[0].from_cache is expected_cache
        assert prepared.notes[0] == f"dataset {path}: detected alpaca (instruction/input/output) format"


def test_mixing_two_datasets_is_deterministic_with_a_seed(home, data_dir, smollm2_tokenizer):
    config = make_config(data_dir, dataset="demo,more", mix_strategy="interleave_over", seed=5)
    first = prepare_guarded_dataset(config, smollm2_tokenizer, use_cache=False).train
    assert prepare_guarded_dataset(config, smollm2_tokenizer, use_cache=False).train == first
    other_seed = prepare_guarded_dataset(config.model_copy(update={"seed": 6}), smollm2_tokenizer, use_cache=False).train
    assert other_seed != first
    concat = prepare_guarded_dataset(config.model_copy(update={"mix_strategy": "concat"}), smollm2_tokenizer).train
    assert len(concat) == 11
    assert {tuple(row["input_ids"]) for row in concat} <= {tuple(row["input_ids"]) for row in first}
