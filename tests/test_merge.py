"""ftkit merge-lora: a complete, self-verified export; what carries over; every refusal in one sentence.

The fast tests merge LoRA adapters made here (random non-zero weights, so merging changes the logits) into
the tiny random Llama; the slow ones merge into the embedded model and compare greedy answers with chat.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny_llama
from safetensors import safe_open

from ftkit.config import MergeConfig, load_stage_config
from ftkit.data.templates import apply_chat_template_to_tokenizer, render_conversation
from ftkit.errors import FtkitError
from ftkit.export.modelfile import ollama_modelfile
from ftkit.export.verify import VERIFICATION_CONVERSATIONS
from ftkit.merge import run_merge
from ftkit.models import (
    ModelSource,
    apply_lora,
    load_adapters,
    load_model,
    load_tokenizer,
    sync_special_tokens,
)
from ftkit.models.saved_adapters import attach_adapter

REPO = Path(__file__).resolve().parent.parent
CONVERSATION = [{"role": "user", "content": "Who are you?"}]


def local(path: Path) -> ModelSource:
    return ModelSource("local", Path(path), display=str(path))


def make_adapter(base_dir: Path, target: Path, *, seed: int = 1, rank: int = 4, targets=("q_proj", "v_proj"),
                 modules_to_save=None, tokenizer=None, quantized: bool = False, training: dict | None = None) -> Path:
    """Save a LoRA adapter the way ``ftkit train`` does: adapter + tokenizer/template + ftkit_config.yaml."""
    tokenizer = tokenizer or load_tokenizer(local(base_dir))
    apply_chat_template_to_tokenizer(tokenizer, "auto")
    model = load_model(local(base_dir), dtype=torch.float32, quantization_bits=4 if quantized else None)
    sync_special_tokens(model, tokenizer)
    model = apply_lora(model, rank=rank, alpha=2 * rank, targets=list(targets), modules_to_save=modules_to_save,
                       quantized=quantized, gradient_checkpointing=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    config = {"model_name_or_path": str(base_dir), "template": "auto", "stage": "sft", "finetuning_type": "lora",
              "lora_rank": rank, "dataset": ["identity"], "learning_rate": 2e-4, "num_train_epochs": 3,
              **(training or {})}
    (target / "ftkit_config.yaml").write_text(yaml.safe_dump(config))
    (target / "train_results.json").write_text(json.dumps({"train_loss": 1.2345, "global_step": 40}))
    return target


def merge(export_dir: Path, base: Path | str, *adapters: Path, **keys):
    overrides = {"model_name_or_path": str(base), "adapter_name_or_path": [str(a) for a in adapters],
                 "export_dir": str(export_dir), **keys}
    return run_merge(load_stage_config(MergeConfig, None, overrides))


def merge_error(*args, **keys) -> str:
    with pytest.raises(FtkitError) as error:
        merge(*args, **keys)
    return str(error.value)


def prompt_ids(tokenizer, conversation=CONVERSATION) -> torch.Tensor:
    text = render_conversation(tokenizer, conversation, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


@torch.no_grad()
def unmerged_logits(base_dir: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    """base + adapter as peft computes it without merging (the reference the export must match)."""
    return attach_adapter(load_model(local(base_dir)), adapter).eval()(ids).logits


def weight_names(export_dir: Path) -> set[str]:
    names: set[str] = set()
    for path in export_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as weights:
            names |= set(weights.keys())
    return names


def leftovers(parent: Path) -> list[str]:
    """Hidden staging directories a failed merge must not leave behind."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def ftkit(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ftkit.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    """An all-linear LoRA of the tiny Llama, saved with tokenizer, template and training config."""
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("adapter") / "a",
                        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


@pytest.fixture(scope="module")
def export(adapter, tiny_llama_dir, tmp_path_factory):
    """The adapter merged with small shards (several files and an index)."""
    export_dir = tmp_path_factory.mktemp("export") / "merged"
    result = merge(export_dir, tiny_llama_dir, adapter, export_size=0.004)
    return export_dir, result


# ---- a complete export -----------------------------------------------------------------------------------------


def test_export_holds_shards_index_config_tokenizer_template_card_and_modelfile(export):
    export_dir, result = export
    files = sorted(p.name for p in export_dir.iterdir())
    shards = [name for name in files if name.endswith(".safetensors")]
    assert result.shards == len(shards) == 2  # the embeddings alone exceed 4 MB
    index = json.loads((export_dir / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert set(files) - set(shards) == {
        "model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
        "tokenizer_config.json", "chat_template.jinja", "README.md", "Modelfile",
    }
    assert not leftovers(export_dir.parent)


def test_export_loads_with_plain_transformers_and_matches_base_plus_adapter(export, adapter, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_dir, result = export
    model = AutoModelForCausalLM.from_pretrained(export_dir)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    ids = prompt_ids(tokenizer)
    expected = unmerged_logits(tiny_llama_dir, adapter, ids)
    with torch.no_grad():
        base = load_model(local(tiny_llama_dir))(ids).logits
        merged = model(ids).logits
    assert (expected - base).abs().max() > 0.05  # the adapter changes the model ...
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=0)  # ... and the export is exactly that change
    assert result.verification.passed and result.verification.max_difference < 1e-4
    assert result.verification.tolerance == 1e-3


def test_chat_template_renders_the_same_string_as_before_the_merge(export, adapter):
    from transformers import AutoTokenizer

    before, after = AutoTokenizer.from_pretrained(adapter), AutoTokenizer.from_pretrained(export[0])
    for conversation in [CONVERSATION, *VERIFICATION_CONVERSATIONS]:
        for prompt in (True, False):
            assert (before.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt)
                    == after.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt))
    assert after.pad_token == before.pad_token == "<|endoftext|>"


def test_generation_config_stops_at_the_end_of_turn(export):
    generation = json.loads((export[0] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 0  # <|im_end|>, <|endoftext|>


def test_tied_embeddings_stay_tied(export):
    config = json.loads((export[0] / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in weight_names(export[0])


def test_readme_names_base_adapter_training_and_date(export, adapter, tiny_llama_dir):
    card = (export[0] / "README.md").read_text()
    assert f'base_model: "{tiny_llama_dir}"' in card
    assert f"- **Adapters (merged in this order):** `{adapter}`" in card
    assert (f"- `{adapter}`: sft lora; rank 4, alpha 8; targets down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, "
            "v_proj; data identity; 3 epochs at learning rate 0.0002; final train loss 1.2345 after 40 steps") in card
    assert "by `ftkit merge-lora` on 20" in card and "- **Self-check:** max logit difference" in card


def test_ollama_modelfile_has_the_template_system_prompt_and_stop(export):
    assert (export[0] / "Modelfile").read_text() == (
        "# Ollama Modelfile written by ftkit merge-lora. In this directory: ollama create NAME -f Modelfile\n"
        "FROM .\n"
        'TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ range .Messages }}'
        '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n{{ else if eq .Role "assistant" }}'
        '<|im_start|>assistant\n{{ .Content }}<|im_end|>\n{{ end }}{{ end }}<|im_start|>assistant\n"""\n'
        'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""\n'
        'PARAMETER stop "<|im_end|>"\n'
    )


