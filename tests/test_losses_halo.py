"""KTO and DPO are HALOs (Ethayarajh et al. 2024, def. 3.4 and prop. 3.5): equal value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kto_jax import losses


def unary_inputs(seed, batch=7):
    rng = np.random.default_rng(seed)
    f = lambda: jnp.asarray(rng.uniform(-30, 0, batch), jnp.float32)  # noqa: E731
    return f(), f(), f() + 5.0, f(), jnp.asarray(rng.random(batch) < 0.4)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)])
def test_kto_is_the_sigmoid_halo_around_the_kl_reference_point(seed, weights):
    args = unary_inputs(seed)
    hp = dict(beta=0.3, desirable_weight=weights[0], undesirable_weight=weights[1])

    def kto(*a):
        return losses.kto(*a, **hp)[0]

    def halo(*a):
        return losses.halo_unary(*a, value="sigmoid", reference_point="kl", **hp)[0]

    np.testing.assert_allclose(halo(*args), kto(*args), rtol=1e-6)
    for g_kto, g_halo in zip(jax.grad(kto, (0, 1, 2, 3))(*args), jax.grad(halo, (0, 1, 2, 3))(*args)):
        np.testing.assert_allclose(g_halo, g_kto, rtol=1e-5, atol=1e-8)


def test_kto_zero_is_the_sigmoid_halo_around_zero():
    p, r, pkl, rkl, d = unary_inputs(4)
    expected = losses.kto_zero(p, r, d, beta=0.5)[0]
    got = losses.halo_unary(p, r, pkl, rkl, d, beta=0.5, reference_point="zero")[0]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_dpo_is_the_log_sigmoid_halo_with_the_rejected_reward_as_reference_point(seed):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = (jnp.asarray(rng.uniform(-40, 0, 5), jnp.float32) for _ in range(4))
    beta = 0.2

    def dpo(pc, pr, rc, rr):
        return losses.dpo(pc, pr, rc, rr, beta=beta)[0]

    def halo(pc, pr, rc, rr):
        # z = E_Q[r(x, y')] with Q all on the rejected completion; a = +1, c = 0, v = log sigmoid.
        return losses.halo(pc, rc, pr - rr, 1.0, beta=beta, value="log_sigmoid", offset=0.0)[0]

    np.testing.assert_allclose(halo(pc, pr, rc, rr), dpo(pc, pr, rc, rr), rtol=1e-6)
    for g_dpo, g_halo in zip(jax.grad(dpo, (0, 1, 2, 3))(pc, pr, rc, rr), jax.grad(halo, (0, 1, 2, 3))(pc, pr, rc, rr)):
        np.testing.assert_allclose(g_halo, g_dpo, rtol=1e-5, atol=1e-8)


def test_value_functions_are_non_decreasing_and_concave_on_positive_reals():
    z = jnp.linspace(-20, 20, 2001)
    for name, (v, _) in losses.VALUE_FUNCTIONS.items():
        values = np.asarray(v(z), np.float64)
        assert np.all(np.diff(values) >= -1e-7), name
        positive = values[z > 0]
        assert np.all(np.diff(positive, 2) <= 1e-5), name  # float32 rounding
