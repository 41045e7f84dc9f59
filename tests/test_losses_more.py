"""BCO (unpaired), AOT (aot, aot_pair, aot_unpaired), f-DPO and sigmoid_norm: hand-derived values, the
float64 numpy references of tests/numpy_reference_more.py (written from TRL's code) under hypothesis,
the reductions the docstrings claim, BCO's running state across steps, and extremes. Gradients against
central differences: tests/test_losses_grad.py's CASES."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kto_jax.losses as L
from kto_jax.logprobs import mean_logps
from tests import numpy_reference_more as M
from tests.numpy_checks import SETTINGS, _valid, accuracy_slack, assert_close, assert_matches, unary_inputs

LN3 = math.log(3.0)


def softplus(x):
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------- hand-derived, tiny inputs


def test_bco_hand_derived():
    # beta 1, rewards [3, 1], desirable [T, F], state mean 0 over 2 rewards:
    # delta = (0 * 2 + 3 + 1) / (2 + 2) = 1, count 4 (each reward counts once, TRL v0.28);
    # l_d = -log sigmoid(3 - 1) = softplus(-2), l_u = -log sigmoid(-(1 - 1)) = log 2.
    policy, reference = jnp.array([3.0, 1.0]), jnp.zeros(2)
    loss, m = L.bco(policy, reference, jnp.array([True, False]), beta=1.0, running_mean=0.0, running_count=2.0)
    np.testing.assert_allclose(loss, (softplus(-2.0) + math.log(2.0)) / 2, rtol=1e-6)
    np.testing.assert_allclose(m["bco/running_mean"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(m["bco/running_count"], 4.0)
    np.testing.assert_allclose(m["rewards/chosen"], 3.0)
    np.testing.assert_allclose(m["rewards/rejected"], 1.0)
    assert m["num_desirable"] == 1 and m["num_undesirable"] == 1
    # a padding row (garbage) changes nothing
    loss2, m2 = L.bco(
        jnp.array([3.0, 1.0, 50.0]),
        jnp.zeros(3),
        jnp.array([True, False, True]),
        beta=1.0,
        running_mean=0.0,
        running_count=2.0,
        example_mask=jnp.array([True, True, False]),
    )
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    np.testing.assert_allclose(m2["bco/running_mean"], 1.0, rtol=1e-6)


def test_aot_hand_derived():
    # beta 1: policy log-ratios pc - pr = [3, -1] sorted [-1, 3]; reference rc - rr = [0, 2] sorted [0, 2];
    # Delta = [-1, 1]: loss = (softplus(1) + softplus(-1)) / 2 (unsorted pairing would give Delta [3, -3]).
    loss, m = L.aot(jnp.array([3.0, -1.0]), jnp.zeros(2), jnp.array([0.0, 2.0]), jnp.zeros(2), beta=1.0)
    np.testing.assert_allclose(loss, (softplus(1.0) + softplus(-1.0)) / 2, rtol=1e-6)
    np.testing.assert_allclose(m["rewards/chosen"], 0.0, atol=1e-7)  # beta mean(pc - rc) = mean(3, -3)
    # label smoothing 0.25: 0.75 * loss + 0.25 * mean(-log sigmoid(-Delta)) = the same by symmetry of [-1, 1]
    args = (jnp.array([3.0, -1.0]), jnp.zeros(2), jnp.array([0.0, 2.0]), jnp.zeros(2))
    loss_s, _ = L.aot(*args, beta=1.0, label_smoothing=0.25)
    np.testing.assert_allclose(loss_s, loss, rtol=1e-6)


def test_aot_pair_hand_derived():
    # beta 1: chosen log-ratios [1, -2] sorted [-2, 1]; rejected [-3, 0] sorted [-3, 0]; Delta = [1, 1]:
    # loss = softplus(-1) (unsorted pairing: Delta [4, -2]). Label smoothing 0.25: 0.75 softplus(-1) + 0.25 softplus(1).
    args = (jnp.array([1.0, -2.0]), jnp.array([-3.0, 0.0]), jnp.zeros(2), jnp.zeros(2))
    np.testing.assert_allclose(L.aot_pair(*args, beta=1.0)[0], softplus(-1.0), rtol=1e-6)
    smoothed = 0.75 * softplus(-1.0) + 0.25 * softplus(1.0)
    np.testing.assert_allclose(L.aot_pair(*args, beta=1.0, label_smoothing=0.25)[0], smoothed, rtol=1e-6)


def test_aot_unpaired_hand_derived_unequal_counts():
    # desirable r = [4, 0, 2] (n_d 3), undesirable r = [1, -1] (n_u 2), one padding row of garbage:
    # m = 3 levels q = [0, 1/2, 1]; Q_d = [0, 2, 4]; Q_u: sorted [-1, 1], h = q -> [-1, 0, 1]
    # Delta = [1, 2, 3]; beta 1: loss = mean(softplus(-1), softplus(-2), softplus(-3)).
    policy = jnp.array([4.0, 1.0, 0.0, 1e30, -1.0, 2.0])
    desirable = jnp.array([True, False, True, True, False, True])
    mask = jnp.array([True, True, True, False, True, True])
    loss, m = L.aot_unpaired(policy, jnp.zeros(6), desirable, beta=1.0, example_mask=mask)
    np.testing.assert_allclose(loss, (softplus(-1.0) + softplus(-2.0) + softplus(-3.0)) / 3, rtol=1e-6)
    assert m["num_desirable"] == 3 and m["num_undesirable"] == 2
    np.testing.assert_allclose(m["rewards/chosen"], 2.0)
    np.testing.assert_allclose(m["rewards/rejected"], 0.0)


def test_fdpo_hand_derived():
    # rw = ln 3, rl = 0, beta 1:
    # reverse_kl Delta = ln 3                              -> -log sigmoid(ln 3) = log(4/3)
    # forward_kl Delta = e^0 - e^-ln3 = 2/3                -> softplus(-2/3)
    # js         Delta = log(3/4) - log(1/2) = log(3/2)    -> log(1 + 2/3) = log(5/3)
    # alpha 1/2  Delta = (e^0 - 3^-1/2) / (1/2)            -> softplus(-2 (1 - 3^-1/2))
    args = (jnp.array([LN3]), jnp.zeros(1), jnp.zeros(1), jnp.zeros(1))
    expected = {
        "reverse_kl": math.log(4 / 3),
        "forward_kl": softplus(-2 / 3),
        "js": math.log(5 / 3),
        "alpha": softplus(-2 * (1 - 3**-0.5)),
    }
    for divergence, value in expected.items():
        loss, _ = L.fdpo(*args, beta=1.0, divergence=divergence, alpha=0.5)
        np.testing.assert_allclose(loss, value, rtol=1e-6, err_msg=divergence)


def test_sigmoid_norm_hand_derived_on_summed_log_probs():
    # chosen: pc = -6, rc = -9 over 3 tokens -> rw / 3 = 1; rejected: pr = -8, rr = -4 over 2 tokens -> rl / 2 = -2
    # Delta = 3, beta 1: softplus(-3). The engine passes mean_logps(sum, count) (the registry's length_normalized).
    sums = [jnp.array([v]) for v in (-6.0, -8.0, -9.0, -4.0)]
    counts = [jnp.array([3]), jnp.array([2]), jnp.array([3]), jnp.array([2])]
    loss, _ = L.sigmoid_norm(*(mean_logps(s, c) for s, c in zip(sums, counts)), beta=1.0)
    np.testing.assert_allclose(loss, softplus(-3.0), rtol=1e-6)
    np.testing.assert_allclose(M.sigmoid_norm_from_sums(*sums, counts[0], counts[1], beta=1.0), softplus(-3.0))


# ---------------------------------------------------------------- against the numpy references


@SETTINGS
@given(
    inputs=unary_inputs(with_kl=False),
    beta=st.floats(0.01, 1.0),
    running_mean=st.floats(-5.0, 5.0),
    running_count=st.one_of(st.just(0.0), st.floats(1.0, 1000.0)),
)
def test_bco_matches_trl_reference(inputs, beta, running_mean, running_count):
    _, (policy, reference), desirable, mask = inputs
    kwargs = dict(beta=beta, running_mean=running_mean, running_count=running_count, example_mask=mask)
    assert_matches(L.bco(policy, reference, desirable, **kwargs), M.bco(policy, reference, desirable, **kwargs))


@SETTINGS
@given(inputs=unary_inputs(with_kl=False), beta=st.floats(0.01, 1.0), label_smoothing=st.floats(0.0, 0.49))
def test_aot_unpaired_matches_np_quantile_reference(inputs, beta, label_smoothing):
    _, (policy, reference), desirable, mask = inputs
    kwargs = dict(beta=beta, label_smoothing=label_smoothing, example_mask=mask)
    out = L.aot_unpaired(policy, reference, desirable, **kwargs)
    assert_matches(out, M.aot_unpaired(policy, reference, desirable, **kwargs), context=str(kwargs))


@st.composite
def small_ratio_pairs(draw):
    """Paired log-probs with log-ratios in [-3, 3] (f-DPO's exponentials stay well conditioned in float32)."""
    batch = draw(st.integers(1, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    pc, pr = rng.uniform(-40, -5, batch), rng.uniform(-40, -5, batch)
    rc, rr = pc - rng.uniform(-3, 3, batch), pr - rng.uniform(-3, 3, batch)
    mask = draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=batch, max_size=batch)))
    return [a.astype(np.float32) for a in (pc, pr, rc, rr)], None if mask is None else np.array(mask)


