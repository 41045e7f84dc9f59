"""Feedback sources by name: one TFDS builder each, prepared once, read by random access.

    examples = load_examples("shp+hh+oasst", "train", data_dir="~/tensorflow_datasets")
    examples, stats = load_mixture("hh:0.5+files:logs/fb-*.jsonl:0.5", "train", data_dir, seed=0,
                                   files={"holdout_fraction": 0.1})

``config.data.sources`` is ``+``-separated entries, each ``name`` or ``name/config`` (a
registered builder: ``synthetic/unary``, ``hh/helpful-base``) or ``files:PATTERN`` (your own
files, ``kto_jax/data/builders/files.py``), optionally followed by ``:WEIGHT``. The sources of
one mixture are all paired or all unary.

Weights are the mixture's proportions: with weights ``w_i`` (sum ``W``) and ``n_i`` examples
available, the mixture takes ``round(N * w_i / W)`` examples of source i, at random (seeded),
where ``N = min_i(n_i * W / w_i)`` is the largest total for which no source repeats an
example. Without weights every example of every source is used. Either every entry has a
weight or none has.

Split aliases: a builder may map the common split names to its own (``SPLIT_ALIASES``;
UltraFeedback's ``train`` is ``train_prefs``), so ``hh+ultrafeedback`` mixes with
``config.data.train_split="train"``. Its own names work too.

``manual_dir`` with several sources: each source reads ``manual_dir/<source name>/`` (e.g.
``manual/hh/helpful-base/train.jsonl.gz``, ``manual/shp/legaladvice/train.json``) when that
folder exists, else ``manual_dir`` itself (the one-source layout; sources whose file names
differ may also share it).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import tensorflow_datasets as tfds

from kto_jax.data.builders.files import FilesOptions, files_builder, files_metadata
from kto_jax.data.builders.hh import HH
from kto_jax.data.builders.oasst import Oasst
from kto_jax.data.builders.shp import SHP
from kto_jax.data.builders.synthetic import Synthetic
from kto_jax.data.builders.ultrafeedback import Ultrafeedback
from kto_jax.data.feedback import Paired, Unary, paired_from_records, unary_from_records
from kto_jax.errors import InputError

BUILDERS: dict[str, type] = {
    "synthetic": Synthetic,
    "hh": HH,
    "shp": SHP,
    "oasst": Oasst,
    "ultrafeedback": Ultrafeedback,
}
FILES = "files"  # the ``files:PATTERN`` source


def register(name: str, builder_cls: type) -> None:
    BUILDERS[name] = builder_cls


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One entry of ``config.data.sources``: ``name`` (a builder, or "files"), its builder
    ``config`` (``hh/helpful-base``), the ``pattern`` of a files source, the mixture ``weight``."""

    name: str
    config: str = ""
    pattern: str = ""
    weight: float | None = None

    @property
    def label(self) -> str:
        return f"files:{self.pattern}" if self.name == FILES else self.name + (f"/{self.config}" if self.config else "")


def _split_weight(entry: str) -> tuple[str, float | None]:
    head, sep, tail = entry.rpartition(":")
    if not sep or not head:
        return entry, None
    try:
        weight = float(tail)
    except ValueError:
        return entry, None  # a colon of the name or pattern itself (files:PATTERN)
    if not np.isfinite(weight) or weight <= 0:
        raise InputError(
            f"config.data.sources: weight {tail!r} of {head!r} must be a positive number (e.g. {head}:0.5)"
        )
    return head, weight


def parse_sources(spec: str) -> list[SourceSpec]:
    """``"hh:0.5+files:x.jsonl:0.5"`` -> [SourceSpec("hh", weight=0.5), SourceSpec("files", pattern="x.jsonl", weight=0.5)]."""
    entries = [e.strip() for e in (spec or "").split("+")]
    if not spec or not all(entries):
        raise InputError(f"config.data.sources={spec!r} has an empty entry; use names joined by '+' (e.g. 'hh+shp')")
    out = []
    for entry in entries:
        body, weight = _split_weight(entry)
        if body.startswith(FILES + ":"):
            pattern = body[len(FILES) + 1 :].strip()
            if not pattern:
                raise InputError(f"config.data.sources: {entry!r} names no files; use files:PATH or files:GLOB")
            out.append(SourceSpec(FILES, pattern=pattern, weight=weight))
            continue
        name, _, config = body.partition("/")
        if name not in BUILDERS:
            raise InputError(
                f"config.data.sources: unknown dataset {name!r}; known: {', '.join(sorted(BUILDERS))}, "
                "or files:PATTERN for your own files"
            )
        out.append(SourceSpec(name, config=config, weight=weight))
    weighted = [s.weight is not None for s in out]
    if any(weighted) and not all(weighted):
        raise InputError(
            f"config.data.sources={spec!r}: give every source a weight or none "
            f"(unweighted: {', '.join(s.label for s in out if s.weight is None)})"
        )
    return out