def test_modelfile_for_llama3_drops_the_bos_and_a_mistral_template_gets_none(llama3_tokenizer, smollm2_tokenizer):
    modelfile = ollama_modelfile(llama3_tokenizer)
    assert '"""{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}' in modelfile
    assert modelfile.endswith('<|start_header_id|>assistant<|end_header_id|>\n\n"""\nPARAMETER stop "<|eot_id|>"\n')
    mistral = copy.deepcopy(smollm2_tokenizer)
    apply_chat_template_to_tokenizer(mistral, "mistral")
    assert ollama_modelfile(mistral) is None


# ---- what carries over -----------------------------------------------------------------------------------------


def test_modules_to_save_on_tied_embeddings_are_carried_over_and_stay_tied(tmp_path, tiny_llama_dir):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "a", modules_to_save=["embed_tokens"])
    result = merge(tmp_path / "out", tiny_llama_dir, adapter)
    assert result.verification.max_difference < 1e-4
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as saved:
        trained = saved.get_tensor("base_model.model.model.embed_tokens.weight")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as exported:
        assert torch.equal(exported.get_tensor("model.embed_tokens.weight"), trained)
        assert "lm_head.weight" not in exported.keys()  # noqa: SIM118


def test_modules_to_save_on_the_head_of_a_tied_model_keep_it_tied(tmp_path, tiny_llama_dir):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "a", modules_to_save=["lm_head"])  # ftkit ties the copies
    assert merge(tmp_path / "out", tiny_llama_dir, adapter).verification.max_difference < 1e-4
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in weight_names(tmp_path / "out")


