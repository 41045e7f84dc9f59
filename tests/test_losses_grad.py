"""Gradients of every registered loss against the float64 numpy references.

For every loss in ``kto_jax.losses.LOSSES`` (each HALO value function around both reference points,
DPO with and without label smoothing, ORPO with and without chosen token counts, ...) on fixed, seeded
batches with moderate log-ratios (|r| <= 4, away from the kinks of hinge, SLiC, PPO's clip and KTO's
max(0, z0)), with and without padding rows:

    jax.grad(loss)(x) == d reference(x) / dx      (float64 central differences of tests/numpy_reference*.py)

for each log-prob input x (and PPO's values), with the library's stop-gradients spelled out:

* KTO, HALO: z0 = sg(max(0, mean(policy_kl - reference_kl))), so d/d policy_kl_logps and
  d/d reference_kl_logps are exactly 0 (while the reference's own derivative there is not).
* bco_pair, bco: delta is a running mean of sg(rewards) (TRL detaches them): the expected gradient
  is the reference's with delta held at its value.
* ppo_offline: A = GAE(sg(V)) normalised under sg, and the critic target G (discounted future reward)
  does not depend on V, so
      d/d values          = critic_coef * (V - G) * m / sum(m)     (only the critic term 0.5 (V - G)^2)
      d/d reference_logps = kl_coef * m / sum(m)                    (only the KL term: the ratio's is sg)
      d/d policy_logps    = the reference's.

Other reference log-probs get the gradient of the formula (the losses are functions of
r = policy - reference): the frozen reference gets no gradient in training because the feeds stop it
(kto_jax/train/feeds.py), not because the losses do. Padding rows get exactly 0.

The library computes in float32 whatever the input dtype (``f32`` in kto_jax/losses/_common.py), so
``jax.experimental.enable_x64`` would not make its gradients more precise: the tolerances are float32's.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kto_jax import losses
from kto_jax.losses import LOSSES, get_loss
from kto_jax.losses.registry import OPTIONAL_INPUTS
from kto_jax.losses.unary import kto_from_reference_point
from tests import numpy_reference_ppo as P
from tests.numpy_checks import PAIRED, REFERENCES, SMALL_SETTINGS, assert_matches_reference
from tests.numpy_grad import reference_gradient

KL_INPUTS = ("policy_kl_logps", "reference_kl_logps")
PADDING = np.array([True, True, False, True, False, True])  # 6 rows, two of them padding

# (case id, registry name, hyperparameter overrides, other keyword arguments: run state, options);
# every registered loss appears
CASES = [
    ("kto", "kto", dict(beta=0.5, desirable_weight=1.3, undesirable_weight=0.8), {}),
    ("kto_zero", "kto_zero", dict(beta=0.5, desirable_weight=1.3, undesirable_weight=0.8), {}),
    ("apo_zero_unpaired", "apo_zero_unpaired", dict(beta=0.5, desirable_weight=0.9, undesirable_weight=1.2), {}),
    *[
        (
            f"halo-{value}-{point}",
            "halo",
            dict(beta=0.5, value=value, reference_point=point, desirable_weight=1.3, undesirable_weight=0.8),
            {},
        )
        for value in ("sigmoid", "log_sigmoid", "linear")
        for point in ("kl", "zero")
    ],
    ("ppo_offline", "ppo_offline", dict(gamma=0.9, lam=0.8, cliprange=0.5, critic_coef=0.3, kl_coef=0.2), {}),
    ("dpo", "dpo", dict(beta=0.3), {}),
    ("dpo-smoothed", "dpo", dict(beta=0.3, label_smoothing=0.2), {}),
    ("cdpo", "cdpo", dict(beta=0.3), {}),  # its default label_smoothing 0.2
    ("ipo", "ipo", dict(beta=0.4), {}),
    ("hinge", "hinge", dict(beta=0.4), {}),
    ("robust", "robust", dict(beta=0.3, label_smoothing=0.2), {}),
    ("exo_pair", "exo_pair", dict(beta=0.3, label_smoothing=0.1), {}),
    ("bco_pair-fresh", "bco_pair", dict(beta=0.3), dict(running_mean=0.0, running_count=0.0)),
    ("bco_pair-running", "bco_pair", dict(beta=0.3), dict(running_mean=1.0, running_count=1.0)),
    ("sppo_hard", "sppo_hard", dict(beta=0.4), {}),
    ("bco-fresh", "bco", dict(beta=0.3), dict(running_mean=0.0, running_count=0.0)),
    ("bco-running", "bco", dict(beta=0.3), dict(running_mean=1.0, running_count=2.0)),
    ("aot", "aot", dict(beta=0.3), {}),
    ("aot-smoothed", "aot", dict(beta=0.3, label_smoothing=0.2), {}),
    ("aot_pair", "aot_pair", dict(beta=0.3, label_smoothing=0.1), {}),
    ("aot_unpaired", "aot_unpaired", dict(beta=0.3, label_smoothing=0.1), {}),
    *[(f"fdpo-{d}", "fdpo", dict(beta=0.3, divergence=d, alpha=0.3), {}) for d in ("reverse_kl", "forward_kl", "js")],
    ("fdpo-alpha", "fdpo", dict(beta=0.3, label_smoothing=0.1, divergence="alpha", alpha=0.3), {}),
    ("sigmoid_norm", "sigmoid_norm", dict(beta=0.3), {}),
    ("nca_pair", "nca_pair", dict(beta=0.3), {}),
    ("apo_zero", "apo_zero", dict(beta=0.3), {}),
    ("apo_down", "apo_down", dict(beta=0.3), {}),
    ("discopop", "discopop", dict(beta=0.3, tau=0.2), {}),
    ("slic", "slic", dict(beta=2.0, lambda_coef=0.3), {}),
    ("simpo", "simpo", dict(beta=2.0, gamma=0.5, label_smoothing=0.1), {}),
    ("orpo", "orpo", dict(beta=0.3), {}),
    ("orpo-counts", "orpo", dict(beta=0.3), {}),
    ("sft", "sft", {}, {}),
    ("sft-sequence", "sft", dict(reduction="sequence"), {}),  # HALOs legacy's per-sequence mean
    ("csft", "csft", {}, {}),
]
CASE_IDS = [c[0] for c in CASES]


def test_every_registered_loss_has_a_gradient_case():
    assert {name for _, name, _, _ in CASES} == set(LOSSES)
    assert set(REFERENCES) == set(LOSSES)


# ---------------------------------------------------------------- inputs


def positional_names(spec):
    return [p.name for p in inspect.signature(spec.fn).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]


def differentiable(spec, hp):
    """The inputs differentiated: every log-prob input the loss takes, and PPO's values."""
    return [n for n in spec.inputs(hp) if n.endswith("_logps") or n == "values"]


