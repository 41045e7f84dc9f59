"""Properties every loss must have: hand-derived values, no gradient through z0, jit/vmap,
finite at extreme log-ratios, odd batch sizes, bf16 inputs, registry behaviour."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kto_jax import losses
from kto_jax.losses import LOSSES, get_loss
from tests.loss_inputs import as_jnp, float_arg_indices, sequence_inputs, token_inputs

LN3 = math.log(3.0)
SEQUENCE_LOSSES = sorted(name for name, spec in LOSSES.items() if not spec.token_level)


# ---------------------------------------------------------------- hand-derived, 2 examples


def test_kto_hand_derived():
    # desirable r = 2 ln 3, undesirable r = 0, KL log-ratios ln 3 -> z0 = ln 3, beta = 1:
    # l0 = 1 - sigmoid(2ln3 - ln3) = 1/4, l1 = 1 - sigmoid(ln3 - 0) = 1/4.
    loss, m = losses.kto(
        jnp.array([2 * LN3, 0.0]), jnp.zeros(2), jnp.array([LN3, LN3]), jnp.zeros(2),
        jnp.array([True, False]), beta=1.0,
    )
    np.testing.assert_allclose(loss, 0.25, rtol=1e-6)
    np.testing.assert_allclose(m["kl"], LN3, rtol=1e-6)
    np.testing.assert_allclose(m["rewards/chosen"], 2 * LN3, rtol=1e-6)
    np.testing.assert_allclose(m["rewards/margins"], 2 * LN3, rtol=1e-6)
    assert m["num_desirable"] == 1 and m["num_undesirable"] == 1


def test_kto_hand_derived_negative_kl_is_clamped_and_weights_not_renormalised():
    # KL estimate -1 -> z0 = 0: l0 = 1 - sigmoid(2 ln 3) = 1/10, l1 = 1 - sigmoid(0) = 1/2.
    # desirable_weight 2: loss = (2 * 1/10 + 1/2) / 2 = 0.35 (a plain mean, no renormalisation).
    loss, m = losses.kto(
        jnp.array([2 * LN3, 0.0]), jnp.zeros(2), jnp.array([-1.0, -1.0]), jnp.zeros(2),
        jnp.array([True, False]), beta=1.0, desirable_weight=2.0,
    )
    np.testing.assert_allclose(loss, 0.35, rtol=1e-6)
    assert m["kl"] == 0.0


def test_dpo_and_cdpo_hand_derived():
    # pair 0: d = ln 3 -> -log sigmoid(ln 3) = log(4/3); pair 1: d = 0 -> log 2.
    args = (jnp.array([LN3, -1.0]), jnp.array([0.0, -1.0]), jnp.zeros(2), jnp.zeros(2))
    loss, m = losses.dpo(*args, beta=1.0)
    np.testing.assert_allclose(loss, 0.5 * math.log(8 / 3), rtol=1e-6)
    np.testing.assert_allclose(m["rewards/accuracies"], 0.5)
    np.testing.assert_allclose(m["rewards/margins"], LN3 / 2, rtol=1e-6)
    loss, _ = losses.dpo(*args, beta=1.0, label_smoothing=0.25)
    cdpo0 = 0.75 * math.log(4 / 3) + 0.25 * math.log(4)  # -log sigmoid(-ln 3) = log 4
    np.testing.assert_allclose(loss, 0.5 * (cdpo0 + math.log(2)), rtol=1e-6)


def test_ipo_slic_sft_hand_derived():
    # IPO, beta = 1/2 -> target margin 1: d = 3 gives 4, d = 1 gives 0.
    loss, _ = losses.ipo(jnp.array([3.0, 1.0]), jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), beta=0.5)
    np.testing.assert_allclose(loss, 2.0)
    # SLiC beta 1, lambda 0.1: max(0, 1+1-3) + 0.1 = 0.1 and max(0, 1+2-1.5) + 0.2 = 1.7.
    loss, _ = losses.slic(jnp.array([-1.0, -2.0]), jnp.array([-3.0, -1.5]))
    np.testing.assert_allclose(loss, 0.9, rtol=1e-6)
    # SFT: (3 + 5) nats over (1 + 3) tokens.
    loss, _ = losses.sft(jnp.array([-3.0, -5.0]), jnp.array([1, 3]))
    np.testing.assert_allclose(loss, 2.0)


# ---------------------------------------------------------------- KTO's reference point


def test_no_gradient_through_kto_reference_point():
    rng = np.random.default_rng(0)
    args = as_jnp(sequence_inputs(get_loss("kto"), 6, rng, -5, 0))
    # make the KL estimate positive so z0 is not clamped at 0
    args = (args[0], args[1], args[2] + 3.0, args[3], args[4])
    grads = jax.grad(lambda *a: losses.kto(*a)[0], argnums=(0, 1, 2, 3))(*args)
    assert np.all(np.asarray(grads[2]) == 0.0) and np.all(np.asarray(grads[3]) == 0.0)
    assert np.any(np.asarray(grads[0]) != 0.0)
    assert float(losses.kto(*args)[1]["kl"]) > 0


@pytest.mark.parametrize("all_desirable", [True, False])
def test_kto_empty_class_is_finite_and_reports_zero(all_desirable):
    desirable = jnp.full(3, all_desirable)
    loss, m = losses.kto(jnp.array([-1.0, -2, -3]), jnp.full(3, -2.0), jnp.zeros(3), jnp.zeros(3), desirable)
    empty = "rejected" if all_desirable else "chosen"
    assert np.isfinite(loss)
    assert m[f"rewards/{empty}"] == 0.0 and m[f"logps/{empty}"] == 0.0
    assert m["num_undesirable" if all_desirable else "num_desirable"] == 0


# ---------------------------------------------------------------- every registered loss


def call(name, args, example_mask=None, **overrides):
    spec = get_loss(name)
    return spec.fn(*args, **spec.hyperparameters(overrides), example_mask=example_mask)


@pytest.mark.parametrize("name", SEQUENCE_LOSSES)
def test_jit_matches_eager(name):
    args = as_jnp(sequence_inputs(get_loss(name), 5, np.random.default_rng(1), -8, -0.01))
    eager_loss, eager_metrics = call(name, args)
    jit_loss, jit_metrics = jax.jit(functools.partial(call, name))(args)
    np.testing.assert_allclose(jit_loss, eager_loss, rtol=1e-6)
    assert eager_metrics.keys() == jit_metrics.keys()


@pytest.mark.parametrize("name", SEQUENCE_LOSSES)
def test_vmap_over_batches_matches_loop(name):
    rng = np.random.default_rng(2)
    batches = [sequence_inputs(get_loss(name), 4, rng, -8, -0.01) for _ in range(3)]
    stacked = tuple(jnp.stack([b[i] for b in batches]) for i in range(len(batches[0])))
    vmapped, _ = jax.vmap(lambda *a: call(name, a))(*stacked)
    looped = [call(name, as_jnp(b))[0] for b in batches]
    np.testing.assert_allclose(vmapped, looped, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", SEQUENCE_LOSSES)
def test_finite_loss_and_gradients_at_log_ratios_of_1e4(name):
    spec = get_loss(name)
    args = list(sequence_inputs(spec, 4, np.random.default_rng(3)))
    extreme = np.array([-1e4, 0.0, -1e4, -1e-6], np.float32)  # log-probs; ratios reach +-1e4
    for i in float_arg_indices(args):
        args[i] = extreme if i % 2 == 0 else extreme[::-1].copy()
    args = as_jnp(args)
    idx = float_arg_indices(args)
    loss, metrics = call(name, args)
    grads = jax.grad(lambda *a: call(name, a)[0], argnums=idx)(*args)
    assert np.isfinite(loss), loss
    assert all(np.all(np.isfinite(g)) for g in grads), grads
    assert all(np.all(np.isfinite(v)) for v in metrics.values()), metrics


@pytest.mark.parametrize("name", SEQUENCE_LOSSES)
@pytest.mark.parametrize("batch", [1, 3, 7])
def test_odd_batch_sizes(name, batch):
    args = as_jnp(sequence_inputs(get_loss(name), batch, np.random.default_rng(batch), -8, -0.01))
    loss, _ = call(name, args)
    assert loss.shape == () and np.isfinite(loss)


@pytest.mark.parametrize("name", SEQUENCE_LOSSES)
def test_bf16_inputs_are_computed_in_float32(name):
    args = sequence_inputs(get_loss(name), 6, np.random.default_rng(4), -8, -0.01)
    bf16 = tuple(jnp.asarray(a, jnp.bfloat16) if np.asarray(a).dtype.kind == "f" else jnp.asarray(a) for a in args)
    upcast = tuple(jnp.asarray(a, jnp.float32) if a.dtype == jnp.bfloat16 else a for a in bf16)
    loss16, metrics16 = call(name, bf16)
    loss32, _ = call(name, upcast)
    assert loss16.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in metrics16.values())
    np.testing.assert_allclose(loss16, loss32, rtol=1e-6)


@pytest.mark.parametrize("name", SEQUENCE_LOSSES)
def test_example_mask_ignores_padding_rows(name):
    spec = get_loss(name)
    args = sequence_inputs(spec, 5, np.random.default_rng(5), -8, -0.01)
    mask = np.array([True, True, False, True, False])
    padded = tuple(np.where(mask, a, np.full_like(a, -3.0)) if np.asarray(a).dtype.kind == "f" else a for a in args)
    kept = tuple(np.asarray(a)[mask] for a in args)
    loss_masked, m_masked = call(name, as_jnp(padded), example_mask=jnp.asarray(mask))
    loss_kept, m_kept = call(name, as_jnp(kept))
    np.testing.assert_allclose(loss_masked, loss_kept, rtol=1e-5, atol=1e-7)
    for key in m_kept:
        np.testing.assert_allclose(m_masked[key], m_kept[key], rtol=1e-5, atol=1e-6, err_msg=key)


# ---------------------------------------------------------------- offline PPO


def test_ppo_offline_jit_vmap_and_extremes():
    rng = np.random.default_rng(6)
    args = as_jnp(token_inputs(3, 9, rng))
    loss, _ = losses.ppo_offline(*args)
    np.testing.assert_allclose(jax.jit(lambda *a: losses.ppo_offline(*a)[0])(*args), loss, rtol=1e-6)
    stacked = [token_inputs(3, 9, rng) for _ in range(2)]
    stacked = tuple(jnp.stack([s[i] for s in stacked]) for i in range(5))
    vm = jax.vmap(lambda *a: losses.ppo_offline(*a)[0])(*stacked)
    np.testing.assert_allclose(vm, [losses.ppo_offline(*(x[k] for x in stacked))[0] for k in range(2)], rtol=1e-5)
    # per-token log-ratios of +-1e4 stay finite
    policy, reference, values, desirable, mask = token_inputs(3, 9, rng)
    reference = policy + np.where(rng.random(policy.shape) < 0.5, 1e4, -1e4).astype(np.float32)
    grads = jax.grad(lambda p, v: losses.ppo_offline(p, reference, v, desirable, mask)[0], (0, 1))(policy, values)
    assert np.isfinite(losses.ppo_offline(policy, reference, values, desirable, mask)[0])
    assert all(np.all(np.isfinite(g)) for g in grads)


# ---------------------------------------------------------------- registry


def test_unknown_loss_lists_known_names():
    with pytest.raises(ValueError, match="unknown loss 'ktoo'.*dpo.*kto"):
        get_loss("ktoo")


def test_unknown_hyperparameter_names_the_valid_ones():
    with pytest.raises(ValueError, match="no hyperparameter 'betta'.*'beta'"):
        get_loss("kto").hyperparameters({"betta": 0.2})
    assert get_loss("kto").hyperparameters({"beta": 0.2})["beta"] == 0.2


def test_registry_entries_are_consistent():
    assert {"kto", "dpo", "ipo", "slic", "sft", "ppo_offline", "halo", "simpo", "orpo"} <= set(LOSSES)
    for name, spec in LOSSES.items():
        assert spec.name == name and spec.kind in ("unary", "paired", "sft")
        assert spec.citation
        assert spec.defaults == spec.hyperparameters()
    assert get_loss("kto").defaults == {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}
    assert get_loss("ipo").length_normalized and get_loss("simpo").length_normalized
    assert not get_loss("slic").needs_reference and get_loss("dpo").needs_reference
    assert get_loss("kto").needs_kl and not get_loss("kto_zero").needs_kl


@pytest.mark.parametrize(
    "name, overrides, field",
    [("ipo", {"beta": 0.0}, "beta"), ("robust", {"label_smoothing": 0.5}, "label_smoothing"),
     ("exo_pair", {"label_smoothing": 0.0}, "label_smoothing"), ("discopop", {"tau": 2.0}, "tau"),
     ("halo", {"reference_point": "mean"}, "reference_point"), ("halo", {"value": "relu"}, "value function")],
)
def test_bad_hyperparameter_values_fail_naming_the_field(name, overrides, field):
    args = as_jnp(sequence_inputs(get_loss(name), 2, np.random.default_rng(0), -5, -0.1))
    with pytest.raises(ValueError, match=field):
        call(name, args, **overrides)


def test_discopop_gradient_at_zero_margin_is_hand_derived():
    """d/dz [softplus(-z)(1 - sigmoid(z/tau)) + exp(-z) sigmoid(z/tau)] at z = 0
    = -1/2 * 1/2 - 1 * 1/2 + (exp(0) - log 2) * 1/(4 tau) = -3/4 + (1 - ln 2) / (4 tau)."""
    tau, beta = 0.05, 1.0
    grad = jax.grad(lambda pc: losses.discopop(pc, jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), beta=beta, tau=tau)[0])(
        jnp.zeros(1)
    )
    np.testing.assert_allclose(grad[0], -0.75 + (1 - math.log(2)) / (4 * tau), rtol=1e-5)
