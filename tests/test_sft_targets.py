"""SFT as HALOs legacy trains it (issue 12 item 7): the loss's ``reduction`` and
``config.data.sft_targets`` ("all" completions or one target "per_prompt").

HALOs legacy (ContextualAI/HALOs, branch legacy @61b9ee6): SFTTrainer sums each sequence's
log-probs and averages the per-sequence NLL (trainers.py:540-549); SFTDataLoader trains
``generations[sft_index]`` once per prompt (dataloader.py:593) with sft_index 0 for HH
(:248, the first pair's chosen) and SHP (:174, the first pair's human_ref_A), and the
default -1 for OASST (:43, never set in get_oasst: the rejected reply of the last pair).
The expected targets below are read off tests/fixtures/{hh,shp}/make_fixtures.py and the
oasst fixture's trees by hand.
"""

import gzip
import importlib.util
import json
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest

from kto_jax import losses
from kto_jax.config import tiny_config
from kto_jax.data.builders import load_examples, load_records
from kto_jax.data.feedback import Paired, Unary, sft_targets_per_prompt, unary_view
from kto_jax.losses import get_loss
from kto_jax.models.presets import PRESETS
from kto_jax.train.plan import make_plan
from kto_jax.train.setup import load_split
from kto_jax.train.subplans import data_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


# ---------------------------------------------------------------- the loss's reduction


def test_sft_reductions_match_the_numpy_formulas():
    rng = np.random.default_rng(0)
    logps = rng.uniform(-300, 0, 7).astype(np.float32)
    counts = rng.integers(1, 90, 7)
    mask = np.array([1, 1, 0, 1, 1, 0, 1], np.float32)
    valid = mask > 0
    token, _ = losses.sft(jnp.asarray(logps), jnp.asarray(counts), example_mask=jnp.asarray(mask))
    default, _ = losses.sft(jnp.asarray(logps), jnp.asarray(counts), example_mask=jnp.asarray(mask), reduction="token")
    sequence, metrics = losses.sft(
        jnp.asarray(logps), jnp.asarray(counts), example_mask=jnp.asarray(mask), reduction="sequence"
    )
    np.testing.assert_allclose(token, -logps[valid].astype(np.float64).sum() / counts[valid].sum(), rtol=1e-6)
    np.testing.assert_allclose(default, token)
    # HALOs SFTTrainer: losses = -summed logps per sequence; losses.mean()
    np.testing.assert_allclose(sequence, -logps[valid].astype(np.float64).mean(), rtol=1e-6)
    assert float(metrics["tokens"]) == counts[valid].sum()
    # two examples of 1 and 3 tokens: token mean -(-3 - 5) / 4 = 2, sequence mean (3 + 5) / 2 = 4
    assert float(losses.sft(jnp.array([-3.0, -5.0]), jnp.array([1, 3]), reduction="sequence")[0]) == pytest.approx(4.0)
    assert float(losses.sft(jnp.array([-3.0, -5.0]), jnp.array([1, 3]))[0]) == pytest.approx(2.0)


def test_sft_reduction_is_validated():
    with pytest.raises(ValueError, match=r"reduction must be one of \('token', 'sequence'\); got 'tokens'"):
        losses.sft(jnp.zeros(2), jnp.ones(2), reduction="tokens")
    for name in ("sft", "csft"):  # a registered hyperparameter: config.loss.reduction
        assert get_loss(name).hyperparameters() == {"reduction": "token"}


# ---------------------------------------------------------------- config, plan, paper


def test_sft_targets_field_is_validated_in_the_plan():
    config = tiny_config("sft")
    assert config.data.sft_targets == "all"
    config.data.sft_targets = "per_prompt"
    make_plan(config, 1)
    config.data.sft_targets = "unique"
    with pytest.raises(ValueError, match=r"config\.data\.sft_targets='unique': must be one of 'all', 'per_prompt'"):
        make_plan(config, 1)
    csft = tiny_config("csft")
    csft.data.sft_targets = "per_prompt"
    with pytest.raises(ValueError, match=r"loss 'csft' trains every desirable and undesirable.*sft_targets='all'"):
        make_plan(csft, 1)


