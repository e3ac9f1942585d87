"""Multi-LoRA: requests for different adapters of one base model in the same batch.

In the spirit of S-LoRA/Punica: the base weights are shared and never merged; every targeted linear layer
is wrapped once (``BatchedLoRALinear``) and, each step, adds to the base output the low-rank update of
each adapter present, computed only on the rows (tokens) of that adapter's requests: gather the rows,
``x @ A^T @ B^T * scale``, scatter-add them back. A step without adapter rows costs one Python check per
layer. Up to ``max_loras`` adapters are resident; loading one more evicts the least recently used adapter
that no unfinished request needs.

Written here because peft applies one active adapter to a whole batch (its mixed-batch ``adapter_names``
path runs every adapter over a separate sub-batch and cannot follow our flattened, paged step), and a
merged copy of the base per adapter would multiply the weights in memory.

Only LoRA on linear layers is served (AdaLoRA too: its singular values fold into A at load; no DoRA, no
embedding LoRA, no ``modules_to_save``); anything else is refused with a sentence when the adapter is loaded.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftkit.errors import FtkitError


@dataclass
class _LoRAWeights:
    down: torch.Tensor  # lora_A: [rank, in]
    up: torch.Tensor  # lora_B: [out, rank]
    scale: float


class BatchedLoRALinear(nn.Module):
    """A base linear layer plus the per-row update of every adapter in the current step."""

    def __init__(self, base: nn.Module, registry: MultiLoRA) -> None:
        super().__init__()
        self.base = base
        self._registry = registry
        self.adapters: dict[str, _LoRAWeights] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        groups = self._registry.step_groups
        if not groups or not self.adapters:
            return out
        flat_in, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        for name, rows in groups:
            weights = self.adapters.get(name)
            if weights is not None:
                update = (flat_in.index_select(0, rows) @ weights.down.T) @ weights.up.T
                flat_out.index_add_(0, rows, update * weights.scale)
        return out


class MultiLoRA:
    """The resident adapters of one base model and the wrapped layers they live in."""

    def __init__(self, model: nn.Module, *, max_loras: int) -> None:
        self.model = model
        self.max_loras = max_loras
        self.step_groups: list[tuple[str, torch.Tensor]] = []
        self._last_used: dict[str, float] = {}
        self._layers: dict[str, BatchedLoRALinear] = {}
        self._ever_loaded: set[str] = set()

    @property
    def names(self) -> list[str]:
        return sorted(self._last_used)

    def __contains__(self, name: object) -> bool:
        return name in self._last_used

    def load(self, name: str, adapter_dir: Path, *, in_use: set[str]) -> bool:
        """Load ``adapter_dir`` as ``name`` (replacing an adapter of that name). True when ``name`` was loaded
        before (now or earlier): the prefix cache may then hold K/V computed with other weights."""
        from ftkit.models import check_adapter_matches

        check_adapter_matches(self.model, adapter_dir)
        weights = _read_lora_weights(adapter_dir)
        replaced = name in self._last_used
        if not replaced and len(self._last_used) >= self.max_loras:
            self._evict_one(in_use, name)
        if replaced:
            self.unload(name)
        parameter = next(self.model.parameters())
        modules = dict(self.model.named_modules())
        for module_name, (down, up, scale) in weights.items():
            layer = self._layers.get(module_name) or self._wrap(module_name, modules)
            layer.adapters[name] = _LoRAWeights(down.to(parameter.device, parameter.dtype),
                                                up.to(parameter.device, parameter.dtype), scale)
        self._last_used[name] = time.monotonic()
        seen_before = name in self._ever_loaded
        self._ever_loaded.add(name)
        return seen_before

    def unload(self, name: str) -> None:
        for layer in self._layers.values():
            layer.adapters.pop(name, None)
        self._last_used.pop(name, None)

    def _evict_one(self, in_use: set[str], wanted: str) -> None:
        idle = [n for n in self._last_used if n not in in_use]
        if not idle:
            raise FtkitError(f"Cannot load adapter {wanted!r}: all max_loras={self.max_loras} resident adapters "
                             "are serving requests; raise max_loras or load it when one is idle.")
        self.unload(min(idle, key=self._last_used.__getitem__))

    def _wrap(self, module_name: str, modules: dict[str, nn.Module]) -> BatchedLoRALinear:
        base = modules.get(module_name)
        if not isinstance(base, nn.Linear):
            raise FtkitError(f"The adapter targets {module_name!r}, which is not a linear layer of this model; "
                             "only LoRA on linear layers can be served side by side (merge it instead).")
        parent_name, _, child = module_name.rpartition(".")
        wrapper = BatchedLoRALinear(base, self)
        setattr(modules[parent_name] if parent_name else self.model, child, wrapper)
        self._layers[module_name] = wrapper
        return wrapper

    def begin_step(self, token_adapters: list[str | None], device: torch.device) -> None:
        """Group the step's rows by adapter (rows of base-model requests need no update)."""
        rows: dict[str, list[int]] = {}
        for index, name in enumerate(token_adapters):
            if name is not None:
                rows.setdefault(name, []).append(index)
        now = time.monotonic()
        for name in rows:
            self._last_used[name] = now
        self.step_groups = [(name, torch.tensor(r, device=device)) for name, r in rows.items()]

    def end_step(self) -> None:
        self.step_groups = []


