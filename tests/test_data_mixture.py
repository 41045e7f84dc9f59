"""Source mixtures (kto_jax/data/builders/__init__.py): the sources spec, weights, split aliases,
one manual_dir subfolder per source, and failing at once offline."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from kto_jax.data import builders
from kto_jax.data.builders import (
    SourceSpec,
    load_mixture,
    mixture_counts,
    parse_sources,
)
from kto_jax.data.builders.base import SourceUnavailable

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def test_parse_sources_names_configs_files_and_weights():
    assert parse_sources("hh+shp") == [SourceSpec("hh"), SourceSpec("shp")]
    assert parse_sources("hh/helpful-base:0.25+files:data/x-*.jsonl:0.75") == [
        SourceSpec("hh", config="helpful-base", weight=0.25),
        SourceSpec("files", pattern="data/x-*.jsonl", weight=0.75),
    ]
    # a colon that is not a weight belongs to the pattern
    assert parse_sources("files:C:/logs/fb.jsonl") == [SourceSpec("files", pattern="C:/logs/fb.jsonl")]
    assert parse_sources("synthetic/unary")[0].label == "synthetic/unary"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("hh:0+shp:1", r"weight '0' of 'hh' must be a positive number"),
        ("hh:-1+shp:1", r"must be a positive number"),
        ("hh:0.5+shp", r"give every source a weight or none \(unweighted: shp\)"),
        ("nope", r"unknown dataset 'nope'; known: hh, oasst, shp, synthetic, ultrafeedback, or files:PATTERN"),
        ("hh++shp", r"has an empty entry"),
        ("files:", r"names no files"),
    ],
)
def test_parse_sources_rejects_bad_specs_naming_the_field(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_sources(spec)
    with pytest.raises(ValueError, match=r"config\.data\.sources"):
        parse_sources(spec)


def test_mixture_counts_are_the_largest_mix_without_repeats():
    # 100 and 30 examples at 1:1 -> 30 + 30; at 3:1 -> 90 + 30; at 1:3 -> 10 + 30
    assert mixture_counts([100, 30], [1.0, 1.0]) == [30, 30]
    assert mixture_counts([100, 30], [3.0, 1.0]) == [90, 30]
    assert mixture_counts([100, 30], [1.0, 3.0]) == [10, 30]
    assert mixture_counts([100, 30], [None, None]) == [100, 30]
    # three sources at 1:2:1 of 10 each: the 2-share is exhausted first -> 5 + 10 + 5
    assert mixture_counts([10, 10, 10], [1.0, 2.0, 1.0]) == [5, 10, 5]
    # proportions, not counts: 0.25/0.75 is 1:3; shares round to the nearest example
    assert mixture_counts([7, 9], [0.25, 0.75]) == [3, 9]
    assert mixture_counts([50, 1000, 7], [1.0, 1.0, 1.0]) == [7, 7, 7]


def test_weighted_mixture_keeps_each_share_without_repeats_and_counts_it(synthetic_data_dir):
    full, _ = load_mixture("synthetic", "validation", synthetic_data_dir)
    examples, stats = load_mixture("synthetic:1+synthetic:3", "validation", synthetic_data_dir, seed=3)
    n = len(full)
    assert {k: (e["available"], e["kept"], e["dropped"], e["weight"]) for k, e in stats["sources"].items()} == {
        "synthetic": (n, round(n / 3), n - round(n / 3), 1.0),
        "synthetic#1": (n, n, 0, 3.0),
    }
    ids = [ex.id for ex in examples]
    assert len(ids) == round(n / 3) + n and len(set(ids)) == n  # the 1-share is a subset, no id twice within it
    again, _ = load_mixture("synthetic:1+synthetic:3", "validation", synthetic_data_dir, seed=3)
    assert [ex.id for ex in again] == ids
    other, _ = load_mixture("synthetic:1+synthetic:3", "validation", synthetic_data_dir, seed=4)
    assert [ex.id for ex in other] != ids


def test_mixing_paired_and_unary_sources_names_each_kind(synthetic_data_dir):
    with pytest.raises(ValueError, match=r"synthetic is paired, synthetic/unary is unary"):
        load_mixture("synthetic+synthetic/unary", "validation", synthetic_data_dir)


def test_weighted_mixture_with_an_empty_source_fails_naming_it(synthetic_data_dir, monkeypatch):
    monkeypatch.setattr(builders, "paired_from_records", lambda records: [])
    with pytest.raises(ValueError, match=r"config\.data\.sources=.*synthetic, synthetic#1 has no validation examples"):
        load_mixture("synthetic:1+synthetic:1", "validation", synthetic_data_dir)
    assert load_mixture("synthetic+synthetic", "validation", synthetic_data_dir)[0] == []


def _feedback_file(path, n=12):
    rows = [{"prompt": f"Shout word{i}!", "chosen": f" WORD{i}", "rejected": f" word{i}"} for i in range(n)]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")


def test_files_source_mixes_with_a_builder_and_records_its_schema(tmp_path, synthetic_data_dir):
    data_dir = str(tmp_path / "data")
    shutil.copytree(synthetic_data_dir, data_dir)
    _feedback_file(tmp_path / "prefs.jsonl")
    spec = f"synthetic:1+files:{tmp_path / 'prefs.jsonl'}:1"
    examples, stats = load_mixture(spec, "train", data_dir, files={"holdout_fraction": 0.0})
    entry = stats["sources"][f"files:{tmp_path / 'prefs.jsonl'}"]
    assert entry["files"]["schema"] == "preference" and entry["kind"] == "paired"
    assert entry["available"] == entry["kept"] == 12 and stats["sources"]["synthetic"]["kept"] == 12
    assert sum(ex.id.startswith("files/") for ex in examples) == 12
    with pytest.raises(
        ValueError, match=r"no split 'test'.*config\.data\.eval_files or config\.data\.holdout_fraction"
    ):
        load_mixture(spec, "test", data_dir)


def _uf_manual(tmp_path):
    manual = tmp_path / "manual"
    shutil.copytree(os.path.join(FIXTURES, "ultrafeedback"), manual / "ultrafeedback")
    shutil.copytree(os.path.join(FIXTURES, "hh"), manual / "hh")
    return manual


def test_split_aliases_let_ultrafeedback_mix_with_train_and_test(tmp_path):
    manual = _uf_manual(tmp_path)
    data_dir = str(tmp_path / "data")
    aliased, _ = load_mixture("ultrafeedback", "train", data_dir, str(manual))
    own, _ = load_mixture("ultrafeedback", "train_prefs", data_dir, str(manual))
    assert aliased == own and aliased
    # one manual_dir, a subfolder per source: hh reads manual/hh, ultrafeedback manual/ultrafeedback
    mixed, stats = load_mixture("hh+ultrafeedback", "test", data_dir, str(manual))
    assert set(stats["sources"]) == {"hh", "ultrafeedback"} and all(e["kept"] > 0 for e in stats["sources"].values())
    assert len(mixed) == sum(e["kept"] for e in stats["sources"].values())
    with pytest.raises(ValueError, match=r"no split 'dev'.*train_prefs.*aliases"):
        load_mixture("ultrafeedback", "dev", data_dir, str(manual))


def _ids(examples, prefix):
    return sorted(ex.id for ex in examples if ex.id.startswith(prefix))


def test_each_source_reads_its_own_manual_dir_subfolder_else_manual_dir_itself(tmp_path):
    hh_only, _ = load_mixture("hh", "train", str(tmp_path / "d0"), os.path.join(FIXTURES, "hh"))
    shp_only, _ = load_mixture("shp", "train", str(tmp_path / "d1"), os.path.join(FIXTURES, "shp"))
    # manual/hh/<subset>/..., manual/shp/<domain>/...
    manual = tmp_path / "manual"
    shutil.copytree(os.path.join(FIXTURES, "hh"), manual / "hh")
    shutil.copytree(os.path.join(FIXTURES, "shp"), manual / "shp")
    assert builders.source_manual_dir(str(manual), "hh") == str(manual / "hh")
    examples, stats = load_mixture("hh+shp", "train", str(tmp_path / "d2"), str(manual))
    assert _ids(examples, "hh/") == _ids(hh_only, "hh/") and _ids(examples, "shp/") == _ids(shp_only, "shp/")
    assert {k: e["kept"] for k, e in stats["sources"].items()} == {"hh": len(hh_only), "shp": len(shp_only)}
    # a source without its subfolder reads manual_dir itself: manual/hh/... and manual/legaladvice/...
    mixed = tmp_path / "mixed"
    shutil.copytree(os.path.join(FIXTURES, "hh"), mixed / "hh")
    shutil.copytree(os.path.join(FIXTURES, "shp", "legaladvice"), mixed / "legaladvice")
    assert builders.source_manual_dir(str(mixed), "shp") == str(mixed)
    examples, stats = load_mixture("hh/helpful-base+shp", "train", str(tmp_path / "d3"), str(mixed))
    assert _ids(examples, "hh/") == [i for i in _ids(hh_only, "hh/") if i.startswith("hh/helpful-base/")]
    assert 0 < stats["sources"]["shp"]["kept"] < len(shp_only)  # legaladvice only
    assert builders.source_manual_dir(None, "hh") is None


def test_missing_upstream_file_offline_fails_at_once_naming_where_to_put_it(tmp_path, monkeypatch):
    manual = tmp_path / "manual"
    shutil.copytree(os.path.join(FIXTURES, "hh"), manual / "hh")
    os.remove(manual / "hh" / "harmless-base" / "test.jsonl.gz")
    monkeypatch.setenv("KTO_JAX_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(SourceUnavailable, match=r"KTO_JAX_OFFLINE=1") as e:
        load_mixture("hh", "train", str(tmp_path / "data"), str(manual))
    assert time.monotonic() - start < 10
    assert os.path.join(str(manual / "hh"), "harmless-base/test.jsonl.gz") in str(e.value)
    assert "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/harmless-base/test.jsonl.gz" in str(e.value)


def test_unreachable_host_fails_at_once_without_an_offline_variable(tmp_path, monkeypatch):
    for variable in builders.base.OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    probed = []
    monkeypatch.setattr(builders.base, "reachable", lambda host: probed.append(host) or False)
    with pytest.raises(SourceUnavailable, match=r"huggingface\.co cannot be reached.*config\.data\.manual_dir"):
        load_mixture("ultrafeedback", "train", str(tmp_path / "data"))
    assert probed == ["huggingface.co"]


def test_failing_tcp_probe_fails_at_once_naming_the_file(tmp_path, monkeypatch):
    for variable in builders.base.OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    calls = []

    def refuse(address, timeout=None):
        calls.append((address, timeout))
        raise OSError("network is unreachable")

    monkeypatch.setattr("socket.create_connection", refuse)
    manual = tmp_path / "manual"
    shutil.copytree(os.path.join(FIXTURES, "hh"), manual)  # the one-source layout
    os.remove(manual / "helpful-online" / "train.jsonl.gz")
    start = time.monotonic()
    with pytest.raises(SourceUnavailable, match=r"huggingface\.co cannot be reached") as e:
        load_mixture("hh", "train", str(tmp_path / "data"), str(manual))
    assert time.monotonic() - start < 10
    assert calls == [(("huggingface.co", 443), 5.0)]
    assert os.path.join(str(manual), "helpful-online/train.jsonl.gz") in str(e.value)
    assert "hh-rlhf/resolve/main/helpful-online/train.jsonl.gz" in str(e.value)
    assert "manual_dir/hh/" in str(e.value)  # the per-source subfolder rule
