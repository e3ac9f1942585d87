"""The training recipe, top to bottom: config -> checks -> tokenizer + data -> model -> Trainer -> files.

Everything that can be refused (a finished output_dir, an impossible resume, a missing logger, a
dataset with no usable example) is refused before the model is loaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape

from ftkit.config import LoadedConfig, TrainConfig, dump_resolved_config
from ftkit.errors import FtkitError
from ftkit.paths import atomic_write_text
from ftkit.run_files import (
    ADALORA_STATE_FILE,
    ADAPTER_CONFIG_FILE,
    RUN_CONFIG_FILE,
    TRAINER_LOG_FILE,
    read_adapter_config,
)
from ftkit.train.checkpoints import (
    FINAL_STAGING_DIR,
    RESULTS_FILE,
    changed_training_keys,
    plan_resume,
)
from ftkit.train.launch import (
    decided_by_rank_zero,
    is_main_process,
    main_process_first,
    start_process_group,
    sum_over_processes,
    world_size,
)
from ftkit.train.memory import decide_gradient_checkpointing
from ftkit.train.output_dir import RunFolder, check_output_dir, claimed_output_dir

console = Console(stderr=True, highlight=False)


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict[str, Any]


def _say(message: str) -> None:
    if is_main_process():  # one process of a multi-process run speaks for all
        console.print(f"[bold cyan]ftkit[/] {message}", soft_wrap=True)


def _check_reporters(config: TrainConfig) -> None:
    for name in config.report_to:
        module = {"tensorboard": "tensorboard", "wandb": "wandb", "swanlab": "swanlab", "mlflow": "mlflow",
                  "trackio": "trackio", "comet_ml": "comet_ml", "clearml": "clearml"}.get(name)
        if module and importlib.util.find_spec(module) is None:
            raise FtkitError(f"report_to {name} needs the {module} package; install it (`pip install {module}`) or "
                             "set report_to: none.")


def run_training(loaded: LoadedConfig) -> TrainResult:
    """Run ``ftkit train`` for a validated config; returns where the results are and the final metrics.

    output_dir is checked and locked first (``ftkit.train.output_dir``); a refused run leaves it as it was.
    In a multi-process launch (``ftkit.train.launch``) this runs in every process.
    """
    start_process_group(loaded.config.ddp_timeout)
    if not is_main_process():
        _quiet_progress_bars()
    with claimed_output_dir(loaded.config, report=_say) as folder:
        return _train(loaded, folder)


def launch_training(loaded: LoadedConfig, argv: list[str]) -> None:
    """Start ``ftkit <argv>`` in the processes ``loaded.config`` asks for (``ftkit.train.launch``) and wait.

    What can be refused without a process (output_dir, the resume plan, the engine's file, the process count,
    the port) is refused here first; node 0 alone looks at output_dir, which the nodes share."""
    from ftkit.train.launch import plan_launch, relaunch

    config: TrainConfig = loaded.config
    launch = plan_launch(config)
    if launch.node_rank == 0:
        check_output_dir(config)
        plan_resume(Path(config.output_dir), config.resume_from_checkpoint, config.overwrite_output_dir,
                    world_size=launch.world_size)
    try:
        relaunch(launch, argv, _say)
    except FtkitError as error:
        if launch.node_rank == 0:
            from ftkit.train.run_status import record_failure

            record_failure(Path(config.output_dir), str(error))
        raise


def _quiet_progress_bars() -> None:
    """Loading and saving bars of transformers, datasets and the hub: rank 0 shows them for every process."""
    import datasets
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


def _train(loaded: LoadedConfig, folder: RunFolder) -> TrainResult:
    config: TrainConfig = loaded.config
    output_dir = Path(config.output_dir)
    checkpoint = decided_by_rank_zero(lambda: plan_resume(
        output_dir, config.resume_from_checkpoint, config.overwrite_output_dir, world_size=world_size(),
        report=lambda message: _say(f"[yellow]warning[/]: {escape(message)}")))
    if checkpoint is not None and config.adaptive_rank and not (checkpoint.path / ADALORA_STATE_FILE).is_file():
        # peft saves AdaLoRA adapters pruned to their current ranks and keeps the importance scores in memory;
        # ftkit's checkpoints add both (adalora_state.pt), a checkpoint from elsewhere lacks them.
        raise FtkitError(f"{checkpoint.path} has no {ADALORA_STATE_FILE} (the full-rank AdaLoRA weights and "
                         "importance scores exact resume needs); set resume_from_checkpoint: false and "
                         "overwrite_output_dir: true to start over.")
    _check_reporters(config)
    from ftkit.train.user_callbacks import load_user_callbacks

    user_callbacks = load_user_callbacks(config.callbacks)
    started = time.perf_counter()

    from ftkit.data.templates import apply_chat_template_to_tokenizer
    from ftkit.guard import BaseModelAnswers, general_check_dtype, prepare_guarded_dataset
    from ftkit.models import (
        LazyModel,
        LoadOptions,
        default_device,
        load_model,
        load_tokenizer,
        model_source_from_config,
        prepare_model_for_training,
        resolve_load_dtype,
        resolve_mixed_precision,
        trainable_parameter_summary,
    )

    device = default_device()
    precision = resolve_mixed_precision(config.bf16, config.fp16, device)
    source = model_source_from_config(config)
    processes = f" x {world_size()} processes ({_engine(config)})" if world_size() > 1 else ""
    _say(f"model {escape(source.display)} | {config.stage} {config.finetuning_type} | device {device.type}"
         f"{processes}, mixed precision {precision}")
    with main_process_first():  # rank 0 downloads and fills the caches; the others then read them
        tokenizer = load_tokenizer(source, trust_remote_code=config.trust_remote_code,
                                   report=lambda m: _say(escape(m)))
    template = apply_chat_template_to_tokenizer(tokenizer, config.template)
    if template.note:
        _say(escape(template.note))

    from transformers import set_seed

    load_dtype = resolve_load_dtype(precision, config.finetuning_type)
    load_options = LoadOptions.from_config(config)
    # The model to train, loaded on first use: self-replay generation may need it while data is prepared.
    base_model = LazyModel(lambda: load_model(source, dtype=load_dtype, device=device,
                                              tensor_parallel=config.tp_size, **load_options.as_kwargs()))

    # A separate check model only where its dtype differs from the training model's (a bf16 base on a CPU);
    # on GPUs the model being trained answers (a second full-precision copy may not fit beside a QLoRA run),
    # and so does a run continuing earlier adapters. A multi-process run checks its saved output in rank 0
    # alone: the model being trained may be sharded across the processes.
    separate_check = (general_check_dtype(device, load_dtype) != load_dtype and config.uses_lora
                      and not config.adapter_name_or_path) or world_size() > 1
    # Rank 0 generates self-replay alone; a tensor-parallel model loads in every process at once, so it
    # generates with a plain copy, dropped once the data is ready.
    replay_model = LazyModel.of(source, dtype=load_dtype, device=device, options=load_options) \
        if config.tp_size > 1 else base_model
    answers = BaseModelAnswers(config, source, template.jinja, load_options, load_dtype, tokenizer, replay_model,
                               report=_say, device=device, separate_check=separate_check)
    with main_process_first():  # self-replay is generated once, by rank 0; the others read its cache
        data = prepare_guarded_dataset(config, tokenizer, answers)
    if replay_model is not base_model:
        replay_model.release()
    for note in data.notes:
        _say(escape(note))
    for stats in data.stats:
        _say(f"data {escape(stats.summary())}")
    layout = "packed rows" if data.packed else "examples"
    _say(f"{len(data.train):,} training {layout}, {data.train_tokens:,} tokens"
         + (f"; {len(data.eval):,} eval examples" if data.eval else ""))

    from ftkit.data.dataset import training_conversations
    from ftkit.data.options import DataOptions
    from ftkit.guard import guard_applies
    from ftkit.train.small_sets import small_set_defaults

    conversations = training_conversations(DataOptions.from_config(config)) if config.stage == "sft" else []
    small = guard_applies(config, len(conversations))
    config, notes = small_set_defaults(config, small)
    for note in notes:
        _say(escape(note))

    if checkpoint is not None:
        changed = changed_training_keys(output_dir / RUN_CONFIG_FILE, yaml.safe_load(dump_resolved_config(config)))
        if changed:
            _say(f"[yellow]warning[/]: resuming with changed settings ({escape('; '.join(changed))}); the result will "
                 "not match an uninterrupted run of either config")

    from ftkit.guard.learned_check import sample_training_prompts

    learned_items = sample_training_prompts(conversations, config.seed) if config.learned_check else []
    with main_process_first():  # the others wait here, idle, rather than spinning in the engine's first collective
        check, learned = answers.checks_before_training(general=config.general_check, learned=learned_items) \
            if is_main_process() else (None, None)
    if world_size() > 1 and small and config.num_train_epochs == "auto" and learned is not None:
        _say("num_train_epochs auto: a fixed number of epochs in a multi-process run (the round-end learned check "
             "runs in one process); set num_train_epochs to choose it")
    epochs, rounds = _plan_epochs(config, data, small, learned is not None and world_size() == 1)
    model = base_model()
    set_seed(config.seed)  # before the adapter is created: its random init must repeat from run to run
    padding_free = _padding_free(config, model, data.packed)
    checkpointing = decide_gradient_checkpointing(
        config.checkpointing_choice, model.config,
        _largest_batch_tokens(data, config.per_device_train_batch_size, padding_free), device.type,
        sum(p.numel() for p in model.parameters()))
    _say(checkpointing.reason)
    model = prepare_model_for_training(model, config, tokenizer=tokenizer, gradient_checkpointing=checkpointing.enabled,
                                       total_steps=_total_optimizer_steps(config, data, epochs))
    _say(trainable_parameter_summary(model))
    _describe_lora_variant(config, model)

    trainer = _build_trainer(config, model, tokenizer, data, precision, output_dir, padding_free, user_callbacks,
                             epochs)
    rounds_callback = _attach_rounds(trainer, rounds, answers, learned) if rounds is not None else None
    # A scratch folder only where PiSSA needs one (a run killed with SIGKILL leaves it behind in /tmp).
    with tempfile.TemporaryDirectory(prefix="ftkit-pissa-") if config.pissa_init and config.pissa_convert \
            else contextlib.nullcontext() as scratch:
        pissa_initial = None
        if scratch is not None:
            # The same seed gives the same initial adapter on resume, so it is saved again rather than kept on disk.
            from ftkit.train.lora_variants import save_initial_pissa_adapter

            pissa_initial = Path(scratch) / "pissa_init"
            save_initial_pissa_adapter(model, pissa_initial)
        # Record the base as the user named it (hub id, ms:// id, alias), not the local cache path it resolved
        # to, so the adapter loads on another machine; local directories stay paths.
        base_name = config.model_name_or_path if source.kind in ("hub", "modelscope", "alias") else None
        return _run(config, folder, trainer, tokenizer, data, answers, (check, learned), checkpoint, started,
                    base_name=base_name, pissa_initial=pissa_initial, rounds=rounds_callback)


def _run(config: TrainConfig, folder: RunFolder, trainer, tokenizer, data, answers, checks, checkpoint,
         started: float, *, base_name: str | None, pissa_initial: Path | None, rounds) -> TrainResult:
    """Train, save the final model (and the results), print the summary."""
    output_dir = Path(config.output_dir)
    # Everything that can be refused has been checked: only now is an earlier run moved aside (deleted once
    # the first step has trained; a failure before that puts it back) and the config written.
    folder.start(dump_resolved_config(config), trainer)
    if checkpoint is not None and folder.manages:
        from ftkit.train.callbacks import truncate_log

        truncate_log(output_dir, checkpoint.step)
        _say(f"resuming from {checkpoint.path.name} (step {checkpoint.step}); set resume_from_checkpoint: false "
             "and overwrite_output_dir: true to start over")
    elif (output_dir / TRAINER_LOG_FILE).exists() and folder.manages:
        (output_dir / TRAINER_LOG_FILE).unlink()

    train_output = trainer.train(resume_from_checkpoint=str(checkpoint.path) if checkpoint else None)
    metrics = _final_metrics(trainer, train_output, data, checkpoint, started)
    if rounds is not None:
        metrics["auto_epochs"] = round(metrics["epoch"])
        _say(f"num_train_epochs auto: trained {metrics['auto_epochs']} epochs")
    if data.eval:
        metrics["eval_loss"] = round(_final_eval_loss(trainer), 6)
    if config.adaptive_rank:
        from ftkit.train.lora_variants import adalora_ranks, rank_summary

        metrics["adalora_ranks"] = adalora_ranks(trainer.model)
        _say(f"AdaLoRA final {rank_summary(metrics['adalora_ranks'])}")

    _save_final_model(trainer, tokenizer, output_dir, base_name=base_name, pissa_initial=pissa_initial)
    if not folder.manages:  # the other processes of a multi-process run are done; rank 0 checks and writes
        return TrainResult(output_dir=output_dir, metrics=metrics)
    if config.deepspeed:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # the check model loads in this process alone, not partitioned by ZeRO-3
    if config.plot_loss:
        from ftkit.train.callbacks import plot_loss

        plot_loss(output_dir)
    metrics["replay_examples"] = data.replay_examples
    warnings = []
    if any(c is not None for c in checks):
        general, learned = answers.checks_after_training(*checks, trainer.model, output_dir)
        if general is not None:
            metrics.update(general.metrics())
            warnings.append(general.warning(config, data.replay_examples))
        if learned is not None:
            metrics.update(learned.metrics())
            warnings.append(learned.warning(config, metrics["global_step"], metrics["epoch"]))
    atomic_write_text(output_dir / RESULTS_FILE, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    folder.finish()
    _print_summary(metrics, output_dir, config)
    for warning in filter(None, warnings):
        _say(f"[yellow]warning[/]: {escape(warning)}")
    return TrainResult(output_dir=output_dir, metrics=metrics)


def _steps_per_epoch(config: TrainConfig, data) -> int:
    """Optimizer steps per epoch, by the Trainer's own formula (known before it exists)."""
    batches = math.ceil(len(data.train) / (1 if data.packed else config.per_device_train_batch_size))
    return max(math.ceil(batches / config.gradient_accumulation_steps), 1)


