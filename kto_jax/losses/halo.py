"""The general human-aware loss (HALO) of Ethayarajh et al. 2024 (arXiv 2402.01306, def. 3.4).

A HALO is  f(pi_theta, pi_ref) = E_{x,y}[a_{x,y} v(r_theta(x,y) - E_Q[r_theta(x,y')])] + C,
with implied reward r_theta = log pi_theta(y|x) - log pi_ref(y|x), a reference point
E_Q[r_theta(x, y')], a value function v (non-decreasing, concave on (0, inf)) and a sign
a_{x,y} in {+1, -1}. As a loss to minimise, per example:

    l_i = w_i * (c_i - a_i * v(beta * (r_i - z_i)))

KTO is v = sigmoid, z = the KL estimate z0, a = +1 / c = 1 for desirable and a = -1 / c = 0
for undesirable examples, w = the class weights. DPO is v = log sigmoid, z = the rejected
completion's reward, a = +1, c = 0, over chosen completions. A new HALO is a new choice of
v, z, a, w: the ``halo`` registry entry makes them config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kto_jax.losses._common import Metrics, check, f32, masked_mean, valid_mask
from kto_jax.losses.unary import kto_reference_point

# name -> (v, sup v): the offset c of a desirable example is sup v, so its loss is >= 0.
VALUE_FUNCTIONS = {
    "sigmoid": (jax.nn.sigmoid, 1.0),
    "log_sigmoid": (jax.nn.log_sigmoid, 0.0),
    "linear": (lambda z: z, 0.0),
}


def value_function(name: str):
    """The value function v registered under ``name``."""
    check(name in VALUE_FUNCTIONS, f"unknown HALO value function {name!r}; known: {sorted(VALUE_FUNCTIONS)}")
    return VALUE_FUNCTIONS[name][0]


def halo(
    policy_logps,
    reference_logps,
    reference_point,
    sign,
    *,
    beta: float = 0.1,
    value: str = "sigmoid",
    weight=1.0,
    offset=0.0,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """General HALO: loss = mean_valid(w_i * (c_i - a_i * v(beta * (r_i - z_i)))).

    Args:
      policy_logps, reference_logps: ``[B]`` summed log-probs; r = policy - reference.
      reference_point: z, in log-ratio units (broadcast to ``[B]``); gradients flow through
        it unless the caller stops them (KTO does, DPO does not).
      sign: a in {+1, -1}, ``[B]`` or scalar. weight: w. offset: c.
      value: a name in ``VALUE_FUNCTIONS``.
    """
    v = value_function(value)
    policy_logps, reference_logps, reference_point, sign, weight, offset = f32(
        policy_logps, reference_logps, reference_point, sign, weight, offset
    )
    mask = valid_mask(example_mask, policy_logps)
    r = policy_logps - reference_logps
    losses = weight * (offset - sign * v(beta * (r - reference_point)))
    rewards = jax.lax.stop_gradient(beta * r)
    metrics = {
        "rewards/mean": masked_mean(rewards, mask),
        "reference_point": masked_mean(jax.lax.stop_gradient(reference_point) * jnp.ones_like(r), mask),
    }
    return masked_mean(losses, mask), metrics


def halo_unary(
    policy_logps,
    reference_logps,
    policy_kl_logps,
    reference_kl_logps,
    desirable,
    *,
    beta: float = 0.1,
    value: str = "sigmoid",
    reference_point: str = "kl",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """A configurable HALO on unary feedback (the ``halo`` registry entry).

    a = +1, c = sup v, w = desirable_weight for desirable examples; a = -1, c = 0,
    w = undesirable_weight for undesirable ones; z = KTO's z0 (``reference_point="kl"``)
    or 0 (``"zero"``). value="sigmoid" with "kl" is exactly :func:`kto`; with "zero" it
    is :func:`kto_zero`.
    """
    check(reference_point in ("kl", "zero"), f"halo: reference_point must be 'kl' or 'zero'; got {reference_point!r}")
    desirable = jnp.asarray(desirable, bool)
    z = 0.0
    if reference_point == "kl":
        z = kto_reference_point(policy_kl_logps, reference_kl_logps, example_mask)
    _, sup = VALUE_FUNCTIONS[value] if value in VALUE_FUNCTIONS else (None, 0.0)
    loss, metrics = halo(
        policy_logps,
        reference_logps,
        z,
        jnp.where(desirable, 1.0, -1.0),
        beta=beta,
        value=value,
        weight=jnp.where(desirable, desirable_weight, undesirable_weight),
        offset=jnp.where(desirable, sup, 0.0),
        example_mask=example_mask,
    )
    mask = valid_mask(example_mask, jnp.asarray(policy_logps, jnp.float32))
    metrics["num_desirable"] = (mask * desirable).sum()
    metrics["num_undesirable"] = (mask * ~desirable).sum()
    return loss, metrics
