"""``ftkit estimate``: the memory a training config needs on each device, for every method and strategy,
read from the model's config.json alone (the model is built on the meta device: shapes, no weights).

The four methods are judged with the functions that decide what trains at load time (``find_lora_targets``,
``apply_freeze``), so the trainable counts are the run's own; the bytes come from ``ftkit.models.memory``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ftkit.errors import FtkitError
from ftkit.models.memory import (
    FITS_SHARE,
    GB,
    OPTIMIZER_BYTES,
    STRATEGIES,
    STRATEGY_NAMES,
    DeviceMemory,
    ModelShape,
    plan,
    shape_of,
)

METHODS = ("full", "freeze", "lora", "qlora")
console = Console(highlight=False)


@dataclass
class Estimate:
    model: str
    parameters: int
    devices: int
    nodes: int
    tokens_per_batch: int
    device_type: str
    gpu_memory_gb: float | None
    shapes: dict[str, ModelShape]
    plans: dict[str, list[DeviceMemory]]

    def fits(self, memory: DeviceMemory, *, checkpointing: bool = True) -> bool | None:
        if self.gpu_memory_gb is None:
            return None
        total = memory.total if checkpointing else memory.total_without_checkpointing
        return total <= FITS_SHARE * self.gpu_memory_gb * GB

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "parameters": self.parameters, "devices": self.devices, "nodes": self.nodes,
                "tokens_per_batch": self.tokens_per_batch, "device_type": self.device_type,
                "gpu_memory_gb": self.gpu_memory_gb,
                "methods": {method: {"trainable": self.shapes[method].trainable,
                                     "plans": [{**{k: v for k, v in asdict(m).items() if k != "notes"},
                                                "total": m.total,
                                                "total_without_checkpointing": m.total_without_checkpointing,
                                                "fits": self.fits(m),
                                                "fits_without_checkpointing": self.fits(m, checkpointing=False)}
                                               for m in plans]}
                            for method, plans in self.plans.items()}}


def config_dir_for(config: Any) -> Path:
    """The folder holding the model's config.json: the embedded model, a local folder, or the hub cache (the
    config alone is downloaded when the cache lacks it)."""
    from ftkit.models.embedded import EMBEDDED_ALIAS, ensure_embedded_model
    from ftkit.models.structure import CONFIG_FILE, local_config_dir

    name = config.model_name_or_path.strip()
    if name.lower() == EMBEDDED_ALIAS:
        return ensure_embedded_model()
    found = local_config_dir(config)
    if found is not None:
        return found
    path = Path(name).expanduser()
    if path.suffix == ".gguf" or path.exists():
        raise FtkitError(f"ftkit estimate reads the model's config.json, and model_name_or_path {name} has none; "
                         "point it at the original model's folder or hub id.")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(name, CONFIG_FILE, revision=config.model_revision,
                                    cache_dir=config.cache_dir)).parent
    except Exception as error:  # noqa: BLE001 - offline, unknown repo, gated: one sentence, no traceback
        raise FtkitError(f"ftkit estimate could not read config.json of model_name_or_path {name}: "
                         f"{type(error).__name__}. Give a local folder holding config.json, or a hub id "
                         "reachable from here.") from None


def config_method(config: Any) -> str:
    """The method this config trains with (``lora`` on a quantized base is ``qlora``)."""
    return "qlora" if config.uses_lora and config.quantization_bits else config.finetuning_type


def method_shapes(model: Any, config: Any) -> dict[str, ModelShape]:
    """Parameter counts of ``model`` (on the meta device) trained each way, with this config's keys."""
    from ftkit.models.adapters import apply_freeze, find_lora_targets

    sizes = shape_of(model)
    total = sum(p.numel() for p in model.parameters())
    shapes = {"full": ModelShape(parameters=total, trainable=total, **sizes)}

    method = config_method(config)
    try:
        apply_freeze(model, trainable_layers=config.freeze_trainable_layers,
                     trainable_modules=config.freeze_trainable_modules, extra_modules=config.freeze_extra_modules)
        shapes["freeze"] = ModelShape(parameters=total, trainable=sum(p.numel() for p in model.parameters()
                                                                      if p.requires_grad), **sizes)
    except FtkitError:
        if method == "freeze":
            raise
    for parameter in model.parameters():
        parameter.requires_grad_(True)

    saved = list(config.additional_target or [])
    try:
        targets = set(find_lora_targets(model, config.lora_target, modules_to_save=saved))
    except FtkitError:
        if method in ("lora", "qlora"):
            raise
        return shapes  # this config's lora_target names modules the model lacks: the LoRA plans are left out
    head = model.get_output_embeddings()
    lora = copies = quantizable = 0
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if hasattr(module, "in_features") and hasattr(module, "out_features"):
            if module is not head:
                quantizable += module.weight.numel()
            if last in targets:
                lora += config.lora_rank * (module.in_features + module.out_features)
        if last in saved:
            copies += sum(p.numel() for p in module.parameters())
    trainable = lora + copies
    shapes["lora"] = ModelShape(parameters=total + trainable, trainable=trainable, **sizes)
    shapes["qlora"] = ModelShape(parameters=total + trainable, trainable=trainable, quantized=quantizable,
                                 bits=config.quantization_bits or 4, double_quantization=config.double_quantization,
                                 **sizes)
    return shapes


