"""ftkit's Trainer: the HF Trainer with three changes, each for a measured reason.

1. The loss computes logits only where a label is trained (``logits_to_keep`` with the positions),
   in fp32 over those rows only. A full-vocabulary logits tensor for every token is the largest
   activation of a small model (49k x tokens x 4 bytes) and, with prompts masked, mostly thrown away.
2. Checkpoints are written into a staging folder and renamed into place, so a run killed mid-save
   never leaves a folder that looks complete (the Trainer writes in place).
3. Length-grouped sampling is seeded per epoch (the Trainer's uses the global RNG, which breaks
   bit-exact resume); real (non-padding) tokens are counted for tokens/s.
Everything else (optimizer, scheduler, accumulation, RNG state, resume, data skipping) is the Trainer's.
"""

from __future__ import annotations

import inspect
import os
import shutil
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import Sampler
from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from ftkit.train.checkpoints import STAGING_DIR


class SeededLengthGroupedSampler(Sampler[int]):
    """Shuffle, then sort within mega-batches by length, reproducibly from (seed, epoch).

    Batches hold examples of similar length (little padding) while their order stays random.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, megabatch_factor: int = 50) -> None:
        self.lengths = lengths
        self.megabatch = batch_size * megabatch_factor
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        grouped: list[int] = []
        for start in range(0, len(order), self.megabatch):
            chunk = sorted(order[start:start + self.megabatch], key=lambda i: -self.lengths[i])
            grouped.extend(chunk)
        # Keep batch order random too, so long batches are not all first.
        batches = [grouped[i:i + self.batch_size] for i in range(0, len(grouped), self.batch_size)]
        batch_order = torch.randperm(len(batches), generator=generator).tolist()
        return iter([i for b in batch_order for i in batches[b]])


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    inner = model
    while hasattr(inner, "get_base_model") or hasattr(inner, "base_model") and inner.base_model is not inner:
        inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner.base_model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


class FtkitTrainer(Trainer):
    """The HF Trainer with trained-position-only logits, atomic checkpoints and token counting."""

    def __init__(self, *args, length_grouping: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.length_grouping = length_grouping
        self.tokens_seen = 0  # real (non-padding) tokens since this process started
        self._staging = False
        self._logits_to_keep = _accepts_logits_to_keep(self.model)
        # compute_loss divides by the trained tokens of the whole accumulation window (num_items_in_batch),
        # so the Trainer must count them and must not divide by the accumulation steps again.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True

    # -- sampling -------------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        if not self.length_grouping:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = [len(row["input_ids"]) for row in dataset]
        return SeededLengthGroupedSampler(lengths, self.args.train_batch_size, self.args.seed)

    # -- loss -----------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        attention_mask = inputs.get("attention_mask")
        self.tokens_seen += int(attention_mask.sum()) if attention_mask is not None else inputs["input_ids"].numel()
        targets = torch.full_like(labels, -100)
        targets[:, :-1] = labels[:, 1:]  # the prediction at position t is scored against token t + 1
        if self._logits_to_keep:
            positions = (targets != -100).any(dim=0).nonzero().squeeze(-1)
            outputs = model(**inputs, logits_to_keep=positions, use_cache=False)
            targets = targets[:, positions]
        else:
            outputs = model(**inputs, use_cache=False)
        logits = outputs.logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                               reduction="sum")
        denominator = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
        if torch.is_tensor(denominator):
            denominator = denominator.to(loss.device)
        loss = loss / denominator
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            labels = inputs["labels"]
            count = (labels[:, 1:] != -100).sum()
            loss = self.compute_loss(model, dict(inputs), num_items_in_batch=count)
        return loss.detach(), None, None

    # -- atomic checkpoints ---------------------------------------------------------------------------
    def _get_output_dir(self, trial):
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if self._staging else run_dir

    def _save_checkpoint(self, model, trial):
        run_dir = super()._get_output_dir(trial)
        staging = os.path.join(run_dir, STAGING_DIR)
        shutil.rmtree(staging, ignore_errors=True)
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        name = f"checkpoint-{self.state.global_step}"
        final = os.path.join(run_dir, name)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(os.path.join(staging, name), final)  # the checkpoint appears complete or not at all
        shutil.rmtree(staging, ignore_errors=True)
        if self.args.should_save:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit, use_mtime=False)
