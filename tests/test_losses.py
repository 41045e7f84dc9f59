"""Properties every loss must have: hand-derived values, no gradient through z0, jit/vmap,
finite (and equal to the numpy reference) at extreme log-ratios and odd batch sizes, bf16 inputs,
registry behaviour. Gradients against the numpy references: tests/test_losses_grad.py."""

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kto_jax import losses
from kto_jax.losses import LOSSES, get_loss
from tests import numpy_reference_ppo as P
from tests.loss_inputs import as_jnp, float_arg_indices, sequence_inputs, token_inputs
from tests.numpy_checks import assert_matches, assert_matches_reference

LN3 = math.log(3.0)
SEQUENCE_LOSSES = sorted(name for name, spec in LOSSES.items() if not spec.token_level)


# ---------------------------------------------------------------- hand-derived, 2 examples


def test_kto_hand_derived():
    # desirable r = 2 ln 3, undesirable r = 0, KL log-ratios ln 3 -> z0 = ln 3, beta = 1:
    # l0 = 1 - sigmoid(2ln3 - ln3) = 1/4, l1 = 1 - sigmoid(ln3 - 0) = 1/4.
    loss, m = losses.kto(
        jnp.array([2 * LN3, 0.0]),
        jnp.zeros(2),
        jnp.array([LN3, LN3]),
        jnp.zeros(2),
        jnp.array([True, False]),
        beta=1.0,
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
        jnp.array([2 * LN3, 0.0]),
        jnp.zeros(2),
        jnp.array([-1.0, -1.0]),
        jnp.zeros(2),
        jnp.array([True, False]),
        beta=1.0,
        desirable_weight=2.0,
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
    for key, value in eager_metrics.items():
        np.testing.assert_allclose(jit_metrics[key], value, rtol=1e-6, atol=1e-6, err_msg=f"{name}: {key}")


@pytest.mark.parametrize("name", SEQUENCE_LOSSES)
def test_vmap_over_batches_matches_loop(name):
    rng = np.random.default_rng(2)
    batches = [sequence_inputs(get_loss(name), 4, rng, -8, -0.01) for _ in range(3)]
    stacked = tuple(jnp.stack([b[i] for b in batches]) for i in range(len(batches[0])))
    vmapped, _ = jax.vmap(lambda *a: call(name, a))(*stacked)
    looped = [call(name, as_jnp(b))[0] for b in batches]
    np.testing.assert_allclose(vmapped, looped, rtol=1e-5, atol=1e-6)


def extreme_inputs(spec, scale):
    """Positional args with log-probs in {-scale, 0, -1e-6}, placed so every log-ratio is +-scale:
    r = policy - reference = +-scale, rw = -rl = +-scale (d = +-2 scale), pc - pr = +-scale, and KTO's
    KL log-ratios all ~scale (z0 ~ scale)."""
    x = np.array([-scale, 0.0, -scale, -1e-6], np.float32)
    by_name = {
        "policy_logps": x,
        "reference_logps": x[::-1],
        "policy_kl_logps": np.array([0.0, -1e-6, 0.0, 0.0], np.float32),
        "reference_kl_logps": np.full(4, -scale, np.float32),
        "policy_chosen_logps": x,
        "policy_rejected_logps": x[::-1],
        "reference_chosen_logps": x[::-1],
        "reference_rejected_logps": x,
    }
    args = list(sequence_inputs(spec, 4, np.random.default_rng(3)))
    names = [p.name for p in inspect.signature(spec.fn).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    return [by_name[n].copy() if n in by_name else a for n, a in zip(names, args)]


@pytest.mark.parametrize("name", SEQUENCE_LOSSES)
def test_loss_and_gradients_at_log_ratios_of_1e4(name):
    """Finite loss, gradients and metrics at log-ratios of +-1e4, equal to the numpy reference there."""
    spec = get_loss(name)
    args = as_jnp(extreme_inputs(spec, 1e4))
    idx = float_arg_indices(args)
    loss, metrics = call(name, args)
    grads = jax.grad(lambda *a: call(name, a)[0], argnums=idx)(*args)
    assert np.isfinite(loss), loss
    assert all(np.all(np.isfinite(g)) for g in grads), grads
    assert all(np.all(np.isfinite(v)) for v in metrics.values()), metrics
    args = extreme_inputs(spec, 1e4)
    if name == "discopop":
        # The reference computes exp(-beta d) * sigmoid(beta d / tau) as written, which is inf * 0 = nan
        # once beta |d| > ~709 (here beta d = +-2e3): compare at the largest scale it handles,
        # 3e3 (beta d = +-600).
        args = extreme_inputs(spec, 3e3)
    if name == "orpo":
        # The reference's log(1 - exp(p)) is -inf at a log-prob of exactly 0, which the library clips
        # to -1e-6 (reference_free.log1mexp): compare with the 0 entries at -1e-6.
        args = [np.minimum(a, np.float32(-1e-6)) for a in args]
    assert_matches_reference(name, call(name, as_jnp(args)), args, spec.hyperparameters())


@pytest.mark.parametrize("name", SEQUENCE_LOSSES)
@pytest.mark.parametrize("batch", [1, 3, 7])
def test_odd_batch_sizes(name, batch):
    """A scalar loss equal to the numpy reference's for batches of 1, 3 and 7."""
    args = sequence_inputs(get_loss(name), batch, np.random.default_rng(batch), -8, -0.01)
    loss, metrics = call(name, as_jnp(args))
    assert loss.shape == () and np.isfinite(loss)
    assert_matches_reference(name, (loss, metrics), args, get_loss(name).hyperparameters())


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
    signs = np.where(rng.random(policy.shape) < 0.5, 1.0, -1.0)
    reference = (policy + 1e4 * signs).astype(np.float32)
    grads = jax.grad(lambda p, v: losses.ppo_offline(p, reference, v, desirable, mask)[0], (0, 1))(policy, values)
    assert np.isfinite(losses.ppo_offline(policy, reference, values, desirable, mask)[0])
    assert all(np.all(np.isfinite(g)) for g in grads)
    # The numpy reference takes exp(+-1e4) = inf / 0 unclipped, while the library clips log-ratios
    # to +-50 (ppo.MAX_LOG_RATIO) first: below that clip they agree, so compare at +-40.
    reference = (policy + 40.0 * signs).astype(np.float32)
    out = losses.ppo_offline(policy, reference, values, desirable, mask)
    assert_matches(out, P.ppo_offline(policy, reference, values, desirable, mask), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- registry


def test_unknown_loss_lists_known_names():
    with pytest.raises(ValueError, match="unknown loss 'ktoo'.*dpo.*kto"):
        get_loss("ktoo")


def test_unknown_hyperparameter_names_the_valid_ones():
    with pytest.raises(ValueError, match="no hyperparameter 'betta'.*'beta'"):
        get_loss("kto").hyperparameters({"betta": 0.2})
    assert get_loss("kto").hyperparameters({"beta": 0.2})["beta"] == 0.2


# Every loss's hyperparameters and defaults as docs/losses.md's loss table states them (ppo_offline's
# critic_coef 0.01 and kl_coef 0.1 are the coefficients in its formula there), written out by hand.
DOCUMENTED_DEFAULTS = {
    "kto": dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0),
    "kto_zero": dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0),
    "apo_zero_unpaired": dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0),
    "halo": dict(beta=0.1, value="sigmoid", reference_point="kl", desirable_weight=1.0, undesirable_weight=1.0),
    "ppo_offline": dict(gamma=0.99, lam=0.95, cliprange=0.5, critic_coef=0.01, kl_coef=0.1),
    "dpo": dict(beta=0.1, label_smoothing=0.0),
    "cdpo": dict(beta=0.1, label_smoothing=0.2),
    "ipo": dict(beta=0.1),
    "hinge": dict(beta=0.1),
    "robust": dict(beta=0.1, label_smoothing=0.0),
    "exo_pair": dict(beta=0.1, label_smoothing=1e-3),
    "bco_pair": dict(beta=0.1),  # running_mean / running_count are run state, not hyperparameters
    "sppo_hard": dict(beta=0.1),
    "nca_pair": dict(beta=0.1),
    "apo_zero": dict(beta=0.1),
    "apo_down": dict(beta=0.1),
    "discopop": dict(beta=0.1, tau=0.05),
    "bco": dict(beta=0.1),  # running_mean / running_count are run state
    "aot_unpaired": dict(beta=0.1, label_smoothing=0.0),
    "aot": dict(beta=0.1, label_smoothing=0.0),
    "aot_pair": dict(beta=0.1, label_smoothing=0.0),
    "fdpo": dict(beta=0.1, label_smoothing=0.0, divergence="reverse_kl", alpha=0.5),
    "sigmoid_norm": dict(beta=0.1),
    "slic": dict(beta=1.0, lambda_coef=0.1),
    "simpo": dict(beta=2.0, gamma=0.5, label_smoothing=0.0),
    "orpo": dict(beta=0.1),  # chosen_token_counts is data the feed computes
    "sft": dict(reduction="token"),  # token-averaged NLL; "sequence" is HALOs legacy's SFTTrainer
    "csft": dict(reduction="token"),
}


