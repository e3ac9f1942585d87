"""What is in an output directory: which files are ftkit's, complete checkpoints, a finished run, what to resume from.

The HF Trainer writes checkpoints in place and ``get_last_checkpoint`` trusts the highest-numbered
folder, so a run killed mid-save resumes from a broken checkpoint. ftkit's trainer writes each
checkpoint into a staging folder and renames it into place (``FtkitTrainer._save_checkpoint``), and
this module additionally checks a checkpoint holds everything exact resume needs before using it.
Each checkpoint also gets a manifest written last (``ftkit_checkpoint.json``: every file's size and
SHA-256, and how many processes of which engine saved it), so a shard that went missing or was cut short
later (a copy between machines, a full disk on shared storage) is found before resuming, and the run falls
back to the previous complete checkpoint with a message instead of loading it half-way.

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

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ftkit.errors import FtkitError
from ftkit.paths import atomic_write_text
from ftkit.run_files import (
    ADAPTER_CONFIG_FILE,
    CHECKPOINT_MANIFEST,
    CHECKPOINT_PATTERN,
    LOSS_PLOT_FILE,
    RUN_CONFIG_FILE,
    RUN_RESULTS_FILE,
    RUN_STATUS_FILE,
    TRAINER_LOG_FILE,
)

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
    RUN_RESULTS_FILE, TRAINER_LOG_FILE, LOSS_PLOT_FILE, RUN_CONFIG_FILE, RUN_STATUS_FILE, ADAPTER_CONFIG_FILE, "config.json",
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "README.md",
    "training_args.bin", "runs", *_WEIGHT_FILES,
})
_RUN_RECORDS = (RUN_CONFIG_FILE, RUN_RESULTS_FILE, TRAINER_LOG_FILE, RUN_STATUS_FILE, STAGING_DIR, FINAL_STAGING_DIR)
_FTKIT_INTERNAL = (MANIFEST_FILE, LOCK_FILE, PREVIOUS_RUN_DIR, PREVIOUS_RUN_DIR + ".deleting", PREVIOUS_RUN_DIR + ".tmp")
_SHARD_PATTERN = re.compile(r"^model-\d+-of-\d+\.safetensors$")
_TEMPORARY_PATTERN = re.compile(r"^\.(?P<name>.+?)\.[^.]*\.tmp$|^\.training_loss\.tmp\.png$")  # atomic writes


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint folder with weights and every file exact resume needs (sizes checked, not checksums)."""
    return checkpoint_problem(path, verify_checksums=False) is None


def checkpoint_problem(path: Path, *, verify_checksums: bool) -> str | None:
    """What is wrong with checkpoint folder ``path`` (None when it can be resumed).

    With a manifest, every file it lists must be there with its size (and, with ``verify_checksums``, its
    SHA-256); a checkpoint from before manifests needs weights and ``RESUME_FILES``."""
    manifest = read_checkpoint_manifest(path)
    if manifest is None:
        if (path / CHECKPOINT_MANIFEST).exists():
            return f"its {CHECKPOINT_MANIFEST} is unreadable"
        has_weights = any((path / name).is_file() for name in _WEIGHT_FILES) or any(path.glob("model-*.safetensors"))
        missing = [name for name in RESUME_FILES if not (path / name).is_file()]
        if not has_weights:
            missing.insert(0, "the weights")
        return f"{', '.join(missing)} missing" if missing else None
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size:,} bytes, {expected['size']:,} expected"
        if verify_checksums and _sha256(file) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def write_checkpoint_manifest(path: Path, *, processes: int, engine: str) -> None:
    """Record every file of checkpoint folder ``path`` (size and SHA-256) and who saved it; call it last."""
    files = {str(file.relative_to(path)): {"size": file.stat().st_size, "sha256": _sha256(file)}
             for file in sorted(path.rglob("*")) if file.is_file() and file.name != CHECKPOINT_MANIFEST}
    atomic_write_text(path / CHECKPOINT_MANIFEST, json.dumps(
        {"processes": processes, "engine": engine, "files": files}, indent=1) + "\n")


def read_checkpoint_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads((path / CHECKPOINT_MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) and {"size", "sha256"} <= v.keys()
                                                  for v in files.values()):
            return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


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


