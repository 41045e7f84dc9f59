"""Unary (binary-feedback) losses: KTO and its reference-point variants, and BCO.

Inputs are per-example summed completion log-probs (float arrays ``[B]``) and a bool
``desirable [B]``. ``example_mask [B]`` marks valid rows (padding rows are ignored in
every mean). The loss is the mean of the per-example losses over valid examples, with
the class weights *not* renormalised (as in the paper's code, HALOs, and TRL).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kto_jax.losses._common import Metrics, f32, masked_mean, unary_metrics, valid_mask


def kto_reference_point(policy_kl_logps, reference_kl_logps, example_mask=None) -> jax.Array:
    """KTO's reference point z0 = stop_gradient(max(0, mean_i(policy_kl_i - reference_kl_i))).

    The KL sequences pair the prompt of example i with the completion of another example
    (mismatched pairs), so the mean log-ratio estimates KL(pi_theta || pi_ref) for the batch.
    The mean is over valid examples of the (micro)batch; no gradient flows through z0.
    """
    policy_kl_logps, reference_kl_logps = f32(policy_kl_logps, reference_kl_logps)
    mask = valid_mask(example_mask, policy_kl_logps)
    kl = masked_mean(policy_kl_logps - reference_kl_logps, mask)
    return jax.lax.stop_gradient(jnp.maximum(kl, 0.0))


def kto_from_reference_point(
    policy_logps,
    reference_logps,
    reference_point,
    desirable,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """KTO's value function around a given reference point z0 (Ethayarajh et al. 2024, eq. 7).

    r_i = policy_i - reference_i
    l_i = desirable_weight   * (1 - sigmoid(beta * (r_i - z0)))   if desirable_i
          undesirable_weight * (1 - sigmoid(beta * (z0 - r_i)))   otherwise
    loss = mean of l_i over valid examples.
    """
    policy_logps, reference_logps, reference_point = f32(policy_logps, reference_logps, reference_point)
    desirable = jnp.asarray(desirable, bool)
    mask = valid_mask(example_mask, policy_logps)
    r = policy_logps - reference_logps
    # 1 - sigmoid(x) == sigmoid(-x), which stays exact for large x.
    desirable_losses = desirable_weight * jax.nn.sigmoid(-beta * (r - reference_point))
    undesirable_losses = undesirable_weight * jax.nn.sigmoid(-beta * (reference_point - r))
    losses = jnp.where(desirable, desirable_losses, undesirable_losses)

    d_mask = mask * desirable
    u_mask = mask * (~desirable)
    rewards = jax.lax.stop_gradient(beta * r)
    chosen, rejected = masked_mean(rewards, d_mask), masked_mean(rewards, u_mask)
    metrics = {
        "kl": jnp.broadcast_to(jax.lax.stop_gradient(reference_point), r.shape).mean(),
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "logps/chosen": masked_mean(jax.lax.stop_gradient(policy_logps), d_mask),
        "logps/rejected": masked_mean(jax.lax.stop_gradient(policy_logps), u_mask),
        "num_desirable": d_mask.sum(),
        "num_undesirable": u_mask.sum(),
    }
    return masked_mean(losses, mask), metrics


def kto(
    policy_logps,
    reference_logps,
    policy_kl_logps,
    reference_kl_logps,
    desirable,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv 2402.01306, eq. 7-8).

    r_i = policy_logps_i - reference_logps_i
    z0  = stop_gradient(max(0, mean_valid(policy_kl_logps - reference_kl_logps)))
    l_i = desirable_weight   * (1 - sigmoid(beta * (r_i - z0)))   if desirable_i
          undesirable_weight * (1 - sigmoid(beta * (z0 - r_i)))   otherwise
    loss = mean_valid(l_i)

    Metrics: ``kl`` (z0), ``rewards/chosen`` = mean beta*r over desirable,
    ``rewards/rejected`` over undesirable, ``rewards/margins`` (their difference),
    ``logps/chosen``, ``logps/rejected``, ``num_desirable``, ``num_undesirable``. An empty
    class gives 0 for its means and count. The paper's setting of the weights: keep
    desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3].
    """
    z0 = kto_reference_point(policy_kl_logps, reference_kl_logps, example_mask)
    return kto_from_reference_point(
        policy_logps,
        reference_logps,
        z0,
        desirable,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        example_mask=example_mask,
    )


