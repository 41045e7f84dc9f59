"""Paired-preference losses with a reference model: DPO and TRL's ``loss_type`` family.

Every function takes per-pair log-probs ``[B]`` (policy/reference x chosen/rejected),
returns ``(loss, metrics)`` with loss = mean over valid pairs, and reports the same
metrics (``rewards/chosen`` = mean beta*(pc - rc), ``rewards/rejected`` = mean
beta*(pr - rr), ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``,
``logps/rejected``). Notation: pc, pr, rc, rr = policy chosen/rejected, reference
chosen/rejected; rw = pc - rc, rl = pr - rr; d = rw - rl.
Formulas follow TRL's ``DPOTrainer.dpo_loss`` (<= v0.28) term by term.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kto_jax.losses._common import Metrics, check, f32, masked_mean, paired_metrics, valid_mask

log_sigmoid = jax.nn.log_sigmoid
sigmoid = jax.nn.sigmoid


def _paired(per_pair_loss, pc, pr, rc, rr, beta, example_mask, extra=None):
    """Mean per-pair loss over valid pairs, plus the shared reward metrics."""
    mask = valid_mask(example_mask, pc)
    metrics = paired_metrics(beta * (pc - rc), beta * (pr - rr), pc, pr, mask)
    metrics.update(extra or {})
    return masked_mean(per_pair_loss, mask), metrics


def dpo(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290, eq. 7).

    d = (pc - pr) - (rc - rr)
    loss = mean(-(1 - eps) * log sigmoid(beta d) - eps * log sigmoid(-beta d)),  eps = label_smoothing

    eps > 0 is conservative DPO (cDPO, Mitchell 2023), which assumes labels flipped with
    probability eps.
    """
    pc, pr, rc, rr = f32(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    z = beta * ((pc - pr) - (rc - rr))
    losses = -(1.0 - label_smoothing) * log_sigmoid(z) - label_smoothing * log_sigmoid(-z)
    return _paired(losses, pc, pr, rc, rr, beta, example_mask)


def cdpo(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.2,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """Conservative DPO (Mitchell 2023): :func:`dpo` with ``label_smoothing`` (the assumed
    probability of a flipped label), 0.2 by default as HALOs' ``cdpo`` (config/loss/cdpo.yaml
    ``epsilon: 0.2``, ``CDPOTrainer``: ``(1 - eps) * forward + eps * reverse``, the same loss).
    """
    return dpo(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        beta=beta,
        label_smoothing=label_smoothing,
        example_mask=example_mask,
    )


def ipo(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float = 0.1,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """Identity Preference Optimization (Azar et al. 2023, arXiv 2310.12036, eq. 17).

    loss = mean((d - 1 / (2 beta))^2), with d built from length-averaged log-probs
    (the registry marks IPO ``length_normalized``; beta is the paper's tau).
    """
    check(beta > 0, f"ipo: beta must be > 0 (it divides 1/(2 beta)); got beta={beta}")
    pc, pr, rc, rr = f32(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    losses = ((pc - pr) - (rc - rr) - 1.0 / (2.0 * beta)) ** 2
    return _paired(losses, pc, pr, rc, rr, beta, example_mask)


def hinge(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float = 0.1,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """Hinge loss on the reference-normalised likelihood (SLiC-HF, Zhao et al. 2023, arXiv 2305.10425).

    loss = mean(max(0, 1 - beta d))
    """
    pc, pr, rc, rr = f32(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    losses = jax.nn.relu(1.0 - beta * ((pc - pr) - (rc - rr)))
    return _paired(losses, pc, pr, rc, rr, beta, example_mask)


def robust(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """Robust DPO, unbiased under label noise eps (Chowdhury et al. 2024, arXiv 2403.00409).

    loss = mean((-(1 - eps) log sigmoid(beta d) + eps log sigmoid(-beta d)) / (1 - 2 eps))
    """
    check(0 <= label_smoothing < 0.5, f"robust: label_smoothing must be in [0, 0.5); got {label_smoothing}")
    pc, pr, rc, rr = f32(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    z = beta * ((pc - pr) - (rc - rr))
    eps = label_smoothing
    losses = (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1.0 - 2.0 * eps)
    return _paired(losses, pc, pr, rc, rr, beta, example_mask)


def exo_pair(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """Pairwise EXO (Ji et al. 2024, arXiv 2402.00856, eq. 16): reverse KL to the label distribution.

    loss = mean(sigmoid(beta d) (log sigmoid(beta d) - log(1 - eps))
                + sigmoid(-beta d) (log sigmoid(-beta d) - log eps))
    TRL replaces eps = 0 with 1e-3; here eps must be in (0, 1) and defaults to 1e-3.
    """
    check(0 < label_smoothing < 1, f"exo_pair: label_smoothing must be in (0, 1); got {label_smoothing}")
    pc, pr, rc, rr = f32(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    z = beta * ((pc - pr) - (rc - rr))
    eps = label_smoothing
    losses = sigmoid(z) * (log_sigmoid(z) - jnp.log1p(-eps)) + sigmoid(-z) * (log_sigmoid(-z) - jnp.log(eps))
    return _paired(losses, pc, pr, rc, rr, beta, example_mask)


def bco_pair(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float = 0.1,
    running_mean=0.0,
    running_count=0.0,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """Pairwise Binary Classifier Optimization (Jung et al. 2024, arXiv 2404.04656).

    delta = running mean of the per-batch mean reward mean({beta*rw, beta*rl}), updated
            with this batch first: delta = m + (mean_batch - m) / (count + 1)
            (TRL feeds its RunningMoments the batch mean, so the count grows by 1 a step)
    loss  = mean(-log sigmoid(beta rw - delta) - log sigmoid(-(beta rl - delta)))

    The running statistics are state of the run: pass the previous ``bco/running_mean`` and
    ``bco/running_count`` metrics back in at the next step (count 0 starts afresh). A batch
    with no valid pair leaves them unchanged.
    """
    pc, pr, rc, rr = f32(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    mask = valid_mask(example_mask, pc)
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    n = (mask.sum() > 0).astype(jnp.float32)
    batch_mean = jax.lax.stop_gradient((masked_mean(chosen_rewards, mask) + masked_mean(rejected_rewards, mask)) / 2.0)
    running_mean, running_count = f32(running_mean, running_count)
    total = running_count + n
    delta = running_mean + (batch_mean - running_mean) * n / jnp.maximum(total, 1e-24)
    losses = -log_sigmoid(chosen_rewards - delta) - log_sigmoid(-(rejected_rewards - delta))
    extra = {"bco/running_mean": delta, "bco/running_count": total}
    return _paired(losses, pc, pr, rc, rr, beta, example_mask, extra)


def sppo_hard(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float = 0.1,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """SPPO with hard labels (Wu et al. 2024, arXiv 2405.00675, eq. 4.7 with P = 1 / 0).

    loss = mean((rw - 1/(2 beta))^2 + (rl + 1/(2 beta))^2)
    """
    check(beta > 0, f"sppo_hard: beta must be > 0 (it divides 1/(2 beta)); got beta={beta}")
    pc, pr, rc, rr = f32(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    losses = ((pc - rc) - 0.5 / beta) ** 2 + ((pr - rr) + 0.5 / beta) ** 2
    return _paired(losses, pc, pr, rc, rr, beta, example_mask)


def nca_pair(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float = 0.1,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """Pairwise Noise Contrastive Alignment (Chen et al. 2024, arXiv 2402.05369).

    loss = mean(-log sigmoid(beta rw) - 0.5 log sigmoid(-beta rw) - 0.5 log sigmoid(-beta rl))
    """
    pc, pr, rc, rr = f32(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    zw, zl = beta * (pc - rc), beta * (pr - rr)
    losses = -log_sigmoid(zw) - 0.5 * log_sigmoid(-zw) - 0.5 * log_sigmoid(-zl)
    return _paired(losses, pc, pr, rc, rr, beta, example_mask)


def apo_zero(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float = 0.1,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """Anchored Preference Optimization, APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 7).

    loss = mean((1 - sigmoid(beta rw)) + sigmoid(beta rl))
    For chosen outputs better than the model's own: push chosen up and rejected down.
    """
    pc, pr, rc, rr = f32(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    losses = sigmoid(-beta * (pc - rc)) + sigmoid(beta * (pr - rr))
    return _paired(losses, pc, pr, rc, rr, beta, example_mask)


def apo_down(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float = 0.1,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """Anchored Preference Optimization, APO-down (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 8).

    loss = mean(sigmoid(beta rw) + (1 - sigmoid(beta (rw - rl))))
    For chosen outputs worse than the model's own: push both down, rejected more.
    """
    pc, pr, rc, rr = f32(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    rw, rl = pc - rc, pr - rr
    losses = sigmoid(beta * rw) + sigmoid(-beta * (rw - rl))
    return _paired(losses, pc, pr, rc, rr, beta, example_mask)


def discopop(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float = 0.1,
    tau: float = 0.05,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, arXiv 2406.08414, eq. 5).

    z = beta d; m = sigmoid(z / tau)
    loss = mean((1 - m) * (-log sigmoid(z)) + m * exp(-z))

    Computed as softplus(-z) * sigmoid(-z/tau) + exp(-z + log sigmoid(z/tau)), which equals
    the formula above and stays finite for any z when tau <= 1 (exp(-z) alone overflows).
    """
    check(0 < tau <= 1, f"discopop: tau must be in (0, 1]; got tau={tau}")
    pc, pr, rc, rr = f32(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    z = beta * ((pc - pr) - (rc - rr))
    losses = jax.nn.softplus(-z) * sigmoid(-z / tau) + jnp.exp(-z + log_sigmoid(z / tau))
    return _paired(losses, pc, pr, rc, rr, beta, example_mask)