def _total_optimizer_steps(config: TrainConfig, data, epochs: float) -> int:
    """The optimizer steps the Trainer will run at most: AdaLoRA's schedule."""
    if config.max_steps > 0:
        return config.max_steps
    return math.ceil(epochs * _steps_per_epoch(config, data))


def _plan_epochs(config: TrainConfig, data, small: bool, can_check: bool):
    from ftkit.train.small_sets import FIRST_ROUND_EPOCHS, plan_epochs

    per_epoch = _steps_per_epoch(config, data)
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * FIRST_ROUND_EPOCHS * per_epoch)
    epochs, rounds = plan_epochs(config, small, can_check, per_epoch, warmup)
    if rounds is not None:
        _say(f"num_train_epochs auto: {FIRST_ROUND_EPOCHS} epochs, then 2 more at a time until the learned check "
             f"passes or stops improving (at most {rounds.ends[-1]}); set num_train_epochs to fix it")
    return epochs, rounds


def _attach_rounds(trainer, rounds, answers, learned):
    """Round-end learned checks and the restarting learning rate of ``num_train_epochs: auto``."""
    from ftkit.train.callbacks import ProgressAndLogCallback
    from ftkit.train.small_sets import LearnedRoundsCallback

    for progress in trainer.callback_handler.callbacks:
        if isinstance(progress, ProgressAndLogCallback):
            progress.horizon = rounds.next_end  # the bar counts to the current round's end
    callback = LearnedRoundsCallback(rounds, lambda model: answers.learned_now(learned, model),
                                     report=lambda message: _say(escape(message)))
    trainer.add_callback(callback)
    trainer.lr_lambda = rounds.lr_factor
    trainer.stop_before_resuming = lambda model, step: rounds.checks_at(step) and callback.passes(model, step)
    trainer.rounds_state = lambda: {str(step): count for step, count in callback.learned.items()}
    trainer.restore_rounds = lambda saved: callback.learned.update({int(k): int(v) for k, v in saved.items()})
    return callback


