"""The training-time half of the LoRA variants: AdaLoRA's per-step rank reallocation and orthogonality
penalty, LoRA+'s optimizer, and PiSSA's conversion back to a plain LoRA on save.

Written here rather than left to peft's own hooks because ftkit's loss (``ftkit.train.loss``) calls the
decoder and head directly: peft adds AdaLoRA's penalty inside ``AdaLoraModel.forward``, which that path
never runs, so ``adalora_orthogonal_penalty`` computes the same term. The adapters themselves are
created in ``ftkit.models.adapters``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ftkit.run_files import ADALORA_STATE_FILE


def adalora_model(model: torch.nn.Module) -> Any | None:
    """The peft ``AdaLoraModel`` inside ``model`` (a PeftModel), or None when it is not an AdaLoRA."""
    tuner = getattr(model, "base_model", None)
    return tuner if type(tuner).__name__ == "AdaLoraModel" else None


def adalora_orthogonal_penalty(model: torch.nn.Module) -> torch.Tensor | None:
    """``orth_reg_weight`` x the mean Frobenius distance of A A^T and B^T B from the identity (peft's term),
    or None when ``model`` is not an AdaLoRA or the weight is 0."""
    tuner = adalora_model(model)
    if tuner is None:
        return None
    name = tuner.trainable_adapter_name
    weight = tuner.peft_config[name].orth_reg_weight
    if not weight:
        return None
    total, count = None, 0
    for param_name, param in tuner.model.named_parameters():
        if ("lora_A" in param_name or "lora_B" in param_name) and name in param_name:
            covariance = param @ param.T if "lora_A" in param_name else param.T @ param
            identity = torch.eye(*covariance.shape, device=covariance.device, dtype=covariance.dtype)
            term = torch.linalg.matrix_norm(covariance - identity, ord="fro")
            total = term if total is None else total + term
            count += 1
    return None if total is None else weight * total / count


def adalora_ranks(model: torch.nn.Module) -> dict[str, int]:
    """Each AdaLoRA module's current rank (its unmasked singular values), by module name."""
    tuner = adalora_model(model)
    if tuner is None:
        return {}
    name = tuner.trainable_adapter_name
    ranks = {}
    for module_name, module in tuner.model.named_modules():
        values = getattr(module, "lora_E", {})
        if name in values:
            ranks[module_name] = int((values[name].detach() != 0).sum())
    return ranks


def save_adalora_state(model: torch.nn.Module, directory: Path) -> None:
    """Write what exact resume of an AdaLoRA run needs into a checkpoint: the adapter at full rank (peft's
    ``save_pretrained`` prunes it to the current ranks), the rank pattern, and the importance scores the
    allocator keeps only in memory. Nothing for other models."""
    tuner = adalora_model(model)
    if tuner is None:
        return
    name, allocator = tuner.trainable_adapter_name, tuner.rankallocator
    state = {
        "weights": {n: p.detach().cpu().clone() for n, p in tuner.model.named_parameters() if f".{name}" in n
                    and "lora_" in n},
        "rank_pattern": tuner.peft_config[name].rank_pattern,
        **{key: {n: t.detach().cpu().clone() for n, t in getattr(allocator, key).items()}
           for key in ("ipt", "exp_avg_ipt", "exp_avg_unc")},
    }
    torch.save(state, directory / ADALORA_STATE_FILE)


def load_adalora_state(model: torch.nn.Module, directory: Path) -> bool:
    """Restore ``save_adalora_state``'s checkpoint into ``model``; False when there is nothing to restore."""
    tuner, path = adalora_model(model), directory / ADALORA_STATE_FILE
    if tuner is None or not path.is_file():
        return False
    state = torch.load(path, map_location="cpu", weights_only=True)
    parameters = dict(tuner.model.named_parameters())
    with torch.no_grad():
        for n, tensor in state["weights"].items():
            parameters[n].copy_(tensor.to(parameters[n].device))
    name, allocator = tuner.trainable_adapter_name, tuner.rankallocator
    tuner.peft_config[name].rank_pattern = state["rank_pattern"]
    for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        setattr(allocator, key, {n: t.to(parameters[n].device) for n, t in state[key].items()})
    return True


def rank_summary(ranks: dict[str, int]) -> str:
    """``"ranks 3-12, mean 8.0 over 14 modules (q_proj 10.5, ...)"``: per module type, the mean final rank."""
    by_type: dict[str, list[int]] = {}
    for module_name, rank in ranks.items():
        by_type.setdefault(module_name.rsplit(".", 1)[-1], []).append(rank)
    values = list(ranks.values())
    kinds = ", ".join(f"{kind} {sum(r) / len(r):.1f}" for kind, r in sorted(by_type.items()))
    return (f"ranks {min(values)}-{max(values)}, mean {sum(values) / len(values):.1f} over {len(values)} modules "
            f"({kinds})")


class AdaLoraRankCallback(TrainerCallback):
    """Reallocates AdaLoRA's ranks after every optimizer step, while the gradients it scores are still there
    (peft: after ``optimizer.step()``, before ``zero_grad()``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.tuner = adalora_model(model)

    def on_train_begin(self, args, state, control, **kwargs):
        config = self.tuner.peft_config[self.tuner.trainable_adapter_name]
        if state.max_steps and config.total_step != state.max_steps:  # the Trainer's own count wins
            self.tuner.rankallocator.set_total_step(state.max_steps)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.tuner.update_and_allocate(state.global_step)


def loraplus_optimizer(model: torch.nn.Module, args, *, ratio: float, embedding_lr: float) -> torch.optim.Optimizer:
    """The optimizer ``args.optim`` names, with LoRA+ parameter groups: B matrices at ``ratio`` x learning_rate,
    LoRA on embeddings at ``embedding_lr`` (peft's ``create_loraplus_optimizer``)."""
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer_kwargs = dict(optimizer_kwargs)
    optimizer_kwargs.pop("lr", None)
    return create_loraplus_optimizer(model, optimizer_cls, lr=args.learning_rate, loraplus_lr_ratio=ratio,
                                     loraplus_lr_embedding=embedding_lr, loraplus_weight_decay=args.weight_decay,
                                     **optimizer_kwargs)


def save_initial_pissa_adapter(model: torch.nn.Module, directory: Path) -> None:
    """Write the adapter as PiSSA initialised it (before any step): converting the trained one needs it."""
    config = model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True  # what peft documents: the saved initial adapter must not re-run the SVD
    try:
        model.save_pretrained(str(directory))
    finally:
        config.init_lora_weights = init


def save_converted_pissa_adapter(model: torch.nn.Module, directory: Path, initial: Path) -> None:
    """Write the trained PiSSA adapter as a plain LoRA of the original base (rank 2r): its update is the trained
    adapter minus the initial one, which peft computes from ``initial``."""
    model.save_pretrained(str(directory), path_initial_model_for_weight_conversion=str(initial))
