"""transformers imports torchao on every model load once it is installed (seconds each time); ftkit keeps it
out until a torchao checkpoint is written or read. Checked in a fresh interpreter, since this test process
may have imported torchao already."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("torchao")


def test_loading_and_training_imports_no_torchao_until_a_torchao_checkpoint_is_loaded(tiny_llama_dir):
    script = f"""
import sys
import ftkit.train.trainer  # transformers' Trainer imports its torchao quantizer
import torch
from ftkit.models import load_for_inference
load_for_inference({str(tiny_llama_dir)!r}, dtype=torch.float32, device=torch.device("cpu"))
print("torchao" in sys.modules)
import transformers.utils
from ftkit.torchao_gate import enable_torchao
enable_torchao()
print(transformers.utils.is_torchao_available())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]