@SETTINGS
@given(
    inputs=small_ratio_pairs(),
    beta=st.floats(0.01, 1.0),
    label_smoothing=st.floats(0.0, 0.49),
    divergence=st.sampled_from(["reverse_kl", "forward_kl", "js", "alpha"]),
    alpha=st.floats(0.05, 0.95),
)
def test_fdpo_matches_trl_reference(inputs, beta, label_smoothing, divergence, alpha):
    (pc, pr, rc, rr), mask = inputs
    kwargs = dict(beta=beta, label_smoothing=label_smoothing, divergence=divergence, alpha=alpha, example_mask=mask)
    rewards = beta * (pc.astype(np.float64) - rc), beta * (pr.astype(np.float64) - rr)
    slack = accuracy_slack(*rewards, _valid(len(pc), mask))
    out = L.fdpo(pc, pr, rc, rr, **kwargs)
    assert_matches(out, M.fdpo(pc, pr, rc, rr, **kwargs), fraction_slack={"rewards/accuracies": slack})


@SETTINGS
@given(inputs=small_ratio_pairs(), beta=st.floats(0.01, 1.0), data=st.data())
def test_sigmoid_norm_matches_trl_formula_on_sums_and_counts(inputs, beta, data):
    (pc, pr, rc, rr), _ = inputs
    batch = len(pc)
    chosen_counts = np.array(data.draw(st.lists(st.integers(0, 40), min_size=batch, max_size=batch)))
    rejected_counts = np.array(data.draw(st.lists(st.integers(0, 40), min_size=batch, max_size=batch)))
    counts = (chosen_counts, rejected_counts, chosen_counts, rejected_counts)
    normalised = [mean_logps(jnp.asarray(s), jnp.asarray(c)) for s, c in zip((pc, pr, rc, rr), counts)]
    loss, _ = L.sigmoid_norm(*normalised, beta=beta)
    assert_close(loss, M.sigmoid_norm_from_sums(pc, pr, rc, rr, chosen_counts, rejected_counts, beta=beta), "loss")


