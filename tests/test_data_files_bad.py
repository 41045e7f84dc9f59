"""The files source's bad inputs: malformed lines, missing columns, unknown labels, mixed schemas,
empty, unreadable and unknown files, skipped records counted, bad options; each error names the
file, the line or field and the fix (the good inputs: tests/test_data_files.py).
"""

import json
import os

import pytest

from kto_jax.data import formats
from kto_jax.data.builders.files import (
    FilesOptions,
    files_builder,
    files_metadata,
)
from tests.files_helpers import (
    msgs,
    prepare,
    save_dict_to_disk,
    write,
)

# ---------------------------------------------------------------- bad inputs


def jsonl(tmp_path, name, lines) -> str:
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return os.fspath(path)


GOOD = {"prompt": "Hi", "completion": "Hello", "label": True}
PAIR = {"prompt": "Hi", "chosen": "Hello", "rejected": "Go"}


def test_malformed_line_names_file_and_line(tmp_path):
    path = jsonl(tmp_path, "f.jsonl", [GOOD, '{"prompt": "Hi", "completion": ', GOOD])
    with pytest.raises(formats.BadRecord, match=rf"{path}, line 2: malformed JSON .*skip_bad_records"):
        prepare(tmp_path, train=path)
    with pytest.raises(formats.BadRecord, match=rf"{path}, line 2: malformed JSON"):
        list(formats.read_rows(path))


def test_missing_column_names_file_column_columns_present_and_fix(tmp_path):
    path = write("csv", tmp_path, "f", [{"prompt": "Hi", "completion": "Hello", "thumbs_up": "1"}])
    with pytest.raises(formats.FileFormatError) as e:
        files_builder(FilesOptions(train=path), os.fspath(tmp_path / "tfds"))
    for part in (
        path,
        "missing column 'label'",
        "unpaired_preference",
        "columns present: 'prompt', 'completion', 'thumbs_up'",
        'config.data.columns="label=<file column>"',
    ):
        assert part in str(e.value)
    with pytest.raises(formats.FileFormatError, match=r"label \(mapped to 'vote'\)"):
        files_builder(FilesOptions(train=path, columns="label=vote"), os.fspath(tmp_path / "tfds"))
    other = write("csv", tmp_path, "g", [{"prompt": "Hi", "completion": "Hello", "label": "1"}])
    with pytest.raises(
        formats.FileFormatError, match=rf"{path}: missing column 'label'"
    ):  # a later file, at preparation
        prepare(tmp_path, train=f"{other},{path}")


def test_unknown_label_names_field_and_value(tmp_path):
    path = jsonl(tmp_path, "f.jsonl", [GOOD, {**GOOD, "label": "maybe"}])
    with pytest.raises(formats.BadRecord, match=rf"{path}, line 2: unknown label value 'maybe' in field 'label'"):
        prepare(tmp_path, train=path)
    mapped = jsonl(tmp_path, "g.jsonl", [{"prompt": "Hi", "completion": "Hello", "up": 3}])
    with pytest.raises(formats.BadRecord, match=r"unknown label value 3 in field 'label' \(column 'up'\)"):
        prepare(tmp_path, train=mapped, columns="label=up")


def test_mixed_schema_in_a_file_across_files_and_in_eval_files(tmp_path):
    path = jsonl(tmp_path, "f.jsonl", [GOOD, PAIR])
    with pytest.raises(
        formats.FileFormatError,
        match=rf"{path}, line 2: mixed schemas: this row is preference .* "
        rf"schema is unpaired_preference \(read from {path}, line 1\)",
    ):
        prepare(tmp_path, train=path)
    a, b = jsonl(tmp_path, "a.jsonl", [GOOD]), jsonl(tmp_path, "b.jsonl", [PAIR])
    with pytest.raises(formats.FileFormatError, match=rf"{b}, line 1: mixed schemas: this row is preference"):
        prepare(tmp_path, train=f"{tmp_path}/[ab].jsonl")
    with pytest.raises(formats.FileFormatError, match=rf"{b}, line 1: mixed schemas"):
        prepare(tmp_path, train=a, test=b)


def test_empty_files_fail_at_preparation(tmp_path):
    good = jsonl(tmp_path, "good.jsonl", [GOOD])
    for name, text in (
        ("e.jsonl", ""),
        ("blank.jsonl", "\n  \n"),
        ("e.json", "[]"),
        ("e.csv", "prompt,completion,label\n"),
    ):
        (tmp_path / name).write_text(text)
        with pytest.raises(formats.FileFormatError, match=rf"{tmp_path / name}: no records \(empty file\)"):
            files_builder(FilesOptions(train=os.fspath(tmp_path / name)), os.fspath(tmp_path / "tfds"))
    with pytest.raises(formats.FileFormatError, match=r"e.jsonl: no records \(empty file\)"):
        prepare(tmp_path, train=good, test=os.fspath(tmp_path / "e.jsonl"))


