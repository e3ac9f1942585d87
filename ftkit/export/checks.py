"""What an export refuses before and while it is written, each in one sentence, as early as it can be known.

Before any model is loaded: an export_dir that is a file, sits under a file, is not empty (without
``overwrite``), or is, holds or sits inside an input. Once the model is loaded (sizes known): an
``export_size`` that would write one shard per tensor, and a disk without room. Used by ``ftkit
merge-lora`` and (next) ``ftkit quantize``.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ftkit.errors import FtkitError

GB = 10**9
"""export_size is in decimal gigabytes, as transformers' ``max_shard_size="5GB"`` is."""


def check_export_dir(export_dir: Path, *, overwrite: bool) -> None:
    """Refuse a file, or an existing non-empty directory unless ``overwrite`` is set."""
    if export_dir.is_file():
        raise FtkitError(f"export_dir {export_dir} is a file; choose a directory path for the export.")
    blocking = next((parent for parent in export_dir.parents if parent.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise FtkitError(f"export_dir {export_dir} cannot be created: {blocking} is a file; choose a directory path "
                         "for the export.")
    if export_dir.is_dir() and any(export_dir.iterdir()) and not overwrite:
        raise FtkitError(f"export_dir {export_dir} already exists and is not empty; choose a new directory or set "
                         "overwrite: true to replace it.")


def check_export_dir_is_not_an_input(export_dir: Path, inputs: Iterable[tuple[str, Path]]) -> None:
    """Writing over (or around) the base or an adapter would destroy what is being merged, and writing inside one
    would mix the export's files into it (an adapter folder holding a full model is taken for a model)."""
    target = export_dir.expanduser().resolve()
    for role, path in inputs:
        source = path.expanduser().resolve()
        if target == source or target in source.parents:
            raise FtkitError(f"export_dir {export_dir} is (or contains) the {role} {path}; write the export to "
                             "another directory.")
        if source in target.parents:
            raise FtkitError(f"export_dir {export_dir} is inside the {role} {path}, which the export's files would "
                             "be mixed into; write the export to a directory outside it.")


def check_shard_plan(model: nn.Module, dtype: torch.dtype, export_size_gb: float) -> int:
    """Refuse an export_size so small that the tensors land about one per shard; return the shard count.

    Mirrors ``huggingface_hub.split_torch_state_dict_into_shards`` (tensors in state-dict order, a new
    shard when the next tensor would not fit, oversized tensors alone), which save_pretrained uses.
    """
    sizes = tensor_sizes(model, dtype)
    limit = export_size_gb * GB
    shards, current = 0, 0
    for _, size in sizes:
        if size > limit:
            shards += 1
            continue
        if current and current + size > limit:
            shards, current = shards + 1, 0
        current += size
    shards += 1 if current else 0
    if len(sizes) > 1 and shards > len(sizes) / 2:
        name, largest = max(sizes, key=lambda item: item[1])
        suggestion = _round_up(2 * largest / GB)  # then any two neighbouring tensors fit in one shard
        raise FtkitError(f"export_size {export_size_gb:g} GB would split the {len(sizes)} tensors into {shards} shards, "
                         f"about one per tensor (the largest, {name}, is {largest / GB:.3g} GB); set export_size to at "
                         f"least {suggestion:g} (GB), or keep the default 5.")
    return shards


def check_free_space(directory: Path, needed_bytes: int) -> None:
    """Refuse before writing when the export's filesystem cannot hold it (5% + 50 MB slack)."""
    free = shutil.disk_usage(directory).free
    if free < needed_bytes * 1.05 + 50 * 10**6:
        raise FtkitError(f"The filesystem of {directory.parent} has {free / GB:.2f} GB free but the export needs about "
                         f"{needed_bytes / GB:.2f} GB; free some space or choose another export_dir.")


def tensor_sizes(model: nn.Module, dtype: torch.dtype) -> list[tuple[str, int]]:
    """(name, bytes in ``dtype``) of each distinct floating tensor in state-dict order (tied ones once)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    sizes: list[tuple[str, int]] = []
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        itemsize = dtype.itemsize if tensor.is_floating_point() else tensor.element_size()
        sizes.append((name, tensor.numel() * itemsize))
    return sizes


def _round_up(value: float) -> float:
    """Round up to two significant digits (0.01234 -> 0.013)."""
    if value <= 0:
        return value
    exponent = math.floor(math.log10(value)) - 1
    return math.ceil(value / 10**exponent) * 10**exponent
