"""The bad-input catalogue's harness: run the real ``ftkit`` command on a user mistake and check the contract.

Every case in the catalogue (``tests/test_bad_input_*.py``) is a ``BadInput``: the command line, the files
to create first, the exit status, and the words the one-sentence message must contain (the key, file or
value it is about). ``check_bad_input`` runs it in a fresh folder with its own ``FTKIT_HOME`` and asserts:

- the exit status (1 for a user mistake, 2 for a command-line usage error);
- no "Traceback" anywhere in the output;
- the message names each expected word;
- nothing outside ftkit's own files was created or removed: the folder's tree (paths, sizes and
  modification times) is the same after the command, except for files under ``FTKIT_HOME`` (the caches
  ftkit owns) and paths the case lists in ``may_create``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class BadInput:
    """One user mistake: ``args`` (``{tmp}`` is replaced by the case's folder), files to create, expectations."""

    id: str
    args: list[str]
    mentions: list[str]
    exit_code: int = 1
    files: dict[str, str | bytes] = field(default_factory=dict)
    setup: Callable[[Path], None] | None = None  # extra preparation (copy a model, make a folder read-only)
    may_create: list[str] = field(default_factory=list)  # paths (relative to the folder) the command may write

    def __str__(self) -> str:
        return self.id


def tree(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` (except under ``skip``) with its size and modification time."""
    found: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == skip or skip in here.parents:
            dirnames[:] = []
            continue
        for name in [*dirnames, *filenames]:
            path = here / name
            if path == skip:
                continue
            stat = path.lstat()
            found[str(path.relative_to(root))] = (0 if path.is_dir() else stat.st_size,
                                                  0 if path.is_dir() else stat.st_mtime_ns)
    return found


def run_ftkit(args: list[str], cwd: Path, home: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "FTKIT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ftkit.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def check_bad_input(case: BadInput, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``case`` in ``tmp_path`` and assert the bad-input contract; returns the finished process."""
    home = tmp_path / ".ftkit-home"
    home.mkdir()
    embedded = Path(os.environ.get("FTKIT_HOME", Path.home() / ".cache" / "ftkit")).expanduser() / "models"
    if embedded.is_dir():  # the converted embedded model, shared read-only so no case waits on the conversion
        (home / "models").symlink_to(embedded, target_is_directory=True)
    for name, content in case.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    if case.setup is not None:
        case.setup(tmp_path)
    before = tree(tmp_path, home)
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in case.args]
    result = run_ftkit(args, tmp_path, home)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == case.exit_code, f"exit {result.returncode}, expected {case.exit_code}:\n{output}"
    for word in case.mentions:
        assert word.replace("{tmp}", str(tmp_path)) in output, f"message does not name {word!r}:\n{output}"
    after = tree(tmp_path, home)
    allowed = [tmp_path / p for p in case.may_create]

    def is_allowed(relative: str) -> bool:
        path = tmp_path / relative
        return any(path == a or a in path.parents for a in allowed)

    created = sorted(p for p in after.keys() - before.keys() if not is_allowed(p))
    removed = sorted(before.keys() - after.keys())
    changed = sorted(p for p in before.keys() & after.keys() if before[p] != after[p] and not is_allowed(p)
                     and not (tmp_path / p).is_dir())
    assert not created, f"created {created}:\n{output}"
    assert not removed, f"removed {removed}:\n{output}"
    assert not changed, f"changed {changed}:\n{output}"
    return result
