"""Defaults that learn a small dataset: the learning rate, rank and epochs an sft run on a few hundred examples needs.

At ftkit's old defaults, a user's own small set was often not learned (lr 1e-4, rank 8, 3 epochs). The loss fell,
but the model still answered the old way. Measured with ``bench/small_sets.py`` on five hand-written sets (table
in bench/README.md): at those defaults an identity set of 60 conversations was learned 2/40. At lr 3e-4 and rank
16 it was learned 40/40, with 20/21 general answers kept and every held-out probe right.

So for ``stage: sft`` on a small set (the guard's ``SMALL_SFT_SET``, up to 1,000 examples), keys the config does
not set take these values:
- LoRA (a new adapter): ``learning_rate`` 3e-4 and ``lora_rank`` 16 (instead of 1e-4 and 8);
- ``num_train_epochs: auto`` (the default) trains in rounds. The first round is ``FIRST_ROUND_EPOCHS`` epochs.
  At the end of each round the learned check (``ftkit.guard.learned_check``) asks the model being trained. If
  at least ``PASS`` of the answers are learned, training stops there. It also stops when a round learned no more
  answers than the round before: measured on an identity set with twice the replay, the check read 33, 35 and 34
  of 40 at epochs 3, 5 and 7, and the epochs up to the cap of 9 only cost general answers (18/21). Otherwise
  another ``ROUND_EPOCHS`` epochs follow, at most ``MAX_AUTO_EPOCHS`` in all. The learning rate follows
  ``lr_scheduler_type`` within each round and restarts at the next (warm restarts, as in SGDR), so a run that
  stops at a round end has annealed.
  Elsewhere ``auto`` means ``OTHER_EPOCHS``, and so it does with AdaLoRA (``adaptive_rank``), whose rank
  pruning is scheduled over the run's length before it starts.

Explicit values always win. A round's length never depends on what a check said, so the schedule is a function of
the step alone, and resume stays exact. A run resumed exactly at a round end runs that round's check again before
training on (``FtkitTrainer`` asks ``stop_before_resuming``).

Written here because no library has it. transformers' ``EarlyStoppingCallback`` stops on an eval metric and never
anneals first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback

from ftkit.errors import FtkitError
from ftkit.guard.learned_check import WARN_BELOW

SMALL_SET_LORA_DEFAULTS = {"learning_rate": 3e-4, "lora_rank": 16}
FIRST_ROUND_EPOCHS = 3
ROUND_EPOCHS = 2
MAX_AUTO_EPOCHS = 9
OTHER_EPOCHS = 3.0
PASS = WARN_BELOW  # learned fraction at a round end that ends training: what the final check does not warn about
ROUND_SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")


def small_set_defaults(config: Any, small: bool) -> tuple[Any, list[str]]:
    """``config`` with the small-set LoRA defaults filled into the keys it does not set, and what was filled."""
    if not (small and config.uses_lora):
        return config, []
    wanted = dict(SMALL_SET_LORA_DEFAULTS)
    if config.adapter_name_or_path:
        wanted.pop("lora_rank")  # an adapter trained on keeps its own rank
    updates = {key: value for key, value in wanted.items() if key not in config.model_fields_set}
    if not updates:
        return config, []
    said = ", ".join(f"{key} {value:g}" for key, value in updates.items())
    return config.model_copy(update=updates), [f"small-set defaults: {said} (set them to override)"]


@dataclass
class EpochRounds:
    """``num_train_epochs: auto`` on a small set: round ends (in epochs and optimizer steps) and the schedule."""

    steps_per_epoch: int
    warmup_steps: int
    schedule: str
    ends: list[int] = field(default_factory=list)  # epochs at which a round ends

    def __post_init__(self) -> None:
        if not self.ends:
            self.ends = list(range(FIRST_ROUND_EPOCHS, MAX_AUTO_EPOCHS + 1, ROUND_EPOCHS))

    @property
    def end_steps(self) -> list[int]:
        return [epoch * self.steps_per_epoch for epoch in self.ends]

    def next_end(self, step: int) -> int:
        """The step the current round ends at (the progress bar's total)."""
        return next((end for end in self.end_steps if end > step), self.end_steps[-1])

    def checks_at(self, step: int) -> bool:
        """Whether a round ends at ``step`` with training left after it (the last round needs no check)."""
        return step in self.end_steps[:-1]

    def lr_factor(self, step: int) -> float:
        """The learning-rate multiplier at ``step``: warmup in the first round, then the schedule within each
        round, restarting at each round's start."""
        start = 0
        for end in self.end_steps:
            if step < end:
                break
            start = end
        else:
            return 0.0
        length, local = end - start, step - start
        if start == 0 and local < self.warmup_steps:
            return local / max(1, self.warmup_steps)  # transformers' warmup
        if self.schedule in ("constant", "constant_with_warmup"):
            return 1.0
        warm = self.warmup_steps if start == 0 else 0
        progress = (local - warm) / max(length - warm, 1)
        if self.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def plan_epochs(config: Any, small: bool, can_check: bool, steps_per_epoch: int,
                warmup_steps: int) -> tuple[float, EpochRounds | None]:
    """The epochs the Trainer is given and, for ``auto`` on a small set, the rounds that may end it sooner.

    ``can_check``: the learned check runs (``learned_check`` on, stage sft); without it ``auto`` is OTHER_EPOCHS."""
    if config.num_train_epochs != "auto":
        return float(config.num_train_epochs), None
    if not (small and can_check) or config.max_steps > 0 or config.adaptive_rank:
        return OTHER_EPOCHS, None  # AdaLoRA's pruning schedule needs the run's length up front
    if config.lr_scheduler_type not in ROUND_SCHEDULES:
        raise FtkitError(f"num_train_epochs: auto restarts the learning rate at each round and supports "
                         f"lr_scheduler_type {', '.join(ROUND_SCHEDULES)}; set num_train_epochs to a number to use "
                         f"{config.lr_scheduler_type}.")
    return float(MAX_AUTO_EPOCHS), EpochRounds(steps_per_epoch, warmup_steps, config.lr_scheduler_type)


class LearnedRoundsCallback(TrainerCallback):
    """At each round end, ask the learned check; stop when it passes, else say the next round is coming."""

    def __init__(self, rounds: EpochRounds, check: Callable[[Any], Any], report: Callable[[str], None]) -> None:
        self.rounds, self.check, self.report = rounds, check, report
        self.learned: dict[int, int] = {}  # round-end step -> answers learned there

    def passes(self, model: Any, step: int) -> bool:
        """Run the check on ``model`` at round-end ``step``; True when training should end here.

        The counts of earlier round ends come back from the checkpoint on resume (``FtkitTrainer`` saves them
        in ``ftkit_state.json``), so the plateau rule sees what an uninterrupted run saw."""
        epochs = step // self.rounds.steps_per_epoch
        result = self.check(model)
        model.train()
        self.learned[step] = result.learned
        earlier = [self.learned[s] for s in self.rounds.end_steps if s < step and s in self.learned]
        if result.fraction >= PASS:
            self.report(f"epoch {epochs}: {result.summary()}: stopping (num_train_epochs: auto)")
            return True
        if earlier and result.learned <= earlier[-1]:
            self.report(f"epoch {epochs}: {result.summary()}, no more than after the last round: stopping "
                        "(num_train_epochs: auto)")
            return True
        self.report(f"epoch {epochs}: {result.summary()}: {ROUND_EPOCHS} more epochs, learning rate restarted "
                    f"(num_train_epochs: auto, at most {MAX_AUTO_EPOCHS})")
        return False

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.rounds.checks_at(state.global_step) and self.passes(model, state.global_step):
            control.should_training_stop = True
        return control
