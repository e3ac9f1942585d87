"""Read a dataset's raw records: local files (json, jsonl, csv, parquet, txt), the HF hub, ModelScope.

JSON and JSON Lines are parsed here rather than by ``datasets`` so that a bad line is reported with
its file and line number and non-UTF-8 input with its line and byte offset. Local CSV, Parquet and Arrow
files are read with pandas and pyarrow directly (the libraries ``datasets`` itself uses): ``load_dataset``
would copy each file into the Hugging Face cache, print progress bars and hide the cause of a parse error.
Hub datasets go through ``datasets`` (and ``modelscope.MsDataset``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ftkit.data.registry import FILE_SUFFIXES, DatasetSpec
from ftkit.errors import FtkitError

Record = dict[str, Any]


def dataset_files(spec: DatasetSpec) -> list[Path]:
    """The files behind a local dataset (a file, or every data file of a folder, sorted)."""
    path = Path(spec.location)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
        if not files:
            raise FtkitError(f"Dataset '{spec.name}': folder {path} holds no {', '.join(FILE_SUFFIXES)} files.")
        return files
    if not path.is_file():
        raise FtkitError(f"Dataset '{spec.name}': file {path} does not exist; fix file_name in dataset_info.json "
                         "or the path.")
    return [path]


def content_digest(spec: DatasetSpec) -> str:
    """A digest of the data itself (file bytes, or hub id + revision info), for the preprocessing cache."""
    digest = hashlib.sha256()
    if spec.source == "file":
        for path in dataset_files(spec):
            digest.update(str(path.name).encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    else:
        digest.update(f"{spec.source}:{spec.location}:{spec.subset}:{spec.split}".encode())
    return digest.hexdigest()


def read_records(spec: DatasetSpec, max_samples: int | None = None) -> list[Record]:
    """All records of a dataset (at most ``max_samples``, then ``num_samples`` from the registry)."""
    if spec.source == "file":
        records: list[Record] = []
        for path in dataset_files(spec):
            records.extend(_read_file(path))
    elif spec.source == "hf_hub":
        records = _read_hf_hub(spec)
    else:
        records = _read_ms_hub(spec)
    limit = min(x for x in (max_samples, spec.num_samples, len(records)) if x is not None)
    return records[:limit]


def _read_file(path: Path) -> list[Record]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return list(_read_json_lines(path))
    if suffix == ".json":
        text = _read_text(path)
        if text.lstrip().startswith("{") and "\n{" in text.strip():
            return list(_read_json_lines(path))  # JSON Lines saved as .json, as LLaMA-Factory accepts
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise FtkitError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}.") from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise FtkitError(f"{path} must hold a JSON list of objects (one per example).")
        return data
    if suffix == ".txt":
        return [{"text": line} for line in _read_text(path).splitlines() if line.strip()]
    return _read_columnar(path)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not part of the data
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise FtkitError(f"{path}:{line}: not UTF-8 text (byte {err.start}); convert the file to UTF-8.") from None


def _read_json_lines(path: Path) -> Iterator[Record]:
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise FtkitError(f"{path}:{number}: invalid JSON line: {err.msg} (column {err.colno}).") from None
        if not isinstance(record, dict):
            raise FtkitError(f"{path}:{number}: each line must be a JSON object, not {type(record).__name__}.")
        yield record


def _read_columnar(path: Path) -> list[Record]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path)
    import pyarrow as pa

    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:  # .arrow: the IPC stream format `datasets` writes, or the IPC file format
            try:
                with pa.memory_map(str(path)) as source:
                    table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                with pa.memory_map(str(path)) as source:
                    table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as err:
        raise FtkitError(f"{path}: cannot be read as {suffix[1:]}: {str(err).splitlines()[0]}.") from None
    return table.to_pylist()


def _read_csv(path: Path) -> list[Record]:
    import pandas as pd

    text = _read_text(path)  # reports a non-UTF-8 byte with its line
    if not text.strip():
        return []
    try:
        frame = pd.read_csv(io.StringIO(text))
    except (pd.errors.ParserError, ValueError) as err:
        raise FtkitError(f"{path}: cannot be read as csv: {str(err).strip().splitlines()[0]}.") from None
    # Empty cells become None (as `datasets` reads them), not NaN.
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def _read_hf_hub(spec: DatasetSpec) -> list[Record]:
    from datasets import load_dataset

    try:
        table = load_dataset(spec.location, name=spec.subset, split=spec.split, data_dir=spec.folder,
                             token=os.environ.get("HF_TOKEN"))
    except Exception as err:  # offline/not cached/unknown id: datasets raises a variety of types
        raise FtkitError(f"Dataset '{spec.name}': cannot load {spec.location} from the Hugging Face hub or its "
                         f"local cache ({type(err).__name__}: {str(err).splitlines()[0][:200]}); download it "
                         "once with network access, or use a local file.") from None
    return table.to_list()


def _read_ms_hub(spec: DatasetSpec) -> list[Record]:
    try:
        from modelscope import MsDataset
    except ImportError:
        raise FtkitError(f"Dataset '{spec.name}' comes from ModelScope; install it with `pip install modelscope`.") from None
    try:
        table = MsDataset.load(spec.location, subset_name=spec.subset, split=spec.split, data_dir=spec.folder)
    except Exception as err:  # modelscope raises many types for offline/unknown ids
        raise FtkitError(f"Dataset '{spec.name}': cannot load {spec.location} from ModelScope or its local cache "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); download it once with "
                         "network access, or use a local file.") from None
    if hasattr(table, "to_hf_dataset"):
        table = table.to_hf_dataset()
    return [dict(r) for r in table]
