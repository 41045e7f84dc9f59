"""The synthetic task: exact judge, half-and-half mixture, determinism, TFDS views."""

import numpy as np
import pytest

from kto_jax.data import synthetic
from kto_jax.data.builders import load_examples
from kto_jax.data.feedback import Paired, Unary
from kto_jax.judges.exact import check_synthetic


def test_judge_is_exact():
    assert check_synthetic("Shout abc!", " ABC")
    assert check_synthetic("Shout abc!", "ABC\n")  # surrounding whitespace ignored
    assert not check_synthetic("Shout abc!", " abc")
    assert not check_synthetic("Shout abc!", " ABD")
    assert not check_synthetic("Shout abc!", " ABCD")
    assert not check_synthetic("Shout abc!", "")
    with pytest.raises(ValueError, match="not a synthetic-task prompt"):
        check_synthetic("Whisper abc!", " abc")


def test_pairs_have_one_desirable_and_one_undesirable_completion():
    for i in range(200):
        ex = synthetic.paired_example("train", i)
        assert check_synthetic(ex["prompt"], ex["chosen"])
        assert not check_synthetic(ex["prompt"], ex["rejected"])


def test_unary_view_is_half_desirable_with_exact_labels():
    examples = [synthetic.unary_example("train", i) for i in range(2000)]
    labels = np.array([ex["desirable"] for ex in examples])
    assert all(check_synthetic(ex["prompt"], ex["completion"]) == ex["desirable"] for ex in examples)
    assert 0.45 < labels.mean() < 0.55
    mistakes = [ex["completion"] for ex in examples if not ex["desirable"]]
    lowercase = np.mean([m == m.lower() for m in mistakes])
    assert 0.4 < lowercase < 0.6  # half the mistakes are not shouted, half have a wrong letter


def test_deterministic_and_splits_differ():
    assert synthetic.paired_example("train", 7) == synthetic.paired_example("train", 7)
    assert synthetic.paired_example("train", 7) != synthetic.paired_example("test", 7)
    with pytest.raises(ValueError, match="unknown synthetic split"):
        synthetic.paired_example("dev", 0)


def test_tfds_builder_paired_and_unary_views(tmp_path):
    pairs = load_examples("synthetic", "validation", data_dir=str(tmp_path))
    assert len(pairs) == 500 and isinstance(pairs[0], Paired)
    by_id = {p.id: p for p in pairs}
    ex = synthetic.paired_example("validation", 3)
    assert by_id["synthetic-validation-3"] == Paired(ex["id"], (("user", ex["prompt"]),), ex["chosen"], ex["rejected"])
    unary = load_examples("synthetic/unary", "validation", data_dir=str(tmp_path))
    assert isinstance(unary[0], Unary) and len(unary) == 500
    with pytest.raises(ValueError, match="mix paired and unary"):
        load_examples("synthetic+synthetic/unary", "validation", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*synthetic"):
        load_examples("nope", "train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_examples("synthetic", "dev", data_dir=str(tmp_path))
