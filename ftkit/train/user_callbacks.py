"""The user's own ``transformers.TrainerCallback`` classes named in the config (``callbacks:``).

Each entry is ``package.module:ClassName``. They are imported and created before the model loads, so a
typo costs seconds, not a model load; the current directory is importable, as it is for ``python -m``.
"""

from __future__ import annotations

import importlib
import os
import sys

from transformers import TrainerCallback

from ftkit.errors import FtkitError


def load_user_callbacks(entries: list[str]) -> list[TrainerCallback]:
    """One instance of each class in ``entries`` (created without arguments), in order."""
    if entries and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return [_load(entry) for entry in entries]


def _load(entry: str) -> TrainerCallback:
    module_name, _, class_name = entry.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise FtkitError(f"callbacks entry {entry}: no module named {error.name}; install the package or run "
                             "ftkit from the folder that holds it.") from None
        raise FtkitError(f"callbacks entry {entry}: importing {module_name} failed: {error}.") from None
    except Exception as error:  # the user's module raised while importing
        raise FtkitError(f"callbacks entry {entry}: importing {module_name} failed: "
                         f"{type(error).__name__}: {error}.") from None
    found = getattr(module, class_name, None)
    if found is None:
        raise FtkitError(f"callbacks entry {entry}: module {module_name} has no {class_name}; check the class "
                         "name after the colon.")
    if not (isinstance(found, type) and issubclass(found, TrainerCallback)):
        raise FtkitError(f"callbacks entry {entry}: {class_name} is not a transformers.TrainerCallback subclass; "
                         "derive it from TrainerCallback.")
    try:
        return found()
    except Exception as error:
        raise FtkitError(f"callbacks entry {entry}: {class_name}() failed: {type(error).__name__}: {error} "
                         "(ftkit creates each callback without arguments).") from None