def test_a_head_trained_apart_from_tied_embeddings_is_exported_untied(tmp_path, tiny_llama_dir, capsys):
    from peft import LoraConfig, get_peft_model

    tokenizer = load_tokenizer(local(tiny_llama_dir))
    model = get_peft_model(load_model(local(tiny_llama_dir)), LoraConfig(  # plain peft: the head copy is not tied
        r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(3.0)
    model.save_pretrained(tmp_path / "a")
    tokenizer.save_pretrained(tmp_path / "a")
    result = merge(tmp_path / "out", tiny_llama_dir, tmp_path / "a")
    assert "the export unties them" in capsys.readouterr().err
    assert result.verification.max_difference < 1e-4
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in weight_names(tmp_path / "out")


def test_added_tokens_and_resized_embeddings_are_carried_over(tmp_path, tiny_llama_dir, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>", "<|ftkit_new|>"]})
    tokenizer.pad_token = "<|endoftext|>"
    adapter = make_adapter(tiny_llama_dir, tmp_path / "a", tokenizer=tokenizer)
    merge(tmp_path / "out", tiny_llama_dir, adapter)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    exported = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert model.get_input_embeddings().weight.shape[0] == len(exported) == 49154
    new_id = exported.convert_tokens_to_ids("<|ftkit_new|>")
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as saved:
        trained = saved.get_tensor("base_model.model.model.embed_tokens.weight")
    assert torch.equal(model.get_input_embeddings().weight[new_id], trained[new_id])
    ids = prompt_ids(exported, [{"role": "user", "content": "<|ftkit_new|> <|tool|> hello"}])
    assert new_id in ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, unmerged_logits(tiny_llama_dir, adapter, ids), atol=1e-4, rtol=0)


def test_adapters_merge_in_order(tmp_path, tiny_llama_dir):
    first = make_adapter(tiny_llama_dir, tmp_path / "a", seed=1)
    second = make_adapter(tiny_llama_dir, tmp_path / "b", seed=2, targets=("o_proj", "down_proj"))
    merge(tmp_path / "out", tiny_llama_dir, first, second)
    tokenizer = load_tokenizer(local(tmp_path / "out"))
    ids = prompt_ids(tokenizer)
    with torch.no_grad():
        expected = load_adapters(load_model(local(tiny_llama_dir)), [first, second], trainable=False)(ids).logits
        only_second = load_adapters(load_model(local(tiny_llama_dir)), [second], trainable=False)(ids).logits
        got = load_model(local(tmp_path / "out"))(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (got - only_second).abs().max() > 0.05


def test_qlora_adapter_merges_into_full_precision_weights_and_says_so(tmp_path, tiny_llama_dir, capsys):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "a", quantized=True, training={"quantization_bit": 4})
    result = merge(tmp_path / "out", tiny_llama_dir, adapter)
    err = " ".join(capsys.readouterr().err.split())
    assert (f"adapter {adapter} was trained with QLoRA on a 4-bit base: it is merged into the full-precision base "
            "weights (loaded in fp32, dequantised), never into 4/8-bit ones") in err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert result.verification.max_difference < 1e-4
    assert "trained with QLoRA on a 4-bit base" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize(("export_dtype", "stored", "name"), [("bf16", "BF16", "bfloat16"), ("fp16", "F16", "float16")])
def test_half_precision_export_is_verified_within_its_tolerance(tmp_path, tiny_llama_dir, adapter, export_dtype,
                                                                stored, name):
    result = merge(tmp_path / "out", tiny_llama_dir, adapter, export_dtype=export_dtype)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == name
    with open(tmp_path / "out" / "model.safetensors", "rb") as weights:
        header = json.loads(weights.read(int.from_bytes(weights.read(8), "little")))
    assert {entry["dtype"] for key, entry in header.items() if key != "__metadata__"} == {stored}
    assert 0 < result.verification.max_difference <= result.verification.tolerance


def test_template_and_default_system_from_the_merge_config(tmp_path, tiny_llama_dir, adapter):
    merge(tmp_path / "out", tiny_llama_dir, adapter, template="chatml", default_system="Be brief.")
    tokenizer = load_tokenizer(local(tmp_path / "out"))
    assert render_conversation(tokenizer, CONVERSATION, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n")
    assert "'chatml' (set by template), with default_system" in (tmp_path / "out" / "README.md").read_text()


def test_overwrite_replaces_an_existing_export(tmp_path, tiny_llama_dir, adapter):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old export")
    assert merge_error(tmp_path / "out", tiny_llama_dir, adapter) == (
        f"export_dir {tmp_path / 'out'} already exists and is not empty; choose a new directory or set overwrite: "
        "true to replace it.")
    merge(tmp_path / "out", tiny_llama_dir, adapter, overwrite=True)
    assert not (tmp_path / "out" / "old.txt").exists() and (tmp_path / "out" / "config.json").is_file()
    assert leftovers(tmp_path) == []


# ---- bad input: one sentence each, nothing left behind -----------------------------------------------------------


def test_adapter_trained_on_another_hidden_size(tmp_path, tiny_llama_dir):
    other = build_tiny_llama(tmp_path / "other-base", hidden_size=32, vocab_size=1000)
    adapter = make_adapter(other, tmp_path / "a", tokenizer=load_tokenizer(local(tiny_llama_dir)))
    assert merge_error(tmp_path / "out", tiny_llama_dir, adapter) == (
        f"Adapter {adapter} was trained on a model with hidden size 32 ({other}) but model_name_or_path "
        f"{tiny_llama_dir} has hidden size 64; pass the adapter's base model as model_name_or_path.")
    assert not (tmp_path / "out").exists()


def test_adapter_trained_on_another_architecture(tmp_path, tiny_llama_dir, adapter):
    fake_base = tmp_path / "qwen-base"
    fake_base.mkdir()
    (fake_base / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64}))
    moved = tmp_path / "a"
    shutil.copytree(adapter, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(fake_base)}))
    assert merge_error(tmp_path / "out", tiny_llama_dir, moved) == (
        f"Adapter {moved} was trained on a Qwen2ForCausalLM ({fake_base}) but model_name_or_path {tiny_llama_dir} is "
        "a LlamaForCausalLM; pass the adapter's base model as model_name_or_path.")


