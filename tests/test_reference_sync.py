"""A moving reference (reference.mode="sync": TR-DPO's soft and hard updates, humanline's per-step
sync) and humanline's per-token log-ratio clamp (reference.humanline), against hand-written rules.

Sync: the reference after each step equals ``alpha * theta_s + (1 - alpha) * ref_s`` every tau-th
step (theta_s the params that step scored with, HALOs main's order) and is unchanged otherwise;
a sync that never comes gives the frozen reference's losses exactly; the loop saves the moving
reference and a run stopped mid-way resumes to the uninterrupted run's weights and reference.

Humanline: the loss of KTO and DPO with the clamp equals HALOs main's formula computed in numpy
from per-token log-probs of the full logits (``get_sequence_rewards``: sum_t clip(log pi_t -
log ref_t, P, R)), fed to the numpy KTO and DPO references of tests/numpy_reference.py; its
gradient equals that of the same formula written directly in JAX; packed rows equal padded ones.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kto_jax.train.state import init_state, learning_rate, make_optimizer
from kto_jax.train.step import microbatch_loss, train_step
from tests import numpy_reference as ref
from tests.test_train_step import (
    OPTIMIZERS,
    assert_trees_close,
    jit,
    loader,
    step_spec,
)

P, R = -1.0, 1.5  # HALOs main's log_epsilon_P, log_epsilon_R defaults


def sync_spec(loss: str, every: int, alpha: float, humanline=None):
    return dataclasses.replace(step_spec(loss, mode="sync"), sync_every=every, sync_alpha=alpha, humanline=humanline)


@functools.cache
def sync_step(loss: str, every: int, alpha: float):
    cfg = OPTIMIZERS["adamw"]
    return jit(
        functools.partial(
            train_step, sync_spec(loss, every, alpha), make_optimizer(cfg), functools.partial(learning_rate, cfg)
        )
    )


@pytest.mark.parametrize("every, alpha", [(1, 1.0), (2, 0.5), (3, 0.6)])
def test_sync_moves_the_reference_by_tr_dpos_rule(every, alpha, examples, policy):
    """ref_{s+1} = alpha theta_s + (1 - alpha) ref_s when (s + 1) % every == 0, else ref_s (4 steps)."""
    spec = sync_spec("dpo", every, alpha)
    state = init_state(spec, make_optimizer(OPTIMIZERS["adamw"]), policy, seed=0)
    batches = loader(examples, "dpo")
    expected = jax.tree_util.tree_map(np.asarray, policy)
    for s in range(4):
        theta = jax.tree_util.tree_map(np.asarray, state.params["model"])
        state, metrics = sync_step("dpo", every, alpha)(state, next(batches), None)
        if (s + 1) % every == 0:
            expected = jax.tree_util.tree_map(
                lambda t, r: alpha * t.astype(np.float64) + (1 - alpha) * r, theta, expected
            )
        assert_trees_close(state.reference, expected, atol=1e-6, what=f"step {s}: ")
        assert np.isfinite(float(metrics["loss"]))
    moved = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree_util.tree_leaves(state.reference), jax.tree_util.tree_leaves(policy))
    )
    assert moved > 1e-4  # the reference did move


def test_a_sync_that_never_comes_is_the_frozen_reference(examples, policy):
    """sync_every beyond the run: the same losses and params as reference.mode="model" with the initial weights."""
    cfg = OPTIMIZERS["adamw"]
    frozen = jit(
        functools.partial(train_step, step_spec("kto"), make_optimizer(cfg), functools.partial(learning_rate, cfg))
    )
    spec = sync_spec("kto", 1000, 1.0)
    moving = sync_step("kto", 1000, 1.0)
    a = init_state(step_spec("kto"), make_optimizer(cfg), policy, seed=0)
    b = init_state(spec, make_optimizer(cfg), policy, seed=0)
    batches = list(zip(range(3), loader(examples, "kto")))
    for _, batch in batches:
        a, ma = frozen(a, batch, policy)
        b, mb = moving(b, batch, None)
        assert float(ma["loss"]) == float(mb["loss"])
    assert_trees_close(b.params, a.params, atol=0)
    assert_trees_close(b.reference, policy, atol=0)


# ---------------------------------------------------------------- humanline


def full_token_logps(params, mb: dict, group: str) -> jax.Array:
    """Per-token log p(x_{t+1} | x_<=t) from the full logits (no chunking), 0 where not scored."""
    from kto_jax.data.batch import prefix
    from tests.test_train_step import MODEL

    p = prefix(group)
    ids, mask, loss_mask = mb[f"{p}input_ids"], mb[f"{p}attention_mask"], mb[f"{p}loss_mask"]
    logits = MODEL.apply({"params": params}, ids, mask).astype(jnp.float32)
    logps = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logps, ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.where(loss_mask[:, 1:] > 0, picked, 0.0)


def halos_rewards(policy, reference, mb, groups, bounds):
    """HALOs main's get_sequence_rewards with humanline: sum_t clip(log pi_t - log ref_t, P, R), per group."""
    return {
        g: jnp.clip(full_token_logps(policy["model"], mb, g) - full_token_logps(reference, mb, g), *bounds).sum(-1)
        for g in groups
    }


