"""Alignment via Optimal Transport (AOT; Melnyk et al. 2024, arXiv 2406.05882, "Distributional
Preference Alignment of LLMs via Optimal Transport").

AOT makes the distribution of chosen rewards first-order stochastically dominate the rejected
one by comparing the two *sorted* samples (the quantiles, i.e. the 1-D optimal-transport
coupling) with DPO's logistic loss, instead of comparing pair by pair. The quantiles are taken
within the (micro)batch, so larger batches give better estimates.

Padding rows (``example_mask`` False) are excluded from every sort: their values are replaced by
0 first (no gradient, no NaN from garbage) and sorted to the end, behind the valid rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kto_jax.losses._common import Metrics, check, f32, masked_mean, paired_metrics, unary_metrics, valid_mask

log_sigmoid = jax.nn.log_sigmoid


def _smoothed_logistic(z, label_smoothing):
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z) (TRL's cDPO form)."""
    return -(1.0 - label_smoothing) * log_sigmoid(z) - label_smoothing * log_sigmoid(-z)


def sorted_valid(values, mask):
    """(values sorted ascending with the valid rows first, how many are valid). Invalid rows are
    set to 0 before sorting, so neither their values nor gradients reach the result."""
    valid = mask > 0
    clean = jnp.where(valid, values, 0.0)
    order = jnp.argsort(jnp.where(valid, clean, jnp.inf), stable=True)
    return clean[order], valid.sum()


def _sorted_pairs_loss(a, b, pc, pr, rc, rr, beta, label_smoothing, example_mask):
    """mean_k of the smoothed logistic loss of beta (sort(a)_k - sort(b)_k) over the valid pairs, with
    the paired reward metrics (unsorted, as TRL reports them)."""
    check(0 <= label_smoothing < 0.5, f"aot: label_smoothing must be in [0, 0.5); got {label_smoothing}")
    mask = valid_mask(example_mask, pc)
    sa, n = sorted_valid(a, mask)
    sb, _ = sorted_valid(b, mask)
    first_n = (jnp.arange(sa.shape[0]) < n).astype(jnp.float32)
    losses = _smoothed_logistic(beta * (sa - sb), label_smoothing)
    metrics = paired_metrics(beta * (pc - rc), beta * (pr - rr), pc, pr, mask)
    return masked_mean(losses, first_n), metrics


def aot(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """AOT for paired data (Melnyk et al. 2024, arXiv 2406.05882; TRL DPOTrainer ``loss_type="aot"``).

    s = sort_batch(pc - pr), t = sort_batch(rc - rr)   (policy and reference log-ratios, each sorted)
    loss = mean_k(-(1 - eps) log sigmoid(beta (s_k - t_k)) - eps log sigmoid(-beta (s_k - t_k)))

    The policy's chosen-vs-rejected log-ratio must dominate the reference's quantile by quantile.
    eps = label_smoothing as in TRL. Valid pairs only are sorted.
    """
    pc, pr, rc, rr = f32(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return _sorted_pairs_loss(pc - pr, rc - rr, pc, pr, rc, rr, beta, label_smoothing, example_mask)


def aot_pair(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """AOT on the rewards of paired data, unpaired (Melnyk et al. 2024, arXiv 2406.05882, sec. 3; TRL
    DPOTrainer ``loss_type="aot_pair"``, renamed ``"aot_unpaired"`` in TRL v0.28, PR #5038).

    u = sort_batch(pc - rc), v = sort_batch(pr - rr)   (chosen and rejected log-ratios, each sorted)
    loss = mean_k(-(1 - eps) log sigmoid(beta (u_k - v_k)) - eps log sigmoid(-beta (u_k - v_k)))

    The chosen rewards must dominate the rejected ones quantile by quantile; which chosen came with
    which rejected is not used. For binary feedback with unequal class counts see :func:`aot_unpaired`.
    """
    pc, pr, rc, rr = f32(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return _sorted_pairs_loss(pc - rc, pr - rr, pc, pr, rc, rr, beta, label_smoothing, example_mask)


def quantiles_at(sorted_values, n, levels):
    """The empirical quantile function of the first ``n`` entries of ``sorted_values`` (ascending) at
    ``levels`` in [0, 1], with linear interpolation (np.quantile's default, Hyndman-Fan type 7):
    h = (n - 1) q, Q(q) = s[floor h] + (h - floor h) (s[floor h + 1] - s[floor h]). 0 when n = 0."""
    last = jnp.maximum(n - 1, 0).astype(jnp.float32)
    h = last * levels
    lo = jnp.clip(jnp.floor(h), 0, last).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, last.astype(jnp.int32))
    frac = h - lo.astype(jnp.float32)
    return sorted_values[lo] + frac * (sorted_values[hi] - sorted_values[lo])


def aot_unpaired(
    policy_logps,
    reference_logps,
    desirable,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """AOT for binary feedback (Melnyk et al. 2024, arXiv 2406.05882, sec. 3, the unpaired setting; TRL
    DPOTrainer ``loss_type="aot_unpaired"`` / formerly ``"aot_pair"`` on the equal-count case).

    r = policy_logps - reference_logps. The valid desirable rows (n_d of them) and the valid undesirable
    rows (n_u) are sorted separately; with m = max(n_d, n_u) quantile levels q_k = k / (m - 1),
    k = 0..m-1 (q_0 = 0 when m = 1), and Q_d, Q_u each class's empirical quantile function with linear
    interpolation (np.quantile's default):

        Delta_k = Q_d(q_k) - Q_u(q_k)
        loss = mean_k(-(1 - eps) log sigmoid(beta Delta_k) - eps log sigmoid(-beta Delta_k))

    Design (static shapes under jit): the quantile grid has B = batch-size slots, the first m of them
    used, so the number of levels is data-dependent but the arrays are not. With equal counts
    (n_d = n_u = n) the levels hit every sorted index exactly (h = k), so the loss is the paper's (and
    TRL's) pairing of the k-th smallest desirable reward with the k-th smallest undesirable one; with
    unequal counts the larger class is compared at its own order statistics and the smaller class is
    linearly interpolated between its order statistics. Every level weighs the same, whatever the class
    sizes. A batch with an empty class (or no valid row) gives loss 0 and zero gradients.

    Metrics as KTO's (``rewards/chosen`` = mean beta r over desirable, ``rewards/rejected``,
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``num_desirable``, ``num_undesirable``).
    """
    check(0 <= label_smoothing < 0.5, f"aot_unpaired: label_smoothing must be in [0, 0.5); got {label_smoothing}")
    policy_logps, reference_logps = f32(policy_logps, reference_logps)
    desirable = jnp.asarray(desirable, bool)
    mask = valid_mask(example_mask, policy_logps)
    r = policy_logps - reference_logps
    d_mask, u_mask = mask * desirable, mask * (~desirable)
    sd, n_d = sorted_valid(r, d_mask)
    su, n_u = sorted_valid(r, u_mask)
    m = jnp.maximum(n_d, n_u)
    k = jnp.arange(r.shape[0], dtype=jnp.float32)
    levels = k / jnp.maximum(m - 1, 1).astype(jnp.float32)
    used = ((k < m) & (n_d > 0) & (n_u > 0)).astype(jnp.float32)
    levels = jnp.where(used > 0, levels, 0.0)
    delta = quantiles_at(sd, n_d, levels) - quantiles_at(su, n_u, levels)
    losses = _smoothed_logistic(beta * delta, label_smoothing)
    metrics = unary_metrics(beta, r, policy_logps, d_mask, u_mask)
    return masked_mean(losses, used), metrics