def away_from_kinks(name, x, hp, mask) -> bool:
    """Central differences are exact only where the loss is smooth: keep 0.05 away from each kink."""
    if name in ("kto", "halo") and "policy_kl_logps" in x:
        kl = (x["policy_kl_logps"].astype(np.float64) - x["reference_kl_logps"])[mask]
        return abs(kl.mean()) > 0.05  # max(0, z0)
    if name == "hinge":
        d = (x["policy_chosen_logps"] - x["policy_rejected_logps"]) - (
            x["reference_chosen_logps"] - x["reference_rejected_logps"]
        )
        return np.all(np.abs(1.0 - hp["beta"] * d.astype(np.float64)) > 0.05)
    if name == "slic":
        gap = hp["beta"] - x["policy_chosen_logps"].astype(np.float64) + x["policy_rejected_logps"]
        return np.all(np.abs(gap) > 0.05)
    if name == "ppo_offline":
        log_ratio = np.abs(x["policy_logps"].astype(np.float64) - x["reference_logps"])
        return np.all(np.abs(log_ratio - np.log(1.0 / hp["cliprange"])) > 0.05)  # clip(ratio, eps, 1/eps)
    return True


def draw_inputs(spec, hp, rng, batch):
    """One batch by input name, float32: log-probs in [-40, -5], log-ratios in [-4, 4] (PPO: [B, 7]
    tokens, log-ratios in [-1.2, 1.2]; reference-free: length-normalised log-probs in [-3, -0.05])."""

    def uniform(low, high, shape=batch):
        return rng.uniform(low, high, shape)

    names = spec.inputs(hp)
    x = {}
    if spec.name == "ppo_offline":
        length = 7
        reference = uniform(-5.0, 0.0, (batch, length))
        token_mask = np.zeros((batch, length), np.float32)
        for row in range(batch):
            start = int(rng.integers(0, 3))
            token_mask[row, start : start + int(rng.integers(2, length - start + 1))] = 1.0
        x = dict(
            policy_logps=reference + uniform(-1.2, 1.2, (batch, length)),
            reference_logps=reference,
            values=uniform(-1.0, 1.0, (batch, length)),
            desirable=rng.permutation(np.arange(batch) % 2 == 0),
            mask=token_mask,
        )
    elif spec.kind == "unary":
        x["reference_logps"] = uniform(-40.0, -5.0)
        x["policy_logps"] = x["reference_logps"] + uniform(-4.0, 4.0)
        if "policy_kl_logps" in names:
            x["reference_kl_logps"] = uniform(-40.0, -5.0)
            x["policy_kl_logps"] = x["reference_kl_logps"] + 1.5 + uniform(-1.0, 1.0)  # z0 ~ 1.5 > 0
        x["desirable"] = rng.permutation(np.arange(batch) % 2 == 0)
    elif spec.kind == "paired" and spec.needs_reference:
        x["policy_chosen_logps"], x["policy_rejected_logps"] = uniform(-40.0, -5.0), uniform(-40.0, -5.0)
        x["reference_chosen_logps"] = x["policy_chosen_logps"] - uniform(-4.0, 4.0)
        x["reference_rejected_logps"] = x["policy_rejected_logps"] - uniform(-4.0, 4.0)
    elif spec.kind == "paired":  # reference-free, on length-normalised log-probs
        x["policy_chosen_logps"], x["policy_rejected_logps"] = uniform(-3.0, -0.05), uniform(-3.0, -0.05)
        if "chosen_token_counts" in names:
            x["chosen_token_counts"] = rng.integers(1, 30, batch).astype(np.int32)
    else:
        x = dict(policy_logps=uniform(-50.0, -1.0), token_counts=rng.integers(1, 20, batch).astype(np.int32))
    return {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in x.items()}


