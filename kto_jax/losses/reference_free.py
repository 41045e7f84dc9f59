"""Losses that need no reference model: SFT, SLiC, SimPO and ORPO."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kto_jax.losses._common import Metrics, check, f32, masked_mean, paired_metrics, valid_mask


def sft(policy_logps, token_counts, *, reduction: str = "token", example_mask=None) -> tuple[jax.Array, Metrics]:
    """Supervised fine-tuning: negative log-likelihood of the completions.

    reduction="token" (default): loss = -sum_i policy_logps_i / sum_i token_counts_i
    reduction="sequence":        loss = -mean_i policy_logps_i
    (valid examples only; ``policy_logps`` are summed per sequence).

    "token" averages over all tokens of the batch, as ``CrossEntropyLoss`` over the
    flattened batch (TRL). "sequence" is HALOs legacy's SFTTrainer, which the KTO paper's
    SFT and CSFT runs used (config/loss/sft.yaml:4 and csft.yaml:5 ``trainer: SFTTrainer``):
    trainers.py:540 ``get_batch_logps(..., average_log_prob=False)`` sums each sequence's
    token log-probs (utils.py:88), trainers.py:541 ``losses = -policy_chosen_logps``,
    trainers.py:549 ``losses.mean()`` over the sequences (ContextualAI/HALOs, branch
    ``legacy`` at 61b9ee6). CSFT (Korbak et al. 2023) is this loss on completions prefixed
    with control tokens.
    """
    reductions = ("token", "sequence")
    check(reduction in reductions, f"sft: reduction must be one of {reductions}; got {reduction!r}")
    (policy_logps,) = f32(policy_logps)
    mask = valid_mask(example_mask, policy_logps)
    counts = jnp.where(mask > 0, jnp.asarray(token_counts, jnp.float32), 0.0)
    if reduction == "sequence":
        loss = -masked_mean(policy_logps, mask)
    else:
        total = jnp.where(mask > 0, policy_logps, 0.0).sum()
        loss = -total / jnp.maximum(counts.sum(), 1.0)
    metrics = {
        "logps/mean": masked_mean(jax.lax.stop_gradient(policy_logps), mask),
        "tokens": counts.sum(),
    }
    return loss, metrics


def slic(
    policy_chosen_logps,
    policy_rejected_logps,
    *,
    beta: float = 1.0,
    lambda_coef: float = 0.1,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """Sequence Likelihood Calibration (Zhao et al. 2023, arXiv 2305.10425), as in HALOs.

    loss = mean(max(0, beta - pc + pr) + lambda_coef * (-pc))

    The calibration hinge uses the policy alone; the regulariser is the chosen NLL.
    Rewards in the metrics are the policy log-probs themselves (HALOs).
    """
    pc, pr = f32(policy_chosen_logps, policy_rejected_logps)
    mask = valid_mask(example_mask, pc)
    losses = jax.nn.relu(beta - pc + pr) + lambda_coef * (-pc)
    return masked_mean(losses, mask), paired_metrics(pc, pr, pc, pr, mask)


def simpo(
    policy_chosen_logps,
    policy_rejected_logps,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """Simple Preference Optimization (Meng et al. 2024, arXiv 2405.14734, eq. 6).

    z = beta * (pc - pr) - gamma          (pc, pr length-averaged log-probs)
    loss = mean(-(1 - eps) log sigmoid(z) - eps log sigmoid(-z))

    TRL's CPOTrainer with loss_type="simpo", cpo_alpha=0 (its ``simpo_gamma`` is gamma).
    Rewards in the metrics are beta * (length-averaged) policy log-probs.
    """
    pc, pr = f32(policy_chosen_logps, policy_rejected_logps)
    mask = valid_mask(example_mask, pc)
    z = beta * (pc - pr) - gamma
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
    return masked_mean(losses, mask), paired_metrics(beta * pc, beta * pr, pc, pr, mask)


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, branching at -ln 2 to avoid cancellation (Maechler 2012).

    x is clipped to <= -1e-6 so a log-prob of exactly 0 gives a large finite value, not -inf.
    """
    x = jnp.minimum(x, -1e-6)
    return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def orpo(
    policy_chosen_logps,
    policy_rejected_logps,
    *,
    beta: float = 0.1,
    chosen_token_counts=None,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """Odds Ratio Preference Optimization (Hong et al. 2024, arXiv 2403.07691, eq. 4-7).

    pc, pr are length-averaged log-probs; odds(p) = p / (1 - p), so
    log_odds = (pc - pr) - (log(1 - exp(pc)) - log(1 - exp(pr)))
    loss = nll_chosen - beta * mean(log sigmoid(log_odds))
    nll_chosen = -sum(pc * n_c) / sum(n_c) when ``chosen_token_counts`` n_c is given (TRL:
    cross-entropy over all chosen tokens), else -mean(pc).
    """
    pc, pr = f32(policy_chosen_logps, policy_rejected_logps)
    mask = valid_mask(example_mask, pc)
    if chosen_token_counts is None:
        nll = -masked_mean(pc, mask)
    else:
        counts = jnp.where(mask > 0, jnp.asarray(chosen_token_counts, jnp.float32), 0.0)
        nll = -jnp.where(mask > 0, pc * counts, 0.0).sum() / jnp.maximum(counts.sum(), 1.0)
    log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
    ratio = jax.nn.log_sigmoid(log_odds)
    loss = nll - beta * masked_mean(ratio, mask)
    metrics = paired_metrics(beta * pc, beta * pr, pc, pr, mask)
    metrics.update(
        {
            "nll_loss": jax.lax.stop_gradient(nll),
            "log_odds_ratio": masked_mean(jax.lax.stop_gradient(ratio), mask),
            "log_odds_chosen": masked_mean(jax.lax.stop_gradient(log_odds), mask),
        }
    )
    return loss, metrics
