"""The ultrafeedback TFDS builder, prepared from small hand-written fixtures.

tests/fixtures/ultrafeedback/data/{train,test}_prefs-00000-of-00001.parquet (the upstream
columns: prompt, prompt_id, chosen, rejected, messages, score_chosen, score_rejected):
train_prefs has a single-turn row, a multi-turn row, an emoji row, a row with a system
message and a repeated prompt_id; test_prefs two single-turn rows.
"""

from __future__ import annotations

import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from kto_jax.data.builders import base
from kto_jax.data.schemas import BadRecord
from tests.builders_helpers import UF_DIR, no_network, prepare  # noqa: F401 (an autouse fixture)

# ---------------------------------------------------------------- ultrafeedback


def uf(prompt_id, prompt, chosen, rejected, score_chosen, score_rejected):
    return {
        "id": f"ultrafeedback/{prompt_id}",
        "prompt": {"role": [r for r, _ in prompt], "content": [c for _, c in prompt]},
        "chosen": chosen,
        "rejected": rejected,
        "score_chosen": score_chosen,
        "score_rejected": score_rejected,
    }


def test_ultrafeedback_records(tmp_path):
    records, counts = prepare("ultrafeedback", tmp_path, UF_DIR)
    assert records == {
        "train_prefs": [
            uf("a1f3", [("user", "How do I boil an egg?")], "Simmer it for 9 minutes.", "Microwave it.", 8.5, 3.0),
            uf(
                "b2e4",
                [("user", "Name a prime number."), ("assistant", "7."), ("user", "Another one, bigger?")],
                "11.",
                "12.",
                9.0,
                2.5,
            ),
            uf("c3d5", [("user", "Translate 'cat' to French 🐱")], "« chat » 🐈", "perro", 10.0, 1.0),
        ],
        "test_prefs": [
            uf("e5b7", [("user", "What is 2+2?")], "4", "5", 10.0, 1.25),
            uf("f6a8", [("user", "Capital of Japan?")], "Tokyo.", "Kyoto.", 9.5, 4.75),
        ],
    }
    train, test = counts["ultrafeedback/train_prefs"], counts["ultrafeedback/test_prefs"]
    assert (train.read, train.kept, train.bad) == (5, 3, 0)
    assert train.filtered == {"system_message": 1, "duplicate_prompt_id": 1}
    assert (test.read, test.kept, test.bad, test.filtered) == (2, 2, 0, {})


def test_ultrafeedback_downloads_without_manual_dir(tmp_path, monkeypatch):
    urls = []

    def download(self, wanted):
        urls.extend(wanted.values())
        return {
            name: os.path.join(UF_DIR, "data", f"{url.rsplit('/', 1)[1].split('-')[0]}-00000-of-00001.parquet")
            for name, url in wanted.items()
        }

    monkeypatch.setattr(tfds.download.DownloadManager, "download", download)
    monkeypatch.setattr(base, "reachable", lambda host: True)
    records, _ = prepare("ultrafeedback", tmp_path, None)
    root = "https://huggingface.co/datasets/HuggingFaceH4/ultrafeedback_binarized/resolve/main/data/"
    assert urls == [root + "train_prefs-00000-of-00001.parquet", root + "test_prefs-00000-of-00001.parquet"]
    assert (len(records["train_prefs"]), len(records["test_prefs"])) == (3, 2)


def conv(*pairs):
    return [{"content": c, "role": r} for r, c in pairs]


def good_row(prompt_id="g1"):
    return {
        "prompt": "Hi",
        "prompt_id": prompt_id,
        "chosen": conv(("user", "Hi"), ("assistant", "Hello")),
        "rejected": conv(("user", "Hi"), ("assistant", "Go away")),
        "score_chosen": 9.0,
        "score_rejected": 1.0,
    }


def write_uf(tmp_path, table: pa.Table | None = None, raw: bytes | None = None) -> str:
    """A manual_dir whose train_prefs file is ``table`` (or ``raw`` bytes); test_prefs from the fixtures."""
    data = tmp_path / "manual" / "data"
    data.mkdir(parents=True)
    path = data / "train_prefs-00000-of-00001.parquet"
    if raw is not None:
        path.write_bytes(raw)
    else:
        pq.write_table(table, path)
    shutil.copy(os.path.join(UF_DIR, "data", "test_prefs-00000-of-00001.parquet"), data)
    return os.fspath(tmp_path / "manual")


