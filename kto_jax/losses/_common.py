"""Small helpers shared by the loss families: float32 inputs, masked means, reward metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]


def check(condition: bool, message: str) -> None:
    """Raise ValueError(message) unless condition (hyperparameter checks, at trace time). A misuse of the
    loss functions from Python: a config's values are checked first by kto_jax.train.rules (InputError)."""
    if not condition:
        raise ValueError(message)


def f32(*arrays):
    """Cast every argument to float32 (losses are computed in fp32 whatever the inputs)."""
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def valid_mask(example_mask, like: jax.Array) -> jax.Array:
    """The float32 mask of valid examples (all ones when ``example_mask`` is None)."""
    if example_mask is None:
        return jnp.ones(like.shape, jnp.float32)
    return jnp.asarray(example_mask, jnp.float32) * jnp.ones(like.shape, jnp.float32)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """sum(mask * values) / max(sum(mask), 1): 0 for an empty selection, never NaN."""
    values = jnp.where(mask > 0, values, 0.0)
    return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def paired_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, mask) -> Metrics:
    """TRL/HALOs metrics of a paired loss, all means over valid pairs.

    rewards/chosen = mean(chosen_rewards), rewards/rejected = mean(rejected_rewards),
    rewards/margins = mean(chosen - rejected), rewards/accuracies = mean(chosen > rejected),
    logps/chosen, logps/rejected = mean policy log-probs. Rewards carry no gradient.
    """
    chosen_rewards = jax.lax.stop_gradient(chosen_rewards)
    rejected_rewards = jax.lax.stop_gradient(rejected_rewards)
    return {
        "rewards/chosen": masked_mean(chosen_rewards, mask),
        "rewards/rejected": masked_mean(rejected_rewards, mask),
        "rewards/margins": masked_mean(chosen_rewards - rejected_rewards, mask),
        "rewards/accuracies": masked_mean((chosen_rewards > rejected_rewards).astype(jnp.float32), mask),
        "logps/chosen": masked_mean(jax.lax.stop_gradient(chosen_logps), mask),
        "logps/rejected": masked_mean(jax.lax.stop_gradient(rejected_logps), mask),
    }


def unary_metrics(beta, r, policy_logps, d_mask, u_mask) -> Metrics:
    """KTO's metrics of a unary loss (no gradient): class reward/log-prob means and counts."""
    rewards = jax.lax.stop_gradient(beta * r)
    chosen, rejected = masked_mean(rewards, d_mask), masked_mean(rewards, u_mask)
    policy_logps = jax.lax.stop_gradient(policy_logps)
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "logps/chosen": masked_mean(policy_logps, d_mask),
        "logps/rejected": masked_mean(policy_logps, u_mask),
        "num_desirable": d_mask.sum(),
        "num_undesirable": u_mask.sum(),
    }