def estimate(config: Any, *, gpus: int = 1, nodes: int = 1, gpu_memory_gb: float | None = None,
             cpu: bool = False) -> Estimate:
    """The per-device plan of every method and strategy for ``config`` on ``gpus`` x ``nodes`` devices."""
    from ftkit.models.structure import empty_model

    folder = config_dir_for(config)
    model = empty_model(folder)
    if model is None:
        raise FtkitError(f"transformers cannot build model_name_or_path {config.model_name_or_path} from its "
                         f"config.json ({folder}) without running the model's own code; ftkit estimate does not "
                         "run remote code.")
    shapes = method_shapes(model, config)
    devices = gpus * nodes
    tokens = config.per_device_train_batch_size * config.cutoff_len
    device_type = "cpu" if cpu else "cuda"
    bytes_per_value = 2 if _mixed_precision(config, cpu) else 4
    shapes = {method: replace(shape, weight_bytes=bytes_per_value) for method, shape in shapes.items()}
    plans = {method: [plan(shape, strategy, devices=devices, nodes=nodes, tokens_per_batch=tokens,
                           device_type=device_type, bytes_per_value=bytes_per_value) for strategy in STRATEGIES]
             for method, shape in shapes.items()}
    return Estimate(config.model_name_or_path, shapes["full"].parameters, devices, nodes, tokens, device_type,
                    gpu_memory_gb, shapes, plans)


def _mixed_precision(config: Any, cpu: bool) -> bool:
    """Whether the run trains in bf16/fp16: ``bf16: auto`` does on GPUs (Ampere and newer are assumed) and on
    CPUs with native bf16 instructions (this machine's, for a --cpu plan); elsewhere it trains in fp32."""
    if config.fp16 or config.bf16 is True:
        return True
    if config.bf16 is False:
        return False
    from ftkit.models.precision import cpu_has_fast_bf16

    return cpu_has_fast_bf16() if cpu else True


def _gb(value: float) -> str:
    return f"{value / GB:.2f}"


def _fit_cell(result: Estimate, memory: DeviceMemory) -> str:
    fits = result.fits(memory)
    if fits is None:
        return ""
    if result.fits(memory, checkpointing=False):
        return "[green]yes[/]"
    return "[yellow]with checkpointing[/]" if fits else "[red]no[/]"


def recommendation(result: Estimate, method: str) -> str | None:
    """The fastest strategy that fits for ``method``: less sharding first, checkpointing only if needed."""
    if result.gpu_memory_gb is None:
        return None
    for memory in result.plans[method]:
        for checkpointing in (False, True):
            if result.fits(memory, checkpointing=checkpointing):
                return (f"{STRATEGY_NAMES[memory.strategy]}{_config_keys(memory.strategy, result.devices)}, "
                        f"gradient checkpointing {'on' if checkpointing else 'off'}")
    return None