def plan_resume(output_dir: Path, resume_from_checkpoint: str | bool | None, overwrite: bool, *,
                world_size: int = 1, report: Callable[[str], None] | None = None) -> Checkpoint | None:
    """Decide where training starts; refuse what cannot work, before anything heavy is loaded.

    ``None`` (default): the last complete checkpoint if there is one. ``True``: the same, but one must
    exist. ``False``: start over (only with overwrite_output_dir when checkpoints exist). A path: that one.
    With ``report``, the checkpoint chosen is verified against its manifest's checksums, and a damaged one is
    reported and skipped for the one before. ``world_size``: the processes of this run (a DeepSpeed
    checkpoint resumes only with as many as saved it).
    Nothing is deleted here: with ``overwrite`` the previous run is moved aside only when the new one starts
    (``ftkit.train.output_dir.RunFolder.start``), so a refused run never costs the old one.
    """
    if is_finished_run(output_dir) and not overwrite:
        raise FtkitError(f"output_dir {output_dir} already holds a finished run ({RESULTS_FILE}); choose another "
                         "output_dir, or set overwrite_output_dir: true to replace it.")
    checkpoints = [] if overwrite else _resumable(output_dir, report)
    if isinstance(resume_from_checkpoint, str):
        path = Path(resume_from_checkpoint)
        if not path.is_dir():
            raise FtkitError(f"resume_from_checkpoint {path} is not a directory; give a checkpoint-N folder "
                             f"(found: {', '.join(c.path.name for c in checkpoints) or 'none'}).")
        problem = checkpoint_problem(path, verify_checksums=report is not None)
        if problem:
            raise FtkitError(f"resume_from_checkpoint {path} cannot be resumed ({problem}); pick an earlier "
                             "checkpoint.")
        if overwrite and output_dir.is_dir() and path.resolve().parent == output_dir.resolve():
            raise FtkitError(f"resume_from_checkpoint {path} is inside output_dir, which overwrite_output_dir: true "
                             "would empty; remove overwrite_output_dir to resume, or resume_from_checkpoint to start "
                             "over.")
        return _resumed_by(Checkpoint(path, checkpoint_step(path)), world_size, report)
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
    return _resumed_by(checkpoints[-1], world_size, report)


def _resumable(output_dir: Path, report: Callable[[str], None] | None) -> list[Checkpoint]:
    """The complete checkpoints, oldest first; with ``report``, the newest is checksum-verified and damaged
    newest ones are reported and dropped until one verifies."""
    checkpoints = list_checkpoints(output_dir)
    if report is None:
        return checkpoints
    found = {c.path.name for c in checkpoints}
    for child in sorted(output_dir.iterdir() if output_dir.is_dir() else [], key=lambda p: p.name):
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir() and child.name not in found:
            report(f"{child.name} cannot be resumed ({checkpoint_problem(child, verify_checksums=False)}); it is "
                   "skipped")
    while checkpoints:
        problem = checkpoint_problem(checkpoints[-1].path, verify_checksums=True)
        if problem is None:
            break
        report(f"{checkpoints[-1].path.name} cannot be resumed ({problem}); it is skipped")
        checkpoints.pop()
    return checkpoints


def _resumed_by(checkpoint: Checkpoint, world_size: int, report: Callable[[str], None] | None) -> Checkpoint:
    """Refuse a DeepSpeed or tensor-parallel checkpoint saved by another number of processes; note it for the others."""
    manifest = read_checkpoint_manifest(checkpoint.path) or {}
    saved = int(manifest.get("processes", 1))
    if saved == world_size:
        return checkpoint
    if manifest.get("engine") in ("deepspeed", "tensor parallel"):
        engine = "DeepSpeed" if manifest["engine"] == "deepspeed" else "tensor-parallel"
        raise FtkitError(f"{checkpoint.path} was saved by {saved} {engine} processes and this run has {world_size}; "
                         f"{engine} shards resume only with as many processes as saved them, so launch "
                         f"{saved} (nproc_per_node x nnodes), or start over with resume_from_checkpoint: false and "
                         "overwrite_output_dir: true.")
    if report is not None:
        report(f"{checkpoint.path.name} was saved by {saved} process(es) and this run has {world_size}: the weights, "
               "optimizer and step carry over, but the batches each process sees from here differ from an "
               "uninterrupted run's")
    return checkpoint


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint was saved at (its trainer_state.json, else its folder name)."""
    try:
        return int(json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        match = CHECKPOINT_PATTERN.match(path.name)
        return int(match.group(1)) if match else 0


# Keys that may change between a run and its resume without changing what is trained.
_RESUME_NEUTRAL_KEYS = {
    "output_dir",  # the same folder, perhaps spelled another way (ftkit board resumes with its absolute path)
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
