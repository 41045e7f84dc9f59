"""Feedback views: paired -> unary, one y per x, imbalance subsampling, weight warning."""

import pytest

from kto_jax.data.feedback import Paired, Unary, one_y_per_x, paired_to_unary, unary_view, weight_warning


def pairs(n, prompts=None):
    prompts = prompts or n
    return [Paired(f"p{i}", (("user", f"q{i % prompts}"),), f"good{i}", f"bad{i}") for i in range(n)]


def test_each_pair_gives_one_desirable_and_one_undesirable_example():
    out = paired_to_unary(pairs(50), seed=0)
    assert len(out) == 100
    assert sum(ex.desirable for ex in out) == 50
    assert {ex.completion for ex in out if ex.desirable} == {f"good{i}" for i in range(50)}
    assert {ex.completion for ex in out if not ex.desirable} == {f"bad{i}" for i in range(50)}


def test_the_unary_view_keeps_each_prompt_s_sft_target():
    """KTO's judged samples are compared with the prompt's SFT target (SHP's first comment, not the chosen reply)."""
    target = [Paired("p0", (("user", "q"),), "chosen", "rejected", "the first comment")]
    assert {ex.sft_target for ex in paired_to_unary(target, seed=0)} == {"the first comment"}


def test_halves_of_a_pair_rarely_share_a_batch():
    out = paired_to_unary(pairs(1000), seed=1)
    batch = 32
    same = 0
    for start in range(0, len(out), batch):
        ids = [ex.id.split("/")[0] for ex in out[start : start + batch]]
        same += len(ids) - len(set(ids))
    assert same < 0.05 * 1000  # expected about batch/N of the pairs, ~3%


def test_one_y_per_x_keeps_one_example_per_prompt():
    examples = paired_to_unary(pairs(60, prompts=20), seed=0)  # 3 pairs, 6 examples per prompt
    kept = one_y_per_x(examples, seed=0)
    assert len(kept) == 20
    assert len({ex.prompt for ex in kept}) == 20
    assert 0 < sum(ex.desirable for ex in kept) < 20


def test_imbalance_subsampling_counts_everything():
    examples, stats = unary_view(pairs(100), seed=0, desirable_fraction=0.1, undesirable_fraction=1.0)
    assert stats.pairs == 100 and stats.unary_in == 200
    assert (stats.desirable_kept, stats.desirable_dropped) == (10, 90)
    assert (stats.undesirable_kept, stats.undesirable_dropped) == (100, 0)
    assert len(examples) == 110 and sum(ex.desirable for ex in examples) == 10
    with pytest.raises(ValueError, match="desirable_fraction=0"):
        unary_view(pairs(10), seed=0, desirable_fraction=0.0)


def test_unary_sources_pass_through_with_counts():
    source = [Unary(f"u{i}", (("user", "q"),), "c", i % 4 == 0) for i in range(40)]
    examples, stats = unary_view(source, seed=0, one_y=False)
    assert len(examples) == 40 and stats.pairs == 0 and stats.unary_in == 40
    assert stats.desirable_kept == 10 and stats.undesirable_kept == 30


def test_weight_warning_range_and_fix():
    assert weight_warning(100, 100, 1.0, 1.0) is None
    assert weight_warning(100, 75, 1.0, 1.0) is None  # ratio 4/3
    msg = weight_warning(10, 100, 1.0, 1.0)  # the paper's 90% desirable dropped
    assert "0.100 is outside [1, 4/3]" in msg
    assert "desirable_weight in [10.000, 13.333]" in msg
    assert "undesirable_weight in [0.075, 0.100]" in msg
    assert weight_warning(10, 100, 10.0, 1.0) is None
    assert "no desirable examples" in weight_warning(0, 5, 1.0, 1.0)
