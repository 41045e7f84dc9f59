"""The files source: every format x schema x form, HALOs' feedback files, column maps,
metadata, content keying, holdout and eval splits (bad inputs: tests/test_data_files_bad.py).

Files are written into tmp_path by tests/files_helpers.py; tests/fixtures/files/ holds
HALOs' binary and pairwise feedback JSON as HALOs' train/label.py writes it (a JSON list,
items indented by 2).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import pytest

from kto_jax.data import formats
from kto_jax.data.builders.files import (
    FilesOptions,
    files_builder,
    files_metadata,
    holdout_split,
)
from kto_jax.data.feedback import Paired, Unary, paired_from_records, unary_from_records
from tests.files_helpers import (
    CASES,
    FORMATS,
    SYSTEM_MULTI,
    msgs,
    prepare,
    prompt_hash_split,
    save_dict_to_disk,
    save_to_disk,
    strip_ids,
    write,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "files")
KINDS = {"unpaired_preference": "unary", "preference": "paired", "implicit_prompt_preference": "paired"}


# ---------------------------------------------------------------- formats and schemas


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("schema", sorted(CASES))
@pytest.mark.parametrize("form", ["standard", "conversational"])
def test_every_format_schema_and_form(tmp_path, fmt, schema, form):
    rows, expected = CASES[schema][form]
    path = write(fmt, tmp_path, "feedback", rows)
    builder, records = prepare(tmp_path, train=path)
    assert list(records) == ["train"]
    assert strip_ids(records["train"]) == expected
    meta = files_metadata(builder)
    assert (meta["schema"], meta["kind"], meta["form"]) == (schema, KINDS[schema], form)
    where = {"jsonl": "line", "jsonl.gz": "line", "json": "item"}.get(fmt, "row")
    name = os.path.basename(path)
    assert [r["id"] for r in records["train"]] == [f"files/{name}/{where}-{i}" for i in range(1, len(rows) + 1)]


def test_records_become_training_examples(tmp_path):
    _, unary = prepare(
        tmp_path / "u", train=write("jsonl", tmp_path, "u", CASES["unpaired_preference"]["conversational"][0])
    )
    _, paired = prepare(tmp_path / "p", train=write("jsonl", tmp_path, "p", CASES["preference"]["conversational"][0]))
    (u0, u1), (p0,) = unary_from_records(unary["train"]), paired_from_records(paired["train"])
    assert u0 == Unary("files/u.jsonl/line-1", SYSTEM_MULTI, "6.", True) and u1.desirable is False
    assert p0 == Paired("files/p.jsonl/line-1", SYSTEM_MULTI, "6.", "7.")


def test_halos_binary_feedback_fixture(tmp_path):
    builder, records = prepare(tmp_path, train=os.path.join(FIXTURES, "halos_binary_feedback.json"))
    assert files_metadata(builder)["schema"] == "halos_binary_feedback"
    assert [(r["id"], r["prompt"]["role"], r["completion"], r["desirable"]) for r in records["train"]] == [
        ("files/halos_binary_feedback.json/item-1", ["user"], "Red.", True),
        ("files/halos_binary_feedback.json/item-2", ["user"], "Purple.", False),
        ("files/halos_binary_feedback.json/item-3", ["system", "user", "assistant", "user"], "6.", True),
    ]


def test_halos_pairwise_feedback_fixture(tmp_path):
    builder, records = prepare(tmp_path, train=os.path.join(FIXTURES, "halos_pairwise_feedback.json"))
    meta = files_metadata(builder)
    assert (meta["schema"], meta["kind"]) == ("halos_pairwise_feedback", "paired")
    # label 1: output_A preferred; label 0: output_B preferred (HALOs train/data.py get_feedback)
    assert [(r["chosen"], r["rejected"]) for r in records["train"]] == [
        ("Red.", "Purple."),
        ("6.", "Six, I believe, after some thought."),
    ]
    assert records["train"][1]["prompt"]["content"] == [c for _, c in SYSTEM_MULTI]


def test_halos_split_field_gives_each_row_its_split(tmp_path):
    with open(os.path.join(FIXTURES, "halos_binary_feedback.json")) as f:
        rows = json.load(f)
    rows[1]["split"], rows[2]["split"] = "train", "test"  # rows[0]: no split, in both (as HALOs)
    path = write("json", tmp_path, "halos", rows)
    builder, records = prepare(tmp_path, train=path, test=path)
    assert [r["id"][-6:] for r in records["train"]] == ["item-1", "item-2"]
    assert [r["id"][-6:] for r in records["test"]] == ["item-1", "item-3"]
    assert files_metadata(builder)["counts"]["test"]["filtered"] == {"other_split": 1}


def test_halos_rows_without_type_are_detected_by_columns(tmp_path):
    rows = [{"prompt": msgs(("user", "q")), "output_A": "a", "output_B": "b", "label": 0}]
    builder, records = prepare(tmp_path, train=write("jsonl", tmp_path, "x", rows))
    assert files_metadata(builder)["schema"] == "halos_pairwise_feedback"
    assert (records["train"][0]["chosen"], records["train"][0]["rejected"]) == ("b", "a")


def test_csv_labels_and_json_cells(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text(
        'prompt,completion,label\n"[{""role"": ""user"", ""content"": ""Hi""}]",Hey,1\n'
        "Plain [not json,Bye,FALSE\nQ,A,True\nQ,B,0\n"
    )
    _, records = prepare(tmp_path, train=os.fspath(path))
    assert [(r["prompt"]["content"], r["completion"], r["desirable"]) for r in records["train"]] == [
        (["Hi"], "Hey", True),
        (["Plain [not json"], "Bye", False),
        (["Q"], "A", True),
        (["Q"], "B", False),
    ]


def test_column_map_and_explicit_schema(tmp_path):
    rows = [{"question": "Why?", "answer": "Because.", "thumbs_up": "true", "chosen": "x", "rejected": "y"}]
    path = write("csv", tmp_path, "log", rows)
    builder, records = prepare(
        tmp_path, train=path, columns="prompt=question,completion=answer,label=thumbs_up", schema="unpaired_preference"
    )
    assert strip_ids(records["train"]) == [
        {"prompt": {"role": ["user"], "content": ["Why?"]}, "completion": "Because.", "desirable": True}
    ]
    meta = files_metadata(builder)
    assert meta["columns"] == {"prompt": "question", "completion": "answer", "label": "thumbs_up"}
    assert meta["schema"] == "unpaired_preference"
    # auto detection sees {chosen, rejected} first: the implicit-prompt schema (prompt "", differs at char 0: bad)
    with pytest.raises(Exception, match="share no prompt"):
        prepare(tmp_path / "auto", train=path)
    # a swap map: chosen and rejected trade places
    _, swapped = prepare(
        tmp_path / "swap",
        train=write("jsonl", tmp_path, "p", CASES["preference"]["standard"][0]),
        columns="chosen=rejected,rejected=chosen",
    )
    assert (swapped["train"][0]["chosen"], swapped["train"][0]["rejected"]) == (" 5", " 4")


def test_datasets_folder_with_shards_and_dataset_dict(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}", "label": i % 2 == 0} for i in range(5)]
    folder = save_to_disk(rows, os.fspath(tmp_path / "ds"), shards=2)
    assert [w for w, _ in formats.read_rows(folder)] == [f"row {i}" for i in range(1, 6)]
    _, records = prepare(tmp_path, train=folder)
    assert sorted(r["completion"] for r in records["train"]) == [f"c{i}" for i in range(5)]
    dd = save_dict_to_disk({"train": rows[:3], "validation": rows[3:]}, os.fspath(tmp_path / "dd"))
    builder, records = prepare(tmp_path / "x", train=dd)
    assert sorted(records) == ["train", "validation"] and len(records["validation"]) == 2
    assert records["validation"][0]["id"] == "files/validation/row-1"
    assert files_metadata(builder)["splits"] == ["train", "validation"]


def test_read_rows_json_shapes_blank_lines_and_gzip(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"data": [{"x": 1}, {"x": 2}], "version": 3}))
    assert list(formats.read_rows(os.fspath(tmp_path / "a.json"))) == [("item 1", {"x": 1}), ("item 2", {"x": 2})]
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write('{"x": 1}\n\n   \n{"x": 2}\n')
    assert list(formats.read_rows(os.fspath(tmp_path / "b.jsonl.gz"))) == [("line 1", {"x": 1}), ("line 4", {"x": 2})]


def test_expand_paths(tmp_path, monkeypatch):
    for name in ("train-2.jsonl", "train-1.jsonl", "eval.jsonl"):
        (tmp_path / name).write_text("{}\n")
    d = os.fspath(tmp_path)
    assert formats.expand_paths(f"{d}/train-*.jsonl") == [f"{d}/train-1.jsonl", f"{d}/train-2.jsonl"]
    assert formats.expand_paths(f"{d}/train-2.jsonl, {d}/eval.jsonl,{d}/train-2.jsonl") == [
        f"{d}/eval.jsonl",
        f"{d}/train-2.jsonl",
    ]
    monkeypatch.setenv("HOME", d)
    assert formats.expand_paths("~/eval.jsonl") == [f"{d}/eval.jsonl"]
    with pytest.raises(FileNotFoundError, match=r"no file matches '.*nothing-\*\.jsonl'"):
        formats.expand_paths(f"{d}/eval.jsonl,{d}/nothing-*.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        formats.expand_paths(f"{d}/missing.jsonl")


def test_split_implicit_follows_trl_extract_prompt():
    def split(chosen, rejected):
        return formats.split_implicit(chosen, rejected)[1:]

    assert split("The sky is blue.", "The sky is green.") == (" blue.", " green.")  # the space goes to the completions
    assert split("Answer:A", "Answer:B") == ("A", "B")
    # no difference within the shorter text: TRL's idx ends at the shorter length - 1
    prompt, chosen, rejected = formats.split_implicit("Say hi", "Say hi there")
    assert (prompt["content"], chosen, rejected) == (["Say h"], "i", "i there")
    with pytest.raises(formats.BadRecord, match="share no prompt"):
        formats.split_implicit("Yes", "No")


def test_parse_label():
    for value, expected in [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        (1.0, True),
        ("true", True),
        ("FALSE", False),
        (" 1 ", True),
        ("0", False),
    ]:
        assert formats.parse_label(value) is expected
    for value in (2, "yes", "", None, [1]):
        with pytest.raises(formats.BadRecord, match="unknown label value"):
            formats.parse_label(value)


# ---------------------------------------------------------------- keying and splits


def test_metadata_records_files_digests_and_counts(tmp_path):
    path = write("jsonl", tmp_path, "f", CASES["preference"]["standard"][0] * 3)
    builder, _ = prepare(tmp_path, train=path)
    meta = files_metadata(builder)
    assert meta["files"] == [
        {
            "path": path,
            "split": "train",
            "name": "f.jsonl",
            "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        }
    ]
    assert meta["counts"] == {"train": {"read": 3, "kept": 3, "filtered": {}, "bad": 0}}
    assert meta["config_name"] == builder.builder_config.name
    # restored from disk by a later builder of the same files
    assert files_metadata(files_builder(FilesOptions(train=path), os.fspath(tmp_path / "tfds"))) == meta


def test_same_content_prepares_once_and_a_changed_file_again(tmp_path):
    path = tmp_path / "f.jsonl"
    write("jsonl", tmp_path, "f", CASES["preference"]["standard"][0])
    first, _ = prepare(tmp_path, train=os.fspath(path))
    assert first.counts  # generated
    again, _ = prepare(tmp_path, train=os.fspath(path))
    assert again.builder_config.name == first.builder_config.name and again.counts == {}  # not generated again
    os.utime(path, (1, 1))  # a touched but unchanged file is the same content
    assert (
        files_builder(FilesOptions(train=os.fspath(path)), os.fspath(tmp_path / "tfds")).builder_config.name
        == first.builder_config.name
    )
    with open(path, "a") as f:
        f.write(json.dumps({"prompt": "3+3=", "chosen": " 6", "rejected": " 7"}) + "\n")
    changed, records = prepare(tmp_path, train=os.fspath(path))
    assert changed.builder_config.name != first.builder_config.name and changed.counts
    assert len(records["train"]) == 2
    assert sorted(os.listdir(tmp_path / "tfds" / "files")) == sorted(
        [first.builder_config.name, changed.builder_config.name]
    )
    other, _ = prepare(tmp_path, train=os.fspath(path), schema="preference")  # other options: another key
    assert other.builder_config.name != changed.builder_config.name


def test_holdout_by_prompt_hash(tmp_path):
    rows = [
        {"prompt": f"question {i}", "completion": f"answer {i}.{j}", "label": j == 0}
        for i in range(40)
        for j in range(3)
    ]
    path = write("jsonl", tmp_path, "f", rows)
    builder, records = prepare(tmp_path, train=path, holdout_fraction=0.3)
    by_split = {s: {r["prompt"]["content"][0] for r in recs} for s, recs in records.items()}
    assert by_split["train"] and by_split["test"] and not by_split["train"] & by_split["test"]
    for split, recs in records.items():
        assert len(recs) == 3 * len(by_split[split])  # every completion of a prompt in the prompt's split
        for r in recs:
            assert prompt_hash_split(r["prompt"], 0.3) == holdout_split(r["prompt"], 0.3) == split
    counts = files_metadata(builder)["counts"]
    assert counts["train"]["filtered"] == {"other_split": len(records["test"])}
    # the same rows in another order split the same way
    _, shuffled = prepare(tmp_path / "again", train=write("jsonl", tmp_path, "g", rows[::-1]), holdout_fraction=0.3)
    assert {s: {r["prompt"]["content"][0] for r in recs} for s, recs in shuffled.items()} == by_split


def test_eval_files_make_the_test_split(tmp_path):
    train = write("jsonl", tmp_path, "train", CASES["preference"]["standard"][0])
    test = write("parquet", tmp_path, "eval", CASES["preference"]["conversational"][0])
    builder, records = prepare(tmp_path, train=train, test=test)
    assert sorted(records) == ["test", "train"]
    assert [r["id"] for r in records["test"]] == ["files/eval.parquet/row-1"]
    assert [(f["name"], f["split"]) for f in files_metadata(builder)["files"]] == [
        ("train.jsonl", "train"),
        ("eval.parquet", "test"),
    ]


def test_ids_stay_unique_across_folders(tmp_path):
    for sub in ("a", "b"):
        os.makedirs(tmp_path / sub)
        write("jsonl", tmp_path / sub, "f", CASES["preference"]["standard"][0])
    _, records = prepare(tmp_path, train=f"{tmp_path}/*/f.jsonl")
    assert [r["id"] for r in records["train"]] == ["files/a/f.jsonl/line-1", "files/b/f.jsonl/line-1"]