def test_unknown_extension_no_match_and_unreadable_files(tmp_path):
    (tmp_path / "f.txt").write_text("hello\n")
    with pytest.raises(
        formats.FileFormatError, match=r"unknown file format; supported: .jsonl, .jsonl.gz, .json, .parquet, .csv"
    ):
        files_builder(FilesOptions(train=os.fspath(tmp_path / "f.txt")), os.fspath(tmp_path / "tfds"))
    with pytest.raises(FileNotFoundError, match=r"no file matches '.*/nope-\*.jsonl'"):
        files_builder(FilesOptions(train=f"{tmp_path}/nope-*.jsonl"), os.fspath(tmp_path / "tfds"))
    (tmp_path / "two.json").write_text(json.dumps({"a": [GOOD], "b": [GOOD]}))
    (tmp_path / "bad.json").write_text("[{")
    (tmp_path / "bad.parquet").write_text("not parquet")
    os.makedirs(tmp_path / "plain")
    for name, message in (
        ("two.json", "exactly one list"),
        ("bad.json", "malformed JSON"),
        ("bad.parquet", "not a readable parquet"),
        ("plain", "not a datasets save_to_disk folder"),
    ):
        with pytest.raises(formats.FileFormatError, match=message):
            list(formats.read_rows(os.fspath(tmp_path / name)))


def test_skip_bad_records_counts_them(tmp_path):
    lines = [
        GOOD,
        "{not json",
        {**GOOD, "label": "maybe"},
        {**GOOD, "completion": "  "},
        [1, 2],
        {**GOOD, "prompt": msgs(("user", "a"), ("assistant", "b"))},
        {"prompt": "Hi", "completion": "x"},
        {**GOOD, "prompt": "Yo"},
    ]
    path = jsonl(tmp_path, "f.jsonl", lines)
    builder, records = prepare(tmp_path, train=path, skip_bad_records=True)
    assert [r["id"] for r in records["train"]] == ["files/f.jsonl/line-1", "files/f.jsonl/line-8"]
    assert files_metadata(builder)["counts"]["train"] == {"read": 8, "kept": 2, "filtered": {}, "bad": 6}
    assert builder.counts["files/train"].bad == 6
    only_bad = jsonl(tmp_path, "g.jsonl", [{**GOOD, "label": 7}, {**GOOD, "completion": ""}])
    with pytest.raises(formats.BadRecord, match=r"g.jsonl: no train records kept \(read 2, filtered none, bad 2\)"):
        prepare(tmp_path, train=only_bad, skip_bad_records=True)


@pytest.mark.parametrize(
    "row, message",
    [
        ({**GOOD, "completion": "  "}, "field 'completion' is empty"),
        ({**GOOD, "prompt": []}, "field 'prompt' is empty"),
        ({**GOOD, "prompt": msgs(("user", ""))}, "field 'prompt' has empty content"),
        ({**GOOD, "prompt": msgs(("bot", "x"))}, "role 'bot' is not one of system, user, assistant"),
        ({**GOOD, "completion": msgs(("user", "x"))}, "field 'completion' should be one assistant message"),
        ({**GOOD, "completion": None}, "field 'completion' is null"),
        ({**GOOD, "prompt": 3}, "field 'prompt' should be a string or a list of messages"),
        (
            {"chosen": msgs(("user", "a"), ("assistant", "b")), "rejected": msgs(("user", "c"), ("assistant", "b"))},
            "should differ only in their last",
        ),
        ({"chosen": "same", "rejected": msgs(("user", "same"))}, "should both be strings or both message lists"),
    ],
)
def test_bad_rows_name_the_field(tmp_path, row, message):
    with pytest.raises(formats.BadRecord, match=rf"f.jsonl, line 1: .*{message}"):
        prepare(tmp_path, train=jsonl(tmp_path, "f.jsonl", [row]))


def test_bad_options(tmp_path):
    path = jsonl(tmp_path, "f.jsonl", [GOOD])
    for fraction in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"config.data.holdout_fraction={fraction} should be in \[0, 1\)"):
            files_builder(FilesOptions(train=path, holdout_fraction=fraction), os.fspath(tmp_path))
    with pytest.raises(ValueError, match="holdout_fraction=0.1 and test files"):
        files_builder(FilesOptions(train=path, test=path, holdout_fraction=0.1), os.fspath(tmp_path))
    with pytest.raises(ValueError, match=r"unknown schema 'kto' \(config.data.schema\)"):
        files_builder(FilesOptions(train=path, schema="kto"), os.fspath(tmp_path))
    for columns, message in (
        ("prompt", "should be canonical=file_column"),
        ("answer=a", "no canonical column"),
        ("label=a,label=b", "mapped twice"),
    ):
        with pytest.raises(ValueError, match=rf"config.data.columns=.*{message}"):
            files_builder(FilesOptions(train=path, columns=columns), os.fspath(tmp_path))
    dd = save_dict_to_disk({"train": [GOOD]}, os.fspath(tmp_path / "dd"))
    with pytest.raises(ValueError, match="DatasetDict folder with its own splits"):
        files_builder(FilesOptions(train=dd, holdout_fraction=0.1), os.fspath(tmp_path))
    halos_sample = write(
        "json", tmp_path, "samples", [{"prompt": msgs(("user", "q")), "output": "a", "type": "sample"}]
    )
    with pytest.raises(formats.FileFormatError, match="HALOs 'sample' rows are not feedback"):
        files_builder(FilesOptions(train=halos_sample), os.fspath(tmp_path))
