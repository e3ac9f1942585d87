"""The output folder of a training run: checked, locked and replaced so that nothing of the user's is lost.

Before anything heavy (tokenizer, data, model), ``claimed_output_dir`` refuses an output_dir that
cannot work, each with the reason:

- a file, a path under a file, or a folder this user cannot write to;
- the model being trained, an adapter being continued or a dataset file (or a folder holding one):
  a run writes there, and ``overwrite_output_dir`` would replace what it finds;
- a folder holding files ftkit did not write (``ftkit.train.checkpoints.foreign_entries``): ftkit trains
  into a new or empty folder, or one of its own runs;
- a folder another ftkit run is training into (``ftkit.train.output_lock``).

Then it takes the lock, creating the folder if needed; a run that is refused later (a bad lora_target,
an unusable dataset) removes the lock and any folder it created, so a refused run leaves nothing.

From ``RunFolder.start`` on, the folder's ``ftkit_status.json`` says whether the run is running (with a
heartbeat), finished, failed or interrupted (``ftkit.train.run_status``).

Replacing a run (``overwrite_output_dir: true``) happens in two steps. ``RunFolder.start``, called once
the model is loaded and the Trainer built, moves the previous run's files into ``.ftkit-previous`` and
writes the new config and manifest; the previous run is deleted when the first optimizer step has
finished. If the run fails before that, it is put back; if the process was killed before that, the next
run in the folder puts it back first. Only rank 0 of a multi-process launch manages the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftkit import __version__
from ftkit.errors import FtkitError
from ftkit.paths import atomic_write_text
from ftkit.run_files import RUN_CONFIG_FILE
from ftkit.train.checkpoints import (
    LOCK_FILE,
    PREVIOUS_RUN_DIR,
    clean_staging,
    foreign_entries,
    is_run_file_name,
    recorded_files,
    write_manifest,
)
from ftkit.train.output_lock import RunLock, acquire_run_lock
from ftkit.train.run_status import RunStatus

if TYPE_CHECKING:
    from ftkit.config import TrainConfig

_DELETING = PREVIOUS_RUN_DIR + ".deleting"
_PREPARING = PREVIOUS_RUN_DIR + ".tmp"  # becomes .ftkit-previous once the journal is in it
_MOVING = ".ftkit-moving.json"  # the journal: inside .ftkit-previous while the previous run's files move into it
_KEPT_WHILE_REPLACING = (LOCK_FILE, PREVIOUS_RUN_DIR, _DELETING, _PREPARING)


@contextlib.contextmanager
def claimed_output_dir(config: TrainConfig, report: Callable[[str], None]) -> Iterator[RunFolder]:
    """Check ``config.output_dir`` and hold it for the run in the block (see the module docstring)."""
    folder = RunFolder(Path(config.output_dir), report, overwrite=config.overwrite_output_dir)
    if not folder.manages:  # another process of a multi-process run: rank 0 checks, claims and writes
        yield folder
        return
    check_output_dir(config)
    folder.claim()
    try:
        with _sigterm_exits():
            yield folder
    except BaseException as error:
        folder.end(error)
        folder.undo_unstarted_run()
        raise
    finally:
        folder.release()


def check_output_dir(config: TrainConfig) -> None:
    """Refuse an output_dir that is a file, unwritable, an input of the run or not ftkit's; changes nothing."""
    output_dir = Path(config.output_dir).expanduser()
    check_writable_folder(output_dir)
    target = output_dir.resolve()
    for role, given, path in _run_inputs(config):
        source = path.expanduser().resolve()
        if target == source or target in source.parents:
            raise FtkitError(f"output_dir {output_dir} {'is' if target == source else 'contains'} the {role} ({given}); "
                             "choose an output_dir outside it: a run writes its files there and overwrite_output_dir "
                             "would replace what it finds.")
    foreign = foreign_entries(output_dir)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FtkitError(f"output_dir {output_dir} holds files ftkit did not write ({shown}); ftkit trains only into a "
                         "new or empty folder or one of its own runs, so choose another output_dir or move those files "
                         "out.")


