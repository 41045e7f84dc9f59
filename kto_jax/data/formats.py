"""Bring-your-own feedback files: read rows from common formats, normalize them to records.

Formats (by extension): JSON Lines (``.jsonl``, ``.jsonl.gz``; a row is named ``line N``,
1-based, blank lines skipped), JSON (``.json``: a list of objects, or an object holding
exactly one list of objects; ``item N``, 1-based), Parquet (``.parquet``; ``row N``), CSV
(``.csv``, header row first; ``row N`` counts data rows from 1; every cell is a string, and a
cell holding a JSON list of ``{"role", "content"}`` messages is parsed into that list), and a
Hugging Face ``datasets`` folder written by ``save_to_disk`` (``row N`` over its shards):
``state.json`` lists the shards (``data-00000-of-0000K.arrow``, Arrow IPC *stream* files)
next to ``dataset_info.json``; a ``DatasetDict`` folder holds ``dataset_dict.json``
(``{"splits": [...]}``) and one such folder per split. ``datasets`` is not imported.

Schemas and normalization live in ``kto_jax.data.schemas`` (re-exported here): see its
docstring for the schemas, their detection and the column map.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator

from kto_jax.data.schemas import (  # noqa: F401  (re-exported: formats is the one entry point)
    CANONICAL,
    HALOS_BINARY,
    HALOS_PAIRWISE,
    IMPLICIT,
    PREFERENCE,
    SCHEMAS,
    UNPAIRED,
    BadRecord,
    FileFormatError,
    apply_columns,
    check_columns,
    detect_schema,
    normalize,
    parse_columns,
    parse_label,
    row_form,
    schema_kind,
    split_implicit,
)
from kto_jax.errors import MissingInput

FORMATS = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv", "a datasets save_to_disk folder")


# ---------------------------------------------------------------- paths and digests


def expand_paths(pattern: str) -> list[str]:
    """The files of ``pattern``: one path, a glob, or a comma-separated list of them; ``~``
    expanded; sorted, without repeats. A part that matches nothing is a MissingInput (a FileNotFoundError)."""
    parts = [p.strip() for p in pattern.split(",") if p.strip()]
    if not parts:
        raise MissingInput(f"no files: the file pattern {pattern!r} is empty")
    found = set()
    for part in parts:
        path = os.path.expanduser(part)
        matches = glob.glob(path) if glob.has_magic(path) else ([path] if os.path.exists(path) else [])
        if not matches:
            raise MissingInput(f"no file matches {part!r} (file pattern {pattern!r})")
        found.update(os.path.normpath(m) for m in matches)
    return sorted(found)


def datasets_splits(path: str) -> dict[str, str] | None:
    """``{split: folder}`` of a ``DatasetDict.save_to_disk`` folder, else None."""
    index = os.path.join(path, "dataset_dict.json")
    if not os.path.isfile(index):
        return None
    with open(index, encoding="utf-8") as f:
        splits = json.load(f).get("splits")
    if not isinstance(splits, list) or not splits:
        raise FileFormatError(f'{index}: expected {{"splits": [names...]}}')
    return {str(s): os.path.join(path, str(s)) for s in splits}


def _arrow_shards(path: str) -> list[str]:
    """The Arrow shards of a ``Dataset.save_to_disk`` folder, in ``state.json``'s order."""
    state = os.path.join(path, "state.json")
    if os.path.isfile(state):
        with open(state, encoding="utf-8") as f:
            names = [d["filename"] for d in json.load(f).get("_data_files", [])]
    else:
        names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(path), "data-*.arrow")))
    if not names:
        raise FileFormatError(
            f"{path}: a folder, but not a datasets save_to_disk folder (no state.json or "
            f"data-*.arrow, no dataset_dict.json); give files or a glob such as {path}/*.jsonl"
        )
    return [os.path.join(path, n) for n in names]


def file_digest(path: str) -> str:
    """sha256 (hex) of a file's bytes; of a datasets folder, over its shards' names and digests."""
    if os.path.isdir(path):
        splits = datasets_splits(path)
        parts = (
            [[s, file_digest(p)] for s, p in splits.items()]
            if splits is not None
            else [[os.path.basename(p), file_digest(p)] for p in _arrow_shards(path)]
        )
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- rows


def read_rows(path: str, on_bad: Callable[[str, BadRecord], None] | None = None) -> Iterator[tuple[str, dict]]:
    """``(where, row)`` for each row of ``path`` (see the module docstring for the formats).

    A malformed JSON line, or a JSON item that is no object, is a BadRecord naming the file
    and the line; with ``on_bad``, ``on_bad(where, error)`` is called instead and the row is
    skipped. A file that cannot be read at all raises FileFormatError.
    """

    def bad(where: str, message: str):
        if on_bad is None:
            raise BadRecord(f"{path}, {where}: {message}")
        on_bad(where, BadRecord(message))

    name = path.lower()
    if os.path.isdir(path):
        if datasets_splits(path) is not None:
            raise FileFormatError(f"{path} is a DatasetDict folder (dataset_dict.json); read one of its split folders")
        yield from _numbered(_arrow_rows(p) for p in _arrow_shards(path))
    elif name.endswith((".jsonl", ".jsonl.gz")):
        with _open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    bad(f"line {line_no}", f"malformed JSON ({e.msg} at column {e.colno})")
                    continue
                if not isinstance(row, dict):
                    bad(f"line {line_no}", f"expected a JSON object, got {type(row).__name__}")
                    continue
                yield f"line {line_no}", row
    elif name.endswith(".json"):
        for i, item in enumerate(_json_items(path), start=1):
            if isinstance(item, dict):
                yield f"item {i}", item
            else:
                bad(f"item {i}", f"expected a JSON object, got {type(item).__name__}")
    elif name.endswith(".parquet"):
        yield from _numbered([_parquet_rows(path)])
    elif name.endswith(".csv"):
        yield from _numbered([_csv_rows(path)])
    else:
        raise FileFormatError(f"{path}: unknown file format; supported: {', '.join(FORMATS)}")


def _open_text(path: str):
    if path.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _numbered(sources) -> Iterator[tuple[str, dict]]:
    i = 0
    for rows in sources:
        for row in rows:
            i += 1
            yield f"row {i}", row


def _json_items(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise FileFormatError(
                f"{path}: a JSON object should hold exactly one list of objects "
                f"(it holds {len(lists)}: keys {sorted(data)})"
            )
        data = lists[0]
    if not isinstance(data, list):
        raise FileFormatError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    return data


def _parquet_rows(path: str) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise FileFormatError(f"{path}: not a readable parquet file ({e})") from None
    for batch in parquet.iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _arrow_rows(path: str) -> Iterator[dict]:
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(pa.memory_map(path))
    except (pa.ArrowException, OSError) as e:
        raise FileFormatError(f"{path}: not an Arrow IPC stream file ({e})") from None
    for batch in reader:
        yield from batch.to_pylist()


def _csv_rows(path: str) -> Iterator[dict]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        for row in csv.DictReader(f):
            yield {k: _csv_cell(v) for k, v in row.items()}


def _csv_cell(text):
    """A cell holding a JSON list of messages as that list; any other cell as its text."""
    if isinstance(text, str) and text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
            return value
    return text
