"""What data preparation reads from a stage config, as one typed value.

The data functions take ``DataOptions``, not the whole train config: they can be used by any stage (evaluate
will encode custom datasets with them) and it is plain which keys change the token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ftkit.config.stages import TrainConfig


@dataclass(frozen=True)
class DataOptions:
    """The keys of the data section (and the few model/method/training keys) that decide the examples."""

    dataset: tuple[str, ...]
    dataset_dir: str = "data"
    eval_dataset: tuple[str, ...] = ()
    stage: str = "sft"
    cutoff_len: int = 2048
    max_samples: int | None = None
    val_size: float = 0.0
    train_on_prompt: bool = False
    mask_history: bool = False
    default_system: str | None = None
    packing: bool = False
    mix_strategy: str = "concat"
    interleave_probs: tuple[float, ...] | None = None
    overwrite_cache: bool = False
    identity_name: str = "Ftkit"
    identity_author: str = "the ftkit team"
    seed: int = 42

    @classmethod
    def from_config(cls, config: TrainConfig) -> DataOptions:
        """The data options of a train config (``ftkit train`` and ``ftkit data preview``)."""
        return cls(
            dataset=tuple(config.dataset), dataset_dir=config.dataset_dir,
            eval_dataset=tuple(config.eval_dataset or ()), stage=config.stage, cutoff_len=config.cutoff_len,
            max_samples=config.max_samples, val_size=config.val_size, train_on_prompt=config.train_on_prompt,
            mask_history=config.mask_history, default_system=config.default_system, packing=config.uses_packing,
            mix_strategy=config.mix_strategy,
            interleave_probs=tuple(config.interleave_probs) if config.interleave_probs else None,
            overwrite_cache=config.overwrite_cache, identity_name=config.identity_name,
            identity_author=config.identity_author, seed=config.seed,
        )

    @property
    def replacements(self) -> dict[str, str]:
        """The placeholders identity-style datasets contain and what they are filled with."""
        return {"{{name}}": self.identity_name, "{{author}}": self.identity_author}