def check_writable_folder(output_dir: Path) -> None:
    """Refuse a file, a path under a file, and a folder (or the nearest existing parent) this user cannot write."""
    if output_dir.is_file():
        raise FtkitError(f"output_dir {output_dir} is a file; choose a folder path (a new or empty folder, or an "
                         "earlier ftkit run).")
    existing = next((p for p in (output_dir, *output_dir.absolute().parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise FtkitError(f"output_dir {output_dir} cannot be created: {existing} is a file; choose a folder path that "
                         "is not under a file.")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        where = "it is read-only" if existing == output_dir else f"{existing} is read-only"
        raise FtkitError(f"output_dir {output_dir} is not writable for this user ({where}); choose a folder you can "
                         "write to.")


def _run_inputs(config: TrainConfig) -> Iterator[tuple[str, str, Path]]:
    """(role, key and value as given, local path) of the run's model, adapters and dataset files on disk."""
    from ftkit.data.registry import resolve_dataset

    model = Path(config.model_name_or_path).expanduser()
    if model.exists():
        yield "model being trained", f"model_name_or_path: {config.model_name_or_path}", model
    for adapter in config.adapter_name_or_path or []:
        if Path(adapter).expanduser().exists():
            yield "adapter being continued", f"adapter_name_or_path: {adapter}", Path(adapter)
    replay = [] if config.replay_source == "self" else [config.replay_source]
    for key, names in (("dataset", config.dataset), ("eval_dataset", config.eval_dataset or []),
                       ("replay_source", replay)):
        for name in names:
            try:
                spec = resolve_dataset(name, config.dataset_dir)
            except FtkitError:
                continue  # the data stage reports it, in its own words
            if spec.source == "file":
                yield "data file", f"{key}: {name}" + ("" if spec.given_as_path else f", {spec.location}"), \
                    Path(spec.location)


class RunFolder:
    """``output_dir`` while a run holds it: its lock, the previous run it replaces, what to undo on failure."""

    def __init__(self, path: Path, report: Callable[[str], None], *, overwrite: bool) -> None:
        self.path = path
        self.report = report
        self.overwrite = overwrite
        self.manages = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0
        self._lock: RunLock | None = None
        self._created: list[Path] = []  # folders this run made, deepest last
        self._was_empty = True
        self._started = False  # start() ran: files were written or moved
        self._replacing = False  # a previous run sits in .ftkit-previous
        self._trained = False  # the first optimizer step finished: the previous run is gone
        self._status: RunStatus | None = None

    # -- claim and release ----------------------------------------------------------------------------------
    def claim(self) -> None:
        """Create the folder if needed, take the lock, and put back a run an interrupted start moved aside."""
        if not self.manages:
            return
        absolute = self.path.absolute()
        missing = [p for p in (absolute, *absolute.parents) if not p.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise FtkitError(f"output_dir {self.path} cannot be created ({error.strerror or error}); choose a folder "
                             "you can write to.") from None
        self._created = list(reversed(missing))
        try:
            self._lock = acquire_run_lock(self.path, self.report)
        except OSError as error:
            self._remove_created()
            raise FtkitError(f"output_dir {self.path} is not writable for this user ({error.strerror or error}); "
                             "choose a folder you can write to.") from None
        except BaseException:
            self._remove_created()
            raise
        self._recover_interrupted_start()
        self._was_empty = not self._entries()

    def release(self) -> None:
        """Give up the lock and remove the folders this run created if they are empty."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only empty ones go

    # -- start, first step, finish ---------------------------------------------------------------------------
    def start(self, resolved_config: str, trainer: Any = None) -> None:
        """The point of no return: move a previous run aside (overwrite_output_dir), write the config and manifest.

        With ``trainer``, a callback deletes the previous run once the first optimizer step has finished.
        """
        if not self.manages:
            return
        self._started = True
        if self.overwrite and not self._was_empty:
            previous, names = self.path / PREVIOUS_RUN_DIR, self._entries()
            (self.path / _PREPARING).mkdir()
            atomic_write_text(self.path / _PREPARING / _MOVING, json.dumps(names))
            os.replace(self.path / _PREPARING, previous)  # .ftkit-previous never exists without its journal
            self._replacing = True
            for name in names:
                os.replace(self.path / name, previous / name)
            (previous / _MOVING).unlink()  # the move is complete; from here on, new files are the new run's
        clean_staging(self.path)
        atomic_write_text(self.path / RUN_CONFIG_FILE, resolved_config)
        self._status = RunStatus(self.path)
        self._status.start()
        write_manifest(self.path, __version__)
        if trainer is not None:
            trainer.add_callback(_step_callback(self))

    def first_step_done(self) -> None:
        """The new run trains: the previous one is deleted (renamed first, so a kill mid-delete is finished later)."""
        if self._trained:
            return
        self._trained = True
        if self._replacing:
            with contextlib.suppress(OSError):
                os.replace(self.path / PREVIOUS_RUN_DIR, self.path / _DELETING)
            for name in (_DELETING, PREVIOUS_RUN_DIR):
                shutil.rmtree(self.path / name, ignore_errors=True)
            self._replacing = False

    def step_done(self, step: int, max_steps: int | None) -> None:
        """An optimizer step finished: the previous run goes after the first; the status records the step."""
        self.first_step_done()
        if self._status is not None:
            self._status.progress(step, max_steps)

    def finish(self) -> None:
        """The run wrote everything: record it all in the manifest, and the status as finished."""
        if not self.manages:
            return
        self.first_step_done()
        write_manifest(self.path, __version__)
        self.end()

    def end(self, error: BaseException | None = None) -> None:
        """Write the run's final status (finished without ``error``); once, and only for a started run."""
        if self._status is not None:
            self._status.end(error)
            self._status = None

    def undo_unstarted_run(self) -> None:
        """After a failure before the first step: put a previous run back, or leave a new folder as it was."""
        if not self.manages or not self._started or self._trained:
            return
        if self._replacing:
            self._restore_previous()
        elif self._was_empty:
            for name in self._entries():
                _remove(self.path / name)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _entries(self) -> list[str]:
        """What the folder holds, apart from the lock and the folders that replacing a run uses."""
        return sorted(child.name for child in self.path.iterdir() if child.name not in _KEPT_WHILE_REPLACING)

    def _restore_previous(self) -> None:
        """Remove the new run's files and move the previous run's back from ``.ftkit-previous``.

        While the move-aside journal exists the move was not finished: what is still in the folder is the
        previous run's own, and the new run has written nothing yet.
        """
        previous = self.path / PREVIOUS_RUN_DIR
        if not (previous / _MOVING).exists():
            recorded = recorded_files(self.path) or set()
            for name in self._entries():
                if name in recorded or is_run_file_name(name):
                    _remove(self.path / name)
        for child in sorted(previous.iterdir()):
            if child.name != _MOVING and not (self.path / child.name).exists():
                os.replace(child, self.path / child.name)
        with contextlib.suppress(FileNotFoundError):
            (previous / _MOVING).unlink()
        with contextlib.suppress(OSError):
            previous.rmdir()
        self._replacing = False

    def _recover_interrupted_start(self) -> None:
        """A run killed between moving the previous run aside and its first step: put the previous run back."""
        for leftover in (_DELETING, _PREPARING):  # a deletion to finish; a move-aside that moved nothing yet
            shutil.rmtree(self.path / leftover, ignore_errors=True)
        if (self.path / PREVIOUS_RUN_DIR).is_dir():
            self._restore_previous()
            self.report(f"note: put back the previous run in {self.path}, which an interrupted start had moved aside "
                        f"into {PREVIOUS_RUN_DIR}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _step_callback(folder: RunFolder):
    """A TrainerCallback telling ``folder`` each optimizer step that has finished."""
    from transformers import TrainerCallback

    class StepDone(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            folder.step_done(state.global_step, state.max_steps)

    return StepDone()


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while the folder is held, so the lock is released (main thread only)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def exit_on_sigterm(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

