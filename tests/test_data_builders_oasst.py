"""The oasst TFDS builder, prepared from small hand-written fixtures.

tests/fixtures/oasst/2023-04-12_oasst_ready.trees.jsonl.gz (the upstream tree format, ids
are uuid5(NAMESPACE_URL, f"kto-jax-fixture-{name}")):

* tree "0" (train split): "What is the capital of France?" -> assistant replies "Paris."
  (rank 0), "Lyon." (rank 1), a deleted rank-2 reply; under "Paris." the prompter asks
  "And of Italy? 🇮🇹" -> "Rome 🍕" (0), "Milan" (1), "Naples" (2), "I don't know." (null).
* tree "1" (train split): German prompt with two ranked German replies.
* tree "22" (test split): "Tell me a joke 😀" -> ranks 0 (en), 1 (es), 2 (en), 3 (en).
"""

from __future__ import annotations

import gzip
import json
import os

import pytest
import tensorflow_datasets as tfds

from kto_jax.data import builders
from kto_jax.data.builders import base, oasst
from kto_jax.data.feedback import Paired
from kto_jax.data.schemas import BadRecord
from tests.builders_helpers import OASST_DIR, OASST_FILE, mid, no_network, prepare  # noqa: F401 (an autouse fixture)

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
