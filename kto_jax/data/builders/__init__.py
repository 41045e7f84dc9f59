"""Feedback sources by name: one TFDS builder each, prepared once, read by random access.

    examples = load_examples("shp+hh+oasst", "train", data_dir="~/tensorflow_datasets")

A name may carry a builder config (``synthetic/unary``); ``+`` mixes sources of the same
kind (all paired, or all unary).
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from kto_jax.data.builders.hh import HH
from kto_jax.data.builders.shp import SHP
from kto_jax.data.builders.oasst import Oasst
from kto_jax.data.builders.synthetic import Synthetic
from kto_jax.data.builders.ultrafeedback import Ultrafeedback
from kto_jax.data.feedback import Paired, Unary, paired_from_records, unary_from_records

BUILDERS: dict[str, type] = {"synthetic": Synthetic, "hh": HH, "shp": SHP, "oasst": Oasst, "ultrafeedback": Ultrafeedback}


def register(name: str, builder_cls: type) -> None:
    BUILDERS[name] = builder_cls


def get_builder(name: str, data_dir: str, *, skip_bad_records: bool = False):
    """The builder for ``name`` (``source`` or ``source/config``); unknown names list the known ones."""
    source, _, config = name.partition("/")
    if source not in BUILDERS:
        raise ValueError(f"unknown dataset {source!r} (config.data.sources); known: {', '.join(sorted(BUILDERS))}")
    configs = [c.name for c in getattr(BUILDERS[source], "BUILDER_CONFIGS", [])]
    if config and config not in configs:
        known = ", ".join(configs) if configs else "none (use the bare name)"
        raise ValueError(f"dataset {source!r} has no config {config!r} (config.data.sources={name!r}); its configs: {known}")
    kwargs = {"config": config} if config else {}
    return BUILDERS[source](data_dir=os.path.expanduser(data_dir), skip_bad_records=skip_bad_records, **kwargs)


def prepare(name: str, data_dir: str, manual_dir: str | None = None, *, skip_bad_records: bool = False):
    """Prepare ``name`` once (a no-op when already prepared); returns the builder."""
    builder = get_builder(name, data_dir, skip_bad_records=skip_bad_records)
    config = tfds.download.DownloadConfig(manual_dir=os.path.expanduser(manual_dir) if manual_dir else None)
    builder.download_and_prepare(download_config=config)
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


def load_records(name: str, split: str, data_dir: str, manual_dir: str | None = None, **kwargs) -> list[dict]:
    """All records of one split as Python dicts (prepares the source first if needed)."""
    builder = prepare(name, data_dir, manual_dir, **kwargs)
    if split not in builder.info.splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; splits: {sorted(builder.info.splits)}")
    source = builder.as_data_source(split=split)
    return [_decode(source[i]) for i in range(len(source))]


def load_examples(spec: str, split: str, data_dir: str, manual_dir: str | None = None, **kwargs) -> list[Paired] | list[Unary]:
    """Examples of a ``+``-separated mixture of sources, all paired or all unary."""
    out: list = []
    kinds = set()
    for name in spec.split("+"):
        records = load_records(name.strip(), split, data_dir, manual_dir, **kwargs)
        unary = bool(records) and "completion" in records[0]
        kinds.add("unary" if unary else "paired")
        out.extend(unary_from_records(records) if unary else paired_from_records(records))
    if len(kinds) > 1:
        raise ValueError(f"data sources {spec!r} mix paired and unary datasets; mix sources of one kind")
    return out
