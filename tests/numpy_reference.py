"""Independent float64 numpy reference implementations of the losses in ``kto_jax.losses``.

Written from the upstream formulas only (TRL v0.28.0 ``DPOTrainer.dpo_loss``, ``KTOTrainer.kto_loss``,
``CPOTrainer`` (simpo), ``ORPOTrainer.odds_ratio_loss``, ``RunningMoments``; HALOs ``legacy`` branch
``KTOTrainer``, ``KTOZeroTrainer``, ``SLiCTrainer``, ``PPOTrainer.compute_advantages`` / ``loss`` and
``utils.masked_mean`` / ``masked_var``), not from the JAX code under test.

``halo_unary`` is written from the paper's definition 3.4 (Ethayarajh et al. 2024).

Every function takes per-example arrays (shape [B], or [B, T] for PPO) plus an optional boolean
``example_mask`` and returns ``(loss: float, metrics: dict[str, float])``.  Rows with
``example_mask == False`` are dropped *before* anything is computed, so garbage in them cannot leak into
the result.  Means over an empty selection are 0.

The code is deliberately plain (python loops where that is clearer); speed does not matter here.
"""

from __future__ import annotations

import math

import numpy as np

from tests.numpy_base import (  # noqa: F401 (re-exported: tests/numpy_reference_ppo.py imports them from here)
    _f64,
    _paired_metrics,
    _select,
    _unary_metrics,
    _valid,
    log1mexp,
    log_sigmoid,
    mean_or_zero,
    sigmoid,
)
from tests.numpy_reference_free import orpo, sft, simpo, slic  # noqa: F401 (part of this module's set)
from tests.numpy_reference_more import aot, aot_pair, aot_unpaired, bco, fdpo, sigmoid_norm  # noqa: F401 (likewise)

# ----------------------------------------------------------------------------------------------------
# unary (KTO family)
# ----------------------------------------------------------------------------------------------------


def kto(
    policy_logps,
    reference_logps,
    policy_kl_logps,
    reference_kl_logps,
    desirable,
    *,
    beta=0.1,
    desirable_weight=1.0,
    undesirable_weight=1.0,
    example_mask=None,
):
    """KTO (HALOs ``KTOTrainer.loss`` / TRL ``kto_loss`` with loss_type="kto")."""
    policy, reference, policy_kl, reference_kl, desirable = _select(
        example_mask, policy_logps, reference_logps, policy_kl_logps, reference_kl_logps, desirable
    )
    policy, reference = _f64(policy), _f64(reference)
    policy_kl, reference_kl = _f64(policy_kl), _f64(reference_kl)
    desirable = desirable.astype(bool)

    # KL = (policy_KL_logps - reference_KL_logps).mean().clamp(min=0)
    kl = max(0.0, mean_or_zero(policy_kl - reference_kl))

    losses = []
    for i in range(policy.shape[0]):
        logratio = policy[i] - reference[i]
        if desirable[i]:
            losses.append(desirable_weight * (1.0 - sigmoid(beta * (logratio - kl))))
        else:
            losses.append(undesirable_weight * (1.0 - sigmoid(beta * (kl - logratio))))
    loss = mean_or_zero(losses)

    metrics = {"kl": kl}
    metrics.update(_unary_metrics(beta, policy, reference, desirable))
    return loss, metrics


def kto_zero(
    policy_logps,
    reference_logps,
    desirable,
    *,
    beta=0.1,
    desirable_weight=1.0,
    undesirable_weight=1.0,
    example_mask=None,
):
    """HALOs ``KTOZeroTrainer``: KTO with the reference point fixed at 0."""
    policy, reference, desirable = _select(example_mask, policy_logps, reference_logps, desirable)
    policy, reference = _f64(policy), _f64(reference)
    desirable = desirable.astype(bool)
    losses = []
    for i in range(policy.shape[0]):
        logratio = policy[i] - reference[i]
        if desirable[i]:
            losses.append(desirable_weight * (1.0 - sigmoid(beta * (logratio - 0.0))))
        else:
            losses.append(undesirable_weight * (1.0 - sigmoid(beta * (0.0 - logratio))))
    metrics = {"kl": 0.0}
    metrics.update(_unary_metrics(beta, policy, reference, desirable))
    return mean_or_zero(losses), metrics


