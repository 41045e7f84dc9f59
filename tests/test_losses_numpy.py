"""Property tests: every loss in ``kto_jax.losses`` against the independent float64 numpy references.

The references (tests/numpy_reference.py) are written from the upstream TRL v0.28.0 / HALOs (legacy) code,
not from the JAX implementation.  Inputs are float32 (what the library sees); the reference gets the very
same float32 values, promoted to float64, so the only differences left are float32 rounding inside the
library.

Functions are called un-jitted (hyperparameters are Python floats that the library validates eagerly);
``test_jit_matches_reference`` checks once per loss that ``jax.jit(partial(fn, **hyperparameters))`` agrees.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kto_jax.losses as L
from tests import numpy_reference as R
from tests.numpy_checks import (
    PAIRED,
    SETTINGS,
    SMALL_SETTINGS,
    _valid,
    accuracy_slack,
    assert_close,
    assert_matches,
    batch_sizes,
    betas,
    example_masks,
    f32_arrays,
    paired_inputs,
    unary_inputs,
    weights,
)


def test_property_tests_replay_exactly_in_ci():
    """The property tests' settings take derandomize and database from the loaded profile (conftest.py):
    under CI=true every run draws the same examples (derandomize) and keeps no database, so a failure
    replays exactly; locally they draw random examples and hypothesis' default database keeps failures."""
    in_ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    for s in (SETTINGS, SMALL_SETTINGS):
        assert s.derandomize == settings.default.derandomize == in_ci
        assert (s.database is None) == in_ci


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
