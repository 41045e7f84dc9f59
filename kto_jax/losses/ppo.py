"""Offline PPO, the KTO paper's RL baseline (HALOs ``PPOTrainer``, one PPO epoch).

The data is unary feedback on fixed completions; the reference policy is the behaviour
policy that "generated" them. All arrays are per token ``[B, T]`` aligned with the shifted
labels (as returned by :func:`kto_jax.logprobs.token_logps`); ``mask`` marks completion
tokens. The value head lives with the model; this file only sees its per-token outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kto_jax.losses._common import Metrics, check, f32, masked_mean, valid_mask

MAX_LOG_RATIO = 50.0


def last_token_rewards(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Put each sequence's scalar score on its last completion token: ``[B, T]``, 0 elsewhere."""
    length = mask.shape[-1]
    last = length - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=-1)
    onehot = jax.nn.one_hot(last, length, dtype=jnp.float32) * (mask.sum(-1, keepdims=True) > 0)
    return onehot * scores[:, None]


def gae(values: jax.Array, rewards: jax.Array, mask: jax.Array, *, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016) over the whole row, as HALOs does.

    With V and r zeroed outside ``mask`` and V_T = 0:
      delta_t = r_t + gamma V_{t+1} - V_t
      A_t     = delta_t + gamma lam A_{t+1}
      G_t     = sum_{k>t} gamma^(k-t-1) r_k      (discounted *future* reward, the critic target)
    Returns ``(A * mask, G * mask)``.
    """
    values, rewards = values * mask, rewards * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)

    def step(carry, xs):
        advantage, future = carry
        r, v, v_next = xs
        advantage = r + gamma * v_next - v + gamma * lam * advantage
        return (advantage, r + gamma * future), (advantage, future)

    zeros = jnp.zeros(values.shape[:1], jnp.float32)
    xs = (rewards.T[::-1], values.T[::-1], next_values.T[::-1])
    _, (advantages, futures) = jax.lax.scan(step, (zeros, zeros), xs)
    return advantages[::-1].T * mask, futures[::-1].T * mask


def ppo_offline(
    policy_logps,
    reference_logps,
    values,
    desirable,
    mask,
    *,
    gamma: float = 0.99,
    lam: float = 0.95,
    cliprange: float = 0.5,
    critic_coef: float = 0.01,
    kl_coef: float = 0.1,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """Offline PPO loss (Schulman et al. 2017) in the KTO paper's one-step form.

    reward: +1 (desirable) or -1 on the last completion token; A = GAE(stop_grad(V), r)
    normalised: A <- (A - mean_m(A)) / sqrt(var_m(A) + 1e-8)   (masked mean/var over tokens)
    ratio_t   = exp(policy_logps_t - reference_logps_t)  (log-ratio clipped to +-50)
    policy    = mean_m(max(-A ratio, -A clip(ratio, cliprange, 1/cliprange)))
    critic    = 0.5 mean_m((V - G)^2),   G = discounted future reward (see :func:`gae`)
    kl        = mean_m(reference_logps - policy_logps)
    loss      = policy + critic_coef * critic + kl_coef * kl

    Args:
      policy_logps, reference_logps, values: ``[B, T]`` per-token arrays.
      desirable: ``[B]`` bool feedback. mask: ``[B, T]`` completion tokens.
    """
    check(0 < cliprange < 1, f"ppo_offline: cliprange must be in (0, 1); got {cliprange}")
    policy_logps, reference_logps, values = f32(policy_logps, reference_logps, values)
    rows = valid_mask(example_mask, policy_logps[:, 0])
    m = jnp.where(rows[:, None] > 0, jnp.asarray(mask, jnp.float32), 0.0)
    scores = jnp.where(jnp.asarray(desirable, bool), 1.0, -1.0)
    rewards = last_token_rewards(scores, m)

    advantages, future_rewards = gae(jax.lax.stop_gradient(values), rewards, m, gamma=gamma, lam=lam)
    mean = masked_mean(advantages, m)
    var = masked_mean((advantages - mean) ** 2, m)
    advantages = jax.lax.stop_gradient((advantages - mean) * jax.lax.rsqrt(var + 1e-8) * m)

    critic_loss = 0.5 * masked_mean((values - future_rewards) ** 2, m)
    log_ratio = jnp.clip(policy_logps - jax.lax.stop_gradient(reference_logps), -MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, cliprange, 1.0 / cliprange)
    policy_loss = masked_mean(jnp.maximum(unclipped, clipped), m)
    kl_penalty = masked_mean(reference_logps - policy_logps, m)
    loss = policy_loss + critic_coef * critic_loss + kl_coef * kl_penalty
    stop = jax.lax.stop_gradient
    metrics = {
        "loss/policy": stop(policy_loss),
        "loss/critic": stop(critic_loss),
        "kl": stop(kl_penalty),
        "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), m),
        "values/mean": masked_mean(stop(values), m),
        "num_desirable": (rows * (scores > 0)).sum(),
        "num_undesirable": (rows * (scores < 0)).sum(),
    }
    return loss, metrics