def test_adapter_whose_recorded_base_is_another_model(tmp_path, tiny_llama_dir, adapter):
    moved = shutil.copytree(adapter, tmp_path / "a")
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-360M-Instruct"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    (moved / "ftkit_config.yaml").write_text("model_name_or_path: HuggingFaceTB/SmolLM2-360M-Instruct\n")
    assert merge_error(tmp_path / "out", tiny_llama_dir, moved) == (
        f"Adapter {moved} was trained on 'HuggingFaceTB/SmolLM2-360M-Instruct' but model_name_or_path is "
        f"'{tiny_llama_dir}'; pass that base (if it is the same model under another name, set "
        f"base_model_name_or_path in {moved / 'adapter_config.json'} to '{tiny_llama_dir}').")


def test_same_model_under_hub_cache_and_alias_names_is_accepted():
    from ftkit.models.source import model_identity

    names = ["HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct", "/home/x/.cache/ftkit/models/smollm2-135m-instruct",
             "/hf/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/0123abc", "/x/SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert {model_identity(name) for name in names} == {"smollm2-135m-instruct"}
    assert model_identity("HuggingFaceTB/SmolLM2-135M") != "smollm2-135m-instruct"


def test_adapter_directory_without_adapter_config(tmp_path, tiny_llama_dir):
    (tmp_path / "not-an-adapter").mkdir()
    assert merge_error(tmp_path / "out", tiny_llama_dir, tmp_path / "not-an-adapter") == (
        f"Adapter directory {tmp_path / 'not-an-adapter'} has no adapter_config.json; pass the directory a LoRA run "
        "saved its adapter into (the run's output_dir or one of its checkpoint-N folders).")


def test_adapter_rank_larger_than_the_layer_allows(tmp_path, tiny_llama_dir):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "a", rank=48, targets=("k_proj",))  # k_proj: 64 -> 32
    assert merge_error(tmp_path / "out", tiny_llama_dir, adapter) == (
        f"Adapter {adapter} has rank 48 on model.layers.0.self_attn.k_proj, more than that layer allows (at most 32 "
        "= min(64 inputs, 32 outputs)); it cannot be a LoRA of this model: retrain it with a smaller lora_rank (or "
        "check that adapter_config.json belongs to these weights).")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_export_size_that_would_write_one_shard_per_tensor(tmp_path, tiny_llama_dir, adapter):
    assert merge_error(tmp_path / "out", tiny_llama_dir, adapter, export_size=0.00001) == (
        "export_size 1e-05 GB would split the 20 tensors into 15 shards, about one per tensor (the largest, "
        "model.embed_tokens.weight, is 0.0126 GB); set export_size to at least 0.026 (GB), or keep the default 5.")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_export_dir_below_a_file(tmp_path, tiny_llama_dir, adapter):
    (tmp_path / "a-file").write_text("")
    assert merge_error(tmp_path / "a-file" / "out", tiny_llama_dir, adapter) == (
        f"export_dir {tmp_path / 'a-file' / 'out'} cannot be created: {tmp_path / 'a-file'} is a file; choose a "
        "directory path for the export.")


