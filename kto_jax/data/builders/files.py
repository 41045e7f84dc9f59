"""TFDS builder for bring-your-own feedback files (``config.data.sources="files:PATTERN"``).

    builder = files_builder(FilesOptions(train="logs/feedback-*.jsonl", holdout_fraction=0.05), data_dir)
    builder.download_and_prepare()
    source = builder.as_data_source("train")

Formats and schemas: ``kto_jax.data.formats`` / ``kto_jax.data.schemas``. One source holds
one schema, detected from the first row of its first train file (after the column map) or
named by ``schema``; its kind (unary or paired) decides the features. Every row is
validated while preparing: a file whose first row lacks a column of the schema, a row of
another schema than the source's (also in another file of the source), an empty file, an
unreadable file, fail naming the file and, for rows, the ``where`` of the row. A bad row (a
malformed JSON line, a missing or null field, an unknown label value, an empty text) fails
naming file, row and field, or is counted (``counts[...].bad``) and skipped with
``skip_bad_records=True``.

Keyed by content: the builder config's name is a hash of the files' sha256 digests (and
names, relative to their common folder) and the options, so the same files prepare once
and a changed, added or renamed file prepares again, in its own folder of
``{data_dir}/files/``.

Splits: ``train`` from the ``train`` files, ``test`` from the ``test`` files when given.
Else, with ``holdout_fraction`` f > 0, a record goes to ``test`` when the first 8 bytes of
``sha256`` of its prompt turns (``base.prompt_key``: the JSON of ``[roles, contents]``),
read as a big-endian integer and divided by 2**64, are ``< f``, else to ``train``: every
completion of a prompt lands in the same split, and the rule does not depend on file order.
A DatasetDict folder (``save_to_disk`` of a ``DatasetDict``) as ``train`` gives its own
splits. HALOs rows may carry a ``split`` field (HALOs' ``get_feedback`` keeps the rows whose
``split`` is the split it loads): such a row is kept only in the split it names (with a
holdout, its ``split`` decides instead of the hash) and counted as ``other_split`` in the
others; give one HALOs file as both ``train`` and ``test`` to use its own splits. Rows of
the other split of a holdout are counted as ``other_split`` too.

Record ids: ``files/{file name}/{where}`` (``files/fb.jsonl/line-3``), the file name taken
relative to the folder common to all of the source's files.

Metadata (``files_metadata(builder)``, saved with the prepared data and restored from it):
``schema``, ``kind``, ``form`` (standard or conversational, of the first row: rows of one
source may mix forms), ``columns``, ``holdout_fraction``, ``splits``, ``files`` (``path``, ``name``,
``split``, ``sha256``), ``counts`` per split (``read``, ``kept``, ``filtered``, ``bad``),
``config_name``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import tensorflow_datasets as tfds

from kto_jax import faults
from kto_jax.data import formats
from kto_jax.data.builders.base import (
    FeedbackBuilder,
    RecordCounts,
    paired_features,
    prompt_key,
    unary_features,
)
from kto_jax.data.schemas import BadRecord
from kto_jax.errors import InputError


class _CustomConfigNotice(logging.Filter):
    """Drops tfds' "Using custom data configuration" warning: every Files config is custom (its
    name is the files' content key), so the warning would print on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Using custom data configuration")


logging.getLogger("absl").addFilter(_CustomConfigNotice())

KEY_VERSION = 1  # bump when a change to this builder or to formats changes what the same files prepare to


@dataclasses.dataclass(frozen=True)
class FilesOptions:
    train: str  # pattern of the train files, or a save_to_disk folder
    test: str = ""  # pattern of the eval files ("" = none)
    holdout_fraction: float = 0.0  # prompts held out as "test" by a hash of the prompt, when test == ""
    schema: str = "auto"
    columns: str = ""


@dataclasses.dataclass(frozen=True)
class SourceFile:
    path: str
    split: str  # the split this file's rows are read for ("train" feeds both splits of a holdout)
    name: str  # relative to the source's common folder; the ids' file name
    sha256: str


