"""Writers of feedback files in every format the files source reads, and the rows they hold.

``write(fmt, folder, name, rows)`` writes ``rows`` as JSON Lines (plain and gzip), JSON,
Parquet, CSV (message lists as JSON cells, labels as true/false) or a ``datasets``
``save_to_disk`` folder, written by hand in the library's layout (``datasets`` is not
installed): Arrow IPC stream shards ``data-0000i-of-0000K.arrow``, ``state.json`` listing
them, ``dataset_info.json``; a DatasetDict folder adds ``dataset_dict.json`` and a folder
per split.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os

import pyarrow as pa
import pyarrow.parquet as pq

from kto_jax.data.builders import _decode
from kto_jax.data.builders.files import FilesOptions, files_builder

FORMATS = ("jsonl", "jsonl.gz", "json", "parquet", "csv", "datasets")


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


SYSTEM_MULTI = (("system", "You are terse."), ("user", "What is 2+2?"), ("assistant", "4."), ("user", "And 3+3?"))
# schema -> form -> (rows, expected records without ids, sorted by id = file order)
CASES = {
    "unpaired_preference": {
        "standard": (
            [
                {"prompt": "The sky is", "completion": " blue.", "label": True},
                {"prompt": "The sky is", "completion": " green.", "label": False},
            ],
            [
                {"prompt": {"role": ["user"], "content": ["The sky is"]}, "completion": " blue.", "desirable": True},
                {"prompt": {"role": ["user"], "content": ["The sky is"]}, "completion": " green.", "desirable": False},
            ],
        ),
        "conversational": (
            [
                {"prompt": msgs(*SYSTEM_MULTI), "completion": msgs(("assistant", "6.")), "label": True},
                {"prompt": msgs(("user", "Hi")), "completion": msgs(("assistant", "Go away.")), "label": False},
            ],
            [
                {
                    "prompt": {
                        "role": ["system", "user", "assistant", "user"],
                        "content": [c for _, c in SYSTEM_MULTI],
                    },
                    "completion": "6.",
                    "desirable": True,
                },
                {"prompt": {"role": ["user"], "content": ["Hi"]}, "completion": "Go away.", "desirable": False},
            ],
        ),
    },
    "preference": {
        "standard": (
            [{"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}],
            [{"prompt": {"role": ["user"], "content": ["2+2="]}, "chosen": " 4", "rejected": " 5"}],
        ),
        "conversational": (
            [
                {
                    "prompt": msgs(*SYSTEM_MULTI),
                    "chosen": msgs(("assistant", "6.")),
                    "rejected": msgs(("assistant", "7.")),
                }
            ],
            [
                {
                    "prompt": {
                        "role": ["system", "user", "assistant", "user"],
                        "content": [c for _, c in SYSTEM_MULTI],
                    },
                    "chosen": "6.",
                    "rejected": "7.",
                }
            ],
        ),
    },
    "implicit_prompt_preference": {  # TRL's extract_prompt docstring examples
        "standard": (
            [{"chosen": "The sky is blue.", "rejected": "The sky is green."}],
            [{"prompt": {"role": ["user"], "content": ["The sky is"]}, "chosen": " blue.", "rejected": " green."}],
        ),
        "conversational": (
            [
                {
                    "chosen": msgs(*SYSTEM_MULTI, ("assistant", "6.")),
                    "rejected": msgs(*SYSTEM_MULTI, ("assistant", "7.")),
                }
            ],
            [
                {
                    "prompt": {
                        "role": ["system", "user", "assistant", "user"],
                        "content": [c for _, c in SYSTEM_MULTI],
                    },
                    "chosen": "6.",
                    "rejected": "7.",
                }
            ],
        ),
    },
}


def _csv_cell(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def save_to_disk(rows: list[dict], folder: str, shards: int = 1) -> str:
    """A ``Dataset.save_to_disk`` folder of ``rows``, by hand, in the library's layout."""
    os.makedirs(folder, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    features = {name: {"dtype": "string", "_type": "Value"} for name in table.column_names}  # indicative only
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    per = math.ceil(len(rows) / shards)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    for i, name in enumerate(names):
        with pa.OSFile(os.path.join(folder, name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(i * per, per))
    state = {
        "_data_files": [{"filename": n} for n in names],
        "_fingerprint": "0123456789abcdef",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(state, f, indent=2, sort_keys=True)
    with open(os.path.join(folder, "dataset_info.json"), "w") as f:
        json.dump({"citation": "", "description": "", "features": features, "homepage": "", "license": ""}, f, indent=2)
    return folder


def save_dict_to_disk(splits: dict[str, list[dict]], folder: str) -> str:
    """A ``DatasetDict.save_to_disk`` folder: dataset_dict.json and one folder per split."""
    for split, rows in splits.items():
        save_to_disk(rows, os.path.join(folder, split))
    with open(os.path.join(folder, "dataset_dict.json"), "w") as f:
        json.dump({"splits": list(splits)}, f)
    return folder


def write(fmt: str, folder, name: str, rows: list[dict]) -> str:
    """``rows`` written as ``{folder}/{name}.{fmt}`` (a folder for "datasets"); returns the path."""
    path = os.path.join(os.fspath(folder), f"{name}.{fmt}" if fmt != "datasets" else name)
    if fmt == "jsonl":
        with open(path, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "jsonl.gz":
        with gzip.open(path, "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        with open(path, "w") as f:
            json.dump(rows, f)
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "csv":
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: _csv_cell(v) for k, v in r.items()} for r in rows)
    elif fmt == "datasets":
        save_to_disk(rows, path)
    else:
        raise ValueError(fmt)
    return path


def prepare(tmp_path, **options):
    """(builder, {split: records sorted by id}) of FilesOptions(**options), prepared in tmp_path/tfds."""
    skip = options.pop("skip_bad_records", False)
    builder = files_builder(FilesOptions(**options), os.fspath(tmp_path / "tfds"), skip_bad_records=skip)
    builder.download_and_prepare()
    out = {}
    for split in builder.info.splits:
        source = builder.as_data_source(split=split)
        out[split] = sorted((_decode(source[i]) for i in range(len(source))), key=lambda r: r["id"])
    return builder, out


def strip_ids(records):
    return [{k: v for k, v in r.items() if k != "id"} for r in records]


def prompt_hash_split(prompt: dict, fraction: float) -> str:
    """The holdout rule, restated: sha256 of json([roles, contents]), first 8 bytes / 2**64 < fraction."""
    digest = hashlib.sha256(
        json.dumps([prompt["role"], prompt["content"]], ensure_ascii=False).encode("utf-8")
    ).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < fraction else "train"
