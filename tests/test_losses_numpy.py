"""Property tests: every loss in ``kto_jax.losses`` against the independent float64 numpy references.

The references (tests/numpy_reference.py) are written from the upstream TRL v0.28.0 / HALOs (legacy) code,
not from the JAX implementation.  Inputs are float32 (what the library sees); the reference gets the very
same float32 values, promoted to float64, so the only differences left are float32 rounding inside the
library.

Functions are called un-jitted (hyperparameters are Python floats that the library validates eagerly);
``test_jit_matches_reference`` checks once per loss that ``jax.jit(partial(fn, **hyperparameters))`` agrees.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kto_jax.losses as L
from tests import numpy_reference as R

RTOL = 2e-5
ATOL = 2e-5

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
)
SMALL_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ----------------------------------------------------------------------------------------------------
# comparison helpers
# ----------------------------------------------------------------------------------------------------


def _scalar(x) -> float:
    x = np.asarray(x)
    assert x.shape == (), f"expected a scalar, got shape {x.shape}"
    return float(x)


def assert_close(actual, expected, what, rtol=RTOL, atol=ATOL):
    actual = _scalar(actual)
    assert np.isfinite(actual), f"{what}: got non-finite {actual} (expected {expected})"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def assert_matches(out, ref, *, rtol=RTOL, atol=ATOL, fraction_slack=None, context=""):
    """Compare ``(loss, metrics)`` from the library with ``(loss, metrics)`` from the reference.

    ``fraction_slack`` maps metric names that are fractions of a discontinuous predicate (accuracies,
    clipfrac) to how far they may differ because of near-ties decided differently in float32.
    """
    loss, metrics = out
    ref_loss, ref_metrics = ref
    fraction_slack = fraction_slack or {}
    assert_close(loss, ref_loss, f"loss {context}", rtol, atol)
    for name, expected in ref_metrics.items():
        if name.startswith("_"):
            continue
        assert name in metrics, f"metric {name!r} missing; got {sorted(metrics)} {context}"
        if name in fraction_slack:
            actual = _scalar(metrics[name])
            assert abs(actual - expected) <= fraction_slack[name] + 1e-6, (
                f"metric {name}: {actual} vs {expected} (slack {fraction_slack[name]}) {context}"
            )
        else:
            assert_close(metrics[name], expected, f"metric {name} {context}", rtol, atol)


def accuracy_slack(chosen_rewards, rejected_rewards, valid):
    """Fraction of valid rows whose chosen/rejected rewards are so close that float32 may order them
    differently from float64."""
    chosen_rewards = np.asarray(chosen_rewards, np.float64)[valid]
    rejected_rewards = np.asarray(rejected_rewards, np.float64)[valid]
    if chosen_rewards.size == 0:
        return 0.0
    near = np.abs(chosen_rewards - rejected_rewards) <= 1e-4 * (
        1 + np.abs(chosen_rewards) + np.abs(rejected_rewards)
    )
    return float(np.mean(near))


def _valid(batch, example_mask):
    return np.ones(batch, bool) if example_mask is None else np.asarray(example_mask, bool)


# ----------------------------------------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------------------------------------

batch_sizes = st.integers(1, 9)


def f32_arrays(batch, low, high):
    low, high = float(np.float32(low)), float(np.float32(high))
    return hnp.arrays(
        np.float32,
        (batch,),
        elements=st.floats(low, high, width=32, allow_nan=False, allow_infinity=False),
    )


def example_masks(batch):
    return st.one_of(st.none(), hnp.arrays(np.bool_, (batch,)))


@st.composite
def paired_inputs(draw, low=-60.0, high=0.0, with_reference=True):
    batch = draw(batch_sizes)
    n = 4 if with_reference else 2
    arrays = [draw(f32_arrays(batch, low, high)) for _ in range(n)]
    mask = draw(example_masks(batch))
    return batch, arrays, mask


@st.composite
def unary_inputs(draw, with_kl=True):
    batch = draw(batch_sizes)
    reference = draw(f32_arrays(batch, -60.0, 0.0))
    logratio = draw(f32_arrays(batch, -20.0, 20.0))
    policy = (reference + logratio).astype(np.float32)
    arrays = [policy, reference]
    if with_kl:
        reference_kl = draw(f32_arrays(batch, -60.0, 0.0))
        kl_logratio = draw(f32_arrays(batch, -20.0, 20.0))
        arrays += [(reference_kl + kl_logratio).astype(np.float32), reference_kl]
    desirable = draw(hnp.arrays(np.bool_, (batch,)))
    mask = draw(example_masks(batch))
    return batch, arrays, desirable, mask


betas = st.floats(0.01, 1.0)
weights = st.floats(0.1, 3.0)


# ----------------------------------------------------------------------------------------------------
# unary losses
# ----------------------------------------------------------------------------------------------------


@SETTINGS
@given(inputs=unary_inputs(with_kl=True), beta=betas, dw=weights, uw=weights)
def test_kto_matches_reference(inputs, beta, dw, uw):
    _, (policy, reference, policy_kl, reference_kl), desirable, mask = inputs
    kwargs = dict(beta=beta, desirable_weight=dw, undesirable_weight=uw, example_mask=mask)
    out = L.kto(policy, reference, policy_kl, reference_kl, desirable, **kwargs)
    ref = R.kto(policy, reference, policy_kl, reference_kl, desirable, **kwargs)
    assert_matches(out, ref, context=str(kwargs))


@SETTINGS
@given(inputs=unary_inputs(with_kl=False), beta=betas, dw=weights, uw=weights)
def test_kto_zero_matches_reference(inputs, beta, dw, uw):
    _, (policy, reference), desirable, mask = inputs
    kwargs = dict(beta=beta, desirable_weight=dw, undesirable_weight=uw, example_mask=mask)
    out = L.kto_zero(policy, reference, desirable, **kwargs)
    ref = R.kto_zero(policy, reference, desirable, **kwargs)
    ref[1].pop("kl")  # kto_zero has no KL estimate; don't require the key
    assert_matches(out, ref, context=str(kwargs))


@SETTINGS
@given(inputs=unary_inputs(with_kl=False), beta=betas, dw=weights, uw=weights)
def test_apo_zero_unpaired_matches_trl_formula(inputs, beta, dw, uw):
    _, (policy, reference), desirable, mask = inputs
    kwargs = dict(beta=beta, desirable_weight=dw, undesirable_weight=uw, example_mask=mask)
    out = L.apo_zero_unpaired(policy, reference, desirable, **kwargs)
    ref = R.apo_zero_unpaired(policy, reference, desirable, **kwargs)
    ref[1].pop("kl")
    assert_matches(out, ref, context=str(kwargs))


def test_kto_reference_point_is_clamped_mean():
    rng = np.random.default_rng(0)
    for batch in (1, 4, 7):
        for shift in (-3.0, 0.0, 3.0):
            reference_kl = rng.uniform(-60, 0, batch).astype(np.float32)
            policy_kl = (reference_kl + shift + rng.uniform(-1, 1, batch)).astype(np.float32)
            mask = rng.random(batch) < 0.7
            expected = max(0.0, R.mean_or_zero((policy_kl.astype(np.float64) - reference_kl)[mask]))
            assert_close(L.kto_reference_point(policy_kl, reference_kl, mask), expected, "z0")


# ----------------------------------------------------------------------------------------------------
# paired losses with a reference model
# ----------------------------------------------------------------------------------------------------

PAIRED = {
    "dpo": dict(beta=st.floats(0.01, 1.0), label_smoothing=st.floats(0.0, 0.49)),
    "ipo": dict(beta=st.floats(0.01, 1.0)),
    "hinge": dict(beta=st.floats(0.01, 1.0)),
    "robust": dict(beta=st.floats(0.01, 1.0), label_smoothing=st.floats(0.0, 0.45)),
    "exo_pair": dict(beta=st.floats(0.01, 1.0), label_smoothing=st.floats(1e-4, 0.45)),
    "bco_pair": dict(
        beta=st.floats(0.01, 1.0),
        running_mean=st.floats(-5.0, 5.0),
        running_count=st.one_of(st.just(0.0), st.floats(1.0, 1000.0)),
    ),
    "sppo_hard": dict(beta=st.floats(0.01, 1.0)),
    "nca_pair": dict(beta=st.floats(0.01, 1.0)),
    "apo_zero": dict(beta=st.floats(0.01, 1.0)),
    "apo_down": dict(beta=st.floats(0.01, 1.0)),
    "discopop": dict(beta=st.floats(0.01, 0.5), tau=st.floats(0.05, 1.0)),
}


@pytest.mark.parametrize("name", sorted(PAIRED))
@SETTINGS
@given(data=st.data())
def test_paired_matches_reference(name, data):
    batch, (pc, pr, rc, rr), mask = data.draw(paired_inputs(), label="inputs")
    hp = {k: data.draw(s, label=k) for k, s in PAIRED[name].items()}
    out = getattr(L, name)(pc, pr, rc, rr, **hp, example_mask=mask)
    ref = getattr(R, name)(pc, pr, rc, rr, **hp, example_mask=mask)
    beta = hp["beta"]
    slack = accuracy_slack(
        beta * (pc.astype(np.float64) - rc), beta * (pr.astype(np.float64) - rr), _valid(batch, mask)
    )
    assert_matches(out, ref, fraction_slack={"rewards/accuracies": slack}, context=f"{name} {hp}")


def test_bco_pair_running_mean_examples():
    """Hand-checkable numbers for the running-mean update (TRL: one batch mean per update)."""
    pc = np.array([-1.0, -2.0, -3.0], np.float32)
    rc = np.array([-2.0, -2.0, -2.0], np.float32)
    pr = np.array([-4.0, -5.0, -6.0], np.float32)
    rr = np.array([-4.0, -4.0, -4.0], np.float32)
    # rewards (beta = 1): chosen [1, 0, -1], rejected [0, -1, -2]; batch mean = -0.5
    _, metrics = L.bco_pair(pc, pr, rc, rr, beta=1.0)
    assert_close(metrics["bco/running_mean"], -0.5, "fresh running mean")
    assert_close(metrics["bco/running_count"], 1.0, "fresh running count")
    _, metrics = L.bco_pair(pc, pr, rc, rr, beta=1.0, running_mean=1.0, running_count=3.0)
    assert_close(metrics["bco/running_mean"], 0.625, "updated running mean")  # 1 + (-1.5) / 4
    assert_close(metrics["bco/running_count"], 4.0, "updated running count")
    # masking the last row: valid rewards [1, 0, 0, -1], mean 0
    mask = np.array([True, True, False])
    _, metrics = L.bco_pair(pc, pr, rc, rr, beta=1.0, running_mean=2.0, running_count=1.0, example_mask=mask)
    assert_close(metrics["bco/running_mean"], 1.0, "masked running mean")  # 2 + (0 - 2) / 2
    assert_close(metrics["bco/running_count"], 2.0, "masked running count")


# ----------------------------------------------------------------------------------------------------
# reference-free losses
# ----------------------------------------------------------------------------------------------------


@SETTINGS
@given(
    inputs=paired_inputs(with_reference=False),
    beta=st.floats(0.0, 5.0),
    lambda_coef=st.floats(0.0, 1.0),
)
def test_slic_matches_reference(inputs, beta, lambda_coef):
    batch, (pc, pr), mask = inputs
    kwargs = dict(beta=beta, lambda_coef=lambda_coef, example_mask=mask)
    out = L.slic(pc, pr, **kwargs)
    ref = R.slic(pc, pr, **kwargs)
    slack = accuracy_slack(pc, pr, _valid(batch, mask))
    assert_matches(out, ref, fraction_slack={"rewards/accuracies": slack}, context=str(kwargs))


@SETTINGS
@given(
    inputs=paired_inputs(low=-20.0, high=0.0, with_reference=False),
    beta=st.floats(0.1, 5.0),
    gamma=st.floats(0.0, 2.0),
    label_smoothing=st.floats(0.0, 0.49),
)
def test_simpo_matches_reference(inputs, beta, gamma, label_smoothing):
    batch, (pc, pr), mask = inputs
    kwargs = dict(beta=beta, gamma=gamma, label_smoothing=label_smoothing, example_mask=mask)
    out = L.simpo(pc, pr, **kwargs)
    ref = R.simpo(pc, pr, **kwargs)
    slack = accuracy_slack(beta * pc.astype(np.float64), beta * pr.astype(np.float64), _valid(batch, mask))
    assert_matches(out, ref, fraction_slack={"rewards/accuracies": slack}, context=str(kwargs))


@SETTINGS
@given(
    inputs=paired_inputs(low=-8.0, high=-0.01, with_reference=False),
    beta=st.floats(0.01, 1.0),
    with_counts=st.booleans(),
    data=st.data(),
)
def test_orpo_matches_reference(inputs, beta, with_counts, data):
    batch, (pc, pr), mask = inputs
    counts = None
    if with_counts:
        counts = data.draw(hnp.arrays(np.int32, (batch,), elements=st.integers(1, 50)), label="counts")
    kwargs = dict(beta=beta, chosen_token_counts=counts, example_mask=mask)
    out = L.orpo(pc, pr, **kwargs)
    ref = R.orpo(pc, pr, **kwargs)
    slack = accuracy_slack(beta * pc.astype(np.float64), beta * pr.astype(np.float64), _valid(batch, mask))
    assert_matches(out, ref, fraction_slack={"rewards/accuracies": slack}, context=str(kwargs))


@SETTINGS
@given(batch=batch_sizes, data=st.data())
def test_sft_matches_reference(batch, data):
    logps = data.draw(f32_arrays(batch, -500.0, 0.0), label="logps")
    counts = data.draw(hnp.arrays(np.int32, (batch,), elements=st.integers(1, 100)), label="counts")
    mask = data.draw(example_masks(batch), label="mask")
    out = L.sft(logps, counts, example_mask=mask)
    ref = R.sft(logps, counts, example_mask=mask)
    assert_matches(out, ref)


# ----------------------------------------------------------------------------------------------------
# offline PPO
# ----------------------------------------------------------------------------------------------------


def right_padded_mask(rng, batch, length):
    """Rows of prompt zeros, then completion ones, then trailing zeros (completion may be empty)."""
    mask = np.zeros((batch, length), np.float32)
    for row in range(batch):
        prompt = rng.integers(0, length + 1)
        completion = rng.integers(0, length - prompt + 1)
        mask[row, prompt : prompt + completion] = 1.0
    return mask


def ppo_inputs(seed, batch, length):
    rng = np.random.default_rng(seed)
    reference = rng.uniform(-10.0, 0.0, (batch, length)).astype(np.float32)
    policy = (reference + rng.uniform(-1.0, 1.0, (batch, length))).astype(np.float32)
    values = rng.uniform(-2.0, 2.0, (batch, length)).astype(np.float32)
    desirable = rng.random(batch) < 0.5
    mask = right_padded_mask(rng, batch, length)
    return rng, policy, reference, values, desirable, mask


def ppo_tolerance(ref_metrics):
    """Normalising the advantages divides by their standard deviation, which amplifies float32 rounding
    of the raw advantages when that deviation is small; widen atol by the amplification factor."""
    amplification = ref_metrics.get("_amplification", 1.0)
    return dict(rtol=1e-4, atol=2e-5 * max(1.0, amplification))


def _ppo_reference(policy, reference, values, desirable, mask, example_mask, **hp):
    loss, metrics = R.ppo_offline(
        policy, reference, values, desirable, mask, example_mask=example_mask, return_details=True, **hp
    )
    valid = _valid(policy.shape[0], example_mask)
    masks = mask[valid].astype(np.float64)
    rewards = R.ppo_rewards(desirable[valid], masks)
    raw, _, _, _ = R.compute_advantages(
        values[valid].astype(np.float64), rewards, masks, gamma=hp["gamma"], lam=hp["lam"]
    )
    std = np.sqrt(R.masked_var(raw, masks) + 1e-8)
    metrics["_amplification"] = float(np.max(np.abs(raw), initial=1.0)) / std * 1e-2
    n = metrics["_num_tokens"]
    metrics["_clip_slack"] = float(np.sum(metrics["_clip_gap"] < 1e-3)) / n if n else 0.0
    return loss, metrics


@SMALL_SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    batch=batch_sizes,
    length=st.sampled_from([1, 12]),
    gamma=st.floats(0.5, 1.0),
    lam=st.floats(0.5, 1.0),
    cliprange=st.floats(0.2, 0.95),
    critic_coef=st.floats(0.0, 1.0),
    kl_coef=st.floats(0.0, 1.0),
    use_example_mask=st.booleans(),
)
def test_ppo_offline_matches_reference(
    seed, batch, length, gamma, lam, cliprange, critic_coef, kl_coef, use_example_mask
):
    rng, policy, reference, values, desirable, mask = ppo_inputs(seed, batch, length)
    example_mask = (rng.random(batch) < 0.7) if use_example_mask else None
    hp = dict(gamma=gamma, lam=lam, cliprange=cliprange, critic_coef=critic_coef, kl_coef=kl_coef)
    out = L.ppo_offline(policy, reference, values, desirable, mask, example_mask=example_mask, **hp)
    ref = _ppo_reference(policy, reference, values, desirable, mask, example_mask, **hp)
    assert_matches(
        out,
        ref,
        fraction_slack={"clipfrac": ref[1]["_clip_slack"]},
        context=f"{hp} seed={seed}",
        **ppo_tolerance(ref[1]),
    )


@SMALL_SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    batch=batch_sizes,
    gamma=st.floats(0.5, 1.0),
    lam=st.floats(0.5, 1.0),
)
def test_gae_matches_halos_loop(seed, batch, gamma, lam):
    """``gae`` returns (advantages, discounted future rewards) as HALOs ``compute_advantages`` (before
    normalisation)."""
    _, _, _, values, desirable, mask = ppo_inputs(seed, batch, 12)
    rewards = R.ppo_rewards(desirable, mask.astype(np.float64)).astype(np.float32)
    advantages, future = L.gae(values, rewards, mask, gamma=gamma, lam=lam)
    ref_adv, _, _, ref_future = R.compute_advantages(
        values.astype(np.float64), rewards.astype(np.float64), mask.astype(np.float64), gamma=gamma, lam=lam
    )
    np.testing.assert_allclose(np.asarray(advantages), ref_adv, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(np.asarray(future), ref_future, rtol=RTOL, atol=1e-5)


def test_ppo_offline_hand_example():
    """One row, two completion tokens, zero values, policy == reference: A_raw = [gamma*lam*1, 1]."""
    mask = np.array([[0.0, 1.0, 1.0, 0.0]], np.float32)
    zeros = np.zeros((1, 4), np.float32)
    loss, metrics = L.ppo_offline(
        zeros, zeros, zeros, np.array([True]), mask, gamma=0.5, lam=0.5, critic_coef=1.0, kl_coef=1.0
    )
    # raw advantages on valid tokens: [0.25, 1]; mean 0.625, var 0.140625; normalised [-1, 1]
    # policy loss = mean(-A * 1) = 0; discounted future rewards (rewards strictly after t, discounted
    # from t+1): [1, 0] on the completion tokens -> with zero values critic = 0.5 * mean([1, 0]) = 0.25;
    # KL = 0.
    assert_close(metrics["loss/policy"], 0.0, "policy loss", atol=1e-6)
    assert_close(metrics["loss/critic"], 0.25, "critic loss")
    assert_close(metrics["kl"], 0.0, "kl")
    assert_close(metrics["clipfrac"], 0.0, "clipfrac")
    assert_close(loss, 0.25, "loss")
    ref_loss, ref_metrics = R.ppo_offline(
        zeros, zeros, zeros, np.array([True]), mask, gamma=0.5, lam=0.5, critic_coef=1.0, kl_coef=1.0
    )
    assert ref_loss == pytest.approx(0.25) and ref_metrics["loss/critic"] == pytest.approx(0.25)


# ----------------------------------------------------------------------------------------------------
# cross-cutting properties: empty classes, masked garbage, all-masked batches, jit
# ----------------------------------------------------------------------------------------------------


def _loss_cases():
    """name -> (args builder(rng, batch), library kwargs, reference fn)."""

    def logps(rng, batch, low=-60.0, high=0.0):
        return rng.uniform(low, high, batch).astype(np.float32)

    def unary_kl(rng, batch):
        return [logps(rng, batch) for _ in range(4)] + [rng.random(batch) < 0.5]

    def unary(rng, batch):
        return [logps(rng, batch) for _ in range(2)] + [rng.random(batch) < 0.5]

    def paired(rng, batch):
        return [logps(rng, batch) for _ in range(4)]

    def ref_free(rng, batch):
        return [logps(rng, batch, -20.0, 0.0) for _ in range(2)]

    def orpo_args(rng, batch):
        return [logps(rng, batch, -8.0, -0.01) for _ in range(2)]

    def sft_args(rng, batch):
        return [logps(rng, batch, -500.0, 0.0), rng.integers(1, 100, batch).astype(np.float32)]

    def ppo_args(rng, batch):
        _, policy, reference, values, desirable, mask = ppo_inputs(int(rng.integers(0, 2**31)), batch, 12)
        return [policy, reference, values, desirable, mask]

    cases = {
        "kto": (unary_kl, dict(beta=0.3, desirable_weight=1.5, undesirable_weight=0.7)),
        "kto_zero": (unary, dict(beta=0.3, desirable_weight=1.5, undesirable_weight=0.7)),
        "apo_zero_unpaired": (unary, dict(beta=0.3, desirable_weight=1.5, undesirable_weight=0.7)),
        "slic": (ref_free, dict(beta=1.0, lambda_coef=0.1)),
        "simpo": (ref_free, dict(beta=2.0, gamma=0.5, label_smoothing=0.1)),
        "orpo": (orpo_args, dict(beta=0.1)),
        "sft": (sft_args, dict()),
        "ppo_offline": (ppo_args, dict(gamma=0.9, lam=0.8, cliprange=0.5, critic_coef=0.1, kl_coef=0.1)),
    }
    paired_hp = dict(
        dpo=dict(beta=0.1, label_smoothing=0.1),
        ipo=dict(beta=0.1),
        hinge=dict(beta=0.1),
        robust=dict(beta=0.1, label_smoothing=0.1),
        exo_pair=dict(beta=0.1, label_smoothing=1e-3),
        bco_pair=dict(beta=0.1, running_mean=0.5, running_count=10.0),
        sppo_hard=dict(beta=0.1),
        nca_pair=dict(beta=0.1),
        apo_zero=dict(beta=0.1),
        apo_down=dict(beta=0.1),
        discopop=dict(beta=0.1, tau=0.05),
    )
    for name, hp in paired_hp.items():
        cases[name] = (paired, hp)
    return cases


CASES = _loss_cases()


def _garbage_for(name, index, garbage):
    """Masked rows get the same garbage (nan, +-1e30) in every argument, counts and masks included."""
    return garbage


def _call(name, args, hp, example_mask):
    return getattr(L, name)(*args, **hp, example_mask=example_mask)


def _reference(name, args, hp, example_mask):
    if name == "ppo_offline":
        return _ppo_reference(*args, example_mask, **hp)
    return getattr(R, name)(*args, **hp, example_mask=example_mask)


def _slack(name, args, hp, example_mask, ref):
    batch = np.asarray(args[0]).shape[0]
    valid = _valid(batch, example_mask)
    if name == "ppo_offline":
        return {"clipfrac": ref[1]["_clip_slack"]}
    if name in ("slic",):
        return {"rewards/accuracies": accuracy_slack(args[0], args[1], valid)}
    if name in ("simpo", "orpo"):
        return {"rewards/accuracies": accuracy_slack(args[0], args[1], valid)}
    if name in PAIRED:
        beta = hp["beta"]
        pc, pr, rc, rr = (np.asarray(a, np.float64) for a in args)
        return {"rewards/accuracies": accuracy_slack(beta * (pc - rc), beta * (pr - rr), valid)}
    return {}


def _tolerance(name, ref):
    return ppo_tolerance(ref[1]) if name == "ppo_offline" else dict(rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["kto", "kto_zero", "apo_zero_unpaired", "ppo_offline"])
@pytest.mark.parametrize("all_desirable", [True, False])
@pytest.mark.parametrize("batch", [1, 6])
def test_one_class_empty(name, all_desirable, batch):
    build, hp = CASES[name]
    args = build(np.random.default_rng(batch), batch)
    desirable_index = 3 if name == "ppo_offline" else len(args) - 1
    args[desirable_index] = np.full(batch, all_desirable)
    loss, metrics = _call(name, args, hp, None)
    assert np.isfinite(_scalar(loss))
    for key, value in metrics.items():
        assert np.isfinite(_scalar(value)), f"{name}: metric {key} = {value}"
    empty = "rejected" if all_desirable else "chosen"
    if name != "ppo_offline":
        assert _scalar(metrics[f"rewards/{empty}"]) == 0.0
        assert _scalar(metrics[f"logps/{empty}"]) == 0.0
    assert _scalar(metrics["num_undesirable" if all_desirable else "num_desirable"]) == 0.0
    ref = _reference(name, args, hp, None)
    assert_matches((loss, metrics), ref, fraction_slack=_slack(name, args, hp, None, ref), **_tolerance(name, ref))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("garbage", [np.nan, 1e30, -1e30])
def test_example_mask_ignores_garbage_rows(name, garbage):
    build, hp = CASES[name]
    rng = np.random.default_rng(7)
    batch = 7
    args = build(rng, batch)
    example_mask = np.array([True, False, True, True, False, True, False])
    clean = _call(name, args, hp, example_mask)
    dirty_args = []
    for index, a in enumerate(args):
        a = np.array(a)
        if a.dtype.kind == "f":
            a[~example_mask] = _garbage_for(name, index, garbage)
        dirty_args.append(a)
    dirty = _call(name, dirty_args, hp, example_mask)
    ref = _reference(name, args, hp, example_mask)
    # the reference ignores masked rows by construction, so a mismatch here is a masking bug
    assert_matches(dirty, ref, fraction_slack=_slack(name, args, hp, example_mask, ref), **_tolerance(name, ref))
    np.testing.assert_allclose(_scalar(dirty[0]), _scalar(clean[0]), rtol=1e-6, atol=1e-6)
    for key in clean[1]:
        np.testing.assert_allclose(
            _scalar(dirty[1][key]), _scalar(clean[1][key]), rtol=1e-6, atol=1e-6, err_msg=key
        )


@pytest.mark.parametrize("garbage", [np.nan, 1e30])
def test_orpo_token_counts_masked_rows_ignored(garbage):
    rng = np.random.default_rng(5)
    batch = 6
    pc = rng.uniform(-8.0, -0.01, batch).astype(np.float32)
    pr = rng.uniform(-8.0, -0.01, batch).astype(np.float32)
    counts = rng.integers(1, 50, batch).astype(np.float32)
    example_mask = np.array([True, False, True, False, True, True])
    ref = R.orpo(pc, pr, beta=0.2, chosen_token_counts=counts, example_mask=example_mask)
    pc_dirty, pr_dirty, counts_dirty = pc.copy(), pr.copy(), counts.copy()
    pc_dirty[~example_mask] = garbage
    pr_dirty[~example_mask] = garbage
    counts_dirty[~example_mask] = garbage
    out = L.orpo(pc_dirty, pr_dirty, beta=0.2, chosen_token_counts=counts_dirty, example_mask=example_mask)
    slack = accuracy_slack(pc, pr, example_mask)
    assert_matches(out, ref, fraction_slack={"rewards/accuracies": slack})


@pytest.mark.parametrize("name", sorted(CASES))
def test_all_rows_masked_gives_zero(name):
    build, hp = CASES[name]
    batch = 5
    args = build(np.random.default_rng(3), batch)
    example_mask = np.zeros(batch, bool)
    loss, metrics = _call(name, args, hp, example_mask)
    assert _scalar(loss) == 0.0, f"{name}: loss {loss} on an empty selection"
    for key, value in metrics.items():
        value = _scalar(value)
        assert np.isfinite(value), f"{name}: metric {key} = {value}"
        if key == "bco/running_mean":
            assert value == pytest.approx(hp["running_mean"]), "no valid rows: running mean unchanged"
        elif key == "bco/running_count":
            assert value == pytest.approx(hp["running_count"]), "no valid rows: running count unchanged"
        else:
            assert value == 0.0, f"{name}: metric {key} = {value} on an empty selection"


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("defaults", [True, False])
def test_jit_matches_reference(name, defaults):
    """jit once per loss (hyperparameters bound with functools.partial); also checks the documented
    default hyperparameters when ``defaults`` is set."""
    build, hp = CASES[name]
    if defaults:
        hp = {}
    batch = 5
    rng = np.random.default_rng(11)
    args = build(rng, batch)
    example_mask = np.array([True, True, False, True, True])
    fn = jax.jit(functools.partial(getattr(L, name), **hp))
    out = fn(*args, example_mask=example_mask)
    if name == "ppo_offline" and defaults:
        hp = dict(gamma=0.99, lam=0.95, cliprange=0.5, critic_coef=0.01, kl_coef=0.1)
    ref = _reference(name, args, hp, example_mask)
    beta_hp = hp if hp else {"beta": _default_beta(name)}
    assert_matches(out, ref, fraction_slack=_slack(name, args, beta_hp, example_mask, ref), **_tolerance(name, ref))


def _default_beta(name):
    return {"slic": 1.0, "simpo": 2.0}.get(name, 0.1)