def draw_smooth_inputs(spec, hp, rng, batch, mask):
    """:func:`draw_inputs` redrawn until 0.05 away from every kink (over the valid rows)."""
    for _ in range(100):
        x = draw_inputs(spec, hp, rng, batch)
        if away_from_kinks(spec.name, x, hp, slice(None) if mask is None else mask):
            return x
    raise AssertionError(f"{spec.name}: no draw away from the kinks")


def case_inputs(case_id, seed, padded):
    """(spec, hyperparameters, extra keyword arguments, inputs by name, example_mask) of a gradient case."""
    _, name, overrides, extra = CASES[CASE_IDS.index(case_id)]
    spec = get_loss(name)
    hp = spec.hyperparameters(overrides)
    rng = np.random.default_rng([seed, CASE_IDS.index(case_id)])
    batch = (4 if padded else 3) if spec.token_level else (len(PADDING) if padded else 5)
    mask = PADDING[:batch] if padded else None
    x = draw_smooth_inputs(spec, hp, rng, batch, mask)
    if case_id == "orpo":
        x.pop("chosen_token_counts")  # orpo without counts: nll = -mean(pc)
    for n in spec.unused(hp):  # halo around z = 0 takes no KL log-probs: passed as None, as the engine does
        x[n] = None
    return spec, hp, extra, x, mask


def split(spec, x):
    """Inputs by name -> (positional args in signature order, keyword-only optional inputs)."""
    return [x[n] for n in positional_names(spec)], {n: x[n] for n in OPTIONAL_INPUTS if n in x}


def library_loss(spec, hp, extra, x, mask):
    return spec.fn(**{n: None if v is None else jnp.asarray(v) for n, v in x.items()}, **hp, **extra, example_mask=mask)