def _paper():
    spec = importlib.util.spec_from_file_location("paper", os.path.join(ROOT, "experiments", "paper.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_sft_runs_use_halos_targets_and_reduction():
    paper = _paper()
    for model in paper.MODELS:
        sequence = "sequence"  # HALOs' SFTTrainer: summed NLL per sequence, averaged over sequences
        sft = paper.get_config(f"model={model},loss=sft")
        assert (sft.data.sft_targets, sft.loss.to_dict().get("reduction")) == ("per_prompt", sequence)
        for init in ("false", "true"):
            csft = paper.get_config(f"model={model},loss=csft,sft={init}")  # SFTTrainer on ConditionalSFTDataLoader
            assert (csft.data.sft_targets, csft.loss.to_dict().get("reduction"), csft.data.sft_examples) == (
                "all",
                sequence,
                "all",
            )
            for loss in ("slic", "dpo", "kto", "ppo"):
                config = paper.get_config(f"model={model},loss={loss},sft={init}")
                assert config.data.sft_targets == "all" and "reduction" not in config.loss


# ---------------------------------------------------------------- the rule over examples


def test_per_prompt_rule_later_source_wins_and_fallbacks():
    q1, q2, q3 = (("user", "q1"),), (("user", "q2"),), (("user", "q3"),)
    source = [
        Paired("a/1", q1, "c1", "r1", "t-a"),
        Paired("a/0", q1, "c0", "r0", "t-a"),
        Paired("b/0", q1, "c2", "r2", "t-b"),  # a later source's record of the same prompt
        Paired("s/2", q2, "x2", "y2"),
        Paired("s/1", q2, "x1", "y1"),  # no sft_target: chosen of the first id
    ]
    out, stats = sft_targets_per_prompt(source)
    assert out == [Unary("a/0/sft", q1, "t-b", True, "t-b"), Unary("s/1/sft", q2, "x1", True, "x1")]
    assert stats == {
        "sft_target_prompts": 2,
        "sft_target_dropped": 8,
        "sft_target_no_target": 0,
        "sft_target_from_source": 1,
    }
    unary = [
        Unary("u/1", q1, "bad", False),
        Unary("u/3", q1, "good3", True),
        Unary("u/2", q1, "good2", True),
        Unary("u/4", q3, "bad", False),
    ]
    out, stats = sft_targets_per_prompt(unary)
    assert out == [Unary("u/2/sft", q1, "good2", True, "good2")]
    assert (stats["sft_target_prompts"], stats["sft_target_dropped"], stats["sft_target_no_target"]) == (1, 3, 1)


# ---------------------------------------------------------------- the shipped fixtures


def _config(sources, data_dir, manual_dir, targets, loss="sft"):
    config = tiny_config(loss)
    config.data.update(
        dict(
            sources=sources,
            data_dir=str(data_dir),
            manual_dir=manual_dir,
            sft_targets=targets,
            sft_examples="desirable",
        )
    )
    spec = get_loss(loss)
    hparams = spec.hyperparameters(spec.split_options({k: v for k, v in config.loss.items() if k != "name"})[0])
    plan = types.SimpleNamespace(loss=spec, hparams=tuple(sorted(hparams.items())), data=data_plan(config, PRESETS))
    return config, plan


def _targets(data):
    return {ex.prompt: ex.completion for ex in data.examples}


def test_hh_fixture_per_prompt(tmp_path):
    config, plan = _config("hh", tmp_path, os.path.join(FIXTURES, "hh"), "per_prompt")
    data = load_split(plan, "train")
    # every kept HH fixture prompt is unique, so each prompt's target is its only pair's chosen
    pairs = load_examples("hh", "train", str(tmp_path))
    assert len({p.prompt for p in pairs}) == len(pairs) == 7
    assert _targets(data) == {p.prompt: p.chosen for p in pairs}
    assert data.stats["sft_targets"] == "per_prompt"
    assert (
        data.stats["sft_target_prompts"],
        data.stats["sft_target_dropped"],
        data.stats["sft_dropped_undesirable"],
    ) == (7, 7, 0)
    assert _targets(data)[(("user", "How do I pick a lock?"),)].startswith("I can't help with getting into property")


def test_shp_fixture_per_prompt(tmp_path):
    config, plan = _config("shp", tmp_path, os.path.join(FIXTURES, "shp"), "per_prompt")
    train = _targets(load_split(plan, "train"))
    caramel = load_records("shp", "train", str(tmp_path))
    by_post = {r["id"].split("/")[1]: r["prompt"]["content"][0] for r in caramel}
    # the first comment (human_ref_A) of each post's first pair with score ratio >= 2
    assert train == {
        (("user", by_post["p7cul"]),): "Low heat and patience: 45 minutes.",
        (("user", by_post["q2cul"]),): "Your dough is too dry; add water.",
        (("user", by_post["r3law"]),): "Send a demand letter citing your state's deposit law, then small claims.",
    }
    # test t1cul's only pair prefers B: the target is still A, the rejected comment
    test = _targets(load_split(plan, "test"))
    assert test[(("user", "How long do eggs keep in the fridge?"),)] == "3-5 weeks."
    assert len(test) == 2 and test[(("user", "Can my employer make me move to another city?"),)] == (
        "Check your contract for a mobility clause."
    )


@pytest.mark.parametrize("loss", ["kto", "dpo"])
def test_an_aligned_run_is_judged_against_the_targets_sft_trains_on(tmp_path, loss):
    """The pairwise evaluator's baseline (kto_jax/train/evaluators.py:samples) is the SFT run's target per
    prompt, whatever the loss's view of the split (SHP: the first comment, not the chosen one)."""
    config, plan = _config("shp", tmp_path, os.path.join(FIXTURES, "shp"), "per_prompt")
    sft = _targets(load_split(plan, "test"))
    config, plan = _config("shp", tmp_path, os.path.join(FIXTURES, "shp"), "all", loss=loss)
    data = load_split(plan, "test")
    assert {ex.prompt: ex.completion for ex in sft_targets_per_prompt(data.source)[0]} == sft
    assert len(data.source) == data.stats["source_examples"]


def test_oasst_fixture_per_prompt(tmp_path):
    config, plan = _config("oasst", tmp_path, FIXTURES + "/oasst", "per_prompt")
    france = (("user", "What is the capital of France?"),)
    italy = france + (("assistant", "Paris."), ("user", "And of Italy? 🇮🇹"))
    # HALOs' generations[-1]: the lower-ranked reply of each prompt's last pair
    data = load_split(plan, "train")
    assert _targets(data) == {france: "Lyon.", italy: "Naples"}
    assert (data.stats["sft_target_prompts"], data.stats["sft_target_dropped"]) == (2, 4)
    assert _targets(load_split(plan, "test")) == {(("user", "Tell me a joke 😀"),): "No."}


def test_all_is_unchanged(tmp_path):
    for source in ("hh", "shp", "oasst"):
        data_dir = tmp_path / source
        config, plan = _config(source, data_dir, os.path.join(FIXTURES, source), "all")
        data = load_split(plan, "train")
        view, _ = unary_view(load_examples(source, "train", str(data_dir)), seed=config.seed)
        assert data.examples == [ex for ex in view if ex.desirable]
        assert data.stats["sft_targets"] == "all" and "sft_target_prompts" not in data.stats


def test_mixture_per_prompt_one_per_prompt(tmp_path):
    config, plan = _config("shp+hh+oasst", tmp_path, "", "per_prompt")
    for source in ("shp", "hh", "oasst"):  # prepare each from its fixture folder
        load_records(source, "train", str(tmp_path), os.path.join(FIXTURES, source))
    data = load_split(plan, "train")
    assert len(data.examples) == len({ex.prompt for ex in data.examples}) == 3 + 7 + 2
    assert all(ex.desirable for ex in data.examples)


# ---------------------------------------------------------------- order rules on made-up sources


def _write_gz(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def test_hh_first_pair_in_hub_file_order(tmp_path):
    """A prompt in two subsets and twice in one file: the first pair in sorted-subset, line order."""
    from kto_jax.data.builders.hh import SUBSETS

    h, a = "\n\nHuman:", "\n\nAssistant:"
    q = f"{h} Hi there{a}"
    rows = {
        "harmless-base/train": [
            {"chosen": f"{h} Other{a} x", "rejected": f"{h} Other{a} y"},
            {"chosen": q + " harmless first", "rejected": q + " no"},
        ],
        "helpful-base/train": [
            {"chosen": q + " helpful", "rejected": q + " nope"},
            {"chosen": q + " helpful again", "rejected": q + " nah"},
        ],
    }
    manual = tmp_path / "manual"
    for subset in SUBSETS:
        for split in ("train", "test"):
            _write_gz(
                os.fspath(manual / subset / f"{split}.jsonl.gz"),
                rows.get(
                    f"{subset}/{split}",
                    [{"chosen": f"{h} {subset} {split}{a} a", "rejected": f"{h} {subset} {split}{a} b"}],
                ),
            )
    config, plan = _config("hh", tmp_path / "data", os.fspath(manual), "per_prompt")
    targets = _targets(load_split(plan, "train"))
    assert targets[(("user", "Hi there"),)] == "harmless first"
    records = [
        r for r in load_records("hh", "train", os.fspath(tmp_path / "data")) if r["prompt"]["content"] == ["Hi there"]
    ]
    assert len(records) == 3 and {r["sft_target"] for r in records} == {"harmless first"}


def test_shp_first_comment_before_the_cap(tmp_path):
    """The first ratio-kept pair's A comment, B preferred, of a post with 7 pairs (5 kept by the cap)."""
    history = "Best way to store basil?"
    rows = [
        dict(
            post_id="p",
            history=history,
            c_root_id_A="a0",
            c_root_id_B="b0",
            human_ref_A="tie",
            human_ref_B="tie b",
            score_A=10,
            score_B=11,
            labels=0,
        )
    ]  # ratio < 2: not a candidate
    rows += [
        dict(
            post_id="p",
            history=history,
            c_root_id_A=f"a{i}",
            c_root_id_B=f"b{i}",
            human_ref_A=f"A{i}",
            human_ref_B=f"B{i}",
            score_A=2,
            score_B=20,
            labels=0,
        )
        for i in range(1, 8)
    ]
    manual = tmp_path / "manual" / "askculinary"
    manual.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        (manual / f"{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config, plan = _config("shp", tmp_path / "data", os.fspath(tmp_path / "manual"), "per_prompt")
    data = load_split(plan, "train")
    assert [ex.completion for ex in data.examples] == ["A1"]
    kept = load_records("shp", "train", os.fspath(tmp_path / "data"))
    assert len(kept) == 5 and {r["sft_target"] for r in kept} == {"A1"}
    # unfiltered test split: the ratio < 2 pair is first
    assert [ex.completion for ex in load_split(plan, "test").examples] == ["tie"]
