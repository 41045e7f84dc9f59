"""TFDS builder for UltraFeedback binarized (``HuggingFaceH4/ultrafeedback_binarized``).

Source: the preference splits' parquet files, ``data/{split}-00000-of-00001.parquet`` for
``split`` in ``train_prefs`` / ``test_prefs`` (tfds accepts these names, so they are kept;
``train`` / ``test`` are aliases of them, ``SPLIT_ALIASES``, as in the KTO authors' loader, so
``hh+ultrafeedback`` mixes with ``config.data.train_split="train"``). In ``manual_dir`` every
``data/{split}-*.parquet`` is read (sorted by name), so re-sharded copies work too.
Columns used: ``prompt`` (str), ``prompt_id`` (str), ``chosen`` / ``rejected`` (lists of
``{"content", "role"}`` messages ending with the assistant reply), ``score_chosen`` /
``score_rejected`` (float); others (``messages``) are ignored.

Record: the prompt is the chosen conversation without its last message (``user`` /
``assistant`` turns); chosen / rejected are the last (assistant) messages' contents.

Rules (counted under ``counts[f"ultrafeedback/{split}"].filtered``):

* ``system_message``: a row whose conversation has a ``system`` message is dropped. The
  record schema has no system turn, and folding it into a user turn would change the
  prompt; the released splits have none.
* ``duplicate_prompt_id``: a row whose ``prompt_id`` was already seen in the split is
  dropped (record ids must be unique); the first row is kept.

A bad row (a missing column, a value of the wrong type or null, a conversation that does
not end with an assistant message or has no prompt turn, chosen and rejected
conversations that differ before their last message, an unknown role) fails naming the
file, the row (0-based, counted over the file) and the column, or is counted and skipped
with ``skip_bad_records=True``. A file that is not readable parquet always fails; a file
without rows fails as empty, and a split whose rows were all bad or filtered fails too
(tfds cannot write an empty split).
"""

from __future__ import annotations

import glob
import os
from typing import ClassVar

import numpy as np

from kto_jax.data.builders.base import (
    FeedbackBuilder,
    RecordCounts,
    manual_dir_or_none,
    paired_features,
    require,
)
from kto_jax.data.schemas import BadRecord

SPLITS = ("train_prefs", "test_prefs")
URL = "https://huggingface.co/datasets/HuggingFaceH4/ultrafeedback_binarized/resolve/main/data/{split}-00000-of-00001.parquet"
ROLES = ("user", "assistant")


def _conversation(row: dict, column: str) -> list[tuple[str, str]]:
    """``row[column]`` as [(role, content), ...]; roles other than user/assistant/system are bad."""
    messages = require(row, column, list)
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRecord(f"field {column!r}, message {i}: expected a struct, got {type(message).__name__}")
        try:
            role, content = require(message, "role", str), require(message, "content", str)
        except BadRecord as e:
            raise BadRecord(f"field {column!r}, message {i}: {e}") from None
        if role not in (*ROLES, "system"):
            raise BadRecord(f"field {column!r}, message {i}: role {role!r} is not one of user/assistant/system")
        out.append((role, content))
    if not out or out[-1][0] != "assistant":
        last = repr(out[-1][0]) if out else "nothing (empty list)"
        raise BadRecord(f"field {column!r} should end with an assistant message, ends with {last}")
    if len(out) < 2:
        raise BadRecord(f"field {column!r} has no prompt turn before the assistant message")
    return out


def _score(row: dict, column: str) -> np.float32:
    return np.float32(require(row, column, (float, int)))


class Ultrafeedback(FeedbackBuilder):
    """UltraFeedback binarized preference pairs (``train_prefs`` / ``test_prefs``)."""

    HOMEPAGE = "https://huggingface.co/datasets/HuggingFaceH4/ultrafeedback_binarized"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Optional: place data/train_prefs-00000-of-00001.parquet and data/test_prefs-00000-of-00001.parquet "
        "(from the dataset repository's data/ folder) in manual_dir; they are downloaded otherwise."
    )
    FEATURES = paired_features(score_chosen=np.float32, score_rejected=np.float32)
    # the common split names, so "hh+ultrafeedback" mixes with config.data.train_split="train"
    SPLIT_ALIASES: ClassVar[dict[str, str]] = {"train": "train_prefs", "test": "test_prefs"}

    def _split_generators(self, dl_manager):
        manual_dir = manual_dir_or_none(dl_manager)
        paths = {}
        for split in SPLITS:
            found = (
                sorted(glob.glob(os.path.join(glob.escape(manual_dir), "data", f"{split}-*.parquet")))
                if manual_dir
                else []
            )
            paths[split] = found or [
                self.download(dl_manager, {f"data/{split}-00000-of-00001.parquet": URL.format(split=split)})[
                    f"data/{split}-00000-of-00001.parquet"
                ]
            ]
        return {split: self._generate_examples(paths[split], split) for split in SPLITS}

    def _generate_examples(self, paths, split):
        seen: set[str] = set()

        def parse(row, counts, _index):
            record = self._parse(row, counts, seen)
            return [] if record is None else [(record["id"], record)]

        for path in paths:
            yield from self.read_records(path, split, parse, rows=_read_parquet(path))
        self.finish_split(split, paths)

    @staticmethod
    def _parse(row: dict, counts: RecordCounts, seen: set) -> dict | None:
        prompt_id = require(row, "prompt_id", str)
        require(row, "prompt", str)
        chosen = _conversation(row, "chosen")
        rejected = _conversation(row, "rejected")
        score_chosen, score_rejected = _score(row, "score_chosen"), _score(row, "score_rejected")
        if chosen[:-1] != rejected[:-1]:
            raise BadRecord("fields 'chosen' and 'rejected' differ before their last message")
        if any(role == "system" for role, _ in chosen + rejected):
            counts.filter("system_message")
            return None
        if prompt_id in seen:
            counts.filter("duplicate_prompt_id")
            return None
        seen.add(prompt_id)
        prompt = chosen[:-1]
        return {
            "id": f"ultrafeedback/{prompt_id}",
            "prompt": {"role": [r for r, _ in prompt], "content": [c for _, c in prompt]},
            "chosen": chosen[-1][1],
            "rejected": rejected[-1][1],
            "score_chosen": score_chosen,
            "score_rejected": score_rejected,
        }


def _read_parquet(path: str):
    """Each row of a parquet file as a dict, read in batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise BadRecord(f"{path}: not a readable parquet file ({e})") from None
    for batch in parquet.iter_batches(batch_size=1024):
        yield from batch.to_pylist()