def _read_lora_weights(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module name -> (lora_A, lora_B, scale) from a peft adapter directory."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("use_dora"):
        raise FtkitError(f"Adapter {adapter_dir} is a DoRA adapter; the engine serves plain LoRA side by side only "
                         "(merge it with ftkit merge-lora instead).")
    if config.get("modules_to_save"):
        raise FtkitError(f"Adapter {adapter_dir} also trains {config['modules_to_save']} in full; the engine serves "
                         "plain LoRA side by side only (merge it with ftkit merge-lora instead).")
    tensors = _load_tensors(adapter_dir)
    alpha = config.get("lora_alpha", 8)
    adalora = config.get("peft_type") == "ADALORA"
    if adalora:
        from ftkit.models import adapter_key_with_marker_dot

        tensors = {adapter_key_with_marker_dot(key): value for key, value in tensors.items()}
    result: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for key, down in tensors.items():
        if ".lora_B." in key or (adalora and ".lora_E." in key):
            continue
        if ".lora_A." not in key:
            raise FtkitError(f"Adapter {adapter_dir} holds {key}, which is not a LoRA weight of a linear layer; "
                             "merge it with ftkit merge-lora instead.")
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        up = tensors[key.replace(".lora_A.", ".lora_B.")]
        if adalora:
            # peft's SVDLinear adds x (A*E)^T B^T alpha / (init_r + 1e-5): the singular values fold into A, and the
            # divisor stays the initial rank after pruning (peft keeps ranknum when it resizes to the rank pattern).
            if down.shape[0] == 0:
                continue  # every rank of this module was pruned
            init_r = config.get("init_r", 12)
            scale = (alpha if alpha > 0 else init_r) / (init_r + 1e-5)
            result[module] = ((down * tensors[key.replace(".lora_A.", ".lora_E.")]).float(), up.float(), scale)
            continue
        module_rank = config.get("rank_pattern", {}).get(module.rsplit(".", 1)[-1], down.shape[0])
        module_alpha = config.get("alpha_pattern", {}).get(module.rsplit(".", 1)[-1], alpha)
        scale = module_alpha / (math.sqrt(module_rank) if config.get("use_rslora") else module_rank)
        result[module] = (down.float(), up.float(), scale)
    if not result:
        raise FtkitError(f"Adapter {adapter_dir} holds no LoRA weights (lora_A/lora_B); is it a LoRA adapter?")
    return result


def _load_tensors(adapter_dir: Path) -> dict[str, Any]:
    safetensors_file = adapter_dir / "adapter_model.safetensors"
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors_file))
    return torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
