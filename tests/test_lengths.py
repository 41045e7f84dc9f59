"""scripts/lengths.py and the histograms behind the length-realistic bench (scripts/bench.py --lengths)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import lengths  # noqa: E402


def test_every_histogram_is_a_distribution_with_its_source_named():
    table = lengths.sources()
    assert {"hh", "shp", "oasst", "ultrafeedback", "mix"} <= set(table)
    for name, source in table.items():
        assert source["where_from"].strip(), name
        for part in ("prompt_tokens", "completion_tokens"):
            edges, probs = np.asarray(source[part]["edges"]), np.asarray(source[part]["probs"])
            assert len(edges) == len(probs) + 1 and (np.diff(edges) > 0).all() and edges[0] >= 1, (name, part)
            np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-6, err_msg=f"{name} {part}")


@pytest.mark.parametrize("source", ["hh", "mix"])
def test_sampled_lengths_follow_the_histogram(source):
    """Each bin's share of 20k draws is its probability (within 1.5 points), every draw inside the edges,
    and the same seed gives the same lengths."""
    table = lengths.sources()[source]
    drawn = lengths.sample_lengths(source, 20000, np.random.default_rng(0))
    np.testing.assert_array_equal(drawn, lengths.sample_lengths(source, 20000, np.random.default_rng(0)))
    for column, part in enumerate(("prompt_tokens", "completion_tokens")):
        edges, probs = np.asarray(table[part]["edges"]), np.asarray(table[part]["probs"])
        x = drawn[:, column]
        assert x.min() >= edges[0] and x.max() < edges[-1]
        shares = np.histogram(x, bins=edges)[0] / len(x)
        np.testing.assert_allclose(shares, probs, atol=0.015)


def test_example_texts_have_the_drawn_lengths():
    rows = lengths.example_texts("unary", "mix", 50, seed=3)
    drawn = lengths.sample_lengths("mix", 50, np.random.default_rng(3))
    assert [len(r["prompt"]) for r in rows] == list(drawn[:, 0])
    assert [len(r["completion"]) for r in rows] == list(drawn[:, 1])
    assert [r["label"] for r in rows[:4]] == [False, True, False, True]
    pairs = lengths.example_texts("paired", "mix", 50, seed=3)
    assert [len(r["chosen"]) for r in pairs] == list(drawn[:, 1])
    with pytest.raises(ValueError, match="not in"):
        lengths.sample_lengths("nope", 1, np.random.default_rng(0))
