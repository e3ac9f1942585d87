"""What is in an output directory: which files are ftkit's, complete checkpoints, a finished run, what to resume from.

The HF Trainer writes checkpoints in place and ``get_last_checkpoint`` trusts the highest-numbered
folder, so a run killed mid-save resumes from a broken checkpoint. ftkit's trainer writes each
checkpoint into a staging folder and renames it into place (``FtkitTrainer._save_checkpoint``), and
this module additionally checks a checkpoint holds everything exact resume needs before using it.

Which files are ftkit's: a run records what it wrote in a manifest (``.ftkit-run.json``, written when
the run starts and when it finishes). In a folder with a manifest, the recorded names and the names a
run writes while it trains (``RUN_ARTIFACTS``, ``checkpoint-N``, staging folders, temporary files of
atomic writes) are ftkit's, so a run killed before it could record them still resumes. A folder without
a manifest is a run from before manifests existed only if every entry has a name a run writes and one of
them is a run's own record (``ftkit_config.yaml``, ``train_results.json``, ``trainer_log.jsonl``, a
checkpoint or a staging folder): a model folder (config.json, weights, tokenizer) alone is never taken
for a run. Anything else is not ftkit's, and ``ftkit.train.output_dir`` refuses to train into it.
These checks need no heavy imports: they run before any model is loaded.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ftkit.errors import FtkitError
from ftkit.paths import atomic_write_text
from ftkit.run_files import (
    ADAPTER_CONFIG_FILE,
    LOSS_PLOT_FILE,
    RUN_CONFIG_FILE,
    RUN_RESULTS_FILE,
    TRAINER_LOG_FILE,
)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STAGING_DIR = ".ftkit-staging"
FINAL_STAGING_DIR = ".ftkit-final"  # where run.py assembles the final model before moving it into place
RESULTS_FILE = RUN_RESULTS_FILE
MANIFEST_FILE = ".ftkit-run.json"  # what the run in this folder wrote
LOCK_FILE = ".ftkit-lock"  # the process training into this folder (ftkit.train.output_lock)
PREVIOUS_RUN_DIR = ".ftkit-previous"  # an overwritten run, kept until the new one has started
# Exact resume needs the optimizer, the scheduler and every RNG state, not just the weights.
RESUME_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth")
_WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
                 "adapter_model.bin", "pytorch_model.bin")
# Names an ftkit run writes into output_dir: its records, the final adapter or model with its tokenizer
# (save_pretrained's file names), the Trainer's training_args.bin and tensorboard's runs/.
RUN_ARTIFACTS = frozenset({
    RUN_RESULTS_FILE, TRAINER_LOG_FILE, LOSS_PLOT_FILE, RUN_CONFIG_FILE, ADAPTER_CONFIG_FILE, "config.json",
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "README.md",
    "training_args.bin", "runs", *_WEIGHT_FILES,
})
_RUN_RECORDS = (RUN_CONFIG_FILE, RUN_RESULTS_FILE, TRAINER_LOG_FILE, STAGING_DIR, FINAL_STAGING_DIR)
_FTKIT_INTERNAL = (MANIFEST_FILE, LOCK_FILE, PREVIOUS_RUN_DIR, PREVIOUS_RUN_DIR + ".deleting", PREVIOUS_RUN_DIR + ".tmp")
_SHARD_PATTERN = re.compile(r"^model-\d+-of-\d+\.safetensors$")
_TEMPORARY_PATTERN = re.compile(r"^\.(?P<name>.+?)\.[^.]*\.tmp$|^\.training_loss\.tmp\.png$")  # atomic writes


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint folder with weights and every file exact resume needs."""
    has_weights = any((path / name).is_file() for name in _WEIGHT_FILES) or any(path.glob("model-*.safetensors"))
    return has_weights and all((path / name).is_file() for name in RESUME_FILES)


