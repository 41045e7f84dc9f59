"""What every feedback builder shares: the record schema, source files, bad-record handling.

A paired record is ``{"id", "prompt", "chosen", "rejected"}`` plus the source's own fields
(scores, domains); a unary record is ``{"id", "prompt", "completion", "desirable"}``. The
prompt is a conversation, a sequence of ``{"role": "user"|"assistant", "content"}`` turns
(the chat template is applied later, by ``kto_jax.data.tokenize``); completions are the
final assistant turn's text.

Each builder prepares from ``manual_dir`` when the source's files are there under their
upstream names, and downloads them from the public location otherwise. Records are written
as array_record and read with ``as_data_source`` (random access, no TensorFlow).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
from typing import Iterator

import numpy as np

import tensorflow_datasets as tfds
from absl import logging

ROLES = ("user", "assistant")


def prompt_feature() -> tfds.features.Sequence:
    return tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()})


def paired_features(**extra) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {"id": tfds.features.Text(), "prompt": prompt_feature(), "chosen": tfds.features.Text(),
         "rejected": tfds.features.Text(), **extra}
    )


def unary_features(**extra) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {"id": tfds.features.Text(), "prompt": prompt_feature(), "completion": tfds.features.Text(),
         "desirable": np.bool_, **extra}
    )


def turns(*pairs: tuple[str, str]) -> dict:
    """A prompt conversation in the record layout: turns(("user", "hi"), ("assistant", "hello"))."""
    for role, _ in pairs:
        if role not in ROLES:
            raise ValueError(f"turn role {role!r} is not one of {ROLES}")
    return {"role": [r for r, _ in pairs], "content": [c for _, c in pairs]}


class BadRecord(ValueError):
    """A source record that does not have the expected structure."""


@dataclasses.dataclass
class RecordCounts:
    """How many source records were read, kept, filtered (by a documented rule) and bad."""

    read: int = 0
    kept: int = 0
    filtered: dict = dataclasses.field(default_factory=dict)
    bad: int = 0

    def filter(self, reason: str) -> None:
        self.filtered[reason] = self.filtered.get(reason, 0) + 1

    def log(self, name: str) -> None:
        logging.info("%s: read %d source records, kept %d, filtered %s, bad (skipped) %d",
                     name, self.read, self.kept, self.filtered or "none", self.bad)


class FeedbackBuilder(tfds.core.GeneratorBasedBuilder):
    """Base for the feedback builders: array_record output, manual_dir or download.

    Subclasses set ``FEATURES`` (or override ``_features``) and implement
    ``_split_generators`` / ``_generate_examples``. ``skip_bad_records=True`` (constructor
    argument) skips malformed records and counts them instead of failing.
    """

    VERSION = tfds.core.Version("1.0.0")
    FEATURES = None

    def __init__(self, *, skip_bad_records: bool = False, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        self.skip_bad_records = skip_bad_records
        self.counts: dict[str, RecordCounts] = {}
        super().__init__(**kwargs)

    def _features(self):
        return self.FEATURES

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=self._features(), homepage=getattr(self, "HOMEPAGE", None))

    def source_file(self, dl_manager, name: str, url: str) -> str:
        """``manual_dir/name`` when present, else ``url`` downloaded by the download manager."""
        manual_dir = dl_manager.manual_dir if dl_manager.manual_dir and os.path.exists(dl_manager.manual_dir) else None
        if manual_dir is not None:
            path = os.path.join(manual_dir, name)
            if os.path.exists(path):
                return path
        return os.fspath(dl_manager.download(url))

    def read_records(self, path: str, split: str, parse) -> Iterator[tuple[str, dict]]:
        """Yield ``parse(obj, counts)`` results for each JSON line of ``path`` (``.gz`` too).

        ``parse`` returns a list of ``(key, record)`` (empty when a documented filter drops
        the object). A malformed line or record fails naming the file, line and problem,
        or is counted and skipped when ``skip_bad_records``.
        """
        counts = self.counts.setdefault(f"{self.name}/{split}", RecordCounts())
        with _open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                counts.read += 1
                try:
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise BadRecord(f"malformed JSON ({e.msg} at column {e.colno})") from None
                    records = parse(obj, counts)
                except BadRecord as e:
                    if not self.skip_bad_records:
                        raise BadRecord(f"{path}, line {line_no}: {e} (set skip_bad_records=True to skip and count such records)") from None
                    counts.bad += 1
                    continue
                counts.kept += len(records)
                yield from records
        if counts.read == 0:
            raise BadRecord(f"{path}: no records (empty split)")
        counts.log(f"{self.name}/{split}")


def require(obj: dict, field: str, kind=str):
    """``obj[field]`` if present with type ``kind``, else a BadRecord naming the field."""
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    if field not in obj:
        raise BadRecord(f"missing field {field!r}")
    value = obj[field]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise BadRecord(f"field {field!r} should be {names}, got {type(value).__name__}")
    return value


def _open_text(path: str):
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")
