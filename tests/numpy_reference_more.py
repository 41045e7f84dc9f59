"""Float64 numpy references of BCO (unpaired), AOT, f-DPO and sigmoid_norm, written from TRL's code, not
from the JAX code under test (the conventions of tests/numpy_reference.py: masked rows dropped first,
means over an empty selection 0):

* ``bco``: TRL v0.28 ``trl/experimental/bco/bco_trainer.py`` ``BCOTrainer.bco_loss`` and
  ``trl/trainer/utils.py`` ``RunningMoments.update`` (no UDM weights).
* ``aot``, ``aot_pair``: TRL v0.28 ``trl/trainer/dpo_trainer.py`` ``dpo_loss``, loss_type "aot" and
  "aot_unpaired" (called "aot_pair" up to TRL v0.27).
* ``aot_unpaired``: the same comparison for binary feedback, with the quantiles of each class taken by
  ``np.quantile`` (linear interpolation) at m = max(n_d, n_u) levels k / (m - 1) of the valid rows.
* ``fdpo``: TRL v0.28 ``dpo_loss`` with ``f_divergence_type`` "reverse_kl" / "js_divergence" /
  "alpha_divergence" (its ``cap_exp`` with cap 50) and TRL main's "forward_kl" (-exp(-logratio)).
* ``sigmoid_norm``: TRL main ``dpo_trainer.py`` loss_type "sigmoid_norm" (PR #5406), on summed log-probs
  and completion token counts (:func:`sigmoid_norm_from_sums`) and on length-normalised inputs.
"""

from __future__ import annotations

import numpy as np

from tests.numpy_base import _f64, _paired_metrics, _select, _unary_metrics, log_sigmoid, mean_or_zero

EXP_CAP = 50.0  # the library's documented exponent cap (TRL's cap_exp(value, cap=50))


def cap_exp(x):
    return np.exp(np.minimum(np.asarray(x, np.float64), EXP_CAP))


def softplus(x):
    return np.logaddexp(0.0, np.asarray(x, np.float64))


def running_moments_mean(mean, count, xs):
    """TRL ``RunningMoments.update``'s mean: xs_count = xs.numel(), delta = xs_mean - mean,
    tot_count = count + xs_count, mean += delta * xs_count / tot_count. An empty xs (which TRL never
    passes) leaves the state unchanged."""
    xs = np.asarray(xs, np.float64).reshape(-1)
    if xs.size == 0:
        return float(mean), float(count)
    xs_count = xs.size
    tot_count = count + xs_count
    return float(mean + (xs.mean() - mean) * xs_count / tot_count), float(tot_count)


def bco(policy_logps, reference_logps, desirable, *, beta=0.1, running_mean=0.0, running_count=0.0, example_mask=None):
    policy, reference, desirable = _select(example_mask, policy_logps, reference_logps, desirable)
    policy, reference, desirable = _f64(policy), _f64(reference), desirable.astype(bool)
    chosen_rewards = beta * (policy[desirable] - reference[desirable])
    rejected_rewards = beta * (policy[~desirable] - reference[~desirable])
    # self.running.update(torch.cat((chosen_rewards, rejected_rewards), 0).detach()); delta = running.mean
    delta, count = running_moments_mean(running_mean, running_count, np.concatenate([chosen_rewards, rejected_rewards]))
    chosen_losses = -log_sigmoid(chosen_rewards - delta)
    rejected_losses = -log_sigmoid(-(rejected_rewards - delta))
    metrics = _unary_metrics(beta, policy, reference, desirable)
    metrics.update({"bco/running_mean": delta, "bco/running_count": count})
    return mean_or_zero(np.concatenate([chosen_losses, rejected_losses])), metrics


def _paired_inputs(example_mask, pc, pr, rc, rr):
    return [_f64(a) for a in _select(example_mask, pc, pr, rc, rr)]


def _smoothed(delta, beta, label_smoothing):
    return -log_sigmoid(beta * delta) * (1 - label_smoothing) - log_sigmoid(-beta * delta) * label_smoothing