def library_gradients(spec, hp, extra, x, mask, names):
    def loss(diff):
        return library_loss(spec, hp, extra, {**x, **diff}, mask)[0]

    grad = jax.grad(loss)
    if spec.token_level:  # offline PPO's GAE scan: one compile is cheaper than eager op-by-op dispatch
        grad = jax.jit(grad)
    grads = grad({n: jnp.asarray(x[n]) for n in names})
    return {n: np.asarray(g, np.float64) for n, g in grads.items()}


# ---------------------------------------------------------------- expected gradients


def ppo_token_weights(x, mask):
    """m / sum(m) over the valid rows' completion tokens (the weights of every masked_mean in PPO)."""
    m = x["mask"].astype(np.float64) * (np.ones(len(x["mask"]), bool) if mask is None else mask)[:, None]
    return m / m.sum()


def ppo_critic_targets(x, hp, mask):
    """G: the discounted future reward of the reference (HALOs compute_advantages), 0 on padding rows."""
    rows = np.ones(len(x["mask"]), bool) if mask is None else mask
    masks = x["mask"][rows].astype(np.float64)
    rewards = P.ppo_rewards(x["desirable"][rows], masks)
    *_, future = P.compute_advantages(
        x["values"][rows].astype(np.float64), rewards, masks, gamma=hp["gamma"], lam=hp["lam"]
    )
    full = np.zeros(x["mask"].shape)
    full[rows] = future
    return full


def expected_gradients(spec, hp, extra, x, mask, names):
    """{input: expected d loss / d input}: the reference's central differences, with the library's
    stop-gradients applied (module docstring); also returns, for each input where a stop-gradient
    decides the answer, the gradient the reference gives *without* it (to show the check has teeth)."""
    reference = REFERENCES[spec.name]
    args, optional = split(spec, x)
    hparams = {**hp, **extra}
    expected, without_stop = {}, {}
    if spec.name in ("bco_pair", "bco"):
        # delta at this batch, then a running count so large the batch no longer moves it: delta fixed
        delta = reference(*args, **hparams, example_mask=mask)[1]["bco/running_mean"]
        frozen = {**hp, "running_mean": delta, "running_count": 1e300}
    for n in names:
        i = positional_names(spec).index(n)
        cd = reference_gradient(reference, args, optional, hparams, i, mask)
        if n in KL_INPUTS:
            expected[n], without_stop[n] = np.zeros(cd.shape), cd
        elif spec.name in ("bco_pair", "bco"):
            expected[n], without_stop[n] = reference_gradient(reference, args, optional, frozen, i, mask), cd
        elif spec.name == "ppo_offline" and n == "values":
            g = ppo_critic_targets(x, hp, mask)
            expected[n] = hp["critic_coef"] * (x["values"] - g) * ppo_token_weights(x, mask)
            without_stop[n] = cd
        elif spec.name == "ppo_offline" and n == "reference_logps":
            expected[n], without_stop[n] = hp["kl_coef"] * ppo_token_weights(x, mask), cd
        else:
            expected[n] = cd
    return expected, without_stop


def gradient_tolerance(expected) -> float:
    """float32 rounding of the library's gradient: 5e-5 of its largest entry, at least 5e-7 (the errors
    seen are ~100x smaller)."""
    scale = float(np.abs(expected).max())
    return 5e-7 * max(1.0, scale) + 5e-5 * scale