def get_builder(name: str | SourceSpec, data_dir: str, *, skip_bad_records: bool = False, files: dict | None = None):
    """The builder for ``name`` (``source``, ``source/config`` or a ``SourceSpec``); unknown names
    list the known ones. ``files``: the options of a ``files:`` source other than its pattern
    (``FilesOptions`` fields: test, holdout_fraction, schema, columns)."""
    spec = name if isinstance(name, SourceSpec) else parse_sources(name)[0]
    data_dir = os.path.expanduser(data_dir)
    if spec.name == FILES:
        return files_builder(
            FilesOptions(train=spec.pattern, **(files or {})), data_dir, skip_bad_records=skip_bad_records
        )
    configs = [c.name for c in getattr(BUILDERS[spec.name], "BUILDER_CONFIGS", [])]
    if spec.config and spec.config not in configs:
        known = ", ".join(configs) if configs else "none (use the bare name)"
        raise InputError(
            f"dataset {spec.name!r} has no config {spec.config!r} (config.data.sources={spec.label!r}); "
            f"its configs: {known}"
        )
    kwargs = {"config": spec.config} if spec.config else {}
    return BUILDERS[spec.name](data_dir=data_dir, skip_bad_records=skip_bad_records, **kwargs)


def source_manual_dir(manual_dir: str | None, source: str) -> str | None:
    """``manual_dir/<source>`` when that folder exists, else ``manual_dir`` (the module docstring)."""
    if not manual_dir:
        return None
    manual_dir = os.path.expanduser(manual_dir)
    own = os.path.join(manual_dir, source)
    return own if os.path.isdir(own) else manual_dir


def prepare(
    name: str | SourceSpec,
    data_dir: str,
    manual_dir: str | None = None,
    *,
    skip_bad_records: bool = False,
    files: dict | None = None,
):
    """Prepare ``name`` once (a no-op when already prepared); returns the builder.

    With several processes, process 0 prepares while the others wait, then they read what it
    wrote. A process that finds the same dataset prepared by another run at the same moment
    (tfds' final rename fails: the folder exists) uses that run's copy: the name is its content
    key, so it is the same data."""
    source = name.name if isinstance(name, SourceSpec) else name.partition("/")[0]
    config = tfds.download.DownloadConfig(manual_dir=source_manual_dir(manual_dir, source))

    def build():
        return get_builder(name, data_dir, skip_bad_records=skip_bad_records, files=files)

    builder = build()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            builder.download_and_prepare(download_config=config)
        multihost_utils.sync_global_devices(f"prepare {builder.info.full_name}")
        builder = build()
    try:
        builder.download_and_prepare(download_config=config)
    except FileExistsError:
        builder = build()
        builder.download_and_prepare(download_config=config)  # prepared by the other run: a no-op
    return builder


def _decode(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.dtype == object):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def resolve_split(builder, split: str, label: str) -> str:
    """``split``, or the builder's own name for it (``SPLIT_ALIASES``); an unknown split lists the known ones."""
    if split in builder.info.splits:
        return split
    aliases = getattr(builder, "SPLIT_ALIASES", {})
    if aliases.get(split) in builder.info.splits:
        return aliases[split]
    hint = ""
    if getattr(builder, "name", "") == FILES and split not in builder.info.splits:
        hint = (
            " (a files: source has a test split only with config.data.eval_files or config.data.holdout_fraction > 0)"
        )
    alias_text = f"; aliases: {aliases}" if aliases else ""
    raise InputError(
        f"dataset {label!r} has no split {split!r}; splits: {sorted(builder.info.splits)}{alias_text}{hint}"
    )


def load_records(
    name: str | SourceSpec, split: str, data_dir: str, manual_dir: str | None = None, **kwargs
) -> list[dict]:
    """All records of one split as Python dicts (prepares the source first if needed)."""
    builder = prepare(name, data_dir, manual_dir, **kwargs)
    label = name.label if isinstance(name, SourceSpec) else name
    return read_split(builder, resolve_split(builder, split, label), label)


