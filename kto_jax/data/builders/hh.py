"""TFDS builder for Anthropic HH-RLHF (``Anthropic/hh-rlhf``): multi-turn preference pairs.

Upstream files, one JSON line ``{"chosen": ..., "rejected": ...}`` per pair, each a whole
dialogue ``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: ..."``:

    https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/{subset}/{split}.jsonl.gz

Configs: ``all`` (default, every subset) and one per subset (``hh/harmless-base``). With a
manual_dir, files are read from ``{manual_dir}/{subset}/{split}.jsonl.gz``; those missing
there are downloaded.

The prompt rule. The prompt is the dialogue up to and including the last
``"\\n\\nAssistant:"`` that chosen and rejected *share*: take their common prefix and cut it
after its last ``"\\n\\nAssistant:"``. The completions are what follows (leading whitespace
stripped). When the two dialogues already differ before their final assistant turn (the
remainder of either still holds an ``"\\n\\nAssistant:"`` marker, or they share none), the
pair has no common prompt and is dropped, counted as ``prompt_differs``; HALOs instead
cuts at the last marker of ``chosen`` and slices ``rejected`` at the same offset, which
gives such pairs a rejected text that is the wrong dialogue's tail. Pairs with an empty
(whitespace-only) completion are dropped as ``empty_completion``, and pairs whose two
completions are equal as ``identical``. Text is otherwise kept as is (HALOs also collapses
runs of spaces; this builder does not).

``sft_target`` (``config.data.sft_targets="per_prompt"``): the chosen completion of the
prompt's first kept pair, reading the subsets in sorted order (harmless-base first) and each
file in line order, the order of HALOs' ``load_dataset("Anthropic/hh-rlhf", split=...)``
(the hub resolves the data files sorted by path). HALOs legacy (ContextualAI/HALOs,
legacy @61b9ee6) dataloader.py:246-248 appends each pair's (chosen, rejected) to its
prompt's ``generations`` and sets ``sft_index = 0``: the first pair's chosen reply. Pairs
this builder drops (above) are not candidates, and prompts are compared as turns (HALOs
compares its formatted prompt string).

The prompt becomes turns by splitting on the ``"\\n\\nHuman:"`` / ``"\\n\\nAssistant:"``
markers, each turn's text stripped of surrounding whitespace; the final (empty) assistant
marker is not a turn. Text before the first marker, or no turn before the final marker,
makes the record bad.
"""

from __future__ import annotations

import re

import tensorflow_datasets as tfds

from kto_jax.data.builders.base import FeedbackBuilder, paired_features, prompt_key, require
from kto_jax.data.schemas import BadRecord

SUBSETS = ("helpful-base", "helpful-online", "helpful-rejection-sampled", "harmless-base")
SPLITS = ("train", "test")
URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/{name}"

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
_MARKERS = re.compile(f"({re.escape(HUMAN)}|{re.escape(ASSISTANT)})")


def file_name(subset: str, split: str) -> str:
    return f"{subset}/{split}.jsonl.gz"


def _common_prefix(a: str, b: str) -> str:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return a[:i]


def dialogue_turns(prompt: str) -> dict:
    """``"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:"`` -> user a, assistant b, user c."""
    parts = _MARKERS.split(prompt)
    if parts[0].strip():
        raise BadRecord(f"field 'chosen' does not start with {HUMAN!r} (starts {parts[0][:40]!r})")
    roles, contents = [], []
    pairs = list(zip(parts[1::2], parts[2::2]))
    for marker, text in pairs[:-1]:  # the last is the final, empty assistant marker
        roles.append("user" if marker == HUMAN else "assistant")
        contents.append(text.strip())
    if not roles:
        raise BadRecord(f"field 'chosen' has no {HUMAN!r} turn before its final {ASSISTANT!r}")
    return {"role": roles, "content": contents}


def split_pair(chosen: str, rejected: str):
    """(prompt text, chosen completion, rejected completion), or (None, reason) when filtered."""
    shared = _common_prefix(chosen, rejected)
    cut = shared.rfind(ASSISTANT)
    if cut < 0:
        return None, "prompt_differs"
    prompt = shared[: cut + len(ASSISTANT)]
    rest_chosen, rest_rejected = chosen[len(prompt) :], rejected[len(prompt) :]
    if ASSISTANT in rest_chosen or ASSISTANT in rest_rejected:
        return None, "prompt_differs"
    rest_chosen, rest_rejected = rest_chosen.lstrip(), rest_rejected.lstrip()
    if not rest_chosen.strip() or not rest_rejected.strip():
        return None, "empty_completion"
    if rest_chosen == rest_rejected:
        return None, "identical"
    return (prompt, rest_chosen, rest_rejected), None


class HH(FeedbackBuilder):
    """Anthropic HH-RLHF preference pairs: multi-turn prompt, chosen and rejected final turn."""

    HOMEPAGE = "https://huggingface.co/datasets/Anthropic/hh-rlhf"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Optional: place the upstream files as {manual_dir}/{subset}/{split}.jsonl.gz "
        f"(subsets {', '.join(SUBSETS)}; splits {', '.join(SPLITS)}); missing files are downloaded."
    )
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="all", description="every subset"),
        *(tfds.core.BuilderConfig(name=s, description=f"the {s} subset only") for s in SUBSETS),
    ]

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "sft_target: the chosen reply of the prompt's first pair (HALOs' sft_index 0)"}

    def _features(self):
        return paired_features(subset=tfds.features.Text(), sft_target=tfds.features.Text())

    def _subsets(self) -> tuple[str, ...]:
        return SUBSETS if self.builder_config.name == "all" else (self.builder_config.name,)

    def _split_generators(self, dl_manager):
        names = [file_name(subset, split) for subset in self._subsets() for split in SPLITS]
        paths = self.source_files(dl_manager, {name: URL.format(name=name) for name in names})
        return {
            split: self._generate_examples(split, [(s, paths[file_name(s, split)]) for s in self._subsets()])
            for split in SPLITS
        }

    def _generate_examples(self, split, files):
        targets: dict[bytes, str] = {}  # prompt -> its first kept pair's chosen reply
        for subset, path in sorted(files):  # HF's file order (sft_target)
            yield from self.read_records(path, split, self._parser(subset, split, targets))
        self.finish_split(split, [path for _, path in files])

    def _parser(self, subset: str, split: str, targets: dict):
        def parse(obj, counts, index):
            # index: the line's 0-based index among the file's non-blank lines (upstream files
            # have no blank lines, so this is the line number - 1).
            chosen = require(obj, "chosen")
            rejected = require(obj, "rejected")
            split_up, reason = split_pair(chosen, rejected)
            if split_up is None:
                counts.filter(reason)
                return []
            prompt, chosen_text, rejected_text = split_up
            record_id = f"hh/{subset}/{split}/{index}"
            prompt_turns = dialogue_turns(prompt)
            sft_target = targets.setdefault(prompt_key(prompt_turns), chosen_text)
            return [
                (
                    record_id,
                    {
                        "id": record_id,
                        "prompt": prompt_turns,
                        "chosen": chosen_text,
                        "rejected": rejected_text,
                        "subset": subset,
                        "sft_target": sft_target,
                    },
                )
            ]

        return parse
