"""Write an export so that a reader never sees half of one: a hidden staging folder, checked, then renamed.

``staged_export(export_dir)`` yields a hidden sibling folder to write into. If the block succeeds, an
existing export_dir (empty, or replaced with ``overwrite``) is moved aside, the staging folder is renamed
into place and only then is the old one deleted; if anything fails, the staging folder is removed and the
old export put back. A full disk or a refused write becomes one sentence. ``save_export`` writes weights
(safetensors shards + index), config, generation config, tokenizer and chat template.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError
from ftkit.export.checks import GB
from ftkit.paths import atomic_directory

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def staged_export(export_dir: Path) -> Iterator[Path]:
    """Yield a staging folder that replaces ``export_dir`` when the block succeeds (see the module docstring)."""
    replaced: Path | None = None
    try:
        with contextlib.ExitStack() as stack:  # leaving it renames the staging directory to export_dir
            staging = _open_staging(stack, export_dir)
            yield staging
            if export_dir.exists():  # moved aside only once the new export is complete and checked
                replaced = export_dir.with_name(f".{export_dir.name}.replaced-{os.getpid()}")
                os.replace(export_dir, replaced)
    except OSError as error:
        _restore(replaced, export_dir)
        raise _write_error(error, export_dir) from None
    except BaseException:
        _restore(replaced, export_dir)
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def save_export(model: Any, tokenizer: Any, directory: Path, export_size_gb: float) -> None:
    """Weights (safetensors shards + index), config.json, generation_config.json, tokenizer and chat template."""
    model.save_pretrained(directory, max_shard_size=int(export_size_gb * GB))
    tokenizer.save_pretrained(directory)


def release_freed_memory() -> None:
    """Collect a freed model and hand the allocator's free pages back to the OS (glibc keeps them otherwise,
    and a model loaded next would count on top of them)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _open_staging(stack: contextlib.ExitStack, export_dir: Path) -> Path:
    try:
        return stack.enter_context(atomic_directory(export_dir))
    except OSError as error:
        raise FtkitError(f"Cannot write the export next to {export_dir} ({error.strerror or error}); choose a "
                         "writable export_dir.") from None


def _restore(replaced: Path | None, export_dir: Path) -> None:
    """Put the previous export back if the new one never made it into place."""
    if replaced is not None and replaced.exists() and not export_dir.exists():
        os.replace(replaced, export_dir)


def _write_error(error: OSError, export_dir: Path) -> Exception:
    """A full disk or a refused write while exporting becomes one sentence; anything else stays as it is."""
    if error.errno in _DISK_FULL:
        return FtkitError(f"The disk holding {export_dir.parent} filled up while the export was written; the partial "
                          "export was removed: free some space or choose another export_dir.")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return FtkitError(f"Cannot write the export into {export_dir.parent} ({error.strerror}); the partial export "
                          "was removed: choose a writable export_dir.")
    return error
