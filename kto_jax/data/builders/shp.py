"""TFDS builder for the Stanford Human Preferences dataset (``stanfordnlp/SHP``).

Upstream files, JSON lines despite the extension, one pair of top-level Reddit comments
(A, B) on a post per line, for 18 subreddits ("domains"):

    https://huggingface.co/datasets/stanfordnlp/SHP/resolve/main/{domain}/{split}.json

Fields used: ``post_id``, ``history`` (the post: the prompt, one user turn), ``c_root_id_A``
/ ``c_root_id_B``, ``human_ref_A`` / ``human_ref_B`` (the comments), ``score_A`` /
``score_B`` (positive Reddit scores), ``labels`` (1 if A is preferred, 0 if B). The
record's ``domain`` is the upstream directory name (the upstream ``domain`` field holds
``askculinary_train``-style values and is not read).

Filters, as in the KTO paper / HALOs (following SteamSHP's data card), on the **train split
only**: keep pairs whose score ratio max(A/B, B/A) is at least 2 (``score_ratio<2``), then
at most 5 pairs per ``post_id`` (``more_than_5_per_post``): a post's pairs are ordered by
id and 5 are drawn without replacement by a generator seeded with a hash of the post_id, so
the choice does not depend on file order, process or Python hash seed. Validation and test
are the full upstream splits, unfiltered, as in HALOs (evaluations stay comparable with
other work on SHP). A repeated pair id within a split is dropped as ``duplicate_id``.

``sft_target`` (``config.data.sft_targets="per_prompt"``): the first comment (``human_ref_A``,
preferred or not) of the prompt's first pair in file order (domains sorted, as the hub
resolves HALOs' ``load_dataset("stanfordnlp/SHP", split=...)``; lines in order) among the
pairs the score-ratio filter keeps, before the per-post cap, as HALOs legacy
(ContextualAI/HALOs, legacy @61b9ee6) dataloader.py:165 filters, :170 appends
(human_ref_A, human_ref_B), :174 ``sft_index = 0`` ("absolute best response cannot be
inferred, so just pick the first") and only then, :179-181, samples 5 pairs per prompt.

With a manual_dir holding ``{manual_dir}/{domain}/{split}.json`` files, only the domains
found there are used (each with all three split files); a manual_dir holding none fails.
Without a manual_dir, all 18 domains are downloaded.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from kto_jax.data.builders.base import (
    FeedbackBuilder,
    manual_dir_or_none,
    paired_features,
    prompt_key,
    require,
    turns,
)
from kto_jax.data.schemas import BadRecord
from kto_jax.errors import MissingInput

DOMAINS = (
    "askacademia",
    "askanthropology",
    "askbaking",
    "askcarguys",
    "askculinary",
    "askdocs",
    "askengineers",
    "askhistorians",
    "askhr",
    "askphilosophy",
    "askphysics",
    "askscience",
    "asksciencefiction",
    "asksocialscience",
    "askvet",
    "changemyview",
    "explainlikeimfive",
    "legaladvice",
)
SPLITS = ("train", "validation", "test")
URL = "https://huggingface.co/datasets/stanfordnlp/SHP/resolve/main/{name}"
MIN_SCORE_RATIO = 2.0
MAX_PAIRS_PER_POST = 5
FILTERED_SPLITS = ("train",)


def file_name(domain: str, split: str) -> str:
    return f"{domain}/{split}.json"


def cap_per_post(post_id: str, ids: list[str], limit: int = MAX_PAIRS_PER_POST) -> set[str]:
    """The ids (at most ``limit``) kept for one post: a deterministic draw seeded by post_id."""
    if len(ids) <= limit:
        return set(ids)
    seed = int.from_bytes(hashlib.sha256(post_id.encode("utf-8")).digest()[:8], "little")
    ordered = sorted(ids)
    chosen = np.random.default_rng(seed).choice(len(ordered), size=limit, replace=False)
    return {ordered[i] for i in chosen}


def _score(obj: dict, field: str) -> float:
    value = require(obj, field, (int, float))
    if not value > 0:
        raise BadRecord(f"field {field!r} should be a positive number, got {value!r}")
    return float(value)


class SHP(FeedbackBuilder):
    """Stanford Human Preferences: Reddit post -> preferred / dispreferred top-level comment."""

    HOMEPAGE = "https://huggingface.co/datasets/stanfordnlp/SHP"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Optional: place the upstream files as {manual_dir}/{domain}/{split}.json (splits "
        f"{', '.join(SPLITS)}); only the domains present are used. Domains: {', '.join(DOMAINS)}."
    )

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "sft_target: the first comment of the prompt's first kept pair (HALOs' sft_index 0)"}

    def _features(self):
        return paired_features(
            domain=tfds.features.Text(),
            score_chosen=np.float32,
            score_rejected=np.float32,
            sft_target=tfds.features.Text(),
        )

    def _split_generators(self, dl_manager):
        manual_dir = manual_dir_or_none(dl_manager)
        if manual_dir is None:
            domains = DOMAINS
            names = [file_name(d, s) for d in domains for s in SPLITS]
            paths = self.source_files(dl_manager, {n: URL.format(name=n) for n in names})
        else:
            domains = tuple(
                d for d in DOMAINS if any(os.path.exists(os.path.join(manual_dir, file_name(d, s))) for s in SPLITS)
            )
            if not domains:
                raise MissingInput(
                    f"manual_dir {manual_dir} holds no SHP file: expected {{domain}}/{{split}}.json for a domain "
                    f"among {', '.join(DOMAINS)} (or an empty/absent manual_dir to download all of them)"
                )
            paths = {}
            for d in domains:
                for s in SPLITS:
                    path = os.path.join(manual_dir, file_name(d, s))
                    if not os.path.exists(path):
                        raise MissingInput(
                            f"{path} is missing: a domain in manual_dir needs all of {', '.join(SPLITS)}"
                        )
                    paths[file_name(d, s)] = path
            logging.info("shp: preparing from %s with domains %s", manual_dir, ", ".join(domains))
        return {
            split: self._generate_examples(split, [(d, paths[file_name(d, split)]) for d in domains])
            for split in SPLITS
        }

    def _generate_examples(self, split, files):
        filtered = split in FILTERED_SPLITS
        key = f"{self.name}/{split}"
        seen: set[str] = set()
        targets: dict[bytes, str] = {}  # prompt -> human_ref_A of its first pair past the ratio filter
        records = []
        for domain, path in sorted(files):  # HF's file order (sft_target)
            records.extend(self.read_records(path, split, self._parser(domain, filtered, seen, targets)))
        counts = self.counts[key]
        if filtered:
            by_post: dict[str, list[str]] = {}
            for record_id, record in records:
                by_post.setdefault(record["_post_id"], []).append(record_id)
            keep = set()
            for post_id, ids in by_post.items():
                keep |= cap_per_post(post_id, ids)
            for _ in range(len(records) - len(keep)):
                counts.filter("more_than_5_per_post")
            counts.kept -= len(records) - len(keep)
            records = [(k, r) for k, r in records if k in keep]
        self.finish_split(split, [path for _, path in files])
        for record_id, record in records:
            record.pop("_post_id")
            record["sft_target"] = targets[prompt_key(record["prompt"])]
            yield record_id, record

    def _parser(self, domain: str, filtered: bool, seen: set, targets: dict):
        def parse(obj, counts, _index):
            post_id = require(obj, "post_id")
            history = require(obj, "history")
            id_a, id_b = require(obj, "c_root_id_A"), require(obj, "c_root_id_B")
            ref_a, ref_b = require(obj, "human_ref_A"), require(obj, "human_ref_B")
            score_a, score_b = _score(obj, "score_A"), _score(obj, "score_B")
            label = require(obj, "labels", int)
            if label not in (0, 1):
                raise BadRecord(f"field 'labels' should be 0 or 1, got {label}")
            if filtered and max(score_a / score_b, score_b / score_a) < MIN_SCORE_RATIO:
                counts.filter("score_ratio<2")
                return []
            targets.setdefault(prompt_key(turns(("user", history))), ref_a)
            record_id = f"shp/{post_id}/{id_a}/{id_b}"
            if record_id in seen:
                counts.filter("duplicate_id")
                return []
            seen.add(record_id)
            a_wins = label == 1
            record = {
                "id": record_id,
                "prompt": turns(("user", history)),
                "chosen": ref_a if a_wins else ref_b,
                "rejected": ref_b if a_wins else ref_a,
                "domain": domain,
                "score_chosen": np.float32(score_a if a_wins else score_b),
                "score_rejected": np.float32(score_b if a_wins else score_a),
                "_post_id": post_id,
            }
            return [(record_id, record)]

        return parse