BAD_UF = {
    "missing column": (
        pa.Table.from_pylist([good_row(), good_row("b1")]).drop_columns(["score_rejected"]),
        r"row 0: missing field 'score_rejected'",
    ),
    "wrong type": (
        pa.Table.from_pylist([{**good_row(), "score_chosen": "9"}, {**good_row("b1"), "score_chosen": "high"}]),
        r"row 0: field 'score_chosen' should be float/int, got str",
    ),
    "null value": (
        pa.Table.from_pylist([good_row(), {**good_row("b1"), "prompt_id": None}]),
        r"row 1: field 'prompt_id' should be str, got NoneType",
    ),
    "no assistant reply": (
        pa.Table.from_pylist([good_row(), {**good_row("b1"), "chosen": conv(("user", "Hi"), ("user", "?"))}]),
        r"row 1: field 'chosen' should end with an assistant message, ends with 'user'",
    ),
    "message without content": (
        pa.Table.from_pylist([good_row(), {**good_row("b1"), "rejected": [{"role": "user"}, {"role": "assistant"}]}]),
        r"row 1: field 'rejected', message 0: field 'content' should be str, got NoneType",
    ),
    "different prompts": (
        pa.Table.from_pylist([good_row(), {**good_row("b1"), "rejected": conv(("user", "Ho"), ("assistant", "x"))}]),
        r"row 1: fields 'chosen' and 'rejected' differ before their last message",
    ),
    "no prompt turn": (
        pa.Table.from_pylist(
            [good_row(), {**good_row("b1"), "chosen": conv(("assistant", "x")), "rejected": conv(("assistant", "y"))}]
        ),
        r"row 1: field 'chosen' has no prompt turn before the assistant message",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_UF))
def test_ultrafeedback_bad_row_fails_naming_file_row_field(tmp_path, case):
    table, match = BAD_UF[case]
    manual = write_uf(tmp_path, table)
    with pytest.raises(BadRecord, match=r"train_prefs-00000-of-00001\.parquet, " + match) as info:
        prepare("ultrafeedback", tmp_path, manual)
    assert "skip_bad_records=True" in str(info.value)


def test_ultrafeedback_bad_rows_counted_with_skip(tmp_path):
    rows = [
        good_row("g1"),
        {**good_row("b1"), "prompt_id": None},
        good_row("g2"),
        {**good_row("b2"), "chosen": conv(("user", "Hi"))},
        {**good_row("b3"), "score_rejected": None},
    ]
    records, counts = prepare(
        "ultrafeedback", tmp_path, write_uf(tmp_path, pa.Table.from_pylist(rows)), skip_bad_records=True
    )
    assert [r["id"] for r in records["train_prefs"]] == ["ultrafeedback/g1", "ultrafeedback/g2"]
    train = counts["ultrafeedback/train_prefs"]
    assert (train.read, train.kept, train.bad, train.filtered) == (5, 2, 3, {})
    assert len(records["test_prefs"]) == 2


def test_ultrafeedback_missing_column_counted_with_skip(tmp_path):
    # a second shard without prompt_id: every row of it is bad; the first shard is read as well
    manual = write_uf(tmp_path, pa.Table.from_pylist([good_row("g1")]))
    table = pa.Table.from_pylist([good_row("b1"), good_row("b2")]).drop_columns(["prompt_id"])
    pq.write_table(table, os.path.join(manual, "data", "train_prefs-00001-of-00002.parquet"))
    records, counts = prepare("ultrafeedback", tmp_path, manual, skip_bad_records=True)
    assert [r["id"] for r in records["train_prefs"]] == ["ultrafeedback/g1"]
    train = counts["ultrafeedback/train_prefs"]
    assert (train.read, train.kept, train.bad) == (3, 1, 2)


def test_ultrafeedback_split_without_records_fails(tmp_path):
    table = pa.Table.from_pylist([good_row(), good_row("b1")]).drop_columns(["prompt_id"])
    with pytest.raises(
        BadRecord,
        match=r"train_prefs-00000-of-00001\.parquet: no train_prefs records kept \(read 2, filtered none, bad 2\)",
    ):
        prepare("ultrafeedback", tmp_path, write_uf(tmp_path, table), skip_bad_records=True)


def test_ultrafeedback_empty_file_fails(tmp_path):
    empty = pa.Table.from_pylist([good_row()]).slice(0, 0)
    with pytest.raises(BadRecord, match=r"train_prefs-00000-of-00001\.parquet: no records \(empty file\)"):
        prepare("ultrafeedback", tmp_path, write_uf(tmp_path, empty))


def test_ultrafeedback_unreadable_file_fails(tmp_path):
    with pytest.raises(BadRecord, match=r"train_prefs-00000-of-00001\.parquet: not a readable parquet file"):
        prepare("ultrafeedback", tmp_path, write_uf(tmp_path, raw=b""), skip_bad_records=True)
