"""Feedback views: paired -> unary, unary -> paired, one y per x, imbalance subsampling, with counts.

KTO needs only binary feedback. The paper turns each preference pair into one desirable
and one undesirable example, optionally keeps one completion per prompt ("one y per x"),
and studies imbalance by keeping a fraction of each class (section 4). Every step here
counts what it kept and dropped; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
from absl import logging

from kto_jax.errors import InputError

Turns = tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class Unary:
    id: str
    prompt: Turns
    completion: str
    desirable: bool
    sft_target: str | None = None  # the prompt's SFT target as HALOs picks it (builders' ``sft_target``)


@dataclasses.dataclass(frozen=True)
class Paired:
    id: str
    prompt: Turns
    chosen: str
    rejected: str
    sft_target: str | None = None  # the prompt's SFT target as HALOs picks it (builders' ``sft_target``)


@dataclasses.dataclass
class FeedbackStats:
    """Counts of every step from source records to training examples."""

    pairs: int = 0
    unary_in: int = 0
    dropped_one_y_per_x: int = 0
    desirable_kept: int = 0
    desirable_dropped: int = 0
    undesirable_kept: int = 0
    undesirable_dropped: int = 0

    def summary(self) -> str:
        return (
            f"{self.pairs} pairs / {self.unary_in} unary examples in; one-y-per-x dropped {self.dropped_one_y_per_x}; "
            f"desirable kept {self.desirable_kept} (dropped {self.desirable_dropped}), "
            f"undesirable kept {self.undesirable_kept} (dropped {self.undesirable_dropped})"
        )


def record_turns(record: dict) -> Turns:
    """A record's prompt conversation as ((role, content), ...)."""
    prompt = record["prompt"]
    return tuple(zip(prompt["role"], prompt["content"]))


def paired_from_records(records: Iterable[dict]) -> list[Paired]:
    return [Paired(r["id"], record_turns(r), r["chosen"], r["rejected"], r.get("sft_target")) for r in records]


def unary_from_records(records: Iterable[dict]) -> list[Unary]:
    return [
        Unary(r["id"], record_turns(r), r["completion"], bool(r["desirable"]), r.get("sft_target")) for r in records
    ]


def paired_to_unary(pairs: Sequence[Paired], *, seed: int) -> list[Unary]:
    """Each pair -> one desirable (chosen) and one undesirable (rejected) example, shuffled
    over the whole set so the two halves of a pair rarely share a batch (as HALOs does)."""
    examples = []
    for p in pairs:
        examples.append(Unary(f"{p.id}/chosen", p.prompt, p.chosen, True, p.sft_target))
        examples.append(Unary(f"{p.id}/rejected", p.prompt, p.rejected, False, p.sft_target))
    order = np.random.default_rng(seed).permutation(len(examples))
    return [examples[i] for i in order]


def one_y_per_x(examples: Sequence[Unary], *, seed: int) -> list[Unary]:
    """The paper's "one y per x" variant: for every prompt keep one of its examples, at random."""
    by_prompt: dict[Turns, list[int]] = {}
    for i, ex in enumerate(examples):
        by_prompt.setdefault(ex.prompt, []).append(i)
    rng = np.random.default_rng(seed)
    keep = sorted(int(rng.choice(idx)) for idx in by_prompt.values())
    return [examples[i] for i in keep]


def paired_from_unary(examples: Sequence[Unary]) -> tuple[list[Paired], dict]:
    """Pairs for the DPO family from unary feedback that shares prompts: returns (pairs, stats).

    For each prompt (in the order prompts first appear) with desirable completions
    ``d_1, d_2, ...`` and undesirable ``u_1, u_2, ...`` (each in example order), the pairs
    are ``(d_k, u_k)`` for ``k <= min(#d, #u)``: every completion is used at most once, so no
    pair repeats a reply. A prompt without both kinds gives no pair.

    stats: ``unary_pairs`` (pairs made), ``unary_prompts_paired``, ``unary_prompts_unpaired``
    (prompts with only one kind, dropped) and ``unary_completions_unpaired`` (completions not in
    any pair: those of unpaired prompts and the surplus of the larger kind).
    """
    by_prompt: dict[Turns, tuple[list, list]] = {}
    for ex in examples:
        by_prompt.setdefault(ex.prompt, ([], []))[0 if ex.desirable else 1].append(ex)
    pairs, unpaired_prompts = [], 0
    for prompt, (good, bad) in by_prompt.items():
        if not good or not bad:
            unpaired_prompts += 1
            continue
        pairs.extend(
            Paired(f"{d.id}+{u.id}", prompt, d.completion, u.completion, d.sft_target) for d, u in zip(good, bad)
        )
    stats = {
        "unary_pairs": len(pairs),
        "unary_prompts_paired": len(by_prompt) - unpaired_prompts,
        "unary_prompts_unpaired": unpaired_prompts,
        "unary_completions_unpaired": len(examples) - 2 * len(pairs),
    }
    logging.info("paired from unary feedback: %s", stats)
    return pairs, stats


SFT_TARGETS = ("all", "per_prompt")