def list_checkpoints(output_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir() and is_complete_checkpoint(child):
            found.append(Checkpoint(child, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def is_finished_run(output_dir: Path) -> bool:
    return (output_dir / RESULTS_FILE).is_file()


def is_run_file_name(name: str) -> bool:
    """Whether ``name`` is one an ftkit run writes into its output_dir (see the module docstring)."""
    if name in RUN_ARTIFACTS or name in _FTKIT_INTERNAL or name in (STAGING_DIR, FINAL_STAGING_DIR):
        return True
    if CHECKPOINT_PATTERN.match(name) or _SHARD_PATTERN.match(name):
        return True
    temporary = _TEMPORARY_PATTERN.match(name)
    return bool(temporary) and (temporary.group("name") is None or is_run_file_name(temporary.group("name")))


def recorded_files(output_dir: Path) -> set[str] | None:
    """The names the manifest of ``output_dir`` records (empty if it is unreadable); None without a manifest."""
    path = output_dir / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {str(name) for name in files} if isinstance(files, list) else set()


def foreign_entries(output_dir: Path) -> list[str]:
    """The entries of ``output_dir`` that are not ftkit's (sorted); empty for a new, empty or ftkit folder."""
    if not output_dir.is_dir():
        return []
    names = sorted(child.name for child in output_dir.iterdir())
    recorded = recorded_files(output_dir)
    if recorded is None and not any(name in _RUN_RECORDS or CHECKPOINT_PATTERN.match(name) for name in names):
        return [name for name in names if name not in _FTKIT_INTERNAL]  # no run was ever here
    return [name for name in names if name not in (recorded or set()) and not is_run_file_name(name)]


def write_manifest(output_dir: Path, version: str) -> None:
    """Record every entry of ``output_dir`` (ftkit's own bookkeeping aside) as written by this run."""
    files = sorted(child.name for child in output_dir.iterdir()
                   if child.name not in _FTKIT_INTERNAL and not _TEMPORARY_PATTERN.match(child.name))
    atomic_write_text(output_dir / MANIFEST_FILE,
                      json.dumps({"written_by": f"ftkit {version}", "files": files}, indent=1) + "\n")


def clean_staging(output_dir: Path) -> None:
    """Remove what a killed save left in the staging folders; they never hold a complete checkpoint."""
    shutil.rmtree(output_dir / STAGING_DIR, ignore_errors=True)
    shutil.rmtree(output_dir / FINAL_STAGING_DIR, ignore_errors=True)


def plan_resume(output_dir: Path, resume_from_checkpoint: str | bool | None, overwrite: bool) -> Checkpoint | None:
    """Decide where training starts; refuse what cannot work, before anything heavy is loaded.

    ``None`` (default): the last complete checkpoint if there is one. ``True``: the same, but one must
    exist. ``False``: start over (only with overwrite_output_dir when checkpoints exist). A path: that one.
    Nothing is deleted here: with ``overwrite`` the previous run is moved aside only when the new one starts
    (``ftkit.train.output_dir.RunFolder.start``), so a refused run never costs the old one.
    """
    if is_finished_run(output_dir) and not overwrite:
        raise FtkitError(f"output_dir {output_dir} already holds a finished run ({RESULTS_FILE}); choose another "
                         "output_dir, or set overwrite_output_dir: true to replace it.")
    checkpoints = [] if overwrite else list_checkpoints(output_dir)
    if isinstance(resume_from_checkpoint, str):
        path = Path(resume_from_checkpoint)
        if not path.is_dir():
            raise FtkitError(f"resume_from_checkpoint {path} is not a directory; give a checkpoint-N folder "
                             f"(found: {', '.join(c.path.name for c in checkpoints) or 'none'}).")
        if not is_complete_checkpoint(path):
            missing = [n for n in RESUME_FILES if not (path / n).is_file()]
            raise FtkitError(f"resume_from_checkpoint {path} is incomplete (missing {', '.join(missing) or 'weights'}); "
                             "pick an earlier checkpoint.")
        if overwrite and output_dir.is_dir() and path.resolve().parent == output_dir.resolve():
            raise FtkitError(f"resume_from_checkpoint {path} is inside output_dir, which overwrite_output_dir: true "
                             "would empty; remove overwrite_output_dir to resume, or resume_from_checkpoint to start "
                             "over.")
        return Checkpoint(path, checkpoint_step(path))
    if resume_from_checkpoint is False:
        if checkpoints:
            raise FtkitError(f"output_dir {output_dir} holds checkpoints but resume_from_checkpoint is false; set "
                             "overwrite_output_dir: true to start over, or drop the key to resume.")
        return None
    if not checkpoints:
        if resume_from_checkpoint is True:
            reason = "overwrite_output_dir: true starts over" if overwrite else \
                f"output_dir {output_dir} holds no complete checkpoint"
            raise FtkitError(f"resume_from_checkpoint is true but {reason}; remove one of the two keys.")
        return None
    return checkpoints[-1]


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint was saved at (its trainer_state.json, else its folder name)."""
    try:
        return int(json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        match = CHECKPOINT_PATTERN.match(path.name)
        return int(match.group(1)) if match else 0


# Keys that may change between a run and its resume without changing what is trained.
_RESUME_NEUTRAL_KEYS = {
    "resume_from_checkpoint", "overwrite_output_dir", "logging_steps", "save_steps", "save_total_limit",
    "report_to", "run_name", "logging_dir", "plot_loss", "dataloader_num_workers", "preprocessing_num_workers",
    "overwrite_cache", "eval_steps", "per_device_eval_batch_size", "ddp_timeout", "cache_dir", "hf_hub_token",
    "ms_hub_token",
}


def changed_training_keys(previous_config: Path, current: dict) -> list[str]:
    """Keys whose value differs from the run being resumed (its saved ftkit_config.yaml), as 'key: old -> new'."""
    import yaml

    try:
        previous = yaml.safe_load(previous_config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return []
    return [f"{key}: {previous.get(key)!r} -> {value!r}" for key, value in current.items()
            if key not in _RESUME_NEUTRAL_KEYS and key in previous and previous[key] != value]
