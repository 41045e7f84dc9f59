"""Property tests against the numpy references, continued: offline PPO and the checks every loss shares
(empty classes, masked garbage rows, all-masked batches, jit), see tests/test_losses_numpy.py."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kto_jax.losses as L
from tests import numpy_reference as R
from tests import numpy_reference_ppo as P
from tests.numpy_checks import (
    ATOL,
    PAIRED,
    RTOL,
    SMALL_SETTINGS,
    _scalar,
    _valid,
    accuracy_slack,
    assert_close,
    assert_matches,
    batch_sizes,
)

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
    loss, metrics = P.ppo_offline(
        policy, reference, values, desirable, mask, example_mask=example_mask, return_details=True, **hp
    )
    valid = _valid(policy.shape[0], example_mask)
    masks = mask[valid].astype(np.float64)
    rewards = P.ppo_rewards(desirable[valid], masks)
    raw, _, _, _ = P.compute_advantages(
        values[valid].astype(np.float64), rewards, masks, gamma=hp["gamma"], lam=hp["lam"]
    )
    std = np.sqrt(P.masked_var(raw, masks) + 1e-8)
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
    rewards = P.ppo_rewards(desirable, mask.astype(np.float64)).astype(np.float32)
    advantages, future = L.gae(values, rewards, mask, gamma=gamma, lam=lam)
    ref_adv, _, _, ref_future = P.compute_advantages(
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
    ref_loss, ref_metrics = P.ppo_offline(
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
        "bco": (unary, dict(beta=0.3, running_mean=0.5, running_count=10.0)),
        "aot_unpaired": (unary, dict(beta=0.3, label_smoothing=0.1)),
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
        aot=dict(beta=0.1, label_smoothing=0.1),
        aot_pair=dict(beta=0.1, label_smoothing=0.1),
        fdpo=dict(beta=0.1, label_smoothing=0.1, divergence="js", alpha=0.5),
        sigmoid_norm=dict(beta=0.1),
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


@pytest.mark.parametrize("name", ["kto", "kto_zero", "apo_zero_unpaired", "bco", "aot_unpaired", "ppo_offline"])
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
        np.testing.assert_allclose(_scalar(dirty[1][key]), _scalar(clean[1][key]), rtol=1e-6, atol=1e-6, err_msg=key)


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