def apo_zero_unpaired(
    policy_logps,
    reference_logps,
    desirable,
    *,
    beta=0.1,
    desirable_weight=1.0,
    undesirable_weight=1.0,
    example_mask=None,
):
    """TRL ``kto_loss`` with loss_type="apo_zero_unpaired" (written separately from kto_zero on purpose)."""
    policy, reference, desirable = _select(example_mask, policy_logps, reference_logps, desirable)
    policy, reference = _f64(policy), _f64(reference)
    desirable = desirable.astype(bool)
    chosen_logratios = policy[desirable] - reference[desirable]
    rejected_logratios = policy[~desirable] - reference[~desirable]
    chosen_losses = 1.0 - sigmoid(beta * chosen_logratios)
    rejected_losses = sigmoid(beta * rejected_logratios)
    losses = np.concatenate([desirable_weight * chosen_losses, undesirable_weight * rejected_losses])
    metrics = {"kl": 0.0}
    metrics.update(_unary_metrics(beta, policy, reference, desirable))
    return mean_or_zero(losses), metrics


# value functions v of a HALO and the constant c of a desirable example (sup v where finite, else 0)
HALO_VALUES = {
    "sigmoid": (sigmoid, 1.0),
    "log_sigmoid": (log_sigmoid, 0.0),
    "linear": (lambda z: np.asarray(z, dtype=np.float64), 0.0),
}


def halo_unary(
    policy_logps,
    reference_logps,
    policy_kl_logps,
    reference_kl_logps,
    desirable,
    *,
    beta=0.1,
    value="sigmoid",
    reference_point="kl",
    desirable_weight=1.0,
    undesirable_weight=1.0,
    example_mask=None,
):
    """A HALO on unary feedback (Ethayarajh et al. 2024, def. 3.4), per valid example:

    l_i = w_i * (c_i - a_i * v(beta * (r_i - z)))
    desirable:   a = +1, c = sup v (1 for sigmoid, 0 for log sigmoid and linear), w = desirable_weight
    undesirable: a = -1, c = 0,                                                   w = undesirable_weight
    z = KTO's max(0, mean(policy_kl - reference_kl)) ("kl") or 0 ("zero")
    """
    policy, reference, desirable = _select(example_mask, policy_logps, reference_logps, desirable)
    policy, reference = _f64(policy), _f64(reference)
    desirable = desirable.astype(bool)
    z = 0.0
    if reference_point == "kl":
        policy_kl, reference_kl = _select(example_mask, policy_kl_logps, reference_kl_logps)
        z = max(0.0, mean_or_zero(_f64(policy_kl) - _f64(reference_kl)))
    v, sup = HALO_VALUES[value]
    losses = []
    for i in range(policy.shape[0]):
        scaled = beta * (policy[i] - reference[i] - z)
        if desirable[i]:
            losses.append(desirable_weight * (sup - float(v(scaled))))
        else:
            losses.append(undesirable_weight * (0.0 + float(v(scaled))))
    metrics = {
        "rewards/mean": mean_or_zero(beta * (policy - reference)),
        "reference_point": z if policy.shape[0] else 0.0,
        "num_desirable": float(np.sum(desirable)),
        "num_undesirable": float(np.sum(~desirable)),
    }
    return mean_or_zero(losses), metrics


# ----------------------------------------------------------------------------------------------------
# paired, with a reference model (TRL DPOTrainer.dpo_loss)
# ----------------------------------------------------------------------------------------------------


def _paired_inputs(example_mask, pc, pr, rc, rr):
    pc, pr, rc, rr = _select(example_mask, pc, pr, rc, rr)
    return _f64(pc), _f64(pr), _f64(rc), _f64(rr)


def _paired(per_row_losses, beta, pc, pr, rc, rr, extra=None):
    metrics = _paired_metrics(beta * (pc - rc), beta * (pr - rr), pc, pr)
    if extra:
        metrics.update(extra)
    return mean_or_zero(per_row_losses), metrics


def dpo(pc, pr, rc, rr, *, beta=0.1, label_smoothing=0.0, example_mask=None):
    pc, pr, rc, rr = _paired_inputs(example_mask, pc, pr, rc, rr)
    logits = (pc - pr) - (rc - rr)
    losses = -log_sigmoid(beta * logits) * (1 - label_smoothing) - log_sigmoid(-beta * logits) * label_smoothing
    return _paired(losses, beta, pc, pr, rc, rr)


def robust(pc, pr, rc, rr, *, beta=0.1, label_smoothing=0.0, example_mask=None):
    pc, pr, rc, rr = _paired_inputs(example_mask, pc, pr, rc, rr)
    logits = (pc - pr) - (rc - rr)
    losses = (-log_sigmoid(beta * logits) * (1 - label_smoothing) + log_sigmoid(-beta * logits) * label_smoothing) / (
        1 - 2 * label_smoothing
    )
    return _paired(losses, beta, pc, pr, rc, rr)


