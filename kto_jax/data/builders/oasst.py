"""TFDS builder for OpenAssistant oasst1 (English): pairs of sibling replies with adjacent ranks.

Source: ``2023-04-12_oasst_ready.trees.jsonl.gz`` from the Hugging Face dataset
``OpenAssistant/oasst1``, one message tree per JSON line::

    {"message_tree_id", "tree_state", "prompt": message}
    message = {"message_id", "parent_id", "text", "role": "prompter"|"assistant", "lang",
               "rank": null|int (0 = best among its siblings), "deleted", "review_result",
               "replies": [message, ...], ...}

Rules (every dropped item is counted under ``counts[f"oasst/{split}"].filtered``):

* Split: the tree file has no split. A tree goes to ``test`` when the first 8 bytes of
  ``sha256(message_tree_id)``, read as a big-endian integer, are ``< 5 (mod 100)``, else
  to ``train`` (about 95/5, by tree, so no conversation prefix crosses splits). HF's own
  ``train``/``validation`` parquet files (used by the KTO authors' loader) come from an
  unseeded shuffle of tree ids that cannot be recomputed from the tree file, so these
  splits differ from theirs. ``other_split`` counts the trees of the other split.
* ``deleted`` / ``non_english``: a message with ``deleted: true``, or ``lang != "en"``, is
  dropped with its whole subtree (counted once, at the dropped message).
* ``null_rank``: an assistant reply with a null rank is in no pair (its subtree is kept).
* Pairs: under each prompter message, every kept assistant reply of rank ``r`` is the
  rejected one against every kept sibling of rank ``r - 1`` (the chosen one). Ranks must
  be exactly adjacent: when the rank-1 reply was dropped, ranks 0 and 2 make no pair.
* Prompt: the conversation from the root to that prompter message, ``prompter`` turns as
  ``user`` and ``assistant`` turns as ``assistant``; texts are kept as they are.
* ``sft_target`` (``config.data.sft_targets="per_prompt"``): HALOs legacy's get_oasst never
  sets ``sft_index`` (ContextualAI/HALOs, legacy @61b9ee6, dataloader.py:272-341), so its
  SFT trains the default ``sft_index = -1`` (dataloader.py:43), ``generations[-1]``: each
  row ranked r >= 1 that has a sibling ranked r - 1 appends (sibling, row) (dataloader.py:
  318-335), so the last generation is the lower-ranked reply of the prompt's last pair, in
  row order. Here: the last reply, in the file's order of trees and replies, that is the
  rejected one of a pair; a prompt in several trees takes its last tree's (HALOs keys by
  the prompt text). The hub's message order is assumed to be the trees' order.
* ``review_result`` and ``tree_state`` are not filtered on (as the KTO authors' loader).

A message missing ``message_id``/``text``/``role``, or a field of the wrong type, or roles
that do not alternate prompter/assistant from a prompter root, is a bad record: it fails
naming the file, line and the message's path in the tree (``prompt.replies[0]...``), or
the whole tree is counted as bad with ``skip_bad_records=True``. ``counts.read`` counts
tree lines, ``counts.kept`` pairs. A split left without pairs fails (tfds cannot write an
empty split), naming the file and the counts.
"""

from __future__ import annotations

import hashlib

import numpy as np
import tensorflow_datasets as tfds

from kto_jax.data.builders.base import (
    FeedbackBuilder,
    RecordCounts,
    is_kind,
    paired_features,
    prompt_key,
    require,
)
from kto_jax.data.schemas import BadRecord

FILE_NAME = "2023-04-12_oasst_ready.trees.jsonl.gz"
URL = f"https://huggingface.co/datasets/OpenAssistant/oasst1/resolve/main/{FILE_NAME}"
TEST_PERCENT = 5
ROLE = {"prompter": "user", "assistant": "assistant"}


def split_of(tree_id: str) -> str:
    """``test`` for about TEST_PERCENT% of trees (by a hash of the tree id), else ``train``."""
    bucket = int.from_bytes(hashlib.sha256(tree_id.encode("utf-8")).digest()[:8], "big") % 100
    return "test" if bucket < TEST_PERCENT else "train"


def _field(msg, field: str, kind, where: str):
    try:
        return require(msg, field, kind)
    except BadRecord as e:
        raise BadRecord(f"{where}: {e}") from None


def _optional(msg: dict, field: str, kind, where: str):
    """``msg[field]``, None when absent or null, else a BadRecord unless of type ``kind``."""
    value = msg.get(field)
    if value is None:
        return None
    if not is_kind(value, kind):
        raise BadRecord(f"{where}: field {field!r} should be {kind.__name__} or null, got {type(value).__name__}")
    return value