def assert_gradient_close(actual, expected, what):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=gradient_tolerance(expected), err_msg=what)


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_value_and_gradient_match_the_numpy_reference(case_id, padded):
    """loss, metrics and d loss / d (each log-prob input) equal the numpy reference's (stop-gradients as
    in the module docstring); padding rows get exactly 0."""
    spec, hp, extra, x, mask = case_inputs(case_id, seed=0, padded=padded)
    names = differentiable(spec, hp)
    args, optional = split(spec, x)
    out = library_loss(spec, hp, extra, x, mask)
    assert_matches_reference(spec.name, out, args, {**hp, **extra, **optional}, mask)

    grads = library_gradients(spec, hp, extra, x, mask, names)
    expected, without_stop = expected_gradients(spec, hp, extra, x, mask, names)
    for n in names:
        assert_gradient_close(grads[n], expected[n], f"{case_id}: d loss / d {n}")
        if mask is not None:
            assert np.all(grads[n][~mask] == 0.0), f"{case_id}: padding rows of {n} get gradient"
        if n in KL_INPUTS:
            assert np.all(grads[n] == 0.0), f"{case_id}: z0 is a stop-gradient, yet {n} gets gradient"
    # a fresh delta is the batch mean, where d loss / d delta ~ 0 (to first order)
    if case_id not in ("bco_pair-fresh", "bco-fresh"):
        for n, g in without_stop.items():  # without the stop-gradient this check would fail by 10x its tolerance
            assert np.abs(g - expected[n]).max() > 10 * gradient_tolerance(expected[n]), (
                f"{case_id}: {n} cannot tell the stop-gradient apart"
            )
    assert any(np.abs(grads[n]).max() > 1e-3 for n in names), f"{case_id}: all gradients ~0"


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_metrics_carry_no_gradient(case_id):
    """Every metric is reported under stop_gradient: d metric / d (each input) is exactly 0."""
    spec, hp, extra, x, mask = case_inputs(case_id, seed=1, padded=True)
    names = differentiable(spec, hp)

    def metrics(diff):
        return library_loss(spec, hp, extra, {**x, **diff}, mask)[1]

    jac = jax.jacrev(metrics)({n: jnp.asarray(x[n]) for n in names})
    for metric, per_input in jac.items():
        for n, g in per_input.items():
            assert np.all(np.asarray(g) == 0.0), f"{case_id}: metric {metric} has a gradient w.r.t. {n}"


def test_halo_and_kto_metrics_carry_no_gradient_through_a_differentiable_reference_point():
    """``halo`` and ``kto_from_reference_point`` take any reference point z and let the loss's gradient
    flow through it (DPO as a HALO: z = the rejected reward), but their metrics must not: the
    ``reference_point`` / ``kl`` metrics report sg(z)."""
    rng = np.random.default_rng(3)
    p, r, z = (jnp.asarray(rng.uniform(-4, 0, 5), jnp.float32) for _ in range(3))
    desirable = jnp.asarray([True, False, True, False, True])

    def halo(z):
        return losses.halo(p, r, z, 1.0, beta=0.5, value="log_sigmoid")

    def kto(z):
        return kto_from_reference_point(p, r, z, desirable, beta=0.5, desirable_weight=1.0, undesirable_weight=1.0)

    for fn, key in ((halo, "reference_point"), (kto, "kl")):
        assert np.abs(np.asarray(jax.grad(lambda z, fn=fn: fn(z)[0])(z))).max() > 1e-3  # the loss sees z
        for metric, g in jax.jacrev(lambda z, fn=fn: fn(z)[1])(z).items():
            assert np.all(np.asarray(g) == 0.0), f"{fn.__name__}: metric {metric} has a gradient w.r.t. z"
        np.testing.assert_allclose(fn(z)[1][key], float(jnp.mean(z)), rtol=1e-6)


# ---------------------------------------------------------------- a property over the paired family


@pytest.mark.parametrize("name", sorted(PAIRED))
@settings(SMALL_SETTINGS, max_examples=4)
@given(seed=st.integers(0, 2**31 - 1), data=st.data())
def test_paired_gradient_property(name, seed, data):
    """d loss / d (pc, pr, rc, rr) equals the reference's central differences for random hyperparameters
    (the strategies of tests/numpy_checks.PAIRED) on random moderate batches."""
    spec = get_loss(name)
    drawn = {k: data.draw(s, label=k) for k, s in PAIRED[name].items()}
    extra = {k: drawn.pop(k) for k in ("running_mean", "running_count") if k in drawn}
    hp = spec.hyperparameters(drawn)
    x = draw_smooth_inputs(spec, hp, np.random.default_rng(seed), 4, None)
    names = differentiable(spec, hp)
    grads = library_gradients(spec, hp, extra, x, None, names)
    expected, _ = expected_gradients(spec, hp, extra, x, None, names)
    for n in names:
        assert_gradient_close(grads[n], expected[n], f"{name} {hp} {extra}: d loss / d {n}")