# ---------------------------------------------------------------- reductions the docstrings claim


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_fdpo_reverse_kl_is_dpo_exactly(label_smoothing):
    # chosen log-probs near -1000, rejected near -1: (pc - rc) - (pr - rr) and (pc - pr) - (rc - rr) round
    # differently in float32, so only the very same computation as dpo's is bit-for-bit equal to it
    rng = np.random.default_rng(0)
    pc = rng.uniform(-1500, -1000, 6).astype(np.float32)
    pr = rng.uniform(-3, -0.1, 6).astype(np.float32)
    rc, rr = (pc + rng.uniform(-3, 3, 6)).astype(np.float32), (pr + rng.uniform(-3, 3, 6)).astype(np.float32)
    args = tuple(jnp.asarray(a) for a in (pc, pr, rc, rr))
    assert np.any((pc - rc) - (pr - rr) != (pc - pr) - (rc - rr))
    mask = jnp.array([True, True, False, True, True, False])
    kw = dict(beta=0.3, label_smoothing=label_smoothing, example_mask=mask)
    out, ref = L.fdpo(*args, divergence="reverse_kl", **kw), L.dpo(*args, **kw)
    assert float(out[0]) == float(ref[0])
    assert all(float(out[1][k]) == float(ref[1][k]) for k in ref[1])
    g = jax.grad(lambda *a: L.fdpo(*a, divergence="reverse_kl", **kw)[0], argnums=(0, 1, 2, 3))(*args)
    h = jax.grad(lambda *a: L.dpo(*a, **kw)[0], argnums=(0, 1, 2, 3))(*args)
    assert all(np.array_equal(a, b) for a, b in zip(g, h))
    # and the other divergences are not DPO
    assert abs(float(L.fdpo(*args, divergence="js", **kw)[0]) - float(ref[0])) > 1e-3