def test_hyperparameter_defaults_are_the_documented_ones():
    assert set(LOSSES) == set(DOCUMENTED_DEFAULTS)
    for name, spec in LOSSES.items():
        assert spec.hyperparameters() == DOCUMENTED_DEFAULTS[name], name


def test_hyperparameter_overrides_replace_one_value_and_reach_the_loss():
    """hyperparameters({k: v}) is the defaults with k = v (the defaults themselves unchanged), and the
    loss computed with it is the one with that value: a beta override changes the DPO loss as the
    hand-derived formula says."""

    def another(value):  # a different valid value of the same kind
        return (
            {"sigmoid": "linear", "kl": "zero", "token": "sequence", "reverse_kl": "js"}[value]
            if isinstance(value, str)
            else value + 0.25
        )

    for name, spec in LOSSES.items():
        for key, default in DOCUMENTED_DEFAULTS[name].items():
            new = another(default)
            assert spec.hyperparameters({key: new}) == {**DOCUMENTED_DEFAULTS[name], key: new}, (name, key)
        assert spec.hyperparameters() == DOCUMENTED_DEFAULTS[name], name
    # d = ln 3, beta = 2: -log sigmoid(2 ln 3) = log(10/9)
    args = (jnp.array([LN3]), jnp.zeros(1), jnp.zeros(1), jnp.zeros(1))
    np.testing.assert_allclose(call("dpo", args, beta=2.0)[0], math.log(10 / 9), rtol=1e-6)


