"""Issue 18's bad input for ``ftkit quantize``: each mistake is one sentence, exit 1, and nothing is written.

Every refusal comes before the output folder exists: the config (method, gguf_type, group_size, calibration
samples), the output folder, the method's package and device, the model (an adapter given as the model, an
adapter of another model, a checkpoint stored quantized), the calibration data. A failure while writing
(a full disk) removes the staging folder: never a half-written output.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from bad_input import BadInput, check_bad_input
from conftest import build_tiny_llama
from test_bad_input_paths import save_adapter

from ftkit.errors import FtkitError

ASSETS: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def assets(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("quantize-assets")
    ASSETS["model"] = tiny_llama_dir
    ASSETS["ad"] = save_adapter(tiny_llama_dir, folder / "ad")
    ASSETS["other-ad"] = save_adapter(build_tiny_llama(folder / "other-base", hidden_size=32, vocab_size=1000),
                                      folder / "other-ad")
    quantized = shutil.copytree(tiny_llama_dir, folder / "quantized")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    ASSETS["quantized"] = quantized


def copy_assets(root: Path) -> None:
    for name in ("model", "ad", "other-ad", "quantized"):
        shutil.copytree(ASSETS[name], root / name)


Q = ["quantize", "--model", "model", "--out", "out"]
CASES = [
    BadInput("unknown-method", [*Q, "--method", "int3"],
             ["method 'int3' is not a quantization method", "int8, int8-dynamic, int8-static, int4, bnb-int8"]),
    BadInput("backend-not-installed-or-no-gpu", [*Q, "--method", "gptq"], ["method gptq", "gptqmodel", "CUDA GPU"],
             setup=copy_assets),
    BadInput("int4-needs-cuda-in-torchao", [*Q, "--method", "int4"], ["method int4", "CUDA only", "bnb-nf4"],
             setup=copy_assets),
    BadInput("unknown-gguf-type", [*Q, "--method", "gguf", "--gguf-type", "q4_k"],
             ["gguf_type 'q4_k'", "f16, bf16, q8_0, q4_0"]),
    BadInput("group-size-for-static-int8", [*Q, "--method", "int8-static", "--group-size", "32"],
             ["group_size applies to int4, gptq, awq", "int8-static"]),
    BadInput("too-few-calibration-samples", [*Q, "--method", "int8-static", "calibration_samples=8"],
             ["calibration_samples 8 is too few", "at least 32"]),
    BadInput("calibration-data-smaller-than-asked", [*Q, "--method", "int8-static", "calibration_samples=64",
                                                     "calibration_dataset=cal.txt"],
             ["calibration_dataset cal.txt has 40 samples", "calibration_samples is 64"],
             files={"cal.txt": "".join(f"Sample sentence number {i}.\n" for i in range(40))}, setup=copy_assets),
    BadInput("output-exists", [*Q, "--method", "int8"], ["export_dir out already exists", "overwrite: true"],
             files={"out/keep.txt": "mine"}, setup=copy_assets),
    BadInput("already-quantized-model", ["quantize", "--model", "quantized", "--out", "out", "--method", "int8"],
             ["quantized is already quantized", "bitsandbytes", "original full-precision model"], setup=copy_assets),
    BadInput("adapter-as-model", ["quantize", "--model", "ad", "--out", "out", "--method", "gguf"],
             ["ad is a LoRA adapter", "adapter_name_or_path"], setup=copy_assets),
    BadInput("adapter-of-another-model", [*Q, "--method", "gguf", "--adapter", "other-ad"],
             ["Adapter other-ad does not fit this base model"], setup=copy_assets),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_is_one_clear_sentence_and_writes_nothing(case, tmp_path):
    check_bad_input(case, tmp_path)


def test_missing_package_names_it(monkeypatch):
    import importlib.util

    from ftkit.quantize import methods

    real = importlib.util.find_spec
    monkeypatch.setattr(methods.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(FtkitError) as error:
        methods.check_method_available("int8", torch.device("cpu"))
    assert str(error.value) == ("method int8 needs the torchao package, which is not installed; install it with "
                                "`pip install torchao` or pick another method.")


def test_group_size_must_divide_every_quantized_width(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from ftkit.quantize.methods import check_group_size

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)  # widths 64 (attention, up/gate) and 128 (down)
    check_group_size(model, 64, ["lm_head"])
    with pytest.raises(FtkitError) as error:
        check_group_size(model, 48, ["lm_head"])
    assert str(error.value).startswith("group_size 48 does not divide the input width 64 of model.layers.0.self_attn")


def test_full_disk_while_writing_leaves_no_output(tiny_llama_dir, tmp_path, monkeypatch):
    from ftkit.config import QuantizeConfig, load_stage_config
    from ftkit.quantize import gguf_file, run_quantize

    def write_half_then_fail(model, tokenizer, path, gguf_type, **kwargs):
        path.write_bytes(b"GGUF" + b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf_file, "write_gguf", write_half_then_fail)
    out = tmp_path / "out"
    config = load_stage_config(QuantizeConfig, None, {"model_name_or_path": str(tiny_llama_dir), "method": "gguf",
                                                      "export_dir": str(out), "report": False}).config
    with pytest.raises(FtkitError) as error:
        run_quantize(config)
    assert "filled up while the export was written; the partial export was removed" in str(error.value)
    assert list(tmp_path.iterdir()) == []  # neither out/ nor a staging folder