def halos_loss_jnp(loss: str, policy, reference, mb, bounds):
    """The same formula in JAX (for the gradient): KTO with z0 from the clamped KL rewards, or DPO."""
    beta = 0.1
    if loss == "kto":
        r = halos_rewards(policy, reference, mb, ["", "kl"], bounds)
        z0 = jnp.maximum(jax.lax.stop_gradient(r["kl"]).mean(), 0.0)
        desirable = mb["desirable"]
        losses = jnp.where(desirable, 1 - jax.nn.sigmoid(beta * (r[""] - z0)), 1 - jax.nn.sigmoid(beta * (z0 - r[""])))
        return losses.mean()
    r = halos_rewards(policy, reference, mb, ["chosen", "rejected"], bounds)
    return -jax.nn.log_sigmoid(beta * (r["chosen"] - r["rejected"])).mean()


def humanline_loss(loss: str, policy, reference, mb, humanline=(P, R), packing=False):
    spec = dataclasses.replace(step_spec(loss), humanline=humanline, packing=packing)
    fn = jit(jax.value_and_grad(lambda p: microbatch_loss(spec, p, reference, mb, {}), has_aux=True))
    (value, (metrics, _)), grads = fn({"model": policy})
    return value, grads, metrics


@pytest.mark.parametrize("loss", ["kto", "dpo"])
def test_humanline_equals_halos_mains_formula(loss, examples, policy, reference):
    """Bounds at the median |log-ratio| of this batch's tokens (two random inits differ little per
    token, so HALOs' -1 / 1.5 would clamp almost none): about half the tokens are clamped."""
    mb = next(loader(examples, loss))
    groups = ["", "kl"] if loss == "kto" else ["chosen", "rejected"]
    raw = {g: np.asarray(full_token_logps(policy, mb, g) - full_token_logps(reference, mb, g)) for g in groups}
    scored = np.concatenate([np.asarray(mb[f"{g}_loss_mask" if g else "loss_mask"])[:, 1:].ravel() > 0 for g in groups])
    ratios = np.concatenate([raw[g].ravel() for g in groups])[scored]
    q = float(np.median(np.abs(ratios)))
    bounds = (-q, 0.8 * q)
    clamped = float(((ratios <= bounds[0]) | (ratios >= bounds[1])).mean())
    assert 0.3 < clamped < 0.7, clamped
    value, grads, metrics = humanline_loss(loss, policy, reference, mb, humanline=bounds)
    # numpy: HALOs main's clamped sequence rewards, then the KTO / DPO numpy references on them
    rewards = {g: np.clip(raw[g].astype(np.float64), *bounds).sum(-1) for g in groups}
    zeros = np.zeros_like(rewards[groups[0]])
    if loss == "kto":
        expected, _ = ref.kto(rewards[""], zeros, rewards["kl"], zeros, np.asarray(mb["desirable"]))
    else:
        expected, _ = ref.dpo(rewards["chosen"], rewards["rejected"], zeros, zeros)
    np.testing.assert_allclose(float(value), expected, rtol=0, atol=2e-6)
    expected_grads = jit(jax.grad(lambda p: halos_loss_jnp(loss, p, reference, mb, bounds)))({"model": policy})
    assert_trees_close(grads, expected_grads, atol=2e-6)
    # the feed's metric: the share of the policy's (gradient) tokens inside the bounds
    policy_groups = [""] if loss == "kto" else ["chosen", "rejected"]
    scored_p = np.concatenate(
        [np.asarray(mb[f"{g}_loss_mask" if g else "loss_mask"])[:, 1:].ravel() > 0 for g in policy_groups]
    )
    ratios_p = np.concatenate([raw[g].ravel() for g in policy_groups])[scored_p]
    inside = float(((ratios_p > bounds[0]) & (ratios_p < bounds[1])).mean())
    np.testing.assert_allclose(float(metrics["humanline/unclamped"]), inside, atol=1e-6)
    unclamped_value, _, plain_metrics = humanline_loss(loss, policy, reference, mb, humanline=None)
    assert "humanline/unclamped" not in plain_metrics
    assert abs(float(unclamped_value) - float(value)) > 1e-7  # the clamp changes the loss


