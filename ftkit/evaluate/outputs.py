"""An evaluation's two files: ``samples.jsonl`` written as items finish, ``results.json`` written atomically.

Every finished item is appended to ``samples.jsonl`` as one line, flushed and fsynced before the next: a
killed run loses at most the line it was writing, and ``--resume`` reads the complete lines back (a torn
last line is cut off) and runs only the items not in them. ``results.json`` is written at the start with
``"status": "running"`` and the run's settings, and replaced at the end with the scores; a resumed run must
have the same settings (a different model or limit would mix two runs' samples).

A folder holding another run's results is refused unless ``--overwrite`` (the two files are replaced;
nothing else in the folder is touched) or ``--resume``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError
from ftkit.paths import atomic_write_text
from ftkit.run_files import EVALUATION_RESULTS_FILE

RESULTS_NAME = EVALUATION_RESULTS_FILE
SAMPLES_NAME = "samples.jsonl"


@dataclass
class OutputFiles:
    """Where one evaluation writes (``results`` and its ``samples`` beside it)."""

    results: Path
    samples: Path
    done: dict[int, dict[str, Any]] = field(default_factory=dict)  # doc id -> sample, finished earlier

    @classmethod
    def at(cls, output_dir: str | None, output_file: str | None, default_dir: str) -> OutputFiles:
        """``output_file`` (LLaMA-Factory's ``--output_file``) with its samples beside it, else ``output_dir``."""
        if output_file:
            results = Path(output_file).expanduser()
            samples = results.with_name(SAMPLES_NAME if results.name == RESULTS_NAME else f"{results.stem}.{SAMPLES_NAME}")
            return cls(results, samples)
        folder = Path(output_dir or default_dir).expanduser()
        return cls(folder / RESULTS_NAME, folder / SAMPLES_NAME)

    def check(self, *, overwrite: bool, resume: bool) -> None:
        """Refuse paths that cannot be written and another run's results (before anything heavy is loaded)."""
        for path in (self.results, self.samples):
            for parent in [path.parent, *path.parent.parents]:
                if parent.exists() and not parent.is_dir():
                    raise FtkitError(f"Output path {path} is under the file {parent}; choose another --output.")
            if path.is_dir():
                raise FtkitError(f"Output path {path} is a folder; choose another --output or --output_file.")
        existing = [p for p in (self.results, self.samples) if p.exists()]
        if existing and not (overwrite or resume):
            raise FtkitError(f"{existing[0]} already holds another evaluation's results; pass --resume to continue "
                             "that run, --overwrite to replace it, or choose another --output.")

    def start(self, settings: dict[str, Any], *, overwrite: bool, resume: bool) -> None:
        """Create the files for this run (reading back a previous run's samples with ``resume``)."""
        self.results.parent.mkdir(parents=True, exist_ok=True)
        if resume and (self.results.exists() or self.samples.exists()):
            self._check_same_settings(settings)
            self.done = read_samples(self.samples)
        elif overwrite:
            self.samples.unlink(missing_ok=True)
        self.samples.touch()
        atomic_write_text(self.results, json.dumps({"status": "running", **settings}, indent=2) + "\n")

    def _check_same_settings(self, settings: dict[str, Any]) -> None:
        try:
            previous = json.loads(self.results.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # a killed first write: the samples decide
        compared = {**{k: v for k, v in settings.items() if k != "settings"}, **settings.get("settings", {})}
        before = {**previous, **previous.get("settings", {})}
        for key, value in compared.items():
            old = before.get(key, value)
            if old != value:
                raise FtkitError(f"--resume: {self.results} was a run with {key} {old!r}, this one has {value!r}; "
                                 "resume with the same settings or pass --overwrite to start again.")

    def append(self, sample: dict[str, Any]) -> None:
        """Add one finished item to samples.jsonl, on disk before this returns."""
        with self.samples.open("a", encoding="utf-8") as f:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[sample["doc_id"]] = sample

    def finish(self, results: dict[str, Any]) -> None:
        atomic_write_text(self.results, json.dumps(results, indent=2, ensure_ascii=False) + "\n")


def read_samples(path: Path) -> dict[int, dict[str, Any]]:
    """The complete lines of a samples file by doc id; a torn last line (a kill mid-write) is cut off."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with path.open("r+b") as f:
            f.truncate(len(complete))
    found = {}
    for line in complete.decode("utf-8").splitlines():
        if line.strip():
            sample = json.loads(line)
            found[sample["doc_id"]] = sample
    return found
