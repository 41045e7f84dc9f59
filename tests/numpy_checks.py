"""Shared pieces of the numpy-reference loss tests: tolerances, hypothesis settings and input strategies."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests import numpy_reference as R
from tests import numpy_reference_ppo as P

RTOL = 2e-5
ATOL = 2e-5

# Neither sets derandomize or database: both come from the profile conftest.py loads (CI=true:
# derandomized, no database, so a failure replays exactly; locally: random examples, failures kept in
# hypothesis' default database under .hypothesis/ and replayed first on the next run).
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SMALL_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ----------------------------------------------------------------------------------------------------
# the numpy reference of every registered loss
# ----------------------------------------------------------------------------------------------------

# registry name -> numpy reference, called with the same positional inputs and hyperparameters
REFERENCES = {
    "kto": R.kto,
    "kto_zero": R.kto_zero,
    "apo_zero_unpaired": R.apo_zero_unpaired,
    "halo": R.halo_unary,
    "ppo_offline": P.ppo_offline,
    "cdpo": R.dpo,  # dpo with label smoothing (0.2 by default)
    **{
        name: getattr(R, name)
        for name in (
            "dpo",
            "ipo",
            "hinge",
            "robust",
            "exo_pair",
            "bco_pair",
            "sppo_hard",
            "nca_pair",
            "apo_zero",
            "apo_down",
            "discopop",
            "bco",
            "aot",
            "aot_pair",
            "aot_unpaired",
            "fdpo",
            "sigmoid_norm",
            "slic",
            "simpo",
            "orpo",
            "sft",
        )
    },
    "csft": R.sft,  # SFT on completions with control tokens: the same loss
}


def pair_rewards(name, args, hp):
    """Per-pair (chosen, rejected) rewards in float64 as ``rewards/accuracies`` compares them, for the
    near-tie slack of :func:`accuracy_slack`; None for losses without that metric."""
    f64 = [np.asarray(a, np.float64) for a in args]
    if name == "slic":
        return f64[0], f64[1]
    if name in ("simpo", "orpo"):
        return hp["beta"] * f64[0], hp["beta"] * f64[1]
    if name in PAIRED or name == "cdpo":
        pc, pr, rc, rr = f64
        return hp["beta"] * (pc - rc), hp["beta"] * (pr - rr)
    return None


def assert_matches_reference(name, out, args, hp, example_mask=None, **tolerance):
    """``out`` (the library's (loss, metrics) for registry loss ``name`` on positional ``args``) equals
    the numpy reference on the same inputs, up to float32 rounding and near-tie accuracies."""
    ref = REFERENCES[name](*args, **hp, example_mask=example_mask)
    slack = {}
    rewards = pair_rewards(name, args, hp)
    if rewards is not None:
        slack["rewards/accuracies"] = accuracy_slack(*rewards, _valid(len(args[0]), example_mask))
    assert_matches(out, ref, fraction_slack=slack, context=f"{name} {hp}", **tolerance)


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
    near = np.abs(chosen_rewards - rejected_rewards) <= 1e-4 * (1 + np.abs(chosen_rewards) + np.abs(rejected_rewards))
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


# hyperparameter strategies of the paired losses (TRL v0.28 dpo_loss family)
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
    "aot": dict(beta=st.floats(0.01, 1.0), label_smoothing=st.floats(0.0, 0.49)),
    "aot_pair": dict(beta=st.floats(0.01, 1.0), label_smoothing=st.floats(0.0, 0.49)),
    "sigmoid_norm": dict(beta=st.floats(0.01, 1.0)),
    # fdpo's forward_kl and alpha divergences exponentiate log-ratios: tests/test_losses_more.py draws
    # them on small log-ratios; on these wide ones (|r| <= 60) only the log-domain divergences
    "fdpo": dict(
        beta=st.floats(0.01, 1.0),
        label_smoothing=st.floats(0.0, 0.49),
        divergence=st.sampled_from(["reverse_kl", "js"]),
    ),
}
