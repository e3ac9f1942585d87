"""Issue 23, model and adapter paths: every wrong path is one sentence that says what the path is and what is wrong.

The catalogue runs the real ``ftkit chat``, ``ftkit merge-lora`` and ``ftkit train`` (offline) in a fresh
folder holding a copy of the tiny Llama (``model``) and, where a case needs one, a LoRA adapter of it
(``ad``) or of a smaller Llama (``other-ad``, hidden size 32). Every refusal comes before any weights are
written, so nothing appears in the folder.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from bad_input import BadInput, check_bad_input
from conftest import build_tiny_llama

from ftkit.errors import FtkitError
from ftkit.models.source import check_gguf_file, refuse_repeated_adapters, resolve_adapter_dir

ASSETS: dict[str, Path] = {}  # "model", "ad" (a LoRA of it), "other-ad" (a LoRA of a hidden-32 Llama)
CHAT = ["chat", "--prompt", "hi", "--max-new-tokens", "2"]
MERGE = ["merge-lora", "--base", "model", "--out", "merged"]
NEITHER = "is neither a local folder"
# A GGUF header (magic, version 3, one tensor, no metadata) whose tensor description was cut off.
CUT_SHORT_GGUF = b"GGUF" + struct.pack("<IQQ", 3, 1, 0)


def save_adapter(base_dir: Path, target: Path) -> Path:
    """A LoRA of ``base_dir`` on q_proj and v_proj with non-zero weights, saved as peft saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    model.save_pretrained(target)
    return target


@pytest.fixture(scope="module", autouse=True)
def assets(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("path-assets")
    ASSETS["model"] = tiny_llama_dir
    ASSETS["ad"] = save_adapter(tiny_llama_dir, folder / "ad")
    ASSETS["other-ad"] = save_adapter(build_tiny_llama(folder / "other-base", hidden_size=32, vocab_size=1000),
                                      folder / "other-ad")
    return ASSETS


def copies(*names: str, records_base: str | None = None) -> Callable[[Path], None]:
    """A setup copying the model and the named adapters into the case's folder; ``records_base`` rewrites the
    base ``other-ad`` records (as if its adapter_config.json had been edited or the base folder replaced)."""
    def setup(folder: Path) -> None:
        shutil.copytree(ASSETS["model"], folder / "model")
        for name in names:
            shutil.copytree(ASSETS[name], folder / name)
        if records_base is not None:
            config_file = folder / "other-ad" / "adapter_config.json"
            config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                               "base_model_name_or_path": records_base}))
    return setup


CASES = [
    # org/name reads as a relative path and as a hub id: the message says neither exists.
    BadInput("chat-model-missing-path-with-a-slash", [*CHAT, "--model", "m/nope"],
             mentions=["'m/nope'", NEITHER, "{tmp}/m/nope", "Hugging Face cache", "hf download m/nope"]),
    BadInput("chat-adapter-missing-path-with-a-slash", [*CHAT, "--model", "model", "--adapter", "ad/nope"],
             mentions=["Adapter 'ad/nope'", NEITHER, "{tmp}/ad/nope", "Hugging Face cache"], setup=copies()),
    BadInput("train-model-missing-path-with-a-slash", ["train", "{tmp}/cfg.yaml"],
             mentions=["'m/nope'", NEITHER, "{tmp}/m/nope"],
             files={"cfg.yaml": "model_name_or_path: m/nope\ndataset: identity\noutput_dir: out\n"}),
    BadInput("merge-base-missing-path-with-a-slash", ["merge-lora", "--base", "m/nope", "--adapter", "ad", "--out", "x"],
             mentions=["'m/nope'", NEITHER, "{tmp}/m/nope"], setup=copies("ad")),
    BadInput("merge-adapter-missing-path-with-a-slash", [*MERGE, "--adapter", "ad/nope"],
             mentions=["Adapter 'ad/nope'", NEITHER, "{tmp}/ad/nope"], setup=copies()),
    # Files that are not what they are named as.
    BadInput("chat-empty-gguf", [*CHAT, "--model", "empty.gguf"],
             mentions=["empty.gguf", "not a valid GGUF file", "it is empty"], files={"empty.gguf": b""}),
    BadInput("chat-gguf-that-is-another-format", [*CHAT, "--model", "fake.gguf"],
             mentions=["fake.gguf", "not a valid GGUF file", "GGUF magic"],
             files={"fake.gguf": b"<html>404 Not Found</html>\n"}),
    BadInput("chat-gguf-cut-short", [*CHAT, "--model", "cut.gguf"],
             mentions=["cut.gguf", "not a valid GGUF file", "cut short"], files={"cut.gguf": CUT_SHORT_GGUF}),
    BadInput("chat-adapter-that-is-a-yaml-file", [*CHAT, "--model", "model", "--adapter", "some_file.yaml"],
             mentions=["Adapter path some_file.yaml is a file, not a folder", "adapter_config.json"],
             files={"some_file.yaml": "lora_rank: 8\n"}, setup=copies()),
    # merge-lora: the same adapter twice, an export inside the adapter, a record that names this very base.
    BadInput("merge-same-adapter-twice", [*MERGE, "--adapter", "ad", "--adapter", "./ad/"],
             mentions=["adapter_name_or_path lists the adapter", "twice", "'ad' and './ad/'"], setup=copies("ad")),
    BadInput("merge-out-inside-the-adapter", ["merge-lora", "--base", "model", "--adapter", "ad", "--out", "ad/merged"],
             mentions=["export_dir ad/merged is inside the adapter ad"], setup=copies("ad")),
    BadInput("merge-adapter-whose-record-names-this-base", [*MERGE, "--adapter", "other-ad"],
             mentions=["other-ad does not fit this base model", "needs a base with hidden size 32",
                       "this one has 64", "names this base ('model')"],
             setup=copies("other-ad", records_base="model")),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_is_one_clear_sentence_and_loses_nothing(case, tmp_path):
    check_bad_input(case, tmp_path)


# ---- the checks behind them, without a process ---------------------------------------------------------------


def test_an_adapter_weights_file_points_to_its_folder(tmp_path):
    adapter = shutil.copytree(ASSETS["ad"], tmp_path / "ad")
    with pytest.raises(FtkitError) as error:
        resolve_adapter_dir(str(adapter / "adapter_model.safetensors"))
    assert str(error.value) == (f"Adapter path {adapter / 'adapter_model.safetensors'} is a file, not a folder; pass "
                                f"its folder {adapter}, which holds adapter_config.json.")


def test_repeated_adapters_are_found_under_any_spelling(tmp_path):
    (tmp_path / "a").mkdir()
    refuse_repeated_adapters(["a", "b"], [tmp_path / "a", tmp_path / "b"])  # different folders are fine
    with pytest.raises(FtkitError, match=r"lists the adapter .* twice \(as 'a'\); it would be applied twice"):
        refuse_repeated_adapters(["a", "a"], [tmp_path / "a", tmp_path / "a"])
    with pytest.raises(FtkitError, match=r"twice \(as 'a' and '.*/x/../a'\)"):
        refuse_repeated_adapters(["a", f"{tmp_path}/x/../a"], [tmp_path / "a", tmp_path / "x" / ".." / "a"])


def test_a_real_gguf_file_passes_the_check():
    from ftkit.models.embedded import embedded_gguf_path

    check_gguf_file(embedded_gguf_path())  # the shipped SmolLM2 GGUF: magic, version 3, readable