def test_aot_unpaired_with_equal_counts_is_the_sorted_pairing():
    """n_d = n_u = n, no padding: the paper's/TRL's pairing of the k-th smallest desirable reward with the
    k-th smallest undesirable one, i.e. aot_pair on the two classes as chosen and rejected."""
    rng = np.random.default_rng(1)
    n = 5
    pc, pr, rc, rr = (rng.uniform(-30, -1, n).astype(np.float32) for _ in range(4))
    policy, reference = np.concatenate([pc, pr]), np.concatenate([rc, rr])
    desirable = np.arange(2 * n) < n
    perm = rng.permutation(2 * n)  # the row order does not matter
    loss, _ = L.aot_unpaired(policy[perm], reference[perm], desirable[perm], beta=0.4, label_smoothing=0.1)
    pair_loss, _ = L.aot_pair(pc, pr, rc, rr, beta=0.4, label_smoothing=0.1)
    delta = np.sort(pc.astype(np.float64) - rc) - np.sort(pr.astype(np.float64) - rr)
    by_hand = np.mean(0.9 * np.logaddexp(0, -0.4 * delta) + 0.1 * np.logaddexp(0, 0.4 * delta))
    np.testing.assert_allclose(loss, pair_loss, rtol=1e-6)
    np.testing.assert_allclose(loss, by_hand, rtol=1e-5)


@pytest.mark.parametrize("all_desirable", [True, False])
def test_aot_unpaired_empty_class_gives_zero_loss_and_finite_zero_gradients(all_desirable):
    policy, reference = jnp.array([-1.0, -2.0, -3.0]), jnp.array([-2.0, -2.5, -1.0])
    desirable = jnp.full(3, all_desirable)
    loss, _ = L.aot_unpaired(policy, reference, desirable)
    grad = jax.grad(lambda p: L.aot_unpaired(p, reference, desirable)[0])(policy)
    assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)


def test_aot_sorts_only_valid_rows_under_jit():
    rng = np.random.default_rng(2)
    args = [rng.uniform(-30, -1, 7).astype(np.float32) for _ in range(4)]
    mask = np.array([True, False, True, True, False, True, True])
    for name in ("aot", "aot_pair"):
        fn = jax.jit(getattr(L, name))
        dirty = [np.where(mask, a, np.float32(-1e30)) for a in args]
        out = fn(*dirty, example_mask=mask)
        assert_matches(out, getattr(M, name)(*args, example_mask=mask), context=name)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "js", "alpha"])