class CorruptedDataset(InputError):
    """A prepared dataset file that cannot be read (corrupted or truncated on disk)."""


def read_split(builder, split: str, label: str) -> list[dict]:
    """Every record of a prepared split; an unreadable array_record file is a
    :class:`CorruptedDataset` naming the file and how to prepare the dataset again."""
    try:
        data = builder.as_data_source(split=split)
        return [_decode(data[i]) for i in range(len(data))]
    except RuntimeError as e:  # array_record / riegeli: a corrupted or truncated file
        bad = _unreadable_files([os.fspath(p) for p in builder.info.splits[split].filepaths])
        raise CorruptedDataset(
            f"dataset {label!r} split {split!r}: {', '.join(bad) or builder.data_dir} cannot be read "
            f"({str(e).splitlines()[0][:200]}): the prepared dataset is damaged; delete {builder.data_dir} to prepare it "
            "again (under config.data.data_dir)"
        ) from None


def _unreadable_files(paths: list[str]) -> list[str]:
    from array_record.python.array_record_module import ArrayRecordReader

    bad = []
    for path in paths:
        try:
            ArrayRecordReader(path).read_all()
        except RuntimeError:
            bad.append(path)
    return bad


def mixture_counts(sizes: list[int], weights: list[float | None]) -> list[int]:
    """How many examples each source gives (the module docstring's rule); all of them unweighted."""
    if not weights or weights[0] is None:
        return list(sizes)
    total = sum(weights)
    n = min(size * total / w for size, w in zip(sizes, weights))
    return [min(size, round(n * w / total)) for size, w in zip(sizes, weights)]


def load_mixture(
    spec: str,
    split: str,
    data_dir: str,
    manual_dir: str | None = None,
    *,
    skip_bad_records: bool = False,
    seed: int = 0,
    files: dict | None = None,
) -> tuple[list[Paired] | list[Unary], dict]:
    """Examples of the mixture ``spec`` (all paired or all unary) and its stats: per source the
    examples available, kept (the weighting's share) and dropped by the weighting, its kind, and
    a files source's metadata (schema, files and digests, record counts)."""
    sources = parse_sources(spec)
    per_source, stats = [], {"sources": {}}
    for i, s in enumerate(sources):
        builder = prepare(s, data_dir, manual_dir, skip_bad_records=skip_bad_records, files=files)
        records = read_split(builder, resolve_split(builder, split, s.label), s.label)
        unary = bool(records) and "completion" in records[0]
        examples = unary_from_records(records) if unary else paired_from_records(records)
        entry = {"kind": "unary" if unary else "paired", "available": len(examples), "weight": s.weight}
        if s.name == FILES:
            entry["files"] = files_metadata(builder)
        per_source.append(examples)
        stats["sources"][s.label if s.label not in stats["sources"] else f"{s.label}#{i}"] = entry
    kinds = {e["kind"] for e in stats["sources"].values()}
    if len(kinds) > 1:
        named = ", ".join(f"{label} is {e['kind']}" for label, e in stats["sources"].items())
        raise InputError(f"data sources {spec!r} mix paired and unary datasets ({named}); mix sources of one kind")
    empty = [label for label, e in stats["sources"].items() if e["available"] == 0]
    if empty and sources[0].weight is not None:
        raise InputError(
            f"config.data.sources={spec!r}: {', '.join(empty)} has no {split} examples, so a weighted "
            "mixture would be empty; drop that source or its weights"
        )
    counts = mixture_counts([len(x) for x in per_source], [s.weight for s in sources])
    out: list = []
    for i, (entry, examples, k) in enumerate(zip(stats["sources"].values(), per_source, counts)):
        if k < len(examples):
            keep = np.sort(np.random.default_rng([seed, i]).choice(len(examples), k, replace=False))
            examples = [examples[j] for j in keep]
        entry["kept"], entry["dropped"] = len(examples), entry["available"] - len(examples)
        out.extend(examples)
    return out, stats


def load_examples(
    spec: str, split: str, data_dir: str, manual_dir: str | None = None, **kwargs
) -> list[Paired] | list[Unary]:
    """Examples of a ``+``-separated mixture of sources, all paired or all unary (``load_mixture``)."""
    return load_mixture(spec, split, data_dir, manual_dir, **kwargs)[0]
