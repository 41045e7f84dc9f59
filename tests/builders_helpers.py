"""Shared pieces of the TFDS builder tests (tests/test_data_builders_*.py): fixture folders, no
downloads, and preparing a builder into its own data_dir."""

from __future__ import annotations

import os
import uuid

import pytest
import tensorflow_datasets as tfds

from kto_jax.data import builders
from kto_jax.data.builders import oasst

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
OASST_DIR = os.path.join(FIXTURES, "oasst")
UF_DIR = os.path.join(FIXTURES, "ultrafeedback")
OASST_FILE = oasst.FILE_NAME


def mid(name) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"kto-jax-fixture-{name}"))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def download(self, url_or_urls):
        raise AssertionError(f"tests must not download: {url_or_urls}")

    monkeypatch.setattr(tfds.download.DownloadManager, "download", download)


def prepare(name, tmp_path, manual_dir, **kwargs):
    """(records by split, counts) of ``name`` prepared into its own data_dir."""
    data_dir = os.fspath(tmp_path / "data")
    builder = builders.prepare(name, data_dir, manual_dir, **kwargs)
    records = {
        split: sorted(builders.load_records(name, split, data_dir), key=lambda r: r["id"])
        for split in builder.info.splits
    }
    return records, builder.counts