def _describe_lora_variant(config: TrainConfig, model) -> None:
    if config.adaptive_rank:
        adapter = model.peft_config["default"]
        _say(f"AdaLoRA: ranks start at {adapter.init_r} and prune to an average of {adapter.target_r} between steps "
             f"{adapter.tinit} and {adapter.total_step - adapter.tfinal} of {adapter.total_step}, every "
             f"{adapter.deltaT} step(s)")
    if config.loraplus_lr_ratio is not None:
        _say(f"LoRA+: B matrices at {config.loraplus_lr_ratio:g} x learning_rate "
             f"({config.learning_rate * config.loraplus_lr_ratio:.3g})")
    if config.pissa_init:
        how = "exact SVD" if config.pissa_iter == -1 else f"{config.pissa_iter} fast SVD iterations"
        form = "converted to a plain LoRA on save" if config.pissa_convert else "saved in PiSSA form (pissa_convert: false)"
        _say(f"PiSSA: adapter initialised from each weight's principal part ({how}); {form}")


def _padding_free(config: TrainConfig, model, packed: bool) -> bool:
    """Padding-free batches pay off with varlen flash-attention; elsewhere one long row costs T^2 attention."""
    if packed:
        return False
    if config.padding_free is not None:
        return config.padding_free
    return getattr(model.config, "_attn_implementation", None) == "flash_attention_2"


