"""What a new adapter is besides plain LoRA: AdaLoRA's rank budget (adaptive_rank) and PiSSA's initialisation.

The train stage decides *when* things happen (AdaLoRA's reallocation every step, PiSSA's conversion on
save); this module only turns the config into peft's arguments, so the adapter is created in one place
(``ftkit.models.adapters.apply_lora``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ftkit.errors import FtkitError

if TYPE_CHECKING:
    from ftkit.config.stages import TrainConfig


@dataclass(frozen=True)
class AdaLoraSchedule:
    """AdaLoRA's rank budget over a run: ranks shrink from ``init_r`` towards an average of ``target_r`` between
    step ``tinit`` and step ``total_step - tfinal``, reallocated every ``deltaT`` steps."""

    init_r: int
    target_r: int
    tinit: int
    tfinal: int
    deltaT: int  # noqa: N815 (peft's name)
    total_step: int
    orth_reg_weight: float

    def peft_kwargs(self) -> dict[str, float | int]:
        return {"init_r": self.init_r, "target_r": self.target_r, "tinit": self.tinit, "tfinal": self.tfinal,
                "deltaT": self.deltaT, "total_step": self.total_step, "orth_reg_weight": self.orth_reg_weight}


def adalora_schedule(config: TrainConfig, total_steps: int) -> AdaLoraSchedule:
    """The schedule for a run of ``total_steps`` optimizer steps: unset phases are a tenth (warm-up at init_r)
    and a fifth (final ranks) of the run, reallocation every hundredth step (at least every step)."""
    total = max(int(total_steps), 1)
    tinit = config.tinit if config.tinit is not None else total // 10
    tfinal = config.tfinal if config.tfinal is not None else total // 5
    if tinit >= total - tfinal:  # the defaults never get here: total // 10 + total // 5 < total
        raise FtkitError(f"tinit {tinit} and tfinal {tfinal} leave no step of this {total}-step run for AdaLoRA to "
                         f"prune ranks in; make tinit + tfinal smaller than {total} (or leave them unset).")
    delta = config.deltaT if config.deltaT is not None else max(total // 100, 1)
    return AdaLoraSchedule(init_r=config.adalora_init_r, target_r=config.adalora_target_r, tinit=tinit,
                           tfinal=tfinal, deltaT=delta, total_step=total, orth_reg_weight=config.orth_reg_weight)


def lora_init_weights(config: TrainConfig) -> bool | str:
    """peft's ``init_lora_weights``: standard (B = 0), or PiSSA by exact SVD or by ``pissa_iter`` fast iterations."""
    if not config.pissa_init:
        return True
    return "pissa" if config.pissa_iter == -1 else f"pissa_niter_{config.pissa_iter}"