def sft_targets_per_prompt(source: Sequence[Paired] | Sequence[Unary]) -> tuple[list[Unary], dict]:
    """One SFT target per unique prompt, as HALOs legacy's SFTDataLoader trains (and samples
    the judged test prompts with, its targets being the judging baseline): returns
    (examples, stats), one desirable ``Unary`` per prompt, in the order prompts first appear.

    HALOs keeps one ``Example`` per prompt string and trains ``generations[sft_index]`` once
    per prompt (ContextualAI/HALOs, branch legacy @61b9ee6: dataloader.py:567-593
    SFTDataLoader, :593 ``example.generations[example.sft_index]``). Which generation that is
    depends on the source, so the builders store it per prompt in each record's
    ``sft_target`` (kto_jax/data/builders/{hh,shp,oasst}.py: HH the chosen reply of the
    prompt's first pair, SHP the first comment (``human_ref_A``) of its first pair, OASST
    ``generations[-1]``, the reply ranked lower in its last pair). A prompt in several
    sources takes the last source's target (dataloader.py:432 ``full_data.update`` per
    dataset in order). Sources whose records carry no ``sft_target`` (the synthetic task,
    ultrafeedback) use the desirable completion of the prompt's first example by id
    (paired: its chosen); a unary prompt with no desirable completion has no target and is
    dropped, counted.

    stats: ``sft_target_prompts`` (examples kept, one per prompt), ``sft_target_dropped``
    (completions of the unary view, two per pair, not trained), ``sft_target_no_target``
    (prompts dropped without a target) and ``sft_target_from_source`` (targets read from
    the records' ``sft_target``, the rest by the fallback rule).
    """
    by_prompt: dict[Turns, list] = {}
    for ex in source:
        by_prompt.setdefault(ex.prompt, []).append(ex)
    completions = sum(2 if isinstance(ex, Paired) else 1 for ex in source)
    out, no_target, from_source = [], 0, 0
    for prompt, group in by_prompt.items():
        given = [ex for ex in group if ex.sft_target is not None]
        first = min(group, key=lambda ex: ex.id)
        if given:
            target, from_source = given[-1].sft_target, from_source + 1
        elif isinstance(first, Paired):
            target = first.chosen
        else:
            desirable = sorted((ex for ex in group if ex.desirable), key=lambda ex: ex.id)
            if not desirable:
                no_target += 1
                continue
            first, target = desirable[0], desirable[0].completion
        out.append(Unary(f"{first.id}/sft", prompt, target, True, target))
    stats = {
        "sft_target_prompts": len(out),
        "sft_target_dropped": completions - len(out),
        "sft_target_no_target": no_target,
        "sft_target_from_source": from_source,
    }
    logging.info("sft targets per prompt: %s", stats)
    return out, stats


def subsample(examples: Sequence[Unary], *, desirable_fraction: float, undesirable_fraction: float, seed: int):
    """Keep round(fraction * n) of each class, chosen at random; returns (kept, counts by class)."""
    for name, frac in (("desirable_fraction", desirable_fraction), ("undesirable_fraction", undesirable_fraction)):
        if not 0 < frac <= 1:
            raise InputError(f"config.data.{name}={frac} must be in (0, 1]")
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(examples), bool)
    counts = {}
    for label, frac in ((True, desirable_fraction), (False, undesirable_fraction)):
        idx = np.array([i for i, ex in enumerate(examples) if ex.desirable == label], int)
        n_keep = int(round(frac * len(idx)))
        keep[rng.choice(idx, n_keep, replace=False)] = True
        counts[label] = (n_keep, len(idx) - n_keep)
    return [ex for ex, k in zip(examples, keep) if k], counts


def unary_view(
    source: Sequence[Paired] | Sequence[Unary],
    *,
    seed: int,
    one_y: bool = False,
    desirable_fraction: float = 1.0,
    undesirable_fraction: float = 1.0,
) -> tuple[list[Unary], FeedbackStats]:
    """Paired or unary source examples -> the unary training set, with counts."""
    stats = FeedbackStats()
    if source and isinstance(source[0], Paired):
        stats.pairs = len(source)
        examples = paired_to_unary(source, seed=seed)
    else:
        examples = list(source)
    stats.unary_in = len(examples)
    if one_y:
        kept = one_y_per_x(examples, seed=seed + 1)
        stats.dropped_one_y_per_x = len(examples) - len(kept)
        examples = kept
    examples, counts = subsample(
        examples, desirable_fraction=desirable_fraction, undesirable_fraction=undesirable_fraction, seed=seed + 2
    )
    stats.desirable_kept, stats.desirable_dropped = counts[True]
    stats.undesirable_kept, stats.undesirable_dropped = counts[False]
    logging.info("feedback: %s", stats.summary())
    return examples, stats


def weight_warning(
    n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float
) -> str | None:
    """A warning when desirable_weight * n_D / (undesirable_weight * n_U) is outside [1, 4/3]
    (the paper's recommended range), naming the weights that fix it; None when inside."""
    if n_desirable == 0 or n_undesirable == 0:
        missing = "desirable" if n_desirable == 0 else "undesirable"
        return f"no {missing} examples: KTO will only see one class"
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if 1.0 <= ratio <= 4.0 / 3.0:
        return None
    low = undesirable_weight * n_undesirable / n_desirable
    high = low * 4.0 / 3.0
    alt_low = desirable_weight * n_desirable / (4.0 / 3.0 * n_undesirable)
    alt_high = desirable_weight * n_desirable / n_undesirable
    return (
        f"desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = {desirable_weight} * {n_desirable} / "
        f"({undesirable_weight} * {n_undesirable}) = {ratio:.3f} is outside [1, 4/3] (KTO paper, section 4). "
        f"Fix: config.loss.desirable_weight in [{low:.3f}, {high:.3f}], "
        f"or config.loss.undesirable_weight in [{alt_low:.3f}, {alt_high:.3f}]."
    )