def test_fdpo_is_finite_at_log_ratios_of_1e4(divergence):
    x = jnp.array([-1e4, 0.0, -1e4, -1e-6])
    args = (x, x[::-1], x[::-1], x)  # rw = -rl = +-1e4
    loss, metrics = L.fdpo(*args, divergence=divergence, alpha=0.01)
    grads = jax.grad(lambda *a: L.fdpo(*a, divergence=divergence, alpha=0.01)[0], argnums=(0, 1, 2, 3))(*args)
    assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)
    assert all(np.isfinite(v) for v in metrics.values())
    ref = M.fdpo(*(np.asarray(a) for a in args), divergence=divergence, alpha=0.01)
    assert_close(loss, ref[0], "loss")


# ---------------------------------------------------------------- BCO's running state


def bco_batches():
    rng = np.random.default_rng(3)
    out = []
    for batch, masked in ((4, 0), (6, 2), (3, 1)):
        policy, reference = rng.uniform(-20, -1, batch), rng.uniform(-20, -1, batch)
        desirable = rng.random(batch) < 0.5
        mask = np.arange(batch) < batch - masked
        out.append(tuple(a.astype(np.float32) for a in (policy, reference)) + (desirable, mask))
    return out


def test_bco_running_mean_is_the_mean_of_every_valid_reward_so_far():
    """Update rule by hand: after each step delta is the plain mean of all valid rewards seen (each
    reward counting once) and the count their number; the loss uses this step's updated delta."""
    state, seen = dict(running_mean=0.0, running_count=0.0), []
    for policy, reference, desirable, mask in bco_batches():
        loss, m = L.bco(policy, reference, desirable, beta=0.5, **state, example_mask=mask)
        rewards = 0.5 * (policy.astype(np.float64) - reference)
        seen.extend(rewards[mask])
        delta = np.mean(seen)
        np.testing.assert_allclose(m["bco/running_mean"], delta, rtol=1e-5, atol=1e-6)
        assert float(m["bco/running_count"]) == len(seen)
        z = rewards[mask] - delta
        by_hand = np.where(desirable[mask], np.logaddexp(0, -z), np.logaddexp(0, z)).mean()
        np.testing.assert_allclose(loss, by_hand, rtol=1e-5)
        state = dict(running_mean=m["bco/running_mean"], running_count=m["bco/running_count"])


def test_bco_resumed_from_saved_state_equals_continuous():
    batches = bco_batches()

    def run(batches, state):
        outs = []
        for policy, reference, desirable, mask in batches:
            loss, m = L.bco(policy, reference, desirable, **state, example_mask=mask)
            outs.append(float(loss))
            state = dict(running_mean=m["bco/running_mean"], running_count=m["bco/running_count"])
        return outs, state

    continuous, final = run(batches, dict(running_mean=0.0, running_count=0.0))
    first, saved = run(batches[:2], dict(running_mean=0.0, running_count=0.0))
    saved = json.loads(json.dumps({k: float(v) for k, v in saved.items()}))  # as a checkpoint stores it
    resumed, final2 = run(batches[2:], saved)
    assert first + resumed == continuous
    assert float(final2["running_mean"]) == float(final["running_mean"])
    # a fresh state at step 3 gives another loss: the state matters
    fresh, _ = run(batches[2:], dict(running_mean=0.0, running_count=0.0))
    assert abs(fresh[0] - continuous[2]) > 1e-4


@pytest.mark.parametrize("field, bad", [("divergence", "total_variation"), ("alpha", 1.0), ("alpha", 0.0)])
def test_config_rules_reject_bad_fdpo_hyperparameters(field, bad):
    import ml_collections

    from kto_jax.config import loss_config
    from kto_jax.errors import InputError
    from kto_jax.train import rules

    config = ml_collections.ConfigDict({"loss": loss_config("fdpo").to_dict()})
    rules.check_values(config)  # the defaults pass
    config.loss[field] = bad
    with pytest.raises(InputError, match=rf"config\.loss\.{field}="):
        rules.check_values(config)