@pytest.mark.parametrize("loss", ["kto", "dpo"])
def test_humanline_with_bounds_never_reached_is_the_plain_loss(loss, examples, policy, reference):
    mb = next(loader(examples, loss))
    wide = humanline_loss(loss, policy, reference, mb, humanline=(-1e9, 1e9))
    plain = humanline_loss(loss, policy, reference, mb, humanline=None)
    np.testing.assert_allclose(float(wide[0]), float(plain[0]), rtol=0, atol=1e-6)
    assert_trees_close(wide[1], plain[1], atol=1e-6)


@pytest.mark.parametrize("loss", ["kto", "dpo"])
def test_humanline_packed_equals_padded(loss, examples, policy, reference):
    from tests.test_packing import batches

    padded, packed = batches(examples, loss)
    a = humanline_loss(loss, policy, reference, padded)
    b = humanline_loss(loss, policy, reference, packed, packing=True)
    assert float(b[2]["humanline/unclamped"]) == pytest.approx(float(a[2]["humanline/unclamped"]), abs=1e-6)
    np.testing.assert_allclose(float(b[0]), float(a[0]), rtol=0, atol=1e-5)
    assert_trees_close(b[1], a[1], atol=1e-5)


def test_bad_reference_options_name_the_field():
    from kto_jax.config import base_config, loss_config
    from kto_jax.train.plan import make_plan

    config = base_config()
    config.reference.update(dict(mode="cached", humanline=True))
    with pytest.raises(ValueError, match="config.reference.humanline=True clamps per-token log-ratios.*mode='sync'"):
        make_plan(config, 1)
    config.reference.mode = "sync"
    config.reference.log_epsilon_P = 0.5
    with pytest.raises(ValueError, match=r"config.reference.log_epsilon_P=0.5: must be < 0"):
        make_plan(config, 1)
    config.reference.log_epsilon_P = -1.0
    config.reference.sync_alpha = 0.0
    with pytest.raises(ValueError, match=r"config.reference.sync_alpha=0.0: must be in \(0, 1\]"):
        make_plan(config, 1)
    config.reference.sync_alpha = 1.0
    config.loss = loss_config("slic")
    with pytest.raises(ValueError, match="loss 'slic' has no per-sequence policy/reference log-ratio"):
        make_plan(config, 1)
    config.loss = loss_config("kto")
    plan = make_plan(config, 1)
    assert (plan.reference_mode, plan.humanline, plan.sync_every) == ("sync", (-1.0, 1.5), 1)


# ---------------------------------------------------------------- the loop: saved and resumed


