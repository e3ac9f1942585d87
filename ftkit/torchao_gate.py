"""Keep transformers from importing torchao on every model load.

Once torchao is installed (``ftkit quantize`` needs it), transformers imports it whenever a model loads:
``quantizers/auto.py`` imports its torchao quantizer, which imports torchao at module level if it is
available. That import takes seconds (torchao tries its CUDA extensions and registers its kernels), in
every ``ftkit`` command and every test process, for models that have nothing to do with torchao.

ftkit needs torchao only to write torchao checkpoints (``ftkit quantize``) and to read them back. So
``defer_torchao`` (called when ``ftkit`` is imported; it costs nothing until transformers is) makes
transformers see torchao as absent, and ``enable_torchao`` (called by quantize, and by the loader for a
checkpoint whose config names torchao) turns it back on and imports the names transformers' torchao
modules skipped while it was off. Written here because transformers has no switch for it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import json
import sys
from pathlib import Path

_enabled = False
# Names transformers' torchao modules import at module level only when torchao is available.
_LATE_IMPORTS = {
    "transformers.quantizers.quantizer_torchao": {
        "flatten_tensor_state_dict": "torchao.prototype.safetensors.safetensors_support"},
    "transformers.integrations.torchao": {
        "unflatten_tensor_state_dict": "torchao.prototype.safetensors.safetensors_support",
        "is_metadata_torchao": "torchao.prototype.safetensors.safetensors_utils"},
}


def defer_torchao() -> None:
    """Hide torchao from transformers until ``enable_torchao``; costs nothing until transformers is imported.

    The gate goes in as ``transformers.utils.import_utils`` is imported (a meta-path hook), so that
    ``transformers.utils`` and every module importing from it bind the gated check; if transformers is
    already imported, it is patched in place (idempotent)."""
    module = sys.modules.get(_IMPORT_UTILS)
    if module is not None:
        _gate(module)
        import transformers.utils as utils

        utils.is_torchao_available = module.is_torchao_available
    elif not any(isinstance(finder, _GateOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _GateOnImport())


_IMPORT_UTILS = "transformers.utils.import_utils"


def _gate(import_utils) -> None:
    real = import_utils.is_torchao_available
    if getattr(real, "ftkit_gate", False):
        return

    def is_torchao_available(*args, **kwargs) -> bool:
        return _enabled and real(*args, **kwargs)

    is_torchao_available.ftkit_gate = True
    import_utils.is_torchao_available = is_torchao_available


class _GateOnImport(importlib.abc.MetaPathFinder):
    """Patches ``transformers.utils.import_utils`` right after it runs, before anything imports from it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _IMPORT_UTILS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _gate(module)
        spec.loader.exec_module = exec_module
        return spec


def enable_torchao() -> None:
    """Let transformers use torchao (to write or read a torchao checkpoint)."""
    global _enabled
    _enabled = True
    for module_name, names in _LATE_IMPORTS.items():
        module = sys.modules.get(module_name)
        for name, source in (names.items() if module is not None else ()):
            if not hasattr(module, name):
                setattr(module, name, getattr(importlib.import_module(source), name))


def uses_torchao(model_dir: Path) -> bool:
    """True when ``model_dir``'s config.json says its weights are torchao-quantized."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        return (config.get("quantization_config") or {}).get("quant_method") == "torchao"
    except (OSError, ValueError, AttributeError):
        return False
