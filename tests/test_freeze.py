"""Trainable parameters (``config.train.freeze``, kto_jax/train/trainable.py).

A frozen leaf gets no gradient, no optimizer state and no checkpoint entry, and ends the run
bitwise equal to its start; the trainable leaves take the same update they would with nothing
frozen (Adam's update is elementwise and nothing is clipped, so freezing a leaf changes no other
leaf's step); the run resumes bitwise after kill -9; 8 simulated devices give the one-device
result; the AOT report's argument bytes drop by the frozen leaves' state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import jax
import ml_collections
import numpy as np
import pytest

from kto_jax.models import abstract_params
from kto_jax.models.hf import init_params
from kto_jax.train import trainable
from kto_jax.train.aot import lower_train_step
from kto_jax.train.plan import make_plan
from kto_jax.train.setup import load_run
from kto_jax.train.state import init_state, make_optimizer
from kto_jax.train.step import train_step
from tests import ckpt_helpers as H
from tests.test_train_step import MODEL_CONFIG, loader, step_spec, synthetic_examples
from tests.train_helpers import finish, small_config, start, subprocess_env, tail

EMBED = "model/embed/.*"

# Adam without clipping or weight decay: each leaf's update depends on its own gradient only
ADAM = ml_collections.ConfigDict(
    dict(name="adam", lr=1e-2, warmup_steps=0, grad_clip=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
)


def paths(tree) -> list[str]:
    return [
        "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p)
        for p, _ in jax.tree_util.tree_leaves_with_path(tree)
    ]


# ---------------------------------------------------------------- the labels


def test_split_and_merge_keep_the_same_buffers():
    params = {"model": {"embed": {"embedding": np.ones(3)}, "layers": {"q": {"kernel": np.zeros(2)}}}}
    train, frozen = trainable.split(params, (EMBED,))
    assert paths(train) == ["model/layers/q/kernel"] and paths(frozen) == ["model/embed/embedding"]
    whole = trainable.merge(train, frozen)
    assert whole["model"]["embed"]["embedding"] is params["model"]["embed"]["embedding"]
    assert whole["model"]["layers"]["q"]["kernel"] is params["model"]["layers"]["q"]["kernel"]
    assert trainable.split(params, ()) == (params, {})
    assert trainable.parse_freeze(" model/embed/.* , model/lm_head/.*,") == (EMBED, "model/lm_head/.*")


def test_regexes_match_whole_paths_and_bad_ones_are_named():
    paths_ = trainable.leaf_paths({"model": abstract_params(MODEL_CONFIG)})
    assert "model/embed/embedding" in paths_
    assert not trainable.is_frozen("model/embed/embedding", ("embed",))  # re.fullmatch: a part is no match
    with pytest.raises(ValueError, match=r"config.train.freeze: 'embed' matches no parameter.*model/embed/embedding"):
        trainable.check_freeze(("embed",), paths_)
    with pytest.raises(ValueError, match=r"'model/\(' is not a regular expression"):
        trainable.check_freeze(("model/(",), paths_)
    with pytest.raises(ValueError, match="freezes every parameter"):
        trainable.check_freeze(("model/.*",), paths_)
    trainable.check_freeze((EMBED, "model/layers/mlp/.*"), paths_)


def test_an_unmatched_regex_fails_in_the_plan(synthetic_data_dir):
    config = small_config("kto", synthetic_data_dir)
    config.train.freeze = "model/embeddings/.*"
    with pytest.raises(ValueError, match=r"config.train.freeze: 'model/embeddings/\.\*' matches no parameter"):
        make_plan(config, 1)


# ---------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def one_step(synthetic_data_dir):
    """One Adam step of KTO from the same params and batch, with nothing and with the embeddings frozen."""
    params = init_params(MODEL_CONFIG, seed=0)
    batch = next(loader(synthetic_examples(synthetic_data_dir), "kto"))
    optimizer = make_optimizer(ADAM)
    out = {}
    for freeze in ((), (EMBED,)):
        spec = dataclasses.replace(step_spec("kto"), freeze=freeze)
        state = init_state(spec, optimizer, params, seed=0)
        # reference mode "model": the frozen leaves are the reference's (``params``), nothing else to pass
        step = jax.jit(lambda s, b, r, spec=spec: train_step(spec, optimizer, lambda c: 0.0, s, b, r, {}))
        new_state, metrics = step(state, batch, params)
        out[freeze] = (state, new_state, metrics)
    return params, out


def test_frozen_leaves_have_no_state_and_the_others_take_the_same_step(one_step):
    params, out = one_step
    (free0, free1, free_metrics), (froz0, froz1, froz_metrics) = out[()], out[(EMBED,)]
    assert "model/embed/embedding" in paths(free0.params)
    assert "model/embed/embedding" not in paths(froz0.params)
    # no moment, accumulator or other optimizer entry for the frozen leaf: Adam's mu and nu cover the rest
    assert not any("embed" in p for p in paths(froz0.opt_state))
    assert len(jax.tree_util.tree_leaves(free0.opt_state)) - len(jax.tree_util.tree_leaves(froz0.opt_state)) == 2
    np.testing.assert_array_equal(free_metrics["loss"], froz_metrics["loss"])  # the same forward
    frozen_flat = trainable.split(free1.params, (EMBED,))[0]
    for path, a, b in zip(
        paths(frozen_flat), jax.tree_util.tree_leaves(frozen_flat), jax.tree_util.tree_leaves(froz1.params)
    ):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-7, err_msg=path)
    moved = [
        p
        for p, a, b in zip(
            paths(froz1.params), jax.tree_util.tree_leaves(froz0.params), jax.tree_util.tree_leaves(froz1.params)
        )
        if not np.array_equal(a, b)
    ]
    assert moved, "the trainable leaves should move"
    # the unfrozen run moved the embeddings: freezing them is what kept them
    assert not np.array_equal(free1.params["model"]["embed"]["embedding"], params["embed"]["embedding"])


# ---------------------------------------------------------------- the CLI: kill -9 and resume


FREEZE_FLAGS = (f"--config.train.freeze={EMBED}",)
STEPS = 12


@pytest.mark.slow
def test_cli_frozen_run_resumes_bitwise_after_kill_9_and_keeps_the_embeddings(tmp_path, synthetic_data_dir):
    arg = f"loss=kto,steps={STEPS}"
    whole = str(tmp_path / "whole")
    ref = H.Proc(H.train_args(whole, synthetic_data_dir, arg, FREEZE_FLAGS), str(tmp_path), "whole").result()
    assert ref["rc"] == 0, tail(ref["stderr"])
    killed = str(tmp_path / "killed")
    proc = H.Proc(H.train_args(killed, synthetic_data_dir, arg, FREEZE_FLAGS), str(tmp_path), "first")
    H.wait_for_step(proc, killed, 6)
    H.wait_for(proc, lambda: H.ckpt_steps(killed), "a finalised checkpoint")  # a save is asynchronous
    proc.kill_group(signal.SIGKILL)
    proc.wait()
    assert H.last_step(killed) < STEPS
    rerun = H.Proc(H.train_args(killed, synthetic_data_dir, arg, FREEZE_FLAGS), str(tmp_path), "rerun").result()
    assert rerun["rc"] == 0, tail(rerun["stderr"])
    assert "resumed from" in rerun["stdout"] + rerun["stderr"]
    H.assert_same_rows(H.rows(killed), H.rows(whole), "kill -9 then rerun")

    a, b = load_run(whole), load_run(killed)
    assert a.step == b.step == STEPS
    H.assert_trees_equal(b.params, a.params, "final weights after kill -9")
    start_weights = init_params(a.model.config, seed=int(a.config.seed))
    np.testing.assert_array_equal(
        np.asarray(a.params["embed"]["embedding"]), np.asarray(start_weights["embed"]["embedding"])
    )
    assert not np.array_equal(np.asarray(a.params["lm_head"]["kernel"]), np.asarray(start_weights["lm_head"]["kernel"]))
    # the checkpoint holds what the run owns: no embedding in its params or optimizer state
    state_dir = os.path.join(whole, "checkpoints", str(STEPS), "state")
    with open(os.path.join(state_dir, "_METADATA"), encoding="utf-8") as f:
        metadata = f.read()
    assert "lm_head" in metadata and "embed" not in metadata


@pytest.mark.slow
def test_cli_unmatched_freeze_is_one_line_naming_it(tmp_path, synthetic_data_dir):
    workdir = str(tmp_path / "run")
    bad = H.Proc(
        H.train_args(workdir, synthetic_data_dir, "loss=kto,steps=2", ("--config.train.freeze=embed",)),
        str(tmp_path),
        "bad",
    ).result()
    assert bad["rc"] == 2, tail(bad["stderr"])
    assert "error: config.train.freeze: 'embed' matches no parameter" in bad["stderr"], tail(bad["stderr"])
    assert "Traceback" not in bad["stderr"]
    assert not os.path.exists(workdir)


# ---------------------------------------------------------------- 8 simulated devices


@pytest.mark.slow
@pytest.mark.parametrize("loss, lora", [("kto", False), ("dpo", False), ("kto", True), ("dpo", True)])
def test_frozen_run_on_8_devices_matches_one_device(loss, lora, tmp_path, synthetic_data_dir):
    """``loop.run`` with embeddings and the gate projections frozen (or LoRA: every base leaf frozen, the
    adapters, sharded as their projections, trained), on (2,2,2) of 8 simulated devices and on one
    device: metrics and final weights to 1e-5, the frozen leaves bitwise at their start."""
    outs = {}
    procs = {}
    for mesh, devices in (("1x1x1", 1), ("2x2x2", 8)):
        out = str(tmp_path / mesh)
        os.makedirs(out)
        args = [
            "-m",
            "tests.train_worker",
            "frozen",
            "--loss",
            loss,
            "--mesh",
            mesh,
            "--data_dir",
            synthetic_data_dir,
            "--out",
            out,
            *(["--lora"] if lora else []),
        ]
        procs[mesh] = (out, start(args, subprocess_env(devices=devices), os.path.join(out, "log.txt")))
    for mesh, (out, proc) in procs.items():
        rc, log = finish(proc, 420)
        assert rc == 0, f"{mesh}: {tail(log)}"
        with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
            outs[mesh] = (
                json.load(f),
                np.load(os.path.join(out, "final.npz")),
                np.load(os.path.join(out, "initial.npz")),
            )
    (one, one_final, initial), (eight, eight_final, _) = outs["1x1x1"], outs["2x2x2"]
    assert eight["devices"] == 8 and len(one["metrics"]) == len(eight["metrics"]) == 3
    for row, expected in zip(eight["metrics"], one["metrics"]):
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected"):
            if key in expected:
                np.testing.assert_allclose(row[key], expected[key], rtol=0, atol=1e-5, err_msg=key)
    assert sorted(one_final.files) == sorted(eight_final.files) == sorted(initial.files)
    for name in initial.files:
        np.testing.assert_allclose(eight_final[name], one_final[name], rtol=0, atol=1e-5, err_msg=name)
        frozen = "lora_" not in name if lora else ("'embed'" in name or "'gate'" in name)
        if not (lora and "lora_a" in name):  # (A may stay put for a step while B = 0)
            assert np.array_equal(one_final[name], initial[name]) == frozen, name
        if frozen:
            np.testing.assert_array_equal(eight_final[name], initial[name], err_msg=name)


# ---------------------------------------------------------------- the AOT report


def test_aot_argument_bytes_drop_by_the_frozen_state(synthetic_data_dir):
    """Frozen embeddings leave the state (param and the optimizer's per-param moments) and are not
    passed again (in reference mode "model" they are the reference's): the compiled step's argument
    bytes drop by (1 + moments) x the embedding's bytes."""
    sizes = {}
    for freeze in ("", EMBED):
        config = small_config("kto", synthetic_data_dir)
        config.train.freeze = freeze
        plan = make_plan(config, 1)
        lowered, _ = lower_train_step(plan, jax.devices()[:1])
        sizes[freeze] = lowered.compile().memory_analysis().argument_size_in_bytes
    moments = {"adamw": 2, "adam": 2, "rmsprop": 1, "sgd": 0}[config.train.optimizer.name]
    embed = np.prod(plan.model_config.vocab_size * plan.model_config.hidden_size) * 4  # float32
    assert sizes[""] - sizes[EMBED] == (1 + moments) * embed
