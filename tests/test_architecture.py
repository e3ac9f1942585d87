"""The architecture rules hold, and breaking one fails with the rule's name.

The rules are import-linter contracts in pyproject.toml (``make lint`` and ``make test`` run
``lint-imports``): stages never import each other; data and models never import a stage, the guard or
the CLI; config never imports torch or transformers. The second test makes a scratch copy of the package
with one forbidden import and checks that ``lint-imports`` then fails, naming the broken contract.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (pip install -e .[dev])")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
                          capture_output=True, text=True, cwd=root, env=env, timeout=120)


def scratch_copy(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "ftkit", tmp_path / "ftkit", ignore=shutil.ignore_patterns("__pycache__", "resources"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_package_keeps_every_import_rule():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "forbidden", "contract"), [
    ("data/encoding.py", "import ftkit.train", "data and models never import a stage"),
    ("merge/checks.py", "import ftkit.train.checkpoints", "Stages never import each other"),
    ("config/loading.py", "import torch", "config imports no torch"),
])
def test_a_forbidden_import_fails_with_the_rules_name(tmp_path, module, forbidden, contract):
    root = scratch_copy(tmp_path)
    path = root / "ftkit" / module
    path.write_text(path.read_text(encoding="utf-8") + f"\n{forbidden}  # a deliberate break\n", encoding="utf-8")
    result = lint_imports(root)
    assert result.returncode != 0
    assert f"{contract}" in result.stdout and "BROKEN" in result.stdout, result.stdout