def _largest_batch_tokens(data, batch_size: int, padding_free: bool) -> int:
    lengths = sorted((len(row["input_ids"]) for row in data.train), reverse=True)
    if data.packed:
        return lengths[0]
    if padding_free:
        return sum(lengths[:batch_size])
    return batch_size * lengths[0]


def _build_trainer(config: TrainConfig, model, tokenizer, data, precision: str, output_dir: Path,
                   padding_free: bool, user_callbacks: list, epochs: float):
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ftkit.data.packing import SupervisedCollator
    from ftkit.train.callbacks import ProgressAndLogCallback
    from ftkit.train.trainer import FtkitTrainer

    has_eval = bool(data.eval)
    eval_strategy = config.eval_strategy or ("steps" if has_eval else "no")
    if config.logging_dir:
        os.environ["TENSORBOARD_LOGGING_DIR"] = config.logging_dir
    warmup = config.warmup_steps if config.warmup_steps else config.warmup_ratio
    try:
        args = TrainingArguments(
            output_dir=str(output_dir),
            per_device_train_batch_size=1 if data.packed else config.per_device_train_batch_size,
            per_device_eval_batch_size=config.per_device_eval_batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            learning_rate=config.learning_rate, num_train_epochs=epochs, max_steps=config.max_steps,
            lr_scheduler_type=config.lr_scheduler_type, warmup_steps=warmup, weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm, optim=config.optim,
            logging_steps=config.logging_steps, save_strategy=config.save_strategy, save_steps=config.save_steps,
            save_total_limit=config.save_total_limit, eval_strategy=eval_strategy,
            eval_steps=config.eval_steps or (config.save_steps if eval_strategy == "steps" else None),
            bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not _has_accelerator(),
            seed=config.seed, data_seed=config.data_seed, report_to=[r for r in config.report_to if r != "none"],
            run_name=config.run_name, dataloader_num_workers=config.dataloader_num_workers, ddp_timeout=config.ddp_timeout,
            remove_unused_columns=False, disable_tqdm=True, label_names=["labels"],
            save_only_model=False, **{**_engine_arguments(config), **config.extra_training_args},
        )
    except (ValueError, TypeError) as err:
        raise FtkitError(f"transformers.TrainingArguments rejected the config: {str(err).splitlines()[0]}") from None
    if config.packing and config.per_device_train_batch_size != 1:
        _say(f"packing: each step takes one packed row of up to {config.cutoff_len} tokens per device "
             "(per_device_train_batch_size applies to unpacked data)")
    trainer = FtkitTrainer(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval or None,
        data_collator=SupervisedCollator(tokenizer, padding_free=padding_free),
        processing_class=tokenizer, length_grouping=config.group_by_length and not padding_free and not data.packed,
        loraplus=(config.loraplus_lr_ratio, config.loraplus_lr_embedding) if config.loraplus_lr_ratio else None,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if is_main_process():
        # The bar shows rank 0's tokens/s times the process count (every process takes batches of one size).
        trainer.add_callback(ProgressAndLogCallback(output_dir, lambda: trainer.tokens_seen * world_size()))
    if config.adaptive_rank:
        from ftkit.train.lora_variants import AdaLoraRankCallback

        trainer.add_callback(AdaLoraRankCallback(model))
    for callback in user_callbacks:
        trainer.add_callback(callback)
    return trainer


def _engine(config: TrainConfig) -> str:
    from ftkit.train.launch import engine_of

    return engine_of(config)


def _engine_arguments(config: TrainConfig) -> dict[str, Any]:
    """TrainingArguments for the multi-process engine: DeepSpeed's config, FSDP's settings, gloo on CPU."""
    from ftkit.train.launch import deepspeed_config, fsdp_settings

    arguments: dict[str, Any] = {}
    if config.deepspeed:
        arguments["deepspeed"] = deepspeed_config(config, world_size())
    if config.fsdp:
        arguments["fsdp"], arguments["fsdp_config"] = True, fsdp_settings(config)
    if world_size() > 1 and not _has_accelerator():
        arguments["ddp_backend"] = "gloo"
    return arguments


def _final_eval_loss(trainer) -> float:
    """Eval loss of the final weights: the Trainer's own evaluation at the last step if it ran one."""
    last = next((r for r in reversed(trainer.state.log_history) if "eval_loss" in r), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return float(last["eval_loss"])
    return float(trainer.evaluate()["eval_loss"])


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


def _final_metrics(trainer, train_output, data, checkpoint, started: float) -> dict[str, Any]:
    runtime = float(train_output.metrics.get("train_runtime", 0.0))
    tokens = sum_over_processes(trainer.tokens_seen)
    metrics = {
        "train_loss": round(trainer.run_train_loss(train_output), 6),
        "global_step": int(trainer.state.global_step),
        "epoch": round(float(trainer.state.epoch or 0), 4),
        "train_runtime_seconds": round(runtime, 2),
        "tokens_per_second": round(tokens / runtime, 1) if runtime else None,
        "tokens_this_process": trainer.tokens_seen,
        "train_examples": len(data.train),
        "resumed_from_step": checkpoint.step if checkpoint else None,
        "total_seconds": round(time.perf_counter() - started, 2),
    }
    if world_size() > 1:
        metrics.update(processes=world_size(), tokens_all_processes=tokens)
    return metrics


def _save_final_model(trainer, tokenizer, output_dir: Path, *, base_name: str | None = None,
                      pissa_initial: Path | None = None) -> None:
    """Write the adapter (or full model), tokenizer, chat template and generation config atomically; a PiSSA
    adapter is converted to a plain LoRA when ``pissa_initial`` holds its initial weights."""
    staging = output_dir / FINAL_STAGING_DIR
    if is_main_process():
        shutil.rmtree(staging, ignore_errors=True)
    model_config = getattr(getattr(trainer.model, "get_base_model", lambda: trainer.model)(), "config", None)
    if model_config is not None:
        model_config.use_cache = True  # turned off for gradient checkpointing; generation wants it back
    if trainer.is_fsdp_enabled:  # checkpoints stay sharded; the output is one plain model, gathered here
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if is_main_process():
            trainer._save(str(staging), state_dict=full)
    else:
        trainer.save_model(str(staging))  # every process: ZeRO-3 gathers the full weights here
    if not is_main_process():
        return
    if pissa_initial is not None:
        from ftkit.train.lora_variants import save_converted_pissa_adapter

        save_converted_pissa_adapter(trainer.model, staging, pissa_initial)
    tokenizer.save_pretrained(str(staging))
    recorded = read_adapter_config(staging) if base_name else None
    if recorded is not None:
        recorded["base_model_name_or_path"] = base_name
        (staging / ADAPTER_CONFIG_FILE).write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n",
                                                   encoding="utf-8")
    generation_config = getattr(trainer.model, "generation_config", None)
    if generation_config is not None and not (staging / "generation_config.json").exists():
        generation_config.save_pretrained(str(staging))
    for item in staging.iterdir():
        target = output_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    shutil.rmtree(staging, ignore_errors=True)


def _print_summary(metrics: dict[str, Any], output_dir: Path, config: TrainConfig) -> None:
    parts = [f"loss {metrics['train_loss']:.4f}", f"{metrics['global_step']} steps",
             f"{metrics['train_runtime_seconds']:.0f} s"]
    if metrics.get("tokens_per_second"):
        parts.append(f"{metrics['tokens_per_second']:.0f} tokens/s")
    if "eval_loss" in metrics:
        parts.append(f"eval loss {metrics['eval_loss']:.4f}")
    if metrics.get("general_answers_base_right"):
        parts.append(f"general answers kept {metrics['general_answers_kept']}/{metrics['general_answers_base_right']}")
    if metrics.get("learned_checked"):
        parts.append(f"training answers learned {metrics['learned_answers']}/{metrics['learned_checked']}")
    _say("[green]done[/]: " + ", ".join(parts))
    what = "adapter" if config.uses_lora else "model"
    _say(f"{what}, logs and plot in {escape(str(output_dir))}/")
    if config.uses_lora:
        _say(f"try it: ftkit chat --model {escape(config.model_name_or_path)} --adapter {escape(str(output_dir))}")
    else:
        _say(f"try it: ftkit chat --model {escape(str(output_dir))}")
