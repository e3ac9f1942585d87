"""resolve_model_source: every kind of model name, offline hub caches, and every error sentence."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ftkit.config.sections import ModelSection
from ftkit.errors import FtkitError
from ftkit.models import (
    EMBEDDED_ALIAS,
    embedded_gguf_path,
    ensure_embedded_model,
    load_model,
    load_tokenizer,
    model_source_from_config,
    resolve_adapter_dir,
    resolve_model_source,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "ftkit-test/tiny-llama"


@pytest.fixture
def clean_hub_env(monkeypatch, tmp_path):
    """No hub variables from the developer's shell leak into a test; the default caches point into tmp."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                 "USE_MODELSCOPE_HUB", "MODELSCOPE_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return monkeypatch


def hf_cache_with(model_dir: Path, cache: Path, repo_id: str = REPO, commit: str = COMMIT) -> Path:
    """Lay out a model the way huggingface_hub caches it: ``models--org--name/{snapshots/<sha>,refs/main}``."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    return snapshot


# ---- alias, local directories, GGUF files -------------------------------------------------------------------


def test_alias_resolves_to_the_converted_embedded_checkpoint():
    source = resolve_model_source(EMBEDDED_ALIAS)
    assert source.kind == "alias"
    assert source.path == ensure_embedded_model()
    assert (source.path / "config.json").is_file()
    assert source.gguf_file is None and source.display == EMBEDDED_ALIAS


def test_local_directory_resolves_to_itself(tiny_llama_dir):
    source = resolve_model_source(str(tiny_llama_dir))
    assert (source.kind, source.path, source.gguf_file) == ("local", tiny_llama_dir, None)


def test_gguf_file_resolves_to_its_directory_and_file_name():
    gguf = embedded_gguf_path()
    source = resolve_model_source(str(gguf))
    assert (source.kind, source.path, source.gguf_file) == ("gguf", gguf.parent, gguf.name)
    assert source.load_kwargs == {"gguf_file": gguf.name}


def test_adapter_directory_as_model_names_the_base_and_the_fix(tmp_path):
    adapter = tmp_path / "my-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M"}))
    with pytest.raises(FtkitError) as error:
        resolve_model_source(str(adapter))
    message = str(error.value)
    assert str(adapter) in message and "LoRA adapter" in message
    assert "adapter_name_or_path" in message and "'HuggingFaceTB/SmolLM2-135M' as model_name_or_path" in message


def test_adapter_directory_is_accepted_when_asked_for(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    source = resolve_model_source(str(tmp_path), allow_adapter=True)
    assert (source.kind, source.path) == ("local", tmp_path)


def test_directory_without_config_json_is_refused(tmp_path):
    with pytest.raises(FtkitError, match="has no config.json") as error:
        resolve_model_source(str(tmp_path))
    assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model", "~/no-such-model", "missing.gguf", "a/b/c"])
def test_missing_path_says_it_does_not_exist(name):
    with pytest.raises(FtkitError) as error:
        resolve_model_source(name)
    assert str(error.value).startswith(f"Model path {name} does not exist;")
    assert EMBEDDED_ALIAS in str(error.value)


def test_existing_file_that_is_not_gguf_is_refused(tiny_llama_dir):
    weights = tiny_llama_dir / "model.safetensors"
    with pytest.raises(FtkitError, match="is a file, not a model") as error:
        resolve_model_source(str(weights))
    assert str(weights) in str(error.value)


def test_malformed_name_is_refused():
    with pytest.raises(FtkitError, match="is not an existing directory, a .gguf file or a hub id"):
        resolve_model_source("not a model")


def test_misspelled_alias_suggests_the_alias():
    with pytest.raises(FtkitError, match=f"did you mean the embedded alias {EMBEDDED_ALIAS}"):
        resolve_model_source("smollm2-135m")


# ---- Hugging Face hub, offline against a real cache layout -----------------------------------------------------


def test_hub_id_resolves_from_the_offline_cache_and_loads(clean_hub_env, tmp_path, tiny_llama_dir):
    snapshot = hf_cache_with(tiny_llama_dir, tmp_path / "hub-cache")
    clean_hub_env.setenv("HF_HUB_OFFLINE", "1")
    clean_hub_env.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    source = resolve_model_source(REPO)
    assert (source.kind, source.path, source.display) == ("hub", snapshot, REPO)
    model = load_model(source)
    tokenizer = load_tokenizer(source)
    assert model.config.hidden_size == 64 and tokenizer.pad_token_id == 0


def test_hub_cache_is_found_through_hf_home(clean_hub_env, tmp_path, tiny_llama_dir):
    snapshot = hf_cache_with(tiny_llama_dir, tmp_path / "hf-home" / "hub")
    clean_hub_env.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_source(REPO).path == snapshot


def test_hub_cache_dir_and_commit_revision_are_honoured(clean_hub_env, tmp_path, tiny_llama_dir):
    snapshot = hf_cache_with(tiny_llama_dir, tmp_path / "explicit-cache")
    clean_hub_env.setenv("HF_HUB_OFFLINE", "1")
    source = resolve_model_source(REPO, cache_dir=str(tmp_path / "explicit-cache"), revision=COMMIT)
    assert source.path == snapshot


def test_hub_model_not_cached_while_offline_is_one_sentence(clean_hub_env, tmp_path):
    clean_hub_env.setenv("HF_HUB_OFFLINE", "1")
    clean_hub_env.chdir(tmp_path)
    with pytest.raises(FtkitError) as error:
        resolve_model_source("ftkit-test/not-cached")
    assert str(error.value) == (  # org/name reads as a relative path too: both readings are named
        f"Model 'ftkit-test/not-cached' is neither a local folder (there is no folder {tmp_path}/ftkit-test/not-cached) "
        "nor in the local Hugging Face cache, and the hub cannot be reached (HF_HUB_OFFLINE is set); fix the path, or "
        "download it first (`hf download ftkit-test/not-cached`)."
    )


def test_unreachable_hub_falls_back_to_the_cache(clean_hub_env, tmp_path, tiny_llama_dir):
    import huggingface_hub.constants

    clean_hub_env.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # refuses connections
    snapshot = hf_cache_with(tiny_llama_dir, tmp_path / "hf-home" / "hub")
    assert resolve_model_source(REPO).path == snapshot
    with pytest.raises(FtkitError) as error:
        resolve_model_source("ftkit-test/not-cached", revision="v2")
    message = str(error.value)
    assert "nor in the local Hugging Face cache, and the hub cannot be reached (" in message
    assert "`hf download ftkit-test/not-cached --revision v2`" in message


# ---- ModelScope, offline against its cache layouts --------------------------------------------------------------


def test_modelscope_id_resolves_from_the_offline_cache(clean_hub_env, tmp_path, tiny_llama_dir):
    snapshot = tmp_path / "ms-cache" / "models" / "ftkit-test--tiny-llama" / "snapshots" / "master"
    shutil.copytree(tiny_llama_dir, snapshot)
    clean_hub_env.setenv("HF_HUB_OFFLINE", "1")
    clean_hub_env.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms-cache"))
    source = resolve_model_source("ms://" + REPO)
    assert (source.kind, source.path, source.display) == ("modelscope", snapshot, "ms://" + REPO)
    assert load_model(source).config.num_hidden_layers == 2


def test_modelscope_legacy_cache_layout_and_selectors(clean_hub_env, tmp_path, tiny_llama_dir):
    legacy = tmp_path / "ms-cache" / "hub" / "models" / "ftkit-test" / "tiny___llama-v0___1"  # dots became ___
    shutil.copytree(tiny_llama_dir, legacy)
    clean_hub_env.setenv("HF_HUB_OFFLINE", "1")
    source = resolve_model_source("ftkit-test/tiny.llama-v0.1", use_modelscope=True, cache_dir=str(tmp_path / "ms-cache"))
    assert (source.kind, source.path) == ("modelscope", legacy)
    clean_hub_env.setenv("USE_MODELSCOPE_HUB", "1")  # LLaMA-Factory's switch
    assert resolve_model_source("ftkit-test/tiny.llama-v0.1", cache_dir=str(tmp_path / "ms-cache")).path == legacy


def test_modelscope_model_not_cached_while_offline_is_one_sentence(clean_hub_env, tmp_path):
    clean_hub_env.setenv("HF_HUB_OFFLINE", "1")
    clean_hub_env.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms-cache"))
    with pytest.raises(FtkitError) as error:
        resolve_model_source("ms://ftkit-test/not-cached")
    assert str(error.value) == (
        "Model 'ms://ftkit-test/not-cached' is not in the local ModelScope cache and ModelScope cannot be reached "
        "(HF_HUB_OFFLINE is set); download it first (`modelscope download --model ftkit-test/not-cached`) or pass "
        "a local directory."
    )


def test_unreachable_modelscope_falls_back_to_the_cache(tmp_path, tiny_llama_dir):
    """Run in a fresh process: modelscope reads its endpoint and retry counts once, at import."""
    snapshot = tmp_path / "ms-cache" / "models" / "ftkit-test--tiny-llama" / "snapshots" / "master"
    shutil.copytree(tiny_llama_dir, snapshot)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(MODELSCOPE_CACHE=str(tmp_path / "ms-cache"), MODELSCOPE_ENDPOINT="http://127.0.0.1:9",
               MODELSCOPE_API_MAX_RETRIES="1", MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS="1")
    script = (
        "from ftkit.models.source import resolve_model_source\n"
        "from ftkit.errors import FtkitError\n"
        f"print(resolve_model_source('ms://{REPO}').path)\n"
        "try:\n    resolve_model_source('ms://ftkit-test/not-cached')\n"
        "except FtkitError as error:\n    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    found, error = result.stdout.strip().splitlines()[-2:]
    assert Path(found) == snapshot
    assert error.startswith("Model 'ms://ftkit-test/not-cached' is not in the local ModelScope cache and ModelScope "
                            "cannot be reached (")


# ---- adapters and stage configs ----------------------------------------------------------------------------------


def test_adapter_dir_resolution_and_errors(tmp_path, tiny_llama_dir):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert resolve_adapter_dir(str(adapter)) == adapter
    with pytest.raises(FtkitError, match="holds a full model .* pass it as model_name_or_path"):
        resolve_adapter_dir(str(tiny_llama_dir))
    with pytest.raises(FtkitError, match="has no adapter_config.json"):
        resolve_adapter_dir(str(tmp_path))
    with pytest.raises(FtkitError, match="Adapter path ./missing-adapter does not exist"):
        resolve_adapter_dir("./missing-adapter")
    (tmp_path / "train.yaml").write_text("lora_rank: 8\n")
    with pytest.raises(FtkitError, match="Adapter path .*train.yaml is a file, not a folder; pass the directory"):
        resolve_adapter_dir(str(tmp_path / "train.yaml"))


def test_adapter_not_cached_while_offline_names_both_readings(clean_hub_env, tmp_path):
    clean_hub_env.setenv("HF_HUB_OFFLINE", "1")
    clean_hub_env.chdir(tmp_path)
    with pytest.raises(FtkitError) as error:
        resolve_adapter_dir("ad/nope")
    assert str(error.value).startswith(
        f"Adapter 'ad/nope' is neither a local folder (there is no folder {tmp_path}/ad/nope) nor in the local "
        "Hugging Face cache")


@pytest.mark.parametrize(("content", "reason"), [
    (b"", "it is empty"),
    (b"PK\x03\x04 a zip file", "it starts with b'PK\\x03\\x04', not the GGUF magic b'GGUF'"),
    (b"GGUF" + bytes(4), "the gguf package cannot read it"),
])
def test_a_gguf_path_that_is_no_gguf_file_is_refused_before_loading(tmp_path, content, reason):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(FtkitError) as error:
        resolve_model_source(str(path))
    assert str(error.value).startswith(f"Model file {path} is not a valid GGUF file: {reason}")


def test_adapter_from_the_offline_hub_cache(clean_hub_env, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    snapshot = hf_cache_with(adapter, tmp_path / "hf-home" / "hub", repo_id="ftkit-test/tiny-adapter")
    clean_hub_env.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_adapter_dir("ftkit-test/tiny-adapter") == snapshot


def test_model_source_from_config_uses_the_model_keys(clean_hub_env, tmp_path, tiny_llama_dir):
    snapshot = hf_cache_with(tiny_llama_dir, tmp_path / "cache")
    clean_hub_env.setenv("HF_HUB_OFFLINE", "1")
    section = ModelSection(model_name_or_path=REPO, cache_dir=str(tmp_path / "cache"), model_revision=COMMIT)
    assert model_source_from_config(section).path == snapshot