def final_state(config, workdir: str):
    """The newest checkpoint's state of a finished run in ``workdir``."""
    from kto_jax import sharding
    from kto_jax.checkpoint import Checkpointer
    from kto_jax.train.engine import build_engine
    from kto_jax.train.plan import make_plan

    plan = make_plan(config, 1)
    engine = build_engine(plan.step_spec(), config.train.optimizer, sharding.make_mesh(plan.mesh))
    step, state, _, _ = Checkpointer(workdir).restore_latest(engine.abstract_state())
    return step, state


def test_sync_run_resumes_to_the_uninterrupted_weights_and_reference(synthetic_data_dir, tmp_path, monkeypatch):
    """A humanline KTO run (sync every step) preempted (SIGTERM) after step 3 of 6 and rerun ends with
    the uninterrupted run's params and moving reference, bitwise: the reference is in the checkpoint."""
    import signal

    from kto_jax.train import loop
    from tests.train_helpers import small_config

    config = small_config("kto", synthetic_data_dir, steps=6)
    config.reference.update(dict(mode="sync", humanline=True))
    loop.run(config, str(tmp_path / "whole"))

    hooks = loop.default_hooks

    def preempt_at_3(run, first, preemption):
        def hook(run, step, state, batch, metrics):
            if step == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # the Preemption handler's flag: save and stop

        return [hook, *hooks(run, first, preemption)]

    monkeypatch.setattr(loop, "default_hooks", preempt_at_3)
    assert loop.run(config, str(tmp_path / "split")) == {"step": 3, "preempted": True}
    monkeypatch.setattr(loop, "default_hooks", hooks)
    loop.run(config, str(tmp_path / "split"))
    (a_step, whole), (b_step, split) = (
        final_state(config, str(tmp_path / "whole")),
        final_state(config, str(tmp_path / "split")),
    )
    assert a_step == b_step == 6
    assert_trees_close(split.params, whole.params, atol=0)
    assert_trees_close(split.reference, whole.reference, atol=0)
    lag = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree_util.tree_leaves(whole.reference), jax.tree_util.tree_leaves(whole.params["model"]))
    )
    assert lag > 0  # the reference is the policy before the last update


# ---------------------------------------------------------------- 8 simulated devices


@pytest.fixture(scope="module")
def sharded_sync(tmp_path_factory, synthetic_data_dir):
    from tests.train_helpers import run_workers

    return run_workers("sync", ("kto", "dpo"), tmp_path_factory, synthetic_data_dir, 600)


@pytest.mark.parametrize("mesh", ["8x1x1", "2x2x2"])
@pytest.mark.parametrize("loss", ["kto", "dpo"])
def test_sync_humanline_on_meshes_equals_one_device(loss, mesh, sharded_sync):
    """Packed humanline runs with a per-step moving reference: metrics, params and reference on 8
    devices equal one device's after 3 sgd steps (1e-5)."""
    out, summary = sharded_sync[loss]
    for step, (row, expected) in enumerate(zip(summary[mesh]["metrics"], summary["1x1x1"]["metrics"]), 1):
        for k, v in expected.items():
            # a pair whose margin is a tie (every token clamped to the bound in both, or a policy
            # equal to its reference) carries float rounding (~1e-7) through the clamped log-probs
            # (ref + clip), so its accuracy (margin > 0) may flip with the reduction order: one pair
            atol = 1 / 8 + 1e-6 if k == "rewards/accuracies" else 1e-5
            np.testing.assert_allclose(row[k], v, rtol=1e-5, atol=atol, err_msg=f"step {step} {k}")
    expected, actual = np.load(os.path.join(out, "params_1x1x1.npz")), np.load(os.path.join(out, f"params_{mesh}.npz"))
    assert sorted(actual.files) == sorted(expected.files) and any("reference" in n for n in expected.files)
    for name in expected.files:
        np.testing.assert_allclose(actual[name], expected[name], rtol=0, atol=1e-5, err_msg=name)
    moved = max(
        float(np.abs(expected[n] - expected[n.replace("['reference']", "['params']['model']")]).max())
        for n in expected.files
        if n.startswith("['reference']")
    )
    assert moved > 0  # the reference is the policy before the last update, not the policy