def aot(pc, pr, rc, rr, *, beta=0.1, label_smoothing=0.0, example_mask=None):
    pc, pr, rc, rr = _paired_inputs(example_mask, pc, pr, rc, rr)
    logratios_sorted = np.sort(pc - pr)
    ref_logratios_sorted = np.sort(rc - rr)
    losses = _smoothed(logratios_sorted - ref_logratios_sorted, beta, label_smoothing)
    return mean_or_zero(losses), _paired_metrics(beta * (pc - rc), beta * (pr - rr), pc, pr)


def aot_pair(pc, pr, rc, rr, *, beta=0.1, label_smoothing=0.0, example_mask=None):
    pc, pr, rc, rr = _paired_inputs(example_mask, pc, pr, rc, rr)
    chosen_logratios_sorted = np.sort(pc - rc)
    rejected_logratios_sorted = np.sort(pr - rr)
    losses = _smoothed(chosen_logratios_sorted - rejected_logratios_sorted, beta, label_smoothing)
    return mean_or_zero(losses), _paired_metrics(beta * (pc - rc), beta * (pr - rr), pc, pr)


def aot_unpaired(policy_logps, reference_logps, desirable, *, beta=0.1, label_smoothing=0.0, example_mask=None):
    policy, reference, desirable = _select(example_mask, policy_logps, reference_logps, desirable)
    policy, reference, desirable = _f64(policy), _f64(reference), desirable.astype(bool)
    chosen = policy[desirable] - reference[desirable]
    rejected = policy[~desirable] - reference[~desirable]
    metrics = _unary_metrics(beta, policy, reference, desirable)
    if chosen.size == 0 or rejected.size == 0:
        return 0.0, metrics
    m = max(chosen.size, rejected.size)
    levels = np.arange(m) / max(m - 1, 1)
    delta = np.quantile(chosen, levels) - np.quantile(rejected, levels)
    return mean_or_zero(_smoothed(delta, beta, label_smoothing)), metrics


def fdpo(pc, pr, rc, rr, *, beta=0.1, label_smoothing=0.0, divergence="reverse_kl", alpha=0.5, example_mask=None):
    pc, pr, rc, rr = _paired_inputs(example_mask, pc, pr, rc, rr)
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    if divergence == "alpha":
        # logits = (cap_exp(rejected_logratios * -alpha_coef) - cap_exp(chosen_logratios * -alpha_coef)) / alpha_coef
        logits = (cap_exp(rejected_logratios * -alpha) - cap_exp(chosen_logratios * -alpha)) / alpha
    elif divergence == "forward_kl":
        # TRL main: chosen_scores = -exp(-chosen_logratios), rejected_scores likewise; delta = chosen - rejected
        logits = -cap_exp(-chosen_logratios) + cap_exp(-rejected_logratios)
    else:
        logits = (pc - pr) - (rc - rr)
        if divergence == "js":
            logits = logits - (softplus(chosen_logratios) - softplus(rejected_logratios))
        else:
            assert divergence == "reverse_kl", divergence
    losses = _smoothed(logits, beta, label_smoothing)
    return mean_or_zero(losses), _paired_metrics(beta * (pc - rc), beta * (pr - rr), pc, pr)


def sigmoid_norm_from_sums(pc, pr, rc, rr, chosen_counts, rejected_counts, *, beta=0.1):
    """TRL: chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0) (likewise rejected),
    delta = chosen_avg_score - rejected_avg_score, loss = -logsigmoid(beta * delta), on summed log-probs."""
    pc, pr, rc, rr = (_f64(a) for a in (pc, pr, rc, rr))
    chosen_avg_score = (pc - rc) / np.maximum(_f64(chosen_counts), 1.0)
    rejected_avg_score = (pr - rr) / np.maximum(_f64(rejected_counts), 1.0)
    return mean_or_zero(-log_sigmoid(beta * (chosen_avg_score - rejected_avg_score)))


def sigmoid_norm(pc, pr, rc, rr, *, beta=0.1, example_mask=None):
    """On log-probs the engine already divided by the token counts (TRL's formula with counts 1)."""
    pc, pr, rc, rr = _paired_inputs(example_mask, pc, pr, rc, rr)
    ones = np.ones_like(pc)
    loss = sigmoid_norm_from_sums(pc, pr, rc, rr, ones, ones, beta=beta)
    return loss, _paired_metrics(beta * (pc - rc), beta * (pr - rr), pc, pr)
