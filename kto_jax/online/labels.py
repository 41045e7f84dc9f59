"""From judged samples to feedback: HALOs main's labelling rules (``train/label.py``), as pure functions.

A round samples N completions per prompt and a judge scores each (a reward model's score, an
API judge's number, or an exact checker's 0/1). KTO trains on one thumbs up or down per sample,
DPO on pairs of one prompt's samples:

    binary_labels(rewards, threshold)      desirable_i = reward_i >= t, with t a number or the
                                           rewards' "mean" or "median" (convert_to_binary_feedback)
    preference_pairs(groups, mode, gap)    per prompt, (chosen, rejected) index pairs whose reward
                                           gap is large enough (convert_to_pairwise_feedback):
        "random"  the prompt's samples shuffled (seeded), then paired 0-1, 2-3, ...; kept when
                  |r_a - r_b| > gap
        "max"     best against worst, kept when their gap > gap
        "min"     the closest pairs whose gap is >= gap (every pair at the smallest such gap)

The higher reward is ``chosen``: HALOs draws which of the two is shown first (``random.random() <
0.5``) and labels the pair by ``reward_A > reward_B``, the same preference; that draw is made
here too, so in "random" mode the shuffles of later prompts follow HALOs' sequence of ``random``
calls for the same seed. Where the two differ: HALOs casts a numeric binary threshold with
``int()`` (0.7 becomes 0), here it is used as given; ties (equal rewards) are never a pair, where
HALOs' "min" scan can pair a sample with itself at gap 0.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

import numpy as np

from kto_jax.errors import InputError

PAIR_MODES = ("random", "max", "min")


def resolve_threshold(rewards: Sequence[float], threshold) -> float:
    """The binary threshold: a number, or the rewards' ``"mean"`` / ``"median"``."""
    if threshold in ("mean", "median"):
        if not len(rewards):
            raise ValueError(f"binary threshold {threshold!r} of no rewards: the round judged no samples")
        return float(np.mean(rewards) if threshold == "mean" else np.median(rewards))
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise InputError(f"binary threshold {threshold!r}: use a number, 'mean' or 'median'") from None
    if not math.isfinite(value):
        raise InputError(f"binary threshold {threshold!r}: use a finite number, 'mean' or 'median'")
    return value


def binary_labels(rewards: Sequence[float], threshold=0.0) -> list[bool]:
    """desirable_i = reward_i >= threshold (:func:`resolve_threshold`)."""
    t = resolve_threshold(rewards, threshold)
    return [float(r) >= t for r in rewards]


def preference_pairs(
    groups: Mapping[str, Sequence[tuple[int, float]]], mode: str = "max", gap: float = 0.0, seed: int = 0
) -> list[tuple[int, int]]:
    """``(chosen, rejected)`` sample indices from each prompt's ``[(index, reward), ...]``, in the
    groups' order (module docstring for the modes); groups of fewer than two samples give none."""
    if mode not in PAIR_MODES:
        raise InputError(f"pair mode {mode!r}: use one of {PAIR_MODES}")
    gap = float(gap)
    rng = random.Random(seed)
    out: list[tuple[int, int]] = []

    def emit(a, b):
        rng.random()  # HALOs' draw of which sample is shown first
        if a[1] != b[1]:
            out.append((a[0], b[0]) if a[1] > b[1] else (b[0], a[0]))

    for samples in groups.values():
        group = list(samples)
        if len(group) < 2:
            continue
        if mode == "random":
            rng.shuffle(group)
            for a, b in zip(group[0:-1:2], group[1::2]):
                if abs(a[1] - b[1]) > gap:
                    emit(a, b)
            continue
        group.sort(key=lambda s: s[1], reverse=True)
        if abs(group[0][1] - group[-1][1]) <= gap:  # best and worst: the widest gap of the prompt
            continue
        if mode == "max":
            emit(group[0], group[-1])
        else:
            eps = 1e-12
            closest = [
                (abs(a[1] - b[1]), a, b)
                for i, a in enumerate(group)
                for b in group[i + 1 :]
                if abs(a[1] - b[1]) + eps >= gap
            ]
            best = min(d for d, _, _ in closest)
            for d, a, b in closest:
                if math.isclose(d, best, abs_tol=eps):
                    emit(a, b)
    return out
