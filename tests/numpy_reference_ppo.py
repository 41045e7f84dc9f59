"""Independent float64 numpy reference of offline PPO (HALOs ``legacy`` ``PPOTrainer.compute_advantages`` /
``loss``, ``utils.masked_mean`` / ``masked_var``); the other losses' references are in tests/numpy_reference.py."""

from __future__ import annotations

import numpy as np

from tests.numpy_reference import _f64, _select

# ----------------------------------------------------------------------------------------------------
# offline PPO (HALOs PPOTrainer, ppo_epochs = 1, old values = current values)
# ----------------------------------------------------------------------------------------------------


def masked_mean(values, mask):
    """HALOs ``utils.masked_mean`` (0 for an empty mask instead of nan)."""
    total = float(np.sum(mask))
    if total == 0:
        return 0.0
    return float(np.sum(values * mask) / total)


def masked_var(values, mask):
    """HALOs ``utils.masked_var`` (biased; the ``unbiased`` flag is ignored upstream too)."""
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask)


def ppo_rewards(desirable, masks):
    """+1 / -1 on the last token of each row whose mask is 1; rows without a token get nothing."""
    rewards = np.zeros_like(masks, dtype=np.float64)
    for row in range(masks.shape[0]):
        nonzero = np.nonzero(masks[row])[0]
        if len(nonzero) == 0:
            continue
        rewards[row, nonzero[-1]] += 1.0 if desirable[row] else -1.0
    return rewards * masks


def compute_advantages(values, rewards, masks, *, gamma, lam):
    """HALOs ``PPOTrainer.compute_advantages`` loop.

    Returns (raw advantages * masks, normalized advantages, returns, discounted_future_rewards).
    """
    values = values * masks
    rewards = rewards * masks
    batch_size, seq_len = rewards.shape
    gae = np.zeros(batch_size)
    advantages_reversed = []
    discounted_future_reward = np.zeros(batch_size)
    discounted_future_rewards_reversed = []
    for t in reversed(range(seq_len)):
        next_value = values[:, t + 1] if t < seq_len - 1 else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        gae = delta + gamma * lam * gae
        advantages_reversed.append(gae)
        discounted_future_rewards_reversed.append(discounted_future_reward)
        discounted_future_reward = rewards[:, t] + gamma * discounted_future_reward

    advantages = np.stack(advantages_reversed[::-1], axis=1) * masks
    returns = advantages + values
    discounted_future_rewards = np.stack(discounted_future_rewards_reversed[::-1], axis=1) * masks

    mean_adv = masked_mean(advantages, masks)
    var_adv = masked_var(advantages, masks)
    normalized = (advantages - mean_adv) / np.sqrt(var_adv + 1e-8)
    normalized = normalized * masks
    return advantages, normalized, returns, discounted_future_rewards


def ppo_offline(
    policy_logps,
    reference_logps,
    values,
    desirable,
    mask,
    *,
    gamma=0.99,
    lam=0.95,
    cliprange=0.5,
    critic_coef=0.01,
    kl_coef=0.1,
    example_mask=None,
    return_details=False,
):
    policy, reference, values, desirable, masks = _select(
        example_mask, policy_logps, reference_logps, values, desirable, mask
    )
    policy, reference, values = _f64(policy), _f64(reference), _f64(values)
    masks = _f64(masks)
    desirable = desirable.astype(bool)

    rewards = ppo_rewards(desirable, masks)
    _, advantages, _, discounted_future_rewards = compute_advantages(values, rewards, masks, gamma=gamma, lam=lam)

    critic_loss = 0.5 * masked_mean((values - discounted_future_rewards) ** 2, masks)

    ratio = np.exp(policy - reference)
    policy_losses = -advantages * ratio
    policy_losses_clipped = -advantages * np.clip(ratio, cliprange, 1 / cliprange)
    policy_loss = masked_mean(np.maximum(policy_losses, policy_losses_clipped), masks)

    kl_penalty = masked_mean(reference - policy, masks)
    loss = policy_loss + critic_coef * critic_loss + kl_coef * kl_penalty

    metrics = {
        "loss/policy": policy_loss,
        "loss/critic": critic_loss,
        "kl": kl_penalty,
        "clipfrac": masked_mean((policy_losses_clipped > policy_losses).astype(np.float64), masks),
        "num_desirable": float(np.sum(desirable)),
        "num_undesirable": float(np.sum(~desirable)),
    }
    if return_details:
        # |clipped - unclipped| per valid token: used by the tests to tolerate near-ties in clipfrac
        metrics["_clip_gap"] = np.abs(policy_losses_clipped - policy_losses)[masks > 0]
        metrics["_num_tokens"] = float(np.sum(masks))
    return loss, metrics
