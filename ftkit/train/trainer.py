"""ftkit's Trainer: the HF Trainer with a few changes, each for a measured reason.

1. The loss computes logits only where a label is trained, one checkpointed chunk at a time
   (``ftkit.train.loss``): full-vocabulary logits for every token are the largest activation of a
   small model and, with prompts masked, mostly thrown away.
2. Checkpoints are written into a staging folder, given a manifest of their files' sizes and checksums,
   and renamed into place, so a run killed mid-save never leaves a folder that looks complete (the Trainer
   writes in place), and one damaged later is found before it is resumed.
3. Length-grouped sampling is seeded per epoch (the Trainer's uses the global RNG, which breaks
   bit-exact resume); real (non-padding) tokens are counted for tokens/s.
4. Each checkpoint records the sum of the step losses so far (``ftkit_state.json``), so a resumed run
   reports the same train_loss as an uninterrupted one (the Trainer averages only the resumed steps), and the
   learned counts of ``num_train_epochs: auto``'s round ends, which decide when it stops.
5. A run resumed from its last step trains no further (the Trainer runs one extra step when max_steps
   ends mid-epoch).
6. LoRA+ builds the optimizer with peft's parameter groups, and AdaLoRA's orthogonality penalty is added to
   the loss here (``ftkit.train.lora_variants``: the chunked loss never runs peft's forward, which adds it).
7. ``num_train_epochs: auto`` brings its own learning-rate function (restarting each round) and may end a run
   resumed at a round end before it trains on (``ftkit.train.small_sets``).
8. FSDP runs on CPU processes too: accelerate enables its FSDP plugin only on accelerator devices (a CPU
   launch stays plain data parallel, silently unsharded), while FSDP2 itself shards on CPU over gloo.
9. A model split at load time (``tp_size``: transformers' tensor parallelism) trains on CPU processes too, and
   resumes: accelerate refuses its parallelism settings on a CPU launch (it validates them only for GPU-like
   devices, though DTensor runs on gloo), and transformers refuses checkpoints for such a model because
   ``torch.save`` of one process's optimizer would keep only its shard. ftkit gives accelerate the settings
   after it is made, and saves and loads weights and optimizer state with torch's distributed checkpoint,
   each process writing its own shards.
10. The FLOP count the Trainer logs (6 x tokens x non-embedding parameters) counts the parameters once: the
   Trainer walks every parameter on every step to count them again (0.8% of a step on the embedded model).
Everything else (optimizer, scheduler, accumulation, RNG state, resume, data skipping) is the Trainer's.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import Sampler
from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from ftkit.train.checkpoints import STAGING_DIR, write_checkpoint_manifest
from ftkit.train.lora_variants import (
    adalora_orthogonal_penalty,
    load_adalora_state,
    loraplus_optimizer,
    save_adalora_state,
)
from ftkit.train.loss import chunked_loss_sum, plain_loss_sum, shifted_targets, supports_chunked_loss

LOSS_STATE_FILE = "ftkit_state.json"
SPLIT_STATE_DIR = "split_state"  # weights and optimizer of a model split at load time, one file per process


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


class FtkitTrainer(Trainer):
    """The HF Trainer with trained-position-only logits, atomic checkpoints and token counting."""

    def __init__(self, *args, length_grouping: bool = False, loraplus: tuple[float, float] | None = None,
                 **kwargs) -> None:
        split = getattr(kwargs.get("model"), "is_distributed_loading_by_transformers", False)
        arguments = kwargs.get("args")
        model_only = arguments.save_only_model if arguments is not None else False
        if split and arguments is not None:  # the Trainer refuses full checkpoints of it; ftkit writes them (9.)
            arguments.save_only_model = True
        try:
            super().__init__(*args, **kwargs)
        finally:
            if arguments is not None:
                arguments.save_only_model = model_only
        self.length_grouping = length_grouping
        self.loraplus = loraplus  # (B's learning-rate ratio, the embedding learning rate) or None
        self.tokens_seen = 0  # real (non-padding) tokens since this process started
        self._staging = False
        self._earlier_loss_sum: float | None = 0.0  # loss summed over the steps before a resumed checkpoint
        self._chunked_loss = supports_chunked_loss(self.model)
        self._flop_parameters: int | None = None  # non-embedding parameters, counted once (10.)
        # num_train_epochs: auto (ftkit.train.small_sets): the learning rate as a function of the step, and whether
        # a run resumed at a round end stops there (its round-end check passes).
        self.lr_lambda = None
        self.stop_before_resuming = None
        self.rounds_state = None  # () -> the round-end learned counts so far, saved in each checkpoint
        self.restore_rounds = None  # (those counts) -> None, on resume
        # compute_loss divides by the trained tokens of the whole accumulation window (num_items_in_batch),
        # so the Trainer must count them and must not divide by the accumulation steps again.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True

    def create_accelerator_and_postprocess(self):
        tp_size = getattr(self.model, "_tp_size", None) or 1
        if tp_size > 1 and self.args.device.type == "cpu":  # (9.) accelerate refuses these settings on CPU
            self.model._tp_size = None
            try:
                super().create_accelerator_and_postprocess()
            finally:
                self.model._tp_size = tp_size
            from accelerate import ParallelismConfig

            settings = ParallelismConfig(tp_size=tp_size, dp_shard_size=self.model.config.distributed_config.dp_size)
            self.accelerator.state.parallelism_config = settings
            self.accelerator.state.device_mesh = settings.get_device_mesh("cpu")
            return
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            state = self.accelerator.state
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            state.distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True

    # -- whole-run training loss -------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self._earlier_loss_sum = 0.0
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            try:
                state = json.loads((Path(resume_from_checkpoint) / LOSS_STATE_FILE).read_text(encoding="utf-8"))
                if self.restore_rounds is not None:
                    self.restore_rounds(state.get("auto_epoch_learned") or {})
                self._earlier_loss_sum = float(state["loss_sum"])
            except (OSError, ValueError, KeyError, TypeError):
                self._earlier_loss_sum = None  # a checkpoint from elsewhere: only the resumed steps are known
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, *args, **kwargs):
        epochs_trained, steps_trained = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, *args, **kwargs)
        if self.state.global_step >= max_steps:
            # Resumed from the last step (killed while writing the final model): nothing is left to train. The
            # Trainer would still enter the epoch loop and run one step too many when max_steps ends mid-epoch.
            return num_train_epochs, 0
        step = self.state.global_step
        if step and self.stop_before_resuming is not None and self.stop_before_resuming(self.model, step):
            return num_train_epochs, 0  # the run had ended at this round end (killed before its final save)
        return epochs_trained, steps_trained

    def _loss_sum_so_far(self) -> float | None:
        """The sum of every optimizer step's loss since step 0 (None when the steps before a resume are unknown)."""
        if self._earlier_loss_sum is None:
            return None
        pending = getattr(self, "_tr_loss", None)  # accumulated since the last logging step
        pending = float(pending.item()) if torch.is_tensor(pending) else 0.0
        return self._earlier_loss_sum + float(getattr(self, "_total_loss_scalar", 0.0)) + pending

    def run_train_loss(self, train_output) -> float:
        """The mean step loss of the whole run, resumed or not (after ``train``)."""
        total = None if self._earlier_loss_sum is None else \
            self._earlier_loss_sum + float(getattr(self, "_total_loss_scalar", 0.0))
        if total is None or not self.state.global_step:
            return float(train_output.training_loss)
        return total / self.state.global_step

    # -- optimizer ------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.loraplus is None or self.optimizer is not None:
            return super().create_optimizer(model)
        ratio, embedding_lr = self.loraplus
        self.optimizer = loraplus_optimizer(self.model if model is None else model, self.args, ratio=ratio,
                                            embedding_lr=embedding_lr)
        return self.optimizer

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_lambda is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, self.lr_lambda)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def floating_point_ops(self, inputs) -> int:
        if self._flop_parameters is None:
            counter = getattr(self.model, "num_parameters", None)
            self._flop_parameters = counter(exclude_embeddings=True) if counter is not None else 0
        ids = inputs.get(getattr(self.model, "main_input_name", "input_ids"))
        return 6 * ids.numel() * self._flop_parameters if ids is not None else 0

    # -- sampling -------------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        if not self.length_grouping:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = [len(row["input_ids"]) for row in dataset]
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return SeededLengthGroupedSampler(lengths, self.args.train_batch_size, seed)

    # -- loss -----------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        attention_mask = inputs.get("attention_mask")
        self.tokens_seen += int(attention_mask.sum()) if attention_mask is not None else inputs["input_ids"].numel()
        targets = shifted_targets(labels)
        # Calling the decoder and head separately bypasses a wrapper's forward (DDP/FSDP gradient sync); FSDP2
        # wraps in place, and needs its root module's forward to gather and free the shards.
        wrapped = self.accelerator.unwrap_model(model) is not model or self.is_fsdp_enabled
        loss_sum = (chunked_loss_sum if self._chunked_loss and not wrapped else plain_loss_sum)(model, inputs, targets)
        denominator = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
        if torch.is_tensor(denominator):
            denominator = denominator.to(loss_sum.device)
        loss = loss_sum / denominator
        if model.training and num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch counts every process's trained tokens, and DDP/DeepSpeed/FSDP average the
            # gradients over the processes: scaled back, the step is the token mean of the whole global batch,
            # as in one process (the Trainer's own compute_loss does the same).
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # the data-parallel processes
        if model.training:
            penalty = adalora_orthogonal_penalty(self.accelerator.unwrap_model(model))
            if penalty is not None:  # once per optimizer step: each micro-batch's loss is summed over the window
                loss = loss + penalty.to(loss.device) / self.args.gradient_accumulation_steps
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            labels = inputs["labels"]
            count = (labels[:, 1:] != -100).sum()
            loss = self.compute_loss(model, dict(inputs), num_items_in_batch=count)
        return loss.detach(), None, None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.is_distributed_loading_by_transformers:  # (9.) its shards load with the optimizer's
            return
        # An AdaLoRA checkpoint's adapter file is pruned to the ranks of that step; its full-rank weights and
        # the allocator's scores are in adalora_state.pt (peft would otherwise shrink the modules on load).
        if model is None and load_adalora_state(self.model, Path(resume_from_checkpoint)):
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    # -- a model split at load time (9.) ------------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_distributed_loading_by_transformers:
            return super()._save_optimizer_and_scheduler(output_dir)
        import torch.distributed.checkpoint as dcp
        from transformers.trainer import SCHEDULER_NAME

        dcp.save(self._split_state(), checkpoint_id=os.path.join(output_dir, SPLIT_STATE_DIR))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self.is_distributed_loading_by_transformers:
            return super()._load_optimizer_and_scheduler(checkpoint)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict
        from transformers.trainer import SCHEDULER_NAME

        state = self._split_state()
        dcp.load(state, checkpoint_id=os.path.join(checkpoint, SPLIT_STATE_DIR))
        set_state_dict(self.model, self._torch_optimizer(), model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    def _split_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self._torch_optimizer())
        return {"model": model_state, "optimizer": optimizer_state}

    def _torch_optimizer(self):
        return getattr(self.optimizer, "optimizer", self.optimizer)  # under accelerate's AcceleratedOptimizer

    # -- atomic checkpoints ---------------------------------------------------------------------------
    def _get_output_dir(self, trial):
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if self._staging else run_dir

    def _save_checkpoint(self, model, trial):
        run_dir = super()._get_output_dir(trial)
        staging = os.path.join(run_dir, STAGING_DIR)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()  # every process has written its share (rng_state_<rank>.pth)
        if not self.args.should_save:
            return
        name = f"checkpoint-{self.state.global_step}"
        loss_sum = self._loss_sum_so_far()
        if loss_sum is not None or self.rounds_state is not None:
            state = {"global_step": self.state.global_step, "loss_sum": loss_sum}
            if self.rounds_state is not None:
                state["auto_epoch_learned"] = self.rounds_state()
            with open(os.path.join(staging, name, LOSS_STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(state, f)
        save_adalora_state(self.model, Path(staging) / name)
        engine = "deepspeed" if self.is_deepspeed_enabled else "fsdp" if self.is_fsdp_enabled else \
            "tensor parallel" if self.is_distributed_loading_by_transformers else \
            "ddp" if self.args.world_size > 1 else "single"
        write_checkpoint_manifest(Path(staging) / name, processes=self.args.world_size, engine=engine)
        final = os.path.join(run_dir, name)
        if os.path.exists(final):  # from an earlier process (killed mid-way, or resumed from an earlier step)
            shutil.rmtree(final)
        os.replace(os.path.join(staging, name), final)  # the checkpoint appears complete or not at all
        shutil.rmtree(staging, ignore_errors=True)
        rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit, use_mtime=False)
