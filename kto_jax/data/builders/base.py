"""What every feedback builder shares: the record schema, source files, bad-record handling.

A paired record is ``{"id", "prompt", "chosen", "rejected"}`` plus the source's own fields
(scores, domains); a unary record is ``{"id", "prompt", "completion", "desirable"}``. The
prompt is a conversation, a sequence of ``{"role": "user"|"assistant", "content"}`` turns
(the chat template is applied later, by ``kto_jax.data.tokenize``); completions are the
final assistant turn's text. The hh, shp and oasst records also carry ``sft_target``: the
completion HALOs legacy's SFT trains for the record's prompt (the same for every record of
a prompt; ``kto_jax.data.feedback.sft_targets_per_prompt``, ``config.data.sft_targets``).

Each builder prepares from ``manual_dir`` when the source's files are there under their
upstream names, and downloads them from the public location otherwise. Records are written
as array_record and read with ``as_data_source`` (random access, no TensorFlow).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from kto_jax import faults
from kto_jax.data.schemas import ROLES, BadRecord
from kto_jax.errors import MissingInput


def prompt_feature() -> tfds.features.Sequence:
    return tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()})


def paired_features(**extra) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "prompt": prompt_feature(),
            "chosen": tfds.features.Text(),
            "rejected": tfds.features.Text(),
            **extra,
        }
    )


def unary_features(**extra) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "prompt": prompt_feature(),
            "completion": tfds.features.Text(),
            "desirable": np.bool_,
            **extra,
        }
    )


def prompt_key(prompt: dict) -> bytes:
    """A short key of a record's prompt conversation (the builders' per-prompt ``sft_target``)."""
    return hashlib.sha256(json.dumps([prompt["role"], prompt["content"]], ensure_ascii=False).encode("utf-8")).digest()


def turns(*pairs: tuple[str, str]) -> dict:
    """A prompt conversation in the record layout: turns(("user", "hi"), ("assistant", "hello"))."""
    for role, _ in pairs:
        if role not in ROLES:
            raise ValueError(f"turn role {role!r} is not one of {ROLES}")
    return {"role": [r for r, _ in pairs], "content": [c for _, c in pairs]}


class SourceUnavailable(MissingInput):
    """An upstream file that is neither in manual_dir nor downloadable (no network)."""


OFFLINE_VARIABLES = ("KTO_JAX_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def _host(url: str) -> str:
    from urllib.parse import urlparse

    return urlparse(url).hostname or url


def reachable(host: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to ``host``:443 opens within ``timeout`` seconds."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


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
        logging.info(
            "%s: read %d source records, kept %d, filtered %s, bad (skipped) %d",
            name,
            self.read,
            self.kept,
            self.filtered or "none",
            self.bad,
        )


class FeedbackBuilder(tfds.core.GeneratorBasedBuilder):
    """Base for the feedback builders: array_record output, manual_dir or download.

    Subclasses set ``FEATURES`` (or override ``_features``) and implement
    ``_split_generators`` / ``_generate_examples``; these read each source file with
    ``read_records`` and end each split with ``finish_split``. ``skip_bad_records=True``
    (constructor argument) skips malformed records and counts them instead of failing.
    """

    VERSION = tfds.core.Version("1.0.0")
    FEATURES = None
    # tfds only lets a builder read dl_manager.manual_dir when this is set; subclasses name their files.
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Optional: place the source's upstream files in manual_dir under their upstream names; "
        "files not found there are downloaded."
    )

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
        return manual_file(dl_manager, name) or self.download(dl_manager, {name: url})[name]

    def source_files(self, dl_manager, urls: dict[str, str]) -> dict[str, str]:
        """``source_file`` for each ``name: url``; the files not in manual_dir are downloaded in one call."""
        paths = {name: path for name in urls if (path := manual_file(dl_manager, name)) is not None}
        missing = {name: url for name, url in urls.items() if name not in paths}
        if missing:
            paths.update(self.download(dl_manager, missing))
        return paths

    def download(self, dl_manager, urls: dict[str, str]) -> dict[str, str]:
        """``{name: local path}`` of the upstream files ``{name: url}``, downloaded; without network
        (an offline variable set, or a host that does not answer) a ``SourceUnavailable`` at once,
        naming each file, where to put it and where to fetch it, instead of tfds' minutes of retries."""
        offline = [v for v in OFFLINE_VARIABLES if os.environ.get(v, "").strip().lower() in ("1", "true", "yes")]
        reason = f"{offline[0]}=1" if offline else None
        if reason is None:
            down = sorted({host for host in map(_host, urls.values()) if not reachable(host)})
            reason = f"{', '.join(down)} cannot be reached" if down else None
        if reason is not None:
            folder = manual_dir_or_none(dl_manager) or f"config.data.manual_dir (e.g. ~/data/{self.name})"
            wanted = "; ".join(f"{os.path.join(folder, name)} from {url}" for name, url in sorted(urls.items()))
            raise SourceUnavailable(
                f"{self.name}: {len(urls)} upstream file(s) are not in manual_dir and cannot be downloaded ({reason}). "
                f"Fetch them on a machine with internet and put them at: {wanted} (with several sources, each "
                f"reads manual_dir/{self.name}/ when that folder exists)"
            )
        return {name: os.fspath(p) for name, p in dl_manager.download(urls).items()}

    def read_records(self, path: str, split: str, parse, rows=None) -> Iterator[tuple[str, dict]]:
        """Yield ``parse(obj, counts, index)`` results for each JSON line of ``path`` (``.gz`` too).

        ``index`` is the 0-based index of the object among the file's records (its non-blank
        lines). ``rows`` (e.g. a parquet file's rows) are read instead of the JSON lines when
        given; errors name them ``row {index}``. ``parse`` returns a list of ``(key, record)``
        (empty when a documented filter drops the object). A malformed line or record fails
        naming the file, line and problem, or is counted and skipped when ``skip_bad_records``.
        A file without records fails.
        """
        counts = self.counts.setdefault(f"{self.name}/{split}", RecordCounts())
        items = _json_lines(path) if rows is None else ((f"row {i}", row) for i, row in enumerate(rows))
        index = -1
        for index, (where, item) in enumerate(items):
            faults.point("data.prepare")
            counts.read += 1
            try:
                records = parse(_json_object(item) if rows is None else item, counts, index)
            except BadRecord as e:
                if not self.skip_bad_records:
                    raise BadRecord(
                        f"{path}, {where}: {e} (set skip_bad_records=True to skip and count such records)"
                    ) from None
                counts.bad += 1
                continue
            counts.kept += len(records)
            yield from records
        if index < 0:
            raise BadRecord(f"{path}: no records (empty file)")

    def finish_split(self, split: str, paths, kept: str = "records", read: str = "") -> RecordCounts:
        """Fail when ``split`` (read from ``paths``) kept no record, naming its counts (tfds would
        fail with a bare "No examples were yielded"), else log its counts; ``kept`` / ``read``
        name what was kept and read ("pairs", "trees")."""
        key = f"{self.name}/{split}"
        counts = self.counts.setdefault(key, RecordCounts())
        if counts.kept == 0:
            raise BadRecord(
                f"{', '.join(paths)}: no {split} {kept} kept (read {counts.read}{' ' + read if read else ''}, "
                f"filtered {counts.filtered or 'none'}, bad {counts.bad})"
            )
        counts.log(key)
        return counts