def test_registry_entries_are_consistent():
    assert {"kto", "dpo", "ipo", "slic", "sft", "ppo_offline", "halo", "simpo", "orpo"} <= set(LOSSES)
    for name, spec in LOSSES.items():
        assert spec.name == name and spec.kind in ("unary", "paired", "sft")
        assert spec.citation
    assert get_loss("ipo").length_normalized and get_loss("simpo").length_normalized
    assert get_loss("sigmoid_norm").length_normalized and not get_loss("fdpo").length_normalized
    assert get_loss("bco").state_metrics == get_loss("bco_pair").state_metrics
    assert not get_loss("slic").needs_reference and get_loss("dpo").needs_reference
    assert get_loss("kto").needs_kl and not get_loss("kto_zero").needs_kl


@pytest.mark.parametrize(
    "name, overrides, field",
    [
        ("ipo", {"beta": 0.0}, "beta"),
        ("robust", {"label_smoothing": 0.5}, "label_smoothing"),
        ("exo_pair", {"label_smoothing": 0.0}, "label_smoothing"),
        ("discopop", {"tau": 2.0}, "tau"),
        ("halo", {"reference_point": "mean"}, "reference_point"),
        ("halo", {"value": "relu"}, "value function"),
        ("fdpo", {"divergence": "total_variation"}, "divergence"),
        ("fdpo", {"divergence": "alpha", "alpha": 1.0}, "alpha"),
        ("fdpo", {"alpha": 0.0}, "alpha"),
        ("aot", {"label_smoothing": 0.5}, "label_smoothing"),
        ("aot_unpaired", {"label_smoothing": -0.1}, "label_smoothing"),
    ],
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