@dataclasses.dataclass(frozen=True)
class FilesPlan:
    """What a Files builder prepares: the files, the schema found in the first one, the key."""

    options: FilesOptions
    files: tuple[SourceFile, ...]
    splits: tuple[str, ...]
    schema: str
    kind: str
    form: str
    columns: tuple[tuple[str, str], ...]
    first: str  # "path, where" of the row the schema was read from
    key: str  # the builder config name


def holdout_split(prompt: dict, fraction: float) -> str:
    """``test`` when the prompt's hash falls below ``fraction`` (see the module docstring), else ``train``."""
    bucket = int.from_bytes(prompt_key(prompt)[:8], "big") / 2**64
    return "test" if bucket < fraction else "train"


def _first_row(path: str, skip_bad_records: bool) -> tuple[str, dict]:
    """The first (good) row of a file; an empty file fails."""
    skipped = []
    for where, row in formats.read_rows(path, on_bad=(lambda w, e: skipped.append(w)) if skip_bad_records else None):
        return where, row
    raise formats.FileFormatError(
        f"{path}: no records (empty file{', or only bad rows: ' + ', '.join(skipped) if skipped else ''})"
    )


def plan_files(options: FilesOptions, *, skip_bad_records: bool = False) -> FilesPlan:
    """Resolve the files, read the schema from the first row, compute the content key."""
    if not 0.0 <= options.holdout_fraction < 1.0:
        raise InputError(f"config.data.holdout_fraction={options.holdout_fraction!r} should be in [0, 1)")
    if options.test and options.holdout_fraction > 0:
        raise InputError(
            f"config.data.holdout_fraction={options.holdout_fraction!r} and test files "
            f"({options.test!r}) both make a test split; set one of them"
        )
    columns = formats.parse_columns(options.columns)
    train = formats.expand_paths(options.train)
    dataset_dict = formats.datasets_splits(train[0]) if len(train) == 1 else None
    if dataset_dict is not None:
        if options.test or options.holdout_fraction > 0:
            raise InputError(
                f"{train[0]} is a DatasetDict folder with its own splits {sorted(dataset_dict)}; "
                "leave config.data.holdout_fraction and the test files unset"
            )
        listed = [(split, path) for split, path in dataset_dict.items()]
        splits = tuple(dataset_dict)
    else:
        test = formats.expand_paths(options.test) if options.test else []
        for path in train + test:
            if formats.datasets_splits(path) is not None:
                raise InputError(f"{path} is a DatasetDict folder: give it alone as the train files")
        listed = [("train", p) for p in train] + [("test", p) for p in test]
        splits = ("train", "test") if test or options.holdout_fraction > 0 else ("train",)
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for _, p in listed])
    files = tuple(
        SourceFile(os.path.abspath(p), split, os.path.relpath(os.path.abspath(p), root), formats.file_digest(p))
        for split, p in listed
    )
    where, row = _first_row(files[0].path, skip_bad_records)
    mapped = formats.apply_columns(row, columns)
    schema = formats.check_columns(mapped, options.schema, files[0].path, columns, list(row))
    key_input = {
        "version": KEY_VERSION,
        "files": [[f.split, f.name, f.sha256] for f in files],
        "options": dataclasses.asdict(dataclasses.replace(options, train="", test="")),
        "skip_bad_records": skip_bad_records,
    }
    key = hashlib.sha256(json.dumps(key_input, sort_keys=True).encode()).hexdigest()[:16]
    return FilesPlan(
        options,
        files,
        splits,
        schema,
        formats.schema_kind(schema),
        formats.row_form(mapped, schema),
        tuple(columns.items()),
        f"{files[0].path}, {where}",
        key,
    )


def files_builder(options: FilesOptions, data_dir: str, *, skip_bad_records: bool = False) -> Files:
    """The Files builder of ``options`` (not prepared yet: call ``download_and_prepare``)."""
    plan = plan_files(options, skip_bad_records=skip_bad_records)
    return Files(plan=plan, data_dir=os.path.expanduser(data_dir), skip_bad_records=skip_bad_records)


def files_metadata(builder: Files) -> dict:
    """The builder's metadata (schema, kind, files and digests, counts) as plain JSON data."""
    return json.loads(json.dumps(dict(builder.info.metadata)))