def kto_zero(
    policy_logps,
    reference_logps,
    desirable,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """KTO with the reference point fixed at z0 = 0 (HALOs' ``kto-zero`` ablation).

    l_i = desirable_weight * (1 - sigmoid(beta * r_i)) if desirable_i
          else undesirable_weight * (1 - sigmoid(-beta * r_i)) = undesirable_weight * sigmoid(beta * r_i)

    This is also TRL's ``apo_zero_unpaired`` (D'Oosterlinck et al. 2024, APO, arXiv
    2408.06266, unpaired form of eq. 7): 1 - sigmoid(beta*r) for desirable and
    sigmoid(beta*r) for undesirable examples. No KL forward pass is needed.
    """
    return kto_from_reference_point(
        policy_logps,
        reference_logps,
        0.0,
        desirable,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        example_mask=example_mask,
    )


def bco(
    policy_logps,
    reference_logps,
    desirable,
    *,
    beta: float = 0.1,
    running_mean=0.0,
    running_count=0.0,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """Binary Classifier Optimization on binary feedback (Jung et al. 2024, arXiv 2404.04656;
    TRL ``BCOTrainer.bco_loss``, v0.28 trl/experimental/bco/bco_trainer.py, formerly KTOTrainer
    ``loss_type="bco"``), without the underlying-distribution-matching weights.

    rewards = beta * r_i, r_i = policy_logps_i - reference_logps_i
    delta   = running mean of every valid reward seen so far, this batch's included (updated before the
              loss, no gradient): delta = m + (sum_batch(rewards) - n m) / (count + n), n = valid rows
              (TRL v0.28 feeds RunningMoments.update the detached rewards torch.cat((chosen, rejected)),
              so the count grows by n a step; before TRL PR #2867 it was fed the batch mean, + 1 a
              step, as ``bco_pair`` still is)
    l_i = -log sigmoid(beta r_i - delta)      if desirable_i
          -log sigmoid(-(beta r_i - delta))   otherwise
    loss = mean_valid(l_i)

    The running statistics are run state: pass the previous ``bco/running_mean`` and
    ``bco/running_count`` metrics back in at the next step (count 0 starts afresh; TRL's 1e-24 is the
    same). A batch with no valid row leaves them unchanged.

    Not implemented: BCO's underlying distribution matching (UDM, ``match_underlying_distribution``),
    which weighs undesirable examples by a density ratio from a classifier trained separately on
    prompt embeddings; this is BCO with all weights 1.

    Metrics as KTO's (``rewards/*``, ``logps/*``, ``num_desirable``, ``num_undesirable``) plus
    ``bco/running_mean`` (delta) and ``bco/running_count``.
    """
    policy_logps, reference_logps = f32(policy_logps, reference_logps)
    desirable = jnp.asarray(desirable, bool)
    mask = valid_mask(example_mask, policy_logps)
    r = policy_logps - reference_logps
    rewards = beta * r
    running_mean, running_count = f32(running_mean, running_count)
    n = mask.sum()
    batch_sum = jax.lax.stop_gradient(jnp.where(mask > 0, rewards, 0.0).sum())
    total = running_count + n
    delta = running_mean + (batch_sum - n * running_mean) / jnp.maximum(total, 1e-24)
    losses = jnp.where(desirable, -jax.nn.log_sigmoid(rewards - delta), -jax.nn.log_sigmoid(-(rewards - delta)))
    metrics = unary_metrics(beta, r, policy_logps, mask * desirable, mask * (~desirable))
    metrics.update({"bco/running_mean": delta, "bco/running_count": total})
    return masked_mean(losses, mask), metrics