def manual_dir_or_none(dl_manager) -> str | None:
    """The manual_dir when it was given, exists and is not empty, else None ("download
    instead"): ``dl_manager.manual_dir`` raises AssertionError in those cases."""
    try:
        return os.fspath(dl_manager.manual_dir)
    except AssertionError:
        return None


def manual_file(dl_manager, name: str) -> str | None:
    """``manual_dir/name`` when the manual_dir holds it, else None."""
    manual_dir = manual_dir_or_none(dl_manager)
    path = os.path.join(manual_dir, name) if manual_dir is not None else None
    return path if path is not None and os.path.exists(path) else None


def is_kind(value, kind) -> bool:
    """``isinstance(value, kind)``, except that a bool is no number: it is of ``kind`` only
    when ``kind`` names ``bool``."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return isinstance(value, kinds) and (not isinstance(value, bool) or bool in kinds)


def require(obj: dict, field: str, kind=str):
    """``obj[field]`` if present with type ``kind`` (see ``is_kind``), else a BadRecord naming the field."""
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    if field not in obj:
        raise BadRecord(f"missing field {field!r}")
    value = obj[field]
    if not is_kind(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise BadRecord(f"field {field!r} should be {names}, got {type(value).__name__}")
    return value


def _json_lines(path: str) -> Iterator[tuple[str, str]]:
    """``("line {n}", text)`` for each non-blank line of ``path`` (1-based line numbers)."""
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                yield f"line {line_no}", line


def _json_object(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRecord(f"malformed JSON ({e.msg} at column {e.colno})") from None


def _open_text(path: str):
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")