def exo_pair(pc, pr, rc, rr, *, beta=0.1, label_smoothing=1e-3, example_mask=None):
    pc, pr, rc, rr = _paired_inputs(example_mask, pc, pr, rc, rr)
    eps = label_smoothing if label_smoothing != 0 else 1e-3  # TRL replaces 0 by 1e-3
    logits = (pc - pr) - (rc - rr)
    x = beta * logits
    losses = sigmoid(x) * (log_sigmoid(x) - math.log(1 - eps)) + sigmoid(-x) * (log_sigmoid(-x) - math.log(eps))
    return _paired(losses, beta, pc, pr, rc, rr)


def hinge(pc, pr, rc, rr, *, beta=0.1, example_mask=None):
    pc, pr, rc, rr = _paired_inputs(example_mask, pc, pr, rc, rr)
    logits = (pc - pr) - (rc - rr)
    losses = np.maximum(0.0, 1 - beta * logits)
    return _paired(losses, beta, pc, pr, rc, rr)


def ipo(pc, pr, rc, rr, *, beta=0.1, example_mask=None):
    pc, pr, rc, rr = _paired_inputs(example_mask, pc, pr, rc, rr)
    logits = (pc - pr) - (rc - rr)
    losses = (logits - 1 / (2 * beta)) ** 2
    return _paired(losses, beta, pc, pr, rc, rr)


def running_mean_update(running_mean, running_count, batch_values):
    """TRL ``RunningMoments.update`` restricted to the mean. TRL v0.28 ``bco_pair`` feeds it
    ``torch.cat((chosen_rewards, rejected_rewards)).mean()``, a 0-d tensor, so xs.numel() == 1."""
    if len(batch_values) == 0:
        return float(running_mean), float(running_count)
    n = 1
    batch_mean = float(np.mean(batch_values))
    tot = running_count + n
    new_mean = running_mean + (batch_mean - running_mean) * n / tot
    return float(new_mean), float(tot)


def bco_pair(pc, pr, rc, rr, *, beta=0.1, running_mean=0.0, running_count=0.0, example_mask=None):
    pc, pr, rc, rr = _paired_inputs(example_mask, pc, pr, rc, rr)
    chosen_rewards = beta * (pc - rc)
    rejected_rewards = beta * (pr - rr)
    delta, count = running_mean_update(running_mean, running_count, np.concatenate([chosen_rewards, rejected_rewards]))
    losses = -log_sigmoid(chosen_rewards - delta) - log_sigmoid(-(rejected_rewards - delta))
    return _paired(losses, beta, pc, pr, rc, rr, {"bco/running_mean": delta, "bco/running_count": count})


def sppo_hard(pc, pr, rc, rr, *, beta=0.1, example_mask=None):
    pc, pr, rc, rr = _paired_inputs(example_mask, pc, pr, rc, rr)
    a = pc - rc
    b = pr - rr
    losses = (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    return _paired(losses, beta, pc, pr, rc, rr)


def nca_pair(pc, pr, rc, rr, *, beta=0.1, example_mask=None):
    pc, pr, rc, rr = _paired_inputs(example_mask, pc, pr, rc, rr)
    chosen_rewards = (pc - rc) * beta
    rejected_rewards = (pr - rr) * beta
    losses = -log_sigmoid(chosen_rewards) - 0.5 * log_sigmoid(-chosen_rewards) - 0.5 * log_sigmoid(-rejected_rewards)
    return _paired(losses, beta, pc, pr, rc, rr)


def apo_zero(pc, pr, rc, rr, *, beta=0.1, example_mask=None):
    pc, pr, rc, rr = _paired_inputs(example_mask, pc, pr, rc, rr)
    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    losses = (1 - sigmoid(beta * chosen_logratios)) + sigmoid(beta * rejected_logratios)
    return _paired(losses, beta, pc, pr, rc, rr)


def apo_down(pc, pr, rc, rr, *, beta=0.1, example_mask=None):
    pc, pr, rc, rr = _paired_inputs(example_mask, pc, pr, rc, rr)
    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    losses = sigmoid(beta * chosen_logratios) + (1 - sigmoid(beta * (chosen_logratios - rejected_logratios)))
    return _paired(losses, beta, pc, pr, rc, rr)


def discopop(pc, pr, rc, rr, *, beta=0.1, tau=0.05, example_mask=None):
    pc, pr, rc, rr = _paired_inputs(example_mask, pc, pr, rc, rr)
    logits = ((pc - pr) - (rc - rr)) * beta
    modulation = sigmoid(logits / tau)
    logistic_component = -log_sigmoid(logits)
    exp_component = np.exp(-logits)
    losses = logistic_component * (1 - modulation) + exp_component * modulation
    return _paired(losses, beta, pc, pr, rc, rr)
