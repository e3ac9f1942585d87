"""Where ftkit keeps what it computes once and reuses: converted models, tokenised datasets, replay sets.

``FTKIT_HOME`` (default ``~/.cache/ftkit``) is the root; every writer below it writes atomically.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def ftkit_home() -> Path:
    """The root of ftkit's cache (``$FTKIT_HOME`` or ``~/.cache/ftkit``)."""
    return Path(os.environ.get("FTKIT_HOME", Path.home() / ".cache" / "ftkit")).expanduser()


def package_resource(*parts: str) -> Path:
    """A file shipped inside the ftkit package (``ftkit/resources/...``)."""
    return Path(__file__).parent.joinpath("resources", *parts)


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory and rename it to ``final`` only if the block succeeds.

    A crash or an exception leaves no directory at ``final`` that looks complete. ``final`` must not
    exist (callers decide whether to replace an old one).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str, *, create_parent: bool = True) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (creating its folder unless told not to:
    then a missing folder is a FileNotFoundError)."""
    path = Path(path)
    if create_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
