"""Float64 numpy references of the reference-free losses (SLiC, SimPO, ORPO, SFT); see
tests/numpy_reference.py for the conventions (re-exported there)."""

from __future__ import annotations

import numpy as np

from tests.numpy_base import _f64, _paired_metrics, _select, log1mexp, log_sigmoid, mean_or_zero

# ----------------------------------------------------------------------------------------------------
# reference-free
# ----------------------------------------------------------------------------------------------------


def slic(pc, pr, *, beta=1.0, lambda_coef=0.1, example_mask=None):
    """HALOs ``SLiCTrainer.loss``; the logged rewards are the log-probs themselves."""
    pc, pr = _select(example_mask, pc, pr)
    pc, pr = _f64(pc), _f64(pr)
    cal_loss = np.maximum(beta - pc + pr, 0.0)
    reg_loss = -pc
    losses = cal_loss + lambda_coef * reg_loss
    return mean_or_zero(losses), _paired_metrics(pc, pr, pc, pr)


def simpo(pc, pr, *, beta=2.0, gamma=0.5, label_smoothing=0.0, example_mask=None):
    """TRL ``CPOTrainer.cpo_loss`` with loss_type="simpo" (alpha = 0)."""
    pc, pr = _select(example_mask, pc, pr)
    pc, pr = _f64(pc), _f64(pr)
    logits = (pc - pr) - gamma / beta
    losses = -log_sigmoid(beta * logits) * (1 - label_smoothing) - log_sigmoid(-beta * logits) * label_smoothing
    return mean_or_zero(losses), _paired_metrics(beta * pc, beta * pr, pc, pr)


def orpo(pc, pr, *, beta=0.1, chosen_token_counts=None, example_mask=None):
    """TRL ``ORPOTrainer``: loss = nll - mean(beta * log sigmoid(log_odds))."""
    batch_size = np.asarray(pc).shape[0]
    counts = np.ones(batch_size) if chosen_token_counts is None else chosen_token_counts
    pc, pr, counts = _select(example_mask, pc, pr, counts)
    pc, pr, counts = _f64(pc), _f64(pr), _f64(counts)
    if pc.size == 0:
        nll = 0.0
    elif chosen_token_counts is None:
        nll = -float(np.mean(pc))
    else:
        nll = -float(np.sum(pc * counts) / np.sum(counts))
    log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
    ratio = log_sigmoid(log_odds)
    losses = beta * ratio
    loss = nll - mean_or_zero(losses)
    metrics = _paired_metrics(beta * pc, beta * pr, pc, pr)
    metrics.update(
        {
            "nll_loss": nll,
            "log_odds_ratio": mean_or_zero(ratio),
            "log_odds_chosen": mean_or_zero(log_odds),
        }
    )
    return loss, metrics


def sft(policy_logps, token_counts, *, reduction="token", example_mask=None):
    """ "token": NLL averaged over all tokens of the batch (TRL, CrossEntropyLoss over the flattened batch);
    "sequence": the mean over sequences of each one's summed NLL (HALOs legacy ``SFTTrainer``:
    ``-policy_chosen_logps`` with ``average_log_prob=False``, then ``.mean()``)."""
    policy, counts = _select(example_mask, policy_logps, token_counts)
    policy, counts = _f64(policy), _f64(counts)
    total = float(np.sum(counts))
    if reduction == "sequence":
        loss = -mean_or_zero(policy)
    else:
        loss = -float(np.sum(policy)) / total if total > 0 else 0.0
    return loss, {"logps/mean": mean_or_zero(policy), "tokens": total}
