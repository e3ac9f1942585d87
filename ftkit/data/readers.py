"""Read a dataset's raw records: local files (json, jsonl, csv, tsv, parquet, arrow, txt), the HF hub, ModelScope.

JSON and JSON Lines are parsed here rather than by ``datasets`` so that a bad line is reported with
its file and line number and non-UTF-8 input with its line and byte offset. CSV (and TSV, the same with
tabs; LLaMA-Factory has no TSV reader, but reading it is cheap and exact) is read with Python's ``csv``
module rather than pandas: pandas turns a row with more fields than the header into an index and reads the
rest shifted (``a,red, yellow, blue`` became prompt " yellow", reply " blue", exit 0), turns ``NA`` or
``None`` cells into missing values and ``007`` into 7. Here a row with more fields than the header is an
error naming the file and line; a row with fewer fields reads its missing trailing fields as missing (the
way ``csv.DictReader`` and pandas read them); an empty cell is missing (None); every other value stays the
text it is. Parquet and Arrow files are read with pyarrow directly: ``load_dataset`` would copy each file
into the Hugging Face cache, print progress bars and hide the cause of a parse error. Hub datasets go
through ``datasets`` (and ``modelscope.MsDataset``).

A dataset path that is a folder is read as all its data files (hidden ones and other suffixes left out),
sorted by path, when they are of one format (JSON and JSON Lines count as one), as LLaMA-Factory reads a
folder. A folder holding ``dataset_info.json`` is a ``dataset_dir``, not a dataset, and is refused.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ftkit.data.registry import FILE_SUFFIXES, REGISTRY_FILE, DatasetSpec
from ftkit.errors import FtkitError

Record = dict[str, Any]


def dataset_files(spec: DatasetSpec) -> list[Path]:
    """The files behind a local dataset: a file of a supported format, or every data file of a folder, sorted."""
    path = Path(spec.location)
    if path.is_dir():
        return _folder_files(spec, path)
    if not path.is_file():
        raise FtkitError(f"Dataset '{spec.name}': file {path} does not exist; fix file_name in dataset_info.json "
                         "or the path.")
    if path.suffix.lower() not in FILE_SUFFIXES:
        kind = f"a {path.suffix} file" if path.suffix else "a file without a suffix"
        raise FtkitError(f"Dataset '{spec.name}': {path} is {kind}, which ftkit does not read as data; datasets "
                         f"are {_format_list()} files, so convert it to one of them (JSON Lines is the simplest).")
    return [path]


def _format_list() -> str:
    names = [suffix[1:] for suffix in FILE_SUFFIXES]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _format_family(path: Path) -> str:
    """The format a file is read as; JSON and JSON Lines are one format, as in LLaMA-Factory."""
    suffix = path.suffix.lower()[1:]
    return "json" if suffix == "jsonl" else suffix


def _folder_files(spec: DatasetSpec, folder: Path) -> list[Path]:
    """Every data file under ``folder`` (hidden files and folders left out), sorted; all of one format."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    registries = [p for p in files if p.name == REGISTRY_FILE]
    if registries:
        holder = registries[0].parent
        raise FtkitError(f"Dataset '{spec.name}': folder {holder} holds {REGISTRY_FILE}, so it is a dataset "
                         f"registry, not a dataset; use dataset_dir: {holder} and name a dataset from it.")
    if not files:
        raise FtkitError(f"Dataset '{spec.name}': folder {folder} holds no {_format_list()} files; put the "
                         "data files there or point at a file.")
    families = {_format_family(p): p for p in reversed(files)}  # the first file of each format
    if len(families) > 1:
        examples = ", ".join(f"{p.relative_to(folder)} ({family})" for family, p in sorted(families.items()))
        raise FtkitError(f"Dataset '{spec.name}': folder {folder} mixes data formats ({examples}), but a folder is "
                         "read as all its files of one format; move the others out or register each file.")
    return files


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
    """The records of one file whose suffix ``dataset_files`` has accepted."""
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
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path, "," if suffix == ".csv" else "\t")
    return _read_arrow_table(path)


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


def _read_arrow_table(path: Path) -> list[Record]:
    """A Parquet file, or an Arrow file (the IPC stream format ``datasets`` writes, or the IPC file format)."""
    import pyarrow as pa

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            try:
                with pa.memory_map(str(path)) as source:
                    table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                with pa.memory_map(str(path)) as source:
                    table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as err:
        raise FtkitError(f"{path}: cannot be read as {suffix[1:]}: {str(err).splitlines()[0]}.") from None
    return table.to_pylist()


def _read_delimited(path: Path, delimiter: str) -> list[Record]:
    """CSV or TSV records: the first row names the columns; an empty cell or a missing trailing field is None."""
    kind = "csv" if delimiter == "," else "tsv"
    quoting = ('put double quotes around a value that contains a comma ("red, yellow, blue")' if kind == "csv"
               else "put double quotes around a value that contains a tab")
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter, strict=True)
    csv.field_size_limit(2**31 - 1)  # long replies are normal; the default limit is 128 KiB per cell
    header: list[str] | None = None
    records: list[Record] = []
    start = 1  # the line the current row starts on (a quoted value may span lines)
    try:
        for row in reader:
            if row and header is None:
                header = _checked_header(path, start, row)
            elif row and len(row) > len(header):
                raise FtkitError(f"{path}:{start}: this row has {len(row)} fields but the header has {len(header)} "
                                 f"({', '.join(header)}); {quoting}.")
            elif row:
                cells = row + [""] * (len(header) - len(row))
                records.append({name: cell or None for name, cell in zip(header, cells, strict=True)})
            start = reader.line_num + 1
    except csv.Error as err:
        if "unexpected end of data" in str(err):
            raise FtkitError(f"{path}:{start}: the double quote that opens a value in this row is never closed; "
                             "close it (a quote inside a quoted value is written twice: \"\").") from None
        raise FtkitError(f"{path}:{start}: cannot be read as {kind}: {err} (a quote inside a quoted value is written "
                         "twice: \"\").") from None
    return records


def _checked_header(path: Path, line: int, header: list[str]) -> list[str]:
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise FtkitError(f"{path}:{line}: the header names column '{duplicated[0]}' more than once; give each "
                         "column its own name.")
    return header


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