def _config_keys(strategy: str, devices: int) -> str:
    """The training-config keys that run ``strategy`` (ftkit's shipped DeepSpeed configs; ZeRO-2 for ZeRO-1)."""
    if strategy == "none":
        return f" (nproc_per_node: {devices}, data parallel)" if devices > 1 else ""
    shipped = {"zero1": "ds_z2", "zero2": "ds_z2", "zero2_offload": "ds_z2_offload", "zero3": "ds_z3",
               "zero3_offload": "ds_z3_offload"}[strategy]
    return f" (deepspeed: {shipped}" + (" or fsdp: full_shard)" if strategy == "zero3" else ")")


def print_estimate(result: Estimate, config_method: str) -> None:
    per_node = result.devices // result.nodes
    unit = ("CPU process" if result.device_type == "cpu" else "GPU") + ("" if per_node == 1 else
                                                                      "es" if result.device_type == "cpu" else "s")
    where = f"{result.nodes} node{'s' if result.nodes > 1 else ''} x {per_node} {unit}"
    memory = f", {result.gpu_memory_gb:g} GB each" if result.gpu_memory_gb else ""
    console.print(f"[bold]ftkit estimate[/]: {escape(result.model)}, {result.parameters / 1e6:,.1f}M parameters; "
                  f"{where}{memory}; micro-batches of {result.tokens_per_batch:,} tokens "
                  "(per_device_train_batch_size x cutoff_len). GB = 10^9 bytes.")
    for method in (m for m in METHODS if m in result.shapes):
        shape = result.shapes[method]
        table = Table(title=f"{method}{' (this config)' if method == config_method else ''}: "
                            f"{shape.trainable / 1e6:,.2f}M trainable", title_justify="left")
        for column in ("GB per device", "weights", "grads", "optim", "activ", "other", "total", "no ckpt",
                       "CPU/node"):
            table.add_column(column, justify="left" if column.startswith("GB") else "right")
        if result.gpu_memory_gb:
            table.add_column("fits")
        for plan_ in result.plans[method]:
            row = [STRATEGY_NAMES[plan_.strategy], _gb(plan_.weights), _gb(plan_.gradients), _gb(plan_.optimizer),
                   _gb(plan_.activations), _gb(plan_.logits + plan_.runtime), f"[bold]{_gb(plan_.total)}[/]",
                   _gb(plan_.total_without_checkpointing),
                   _gb(plan_.cpu_offload_per_node) if plan_.cpu_offload_per_node else "-"]
            if result.gpu_memory_gb:
                row.append(_fit_cell(result, plan_))
            table.add_row(*row)
        console.print(table)
    console.print("[dim]activ: activations with gradient checkpointing; other: logits (computed in chunks) and the "
                  "runtime (CUDA context or a CPU process's libraries); no ckpt: the total without checkpointing.[/]")
    full = result.shapes["full"].trainable
    mixed = result.shapes["full"].mixed_precision
    per = OPTIMIZER_BYTES if mixed else OPTIMIZER_BYTES - 4
    states = per * full
    what = "fp32 master weights, momentum, variance" if mixed else "momentum and variance; fp32 training keeps no master copy"
    console.print(f"Adam states of a full fine-tune: {per} bytes ({what}) x {full:,} parameters = {_gb(states)} GB "
                  f"unsharded; ZeRO-1/2/3 split them over "
                  f"{result.devices} device{'s' if result.devices > 1 else ''}: {_gb(states)} / {result.devices} = "
                  f"{_gb(states / result.devices)} GB each.")
    advice = recommendation(result, config_method)
    if result.gpu_memory_gb:
        console.print(f"For {config_method}: " + (advice or "nothing fits; add devices or nodes, use qlora, or "
                                                  "lower per_device_train_batch_size / cutoff_len") + ".")
    console.print("[dim]Model states follow DeepSpeed's accounting of mixed-precision Adam; activations Korthikanti "
                  f"et al. (2022); 'fits' leaves {100 - FITS_SHARE * 100:.0f}% of the device free.[/]")


def run_estimate(config: Any, *, gpus: int = 1, nodes: int = 1, gpu_memory_gb: float | None = None,
                 cpu: bool = False, as_json: bool = False) -> Estimate:
    result = estimate(config, gpus=gpus, nodes=nodes, gpu_memory_gb=gpu_memory_gb, cpu=cpu)
    if as_json:
        print(json.dumps(result.as_dict(), indent=1))
    else:
        print_estimate(result, config_method(config))
    return result
