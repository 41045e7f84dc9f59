"""Shared reference caches (kto_jax/train/reference_cache.py): runs on the same reference model
and batches compute the reference log-probs once; a run with other weights or batches passes
a cache over with its reason and computes its own; a cache read from another run trains to the
bitwise same metrics as one the run computed itself.

    run        loss / steps        cache_dir    expected
    first      kto beta 0.1 / 8    shared       computes, writes reference_cache-<key>.npz
    sibling    kto beta 0.3 / 6    shared       reads the first's (a longer run's prefix)
    own        kto beta 0.3 / 6    its workdir  computes: the same rows as the sibling
    other      kto from first / 6  shared       another reference model: passes it over, computes
"""

from __future__ import annotations

import glob
import json
import os

import pytest

from tests import ckpt_helpers as H
from tests.train_helpers import tail


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_data_dir):
    root = tmp_path_factory.mktemp("shared_cache")
    shared = str(root / "cache")
    cached = ("--config.reference.mode=cached",)

    def start(name, arg, *extra, cache=shared):
        flags = cached + ((f"--config.reference.cache_dir={cache}",) if cache else ()) + extra
        return H.Proc(H.train_args(str(root / name), synthetic_data_dir, arg, flags), str(root), name)

    out = {"root": root, "shared": shared}
    first = start("first", "loss=kto,steps=8")
    out["first"] = first.result()
    sibling = start("sibling", "loss=kto,steps=6", "--config.loss.beta=0.3")
    own = start("own", "loss=kto,steps=6", "--config.loss.beta=0.3", cache=None)
    out["sibling"], out["own"] = sibling.result(), own.result()
    out["other"] = start("other", f"loss=kto,steps=6,init=orbax:{root / 'first'}").result()
    return out


def _ok(result):
    assert result["rc"] == 0, tail(result["stderr"])
    return result["stderr"]


def test_the_first_run_computes_and_shares_its_cache(runs):
    log = _ok(runs["first"])
    written = [p for p in glob.glob(os.path.join(runs["shared"], "reference_cache-*.npz")) if p in log]
    assert "cached reference log-probs for 8 steps" in log and len(written) == 1, tail(log)
    assert not glob.glob(str(runs["root"] / "first" / "reference_cache-*.npz")), "written to cache_dir, not the workdir"


def test_a_sibling_run_reads_the_shared_cache_and_trains_as_if_it_had_computed_it(runs):
    log = _ok(runs["sibling"])
    assert "reference log-probs for 6 steps read from" in log and "cached reference log-probs for" not in log
    own = _ok(runs["own"])
    assert "cached reference log-probs for 6 steps" in own
    rows = H.rows(str(runs["root"] / "sibling"))
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    H.assert_same_rows(rows, H.rows(str(runs["root"] / "own")), "shared cache vs own cache")
    with open(runs["root"] / "sibling" / "eval.json") as a, open(runs["root"] / "own" / "eval.json") as b:
        assert json.load(a) == json.load(b)


def test_a_cache_of_another_reference_model_is_passed_over_with_the_reason(runs):
    log = _ok(runs["other"])
    assert "reference cache not used:" in log and "computed against another reference model" in log, tail(log)
    assert "cached reference log-probs for 6 steps" in log
    assert len(glob.glob(os.path.join(runs["shared"], "reference_cache-*.npz"))) == 2


def test_why_not_names_each_mismatch():
    from kto_jax.train.reference_cache import LAYOUT_VERSION, why_not

    meta = {
        "layout": LAYOUT_VERSION,
        "reference": "r1",
        "reference_source": "tiny-1m",
        "outputs": ["reference_logps"],
        "train": ["a", "b", "c"],
        "eval": ["e"],
    }
    assert why_not(meta, "r1", ["a", "b"], ["e"], ("reference_logps",)) is None  # a shorter run: the prefix serves
    assert "another reference model" in why_not(meta, "r2", ["a"], ["e"], ("reference_logps",))
    assert "has 3 training steps; this run needs 4" in why_not(meta, "r1", list("abcd"), ["e"], ("reference_logps",))
    assert "other training batches from batch 2" in why_not(meta, "r1", ["a", "x"], ["e"], ("reference_logps",))
    assert "other held-out batches from batch 1" in why_not(meta, "r1", ["a"], ["f"], ("reference_logps",))
    assert "also needs ['reference_kl_logps']" in why_not(
        meta, "r1", ["a"], ["e"], ("reference_logps", "reference_kl_logps")
    )
    assert "another version" in why_not({**meta, "layout": 2}, "r1", ["a"], ["e"], ("reference_logps",))