class Oasst(FeedbackBuilder):
    """OpenAssistant oasst1 ready trees, English only: adjacent-rank sibling replies as pairs."""

    HOMEPAGE = "https://huggingface.co/datasets/OpenAssistant/oasst1"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Optional: place {FILE_NAME} (from {URL}) in manual_dir; it is downloaded otherwise."
    )
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "sft_target: HALOs' generations[-1], the rejected reply of the prompt's last pair"}
    FEATURES = paired_features(
        tree_id=tfds.features.Text(), rank_chosen=np.int32, rank_rejected=np.int32, sft_target=tfds.features.Text()
    )

    def _split_generators(self, dl_manager):
        path = self.source_file(dl_manager, FILE_NAME, URL)
        return {split: self._generate_examples(path, split) for split in ("train", "test")}

    def _generate_examples(self, path, split):
        def parse(tree, counts, _index):
            tree_id = require(tree, "message_tree_id", str)
            if split_of(tree_id) != split:
                counts.filter("other_split")
                return []
            root = require(tree, "prompt", dict)
            records, dropped = [], RecordCounts()  # filters count only once the whole tree parsed
            self._visit(root, "prompt", None, [], tree_id, dropped, records)
            for reason, n in dropped.filtered.items():
                counts.filtered[reason] = counts.filtered.get(reason, 0) + n
            return records

        records = list(self.read_records(path, split, parse))
        self.finish_split(split, [path], kept="pairs", read="trees")
        targets: dict[bytes, str] = {}  # prompt -> its last tree's target (HALOs keys by prompt text)
        for _, record in records:
            targets[prompt_key(record["prompt"])] = record["sft_target"]
        for key, record in records:
            record["sft_target"] = targets[prompt_key(record["prompt"])]
            yield key, record

    def _visit(self, msg, loc, parent_role, path, tree_id, counts, records):
        """Depth-first: check ``msg`` (at ``loc`` in the tree), drop it (and its subtree) by
        the rules, pair its kept replies; returns (message_id, text, rank) when kept."""
        if not isinstance(msg, dict):
            raise BadRecord(f"{loc}: expected a JSON object, got {type(msg).__name__}")
        message_id = _field(msg, "message_id", str, loc)
        where = f"{loc} (message {message_id})"
        text = _field(msg, "text", str, where)
        role = _field(msg, "role", str, where)
        if role not in ROLE:
            raise BadRecord(f"{where}: field 'role' should be one of {sorted(ROLE)}, got {role!r}")
        expected = "prompter" if parent_role in (None, "assistant") else "assistant"
        if role != expected:
            after = f"after a {parent_role!r} message" if parent_role else "at the root"
            raise BadRecord(f"{where}: field 'role' is {role!r} {after}; expected {expected!r}")
        rank = _optional(msg, "rank", int, where)
        lang = _optional(msg, "lang", str, where)
        deleted = _optional(msg, "deleted", bool, where)
        replies = _optional(msg, "replies", list, where) or []
        if deleted:
            counts.filter("deleted")
            return None
        if lang != "en":
            counts.filter("non_english")
            return None
        if role == "assistant" and rank is None:
            counts.filter("null_rank")

        path = path + [(ROLE[role], text)]
        kept = []  # (message_id, text, rank) of kept assistant replies to this prompter message
        for i, reply in enumerate(replies):
            child = self._visit(reply, f"{loc}.replies[{i}]", role, path, tree_id, counts, records)
            if child is not None and role == "prompter" and child[2] is not None:
                kept.append(child)
        prompt = {"role": [r for r, _ in path], "content": [c for _, c in path]}
        ranks = {c[2] for c in kept}
        # HALOs' generations[-1]: the last reply (in reply order) that is the rejected one of a pair
        in_pairs = [text for _, text, rank in kept if rank - 1 in ranks]
        sft_target = in_pairs[-1] if in_pairs else None
        for rejected_id, rejected, rank_rejected in sorted(kept, key=lambda c: c[2]):
            for chosen_id, chosen, rank_chosen in kept:
                if rank_chosen == rank_rejected - 1:
                    key = f"oasst/{chosen_id}/{rejected_id}"
                    records.append(
                        (
                            key,
                            {
                                "id": key,
                                "prompt": prompt,
                                "chosen": chosen,
                                "rejected": rejected,
                                "tree_id": tree_id,
                                "rank_chosen": np.int32(rank_chosen),
                                "rank_rejected": np.int32(rank_rejected),
                                "sft_target": sft_target,
                            },
                        )
                    )
        return message_id, text, rank
