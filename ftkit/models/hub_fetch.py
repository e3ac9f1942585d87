"""Fetching a model or adapter from the Hugging Face hub or ModelScope: cache first when offline, one error.

Hub downloads fetch only what loading needs (the callers pass file patterns, weight formats in order of
preference). When a hub cannot be reached the local cache is used; when the files are not cached the
error says how to get them. ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) skips the network for
both hubs: ModelScope has no offline switch of its own and otherwise retries for many seconds.
Environment variables are read at call time (huggingface_hub reads its own at import time), so
``HF_HUB_CACHE``/``HF_HOME``/``MODELSCOPE_CACHE`` set after start-up still count.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError

TRUE_VALUES = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` asks for no network access."""
    return any(os.environ.get(name, "").strip().lower() in TRUE_VALUES for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


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


def fetch_from_hf(
    repo_id: str, pattern_sets: Sequence[list[str]], *, revision: str, cache_dir: str | None, token: str | None,
    local_name: str | None = None, what: str = "Model",
) -> Path:
    """Download (or find in the cache) ``repo_id``; the pattern sets are tried in order until weights appear.

    ``local_name`` is the name as given when it also reads as a relative path (``org/name``): the error then
    says that no such folder exists either. ``what`` starts the error (Model, Adapter).
    """
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
                f"{what} '{repo_id}' has no revision '{revision}' on the Hugging Face hub; fix model_revision "
                "(a branch, tag or commit)."
            ) from error
        except OSError as error:  # unreachable hub, hub down, private/gated, unknown id: the cache may have it
            online_error = error
    try:
        return fetch(local_only=True)
    except OSError as error:
        folder = f" (there is no folder {Path(local_name).expanduser().absolute()})" if local_name else ""
        if isinstance(online_error, RepositoryNotFoundError):
            raise FtkitError(
                f"{what} '{repo_id}' is neither a local folder{folder} nor a repository on the Hugging Face hub (or "
                "it is private or gated and needs a token); fix the path or the id, or set hf_hub_token (or run "
                "`hf auth login`)."
            ) from online_error
        reason = "HF_HUB_OFFLINE is set" if offline else _short_reason(online_error or error)
        download = f"hf download {repo_id}" + (f" --revision {revision}" if revision != "main" else "")
        cached = "complete in" if type(error).__name__ == "IncompleteSnapshotError" else "in"
        raise FtkitError(
            f"{what} '{repo_id}' is neither a local folder{folder} nor {cached} the local Hugging Face cache, and the "
            f"hub cannot be reached ({reason}); fix the path, or download it first (`{download}`)."
        ) from error


def fetch_from_modelscope(
    repo_id: str, pattern_sets: Sequence[list[str]], *, revision: str, cache_dir: str | None, token: str | None,
    what: str = "Model",
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
            f"{what} 'ms://{repo_id}' is on ModelScope, which needs the modelscope package; install it with "
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
            f"{what} 'ms://{repo_id}' is not in the local ModelScope cache and ModelScope cannot be reached "
            f"({reason}); download it first (`modelscope download --model {repo_id}`) or pass a local directory."
        ) from error


def _short_reason(error: BaseException) -> str:
    """One line saying why a hub call failed (the underlying network error when there is one)."""
    cause = error.__cause__ or error
    text = " ".join(str(cause).split())
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__
