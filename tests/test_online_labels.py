"""HALOs main's labelling rules (kto_jax/online/labels.py) on hand-worked rewards."""

from __future__ import annotations

import random

import pytest

from kto_jax.online.labels import binary_labels, preference_pairs, resolve_threshold

REWARDS = [0.2, 0.9, 0.5, -0.3, 0.5]


def test_binary_labels_threshold_number_mean_median():
    assert binary_labels(REWARDS, 0.5) == [False, True, True, False, True]  # >=: 0.5 is desirable
    assert resolve_threshold(REWARDS, "mean") == pytest.approx(0.36)
    assert binary_labels(REWARDS, "mean") == [False, True, True, False, True]
    assert resolve_threshold(REWARDS, "median") == 0.5
    assert binary_labels(REWARDS, 0.7) == [
        False,
        True,
        False,
        False,
        False,
    ]  # HALOs' int(0.7) = 0 would label 4 desirable
    with pytest.raises(ValueError, match="use a number, 'mean' or 'median'"):
        binary_labels(REWARDS, "top")
    with pytest.raises(ValueError, match="judged no samples"):
        binary_labels([], "mean")


GROUPS = {"p1": [(0, 0.2), (1, 0.9), (2, 0.5), (3, -0.3)], "p2": [(4, 1.0)], "p3": [(5, 0.4), (6, 0.4)]}


def test_max_pairs_best_against_worst_over_the_gap():
    assert preference_pairs(GROUPS, "max", gap=0.0) == [(1, 3)]  # p2 has one sample, p3 ties
    assert preference_pairs(GROUPS, "max", gap=1.2) == []  # 0.9 - (-0.3) = 1.2 is not > 1.2
    assert preference_pairs(GROUPS, "max", gap=1.1) == [(1, 3)]


def test_min_pairs_the_closest_at_or_over_the_gap():
    # p1 gaps: 0.9-0.5=0.4, 0.5-0.2=0.3, 0.2-(-0.3)=0.5, ... ; the smallest >= 0.35 is 0.4
    assert preference_pairs(GROUPS, "min", gap=0.35) == [(1, 2)]
    assert preference_pairs(GROUPS, "min", gap=0.0) == [(2, 0)]  # 0.3, the smallest non-zero gap
    assert preference_pairs(GROUPS, "min", gap=1.3) == []  # no pair reaches it


def test_random_pairs_follow_halos_draws():
    """The shuffle and the show-first draw of HALOs' convert_to_pairwise_feedback with random.seed(seed)."""
    seed = 3
    rng = random.Random(seed)
    group = list(GROUPS["p1"])
    rng.shuffle(group)
    expected = []
    for a, b in zip(group[0::2], group[1::2]):
        if abs(a[1] - b[1]) > 0.1:
            rng.random()
            expected.append((a[0], b[0]) if a[1] > b[1] else (b[0], a[0]))
    got = preference_pairs({"p1": GROUPS["p1"]}, "random", gap=0.1, seed=seed)
    assert got == expected and len(got) >= 1
    assert all(dict(GROUPS["p1"])[c] > dict(GROUPS["p1"])[r] for c, r in got)  # chosen has the higher reward
    assert preference_pairs(GROUPS, "random", gap=0.1, seed=seed) == preference_pairs(
        GROUPS, "random", gap=0.1, seed=seed
    )


def test_unknown_mode_names_the_choices():
    with pytest.raises(ValueError, match=r"pair mode 'best': use one of \('random', 'max', 'min'\)"):
        preference_pairs(GROUPS, "best")
