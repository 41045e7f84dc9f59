"""The oasst and ultrafeedback TFDS builders, prepared from small hand-written fixtures.

tests/fixtures/oasst/2023-04-12_oasst_ready.trees.jsonl.gz (the upstream tree format, ids
are uuid5(NAMESPACE_URL, f"kto-jax-fixture-{name}")):

* tree "0" (train split): "What is the capital of France?" -> assistant replies "Paris."
  (rank 0), "Lyon." (rank 1), a deleted rank-2 reply; under "Paris." the prompter asks
  "And of Italy? 🇮🇹" -> "Rome 🍕" (0), "Milan" (1), "Naples" (2), "I don't know." (null).
* tree "1" (train split): German prompt with two ranked German replies.
* tree "22" (test split): "Tell me a joke 😀" -> ranks 0 (en), 1 (es), 2 (en), 3 (en).

tests/fixtures/ultrafeedback/data/{train,test}_prefs-00000-of-00001.parquet (the upstream
columns: prompt, prompt_id, chosen, rejected, messages, score_chosen, score_rejected):
train_prefs has a single-turn row, a multi-turn row, an emoji row, a row with a system
message and a repeated prompt_id; test_prefs two single-turn rows.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

from kto_jax.data import builders
from kto_jax.data.builders import base, oasst
from kto_jax.data.feedback import Paired
from kto_jax.data.schemas import BadRecord

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


# ---------------------------------------------------------------- oasst


def oasst_pair(chosen, rejected, prompt, chosen_text, rejected_text, tree, ranks, sft_target):
    return {
        "id": f"oasst/{mid(chosen)}/{mid(rejected)}",
        "prompt": {"role": [r for r, _ in prompt], "content": [c for _, c in prompt]},
        "chosen": chosen_text,
        "rejected": rejected_text,
        "tree_id": mid(tree),
        "rank_chosen": ranks[0],
        "rank_rejected": ranks[1],
        "sft_target": sft_target,
    }


def test_oasst_split_rule():
    assert [oasst.split_of(mid(n)) for n in (0, 1, 22)] == ["train", "train", "test"]
    share = sum(oasst.split_of(mid(i)) == "test" for i in range(4000)) / 4000
    assert 0.04 < share < 0.06


def test_oasst_records(tmp_path):
    records, counts = prepare("oasst", tmp_path, OASST_DIR)
    france = [("user", "What is the capital of France?")]
    italy = france + [("assistant", "Paris."), ("user", "And of Italy? 🇮🇹")]
    # sft_target: HALOs' generations[-1], the last reply (in reply order) that is the rejected one of a pair
    expected_train = [
        oasst_pair("0a", "0b", france, "Paris.", "Lyon.", 0, (0, 1), "Lyon."),
        oasst_pair("0ap1", "0ap2", italy, "Rome 🍕", "Milan", 0, (0, 1), "Naples"),
        oasst_pair("0ap2", "0ap3", italy, "Milan", "Naples", 0, (1, 2), "Naples"),
    ]
    # rank 1 is Spanish: no 0-1 or 1-2 pair, only 2-3
    expected_test = [
        oasst_pair("22c", "22d", [("user", "Tell me a joke 😀")], "Knock knock.", "No.", 22, (2, 3), "No.")
    ]
    assert records == {"train": sorted(expected_train, key=lambda r: r["id"]), "test": expected_test}

    train, test = counts["oasst/train"], counts["oasst/test"]
    assert (train.read, train.kept, train.bad) == (3, 3, 0)
    assert train.filtered == {"other_split": 1, "deleted": 1, "non_english": 1, "null_rank": 1}
    assert (test.read, test.kept, test.bad) == (3, 1, 0)
    assert test.filtered == {"other_split": 2, "non_english": 1}

    examples = builders.load_examples("oasst", "test", os.fspath(tmp_path / "data"))
    assert examples == [Paired(expected_test[0]["id"], (("user", "Tell me a joke 😀"),), "Knock knock.", "No.", "No.")]


def test_oasst_downloads_without_manual_dir(tmp_path, monkeypatch):
    urls = []

    def download(self, wanted):
        urls.extend(wanted.values())
        return {name: os.path.join(OASST_DIR, OASST_FILE) for name in wanted}

    monkeypatch.setattr(tfds.download.DownloadManager, "download", download)
    monkeypatch.setattr(base, "reachable", lambda host: True)
    records, _ = prepare("oasst", tmp_path, None)
    assert urls == [oasst.URL]
    assert urls[0].endswith("/OpenAssistant/oasst1/resolve/main/2023-04-12_oasst_ready.trees.jsonl.gz")
    assert (len(records["train"]), len(records["test"])) == (3, 1)


def message(name, role, text, replies=(), **fields):
    return {
        "message_id": mid(name),
        "text": text,
        "role": role,
        "lang": "en",
        "deleted": False,
        "rank": None,
        "replies": list(replies),
        **fields,
    }


def tree_line(name, prompt) -> str:
    return json.dumps({"message_tree_id": mid(name), "tree_state": "ready_for_export", "prompt": prompt})


GOOD_TREE = tree_line(
    2,
    message(
        2,
        "prompter",
        "Hi",
        [message("2a", "assistant", "Hello", rank=0), message("2b", "assistant", "Go away", rank=1)],
    ),
)
GOOD_TEST_TREE = tree_line(
    22,
    message(
        22, "prompter", "Yo", [message("22a", "assistant", "Hey", rank=0), message("22b", "assistant", "No", rank=1)]
    ),
)


def write_oasst(tmp_path, lines) -> str:
    manual = tmp_path / "manual"
    manual.mkdir()
    with gzip.open(manual / OASST_FILE, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return os.fspath(manual)


def missing_text_tree():
    reply = message("3a", "assistant", "x", rank=0)
    del reply["text"]
    return tree_line(3, message(3, "prompter", "Hi", [reply]))


BAD_OASST = {
    "missing field": (
        missing_text_tree(),
        r"trees\.jsonl\.gz, line 2: prompt\.replies\[0\] \(message " + mid("3a") + r"\): missing field 'text'",
    ),
    "wrong type": (
        tree_line(4, message(4, "prompter", "Hi", [message("4a", "assistant", "x", rank="0")])),
        r"line 2: prompt\.replies\[0\] \(message .*\): field 'rank' should be int or null, got str",
    ),
    "malformed json": (
        '{"message_tree_id": "' + mid(5) + '", "prompt": {',
        r"line 2: malformed JSON \(Expecting property name .*column \d+\)",
    ),
    "missing tree id": (
        json.dumps({"prompt": message(6, "prompter", "Hi")}),
        r"line 2: missing field 'message_tree_id'",
    ),
    "roles": (
        tree_line(7, message(7, "assistant", "Hi")),
        r"line 2: prompt \(message .*\): field 'role' is 'assistant' at the root; expected 'prompter'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_OASST))
def test_oasst_bad_line_fails_naming_file_line_field(tmp_path, case):
    line, match = BAD_OASST[case]
    manual = write_oasst(tmp_path, [GOOD_TREE, line])
    with pytest.raises(BadRecord, match=match) as info:
        prepare("oasst", tmp_path, manual)
    assert os.path.join(manual, OASST_FILE) in str(info.value)
    assert "skip_bad_records=True" in str(info.value)


def test_oasst_bad_lines_counted_with_skip(tmp_path):
    manual = write_oasst(tmp_path, [GOOD_TREE, GOOD_TEST_TREE] + [line for line, _ in BAD_OASST.values()])
    records, counts = prepare("oasst", tmp_path, manual, skip_bad_records=True)
    assert [r["id"] for r in records["train"]] == [f"oasst/{mid('2a')}/{mid('2b')}"]
    assert [r["id"] for r in records["test"]] == [f"oasst/{mid('22a')}/{mid('22b')}"]
    # trees 2, 3, 4 and 7 are train trees; a line without a readable tree id is bad in both passes
    assert all(oasst.split_of(mid(n)) == "train" for n in (2, 3, 4, 7))
    train, test = counts["oasst/train"], counts["oasst/test"]
    assert (train.read, train.kept, train.bad, train.filtered) == (7, 1, 5, {"other_split": 1})
    assert (test.read, test.kept, test.bad, test.filtered) == (7, 1, 2, {"other_split": 4})


def test_oasst_split_without_pairs_fails(tmp_path):
    manual = write_oasst(tmp_path, [GOOD_TREE])
    with pytest.raises(
        BadRecord, match=r"trees\.jsonl\.gz: no test pairs kept \(read 1 trees, filtered \{'other_split': 1\}, bad 0\)"
    ):
        prepare("oasst", tmp_path, manual)


def test_oasst_empty_file_fails(tmp_path):
    manual = write_oasst(tmp_path, [])
    with pytest.raises(BadRecord, match=r"trees\.jsonl\.gz: no records \(empty file\)"):
        prepare("oasst", tmp_path, manual)


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