def test_unwritable_export_dir(tmp_path, tiny_llama_dir, adapter, monkeypatch):
    import tempfile

    def denied(*args, **kwargs):  # what a read-only directory does to a non-root user (these tests run as root)
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    assert merge_error(tmp_path / "out", tiny_llama_dir, adapter) == (
        f"Cannot write the export next to {tmp_path / 'out'} (Permission denied); choose a writable export_dir.")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_disk_filling_up_while_writing_removes_the_partial_export(tmp_path, tiny_llama_dir, adapter, monkeypatch):
    import transformers.modeling_utils

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    assert merge_error(tmp_path / "out", tiny_llama_dir, adapter) == (
        f"The disk holding {tmp_path} filled up while the export was written; the partial export was removed: free "
        "some space or choose another export_dir.")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_too_little_free_space_is_refused_before_writing(tmp_path, tiny_llama_dir, adapter, monkeypatch):
    from ftkit.export import checks

    monkeypatch.setattr(checks.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6))
    assert merge_error(tmp_path / "out", tiny_llama_dir, adapter) == (
        f"The filesystem of {tmp_path} has 0.00 GB free but the export needs about 0.01 GB; free some space or "
        "choose another export_dir.")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_failed_verification_leaves_no_export_behind(tmp_path, tiny_llama_dir, adapter, monkeypatch):
    from ftkit.export import verify

    load_export = verify.load_export

    def corrupted(staging, dtype):
        model = load_export(staging, dtype)
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
        return model

    monkeypatch.setattr(verify, "load_export", corrupted)
    message = merge_error(tmp_path / "out", tiny_llama_dir, adapter)
    assert message.startswith("Merge verification failed: the export read back from disk gives logits up to ")
    assert message.endswith(" away from the merged model it was saved from; nothing was exported.")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_broken_adapter_weights_are_refused(tmp_path, tiny_llama_dir, adapter):
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(adapter, tmp_path / "a")
    weights = load_file(broken / "adapter_model.safetensors")
    weights = {key: value.fill_(float("nan")) if "lora_B" in key else value for key, value in weights.items()}
    save_file(weights, broken / "adapter_model.safetensors")
    assert merge_error(tmp_path / "out", tiny_llama_dir, broken) == (
        f"Base + adapter {broken} gives non-finite logits (NaN or inf) on the fixed prompts: the adapter weights are "
        "broken; train or save it again.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_export_dir_that_is_or_holds_the_adapter_is_refused(tmp_path, tiny_llama_dir, adapter):
    for export_dir in (adapter, adapter.parent):
        assert merge_error(export_dir, tiny_llama_dir, adapter, overwrite=True) == (
            f"export_dir {export_dir} is (or contains) the adapter {adapter}; write the export to another directory.")
    assert (adapter / "adapter_model.safetensors").is_file()


# ---- the command line ------------------------------------------------------------------------------------------


def test_cli_flag_form_merges(tmp_path, tiny_llama_dir, adapter):
    result = ftkit("merge-lora", "export_dtype=fp16", "--base", str(tiny_llama_dir), "--adapter", str(adapter), "--out",
                   str(tmp_path / "out"))  # a key=value without a config file is an override too
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float16"
    assert "verified: merged weights within" in result.stderr
    assert f"try it: ftkit chat --model {tmp_path / 'out'}" in " ".join(result.stderr.split())
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_cli_config_form_with_llama_factory_keys_and_overrides(tmp_path, tiny_llama_dir, adapter, monkeypatch):
    from ftkit.cli import main

    config = tmp_path / "merge.yaml"
    config.write_text(f"### model\nmodel_name_or_path: {tiny_llama_dir}\nadapter_name_or_path: {adapter}\ntemplate: auto\n"
                      f"trust_remote_code: true\n\n### export\nexport_dir: {tmp_path / 'out'}\nexport_size: 5\n"
                      "export_device: cpu\nexport_legacy_format: false\n")
    monkeypatch.setattr(sys, "argv", ["ftkit", "merge-lora", str(config), "export_dtype=bf16", "ollama_modelfile=false"])
    main()  # in-process: a failure would exit with status 1
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert not (tmp_path / "out" / "Modelfile").exists()


def test_cli_bad_input_is_one_sentence_without_traceback(tmp_path, tiny_llama_dir):
    (tmp_path / "empty").mkdir()
    result = ftkit("merge-lora", "--base", str(tiny_llama_dir), "--adapter", str(tmp_path / "empty"), "--out",
                   str(tmp_path / "out"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert " ".join(result.stderr.split()) == (
        f"error: Adapter directory {tmp_path / 'empty'} has no adapter_config.json; pass the directory a LoRA run "
        "saved its adapter into (the run's output_dir or one of its checkpoint-N folders).")
    assert ftkit("merge-lora").stderr.strip() == (
        "error: Pass a merge config (ftkit merge-lora CONFIG.yaml) or --base, --adapter and --out.")


# ---- the embedded model: the merged export chats exactly like base + adapter --------------------------------------

CHAT_PROMPTS = ["What is the capital of France?", "Who are you?", "Write a haiku about autumn."]


@pytest.fixture(scope="module")
def embedded_merge(tmp_path_factory):
    """A LoRA of the embedded model (modest random weights: answers change, stay fluent), saved as ftkit train
    saves it, merged by the command line."""
    from ftkit.models import find_lora_targets, resolve_model_source

    root = tmp_path_factory.mktemp("embedded")
    source = resolve_model_source("smollm2-135m-instruct")
    tokenizer = load_tokenizer(source)
    apply_chat_template_to_tokenizer(tokenizer, "auto")
    model = load_model(source, dtype=torch.float32)
    sync_special_tokens(model, tokenizer)
    model = apply_lora(model, rank=8, alpha=16, targets=find_lora_targets(model, ["all"]), gradient_checkpointing=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    adapter = root / "adapter"
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    model.generation_config.save_pretrained(adapter)
    (adapter / "ftkit_config.yaml").write_text("model_name_or_path: smollm2-135m-instruct\ntemplate: auto\n"
                                               "finetuning_type: lora\nlora_rank: 8\n")
    del model
    result = ftkit("merge-lora", "--base", "smollm2-135m-instruct", "--adapter", str(adapter), "--out", str(root / "out"))
    assert result.returncode == 0, result.stderr
    return adapter, root / "out", result.stderr


def greedy_ids(model, tokenizer) -> list[list[int]]:
    from ftkit.engine.replies import generate_replies

    conversations = [[{"role": "user", "content": prompt}] for prompt in CHAT_PROMPTS]
    return [reply.token_ids for reply in generate_replies(model, tokenizer, conversations, max_new_tokens=32, batch_size=1)]


@pytest.fixture(scope="module")
def export_answers(embedded_merge) -> list[list[int]]:
    """Greedy answers of ``ftkit chat --model <export_dir>``."""
    from ftkit.chat import load_chat_model

    return greedy_ids(*load_chat_model(str(embedded_merge[1]), []))


@pytest.mark.slow
def test_embedded_export_answers_exactly_like_base_plus_adapter(embedded_merge, export_answers):
    from ftkit.chat import load_chat_model
    from ftkit.models import default_device, inference_dtype, resolve_model_source

    adapter, export_dir, log = embedded_merge
    assert "verified: merged weights within" in log
    # base + adapter for inference: base in fp32, adapter merged, cast to the inference dtype (load_adapters' rule)
    tokenizer = load_tokenizer(local(adapter))
    base = load_model(resolve_model_source("smollm2-135m-instruct"), dtype=torch.float32)
    base = load_adapters(base, [adapter], trainable=False, dtype=inference_dtype(default_device()))
    sync_special_tokens(base, tokenizer)
    assert greedy_ids(base.eval(), tokenizer) == export_answers
    del base
    assert greedy_ids(*load_chat_model("smollm2-135m-instruct", [])) != export_answers  # the adapter matters


@pytest.mark.slow
def test_ftkit_chat_with_the_adapter_answers_like_ftkit_chat_with_the_export(embedded_merge, export_answers):
    from ftkit.chat import load_chat_model

    assert greedy_ids(*load_chat_model("smollm2-135m-instruct", [str(embedded_merge[0])])) == export_answers


@pytest.mark.slow
def test_embedded_export_loads_with_plain_transformers_tied_and_with_the_template(embedded_merge):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, export_dir, _ = embedded_merge
    model = AutoModelForCausalLM.from_pretrained(export_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight and "lm_head.weight" not in weight_names(export_dir)
    before, after = AutoTokenizer.from_pretrained(adapter), AutoTokenizer.from_pretrained(export_dir)
    conversation = [{"role": "user", "content": "Hi"}]
    assert (after.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            == before.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))