class Files(FeedbackBuilder):
    """Feedback read from local files (JSON Lines, JSON, Parquet, CSV, datasets folders)."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = None  # the files are named by the options, not placed in manual_dir

    def __init__(self, *, plan: FilesPlan, **kwargs):
        self.plan = plan
        config = tfds.core.BuilderConfig(
            name=plan.key, description=f"{plan.schema} feedback from {len(plan.files)} file(s)"
        )
        super().__init__(config=config, **kwargs)

    def _features(self):
        return unary_features() if self.plan.kind == "unary" else paired_features()

    def _info(self) -> tfds.core.DatasetInfo:
        plan = self.plan
        metadata = tfds.core.MetadataDict(
            schema=plan.schema,
            kind=plan.kind,
            form=plan.form,
            columns=dict(plan.columns),
            holdout_fraction=plan.options.holdout_fraction,
            splits=list(plan.splits),
            config_name=plan.key,
            files=[dataclasses.asdict(f) for f in plan.files],
            counts={},
        )
        return tfds.core.DatasetInfo(
            builder=self, description=self.__doc__, features=self._features(), metadata=metadata
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self.plan.splits}

    def _sources(self, split: str) -> list[SourceFile]:
        holdout = self.plan.options.holdout_fraction > 0
        return [f for f in self.plan.files if f.split == ("train" if holdout else split)]

    def _generate_examples(self, split: str):
        sources = self._sources(split)
        for source in sources:
            yield from self._read(source, split)
        counts = self.finish_split(split, [s.path for s in sources])
        self.info.metadata["counts"][split] = dataclasses.asdict(counts)

    def _read(self, source: SourceFile, split: str):
        """The records of one file for ``split``: base.read_records' bad-record handling and
        counts, over formats.read_rows' (where, row) (read_records names rows by 0-based index)."""
        counts = self.counts.setdefault(f"{self.name}/{split}", RecordCounts())
        path = source.path

        def bad(where: str, error: BadRecord):
            if not self.skip_bad_records:
                raise BadRecord(f"{path}, {where}: {error} (set skip_bad_records=True to skip and count such records)")
            counts.bad += 1

        read = 0  # this file's rows, bad ones included

        def on_bad(where: str, error: BadRecord):
            nonlocal read
            read += 1
            counts.read += 1
            bad(where, error)

        rows = 0  # this file's well-formed rows
        for where, row in formats.read_rows(path, on_bad=on_bad):
            faults.point("data.prepare")
            read += 1
            rows += 1
            counts.read += 1
            try:
                record = self._parse(source, split, where, row, first=rows == 1)
            except BadRecord as e:
                bad(where, e)
                continue
            if isinstance(record, str):  # a documented filter
                counts.filter(record)
                continue
            counts.kept += 1
            yield record["id"], record
        if read == 0:
            raise formats.FileFormatError(f"{path}: no records (empty file)")

    def _parse(self, source: SourceFile, split: str, where: str, row: dict, *, first: bool):
        """The record of one row, or the name of the filter that drops it."""
        plan = self.plan
        columns = dict(plan.columns)
        mapped = formats.apply_columns(row, columns)
        if first:
            found = formats.check_columns(mapped, plan.options.schema, source.path, columns, list(row))
        elif plan.options.schema == "auto":
            found = formats.detect_schema(mapped) or plan.schema  # no schema: normalize names the missing field
        else:
            found = plan.schema
        if found != plan.schema:
            raise formats.FileFormatError(
                f"{source.path}, {where}: mixed schemas: this row is {found} (columns {sorted(mapped)}), but the source's "
                f"schema is {plan.schema} (read from {plan.first}); one source holds one schema: give these files as "
                "separate sources, or map their columns (config.data.columns)"
            )
        record = formats.normalize(mapped, plan.schema, columns)
        row_split = mapped.get("split") if plan.schema in (formats.HALOS_BINARY, formats.HALOS_PAIRWISE) else None
        row_split = row_split if isinstance(row_split, str) and row_split else None
        if plan.options.holdout_fraction > 0:
            target = row_split or holdout_split(record["prompt"], plan.options.holdout_fraction)
        else:
            target = row_split or source.split
        if target != split:
            return "other_split"
        record["id"] = f"files/{source.name}/{where.replace(' ', '-')}"
        return record
