"""DPO variants of TRL's DPOTrainer: f-DPO (``f_divergence_type``) and ``loss_type="sigmoid_norm"``.

Notation as in kto_jax/losses/paired.py: pc, pr, rc, rr the policy/reference chosen/rejected
log-probs, rw = pc - rc, rl = pr - rr (log u_w, log u_l with u = pi_theta / pi_ref).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kto_jax.losses._common import Metrics, check, f32
from kto_jax.losses.paired import _paired, dpo

log_sigmoid = jax.nn.log_sigmoid

DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")
# exponents are clamped here before exp (TRL clamps at 80 for float32 or log(float32 max) = 88.72 in
# v0.28's cap_exp); 50 keeps beta * Delta / alpha and its gradient finite in float32 for alpha >= 1e-6
MAX_EXPONENT = 50.0


def _capped_exp(x):
    return jnp.exp(jnp.minimum(x, MAX_EXPONENT))


def fdpo_logits(rw, rl, divergence: str, alpha: float):
    """Delta = f'(u_w) - f'(u_l) for the f-divergence ``divergence`` (Wang et al. 2023, Table 1), with
    the constants of f' dropped (they cancel):

        reverse_kl  f'(u) = log u + 1            Delta = rw - rl              (DPO)
        forward_kl  f'(u) = 1 - 1/u              Delta = exp(-rl) - exp(-rw)
        js          f'(u) = log(2u / (1 + u))    Delta = log sigmoid(rw) - log sigmoid(rl)
        alpha       f'(u) = (1 - u^-alpha)/alpha Delta = (exp(-alpha rl) - exp(-alpha rw)) / alpha
    """
    if divergence == "forward_kl":
        return _capped_exp(-rl) - _capped_exp(-rw)
    if divergence == "js":
        return log_sigmoid(rw) - log_sigmoid(rl)
    if divergence == "alpha":
        return (_capped_exp(-alpha * rl) - _capped_exp(-alpha * rw)) / alpha
    return rw - rl


def fdpo(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    divergence: str = "reverse_kl",
    alpha: float = 0.5,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """f-DPO (Wang et al. 2023, arXiv 2309.16240, "Beyond Reverse KL", Table 1 and eq. 6-7; TRL
    DPOTrainer ``f_divergence_type`` / ``f_alpha_divergence_coef`` with ``loss_type="sigmoid"``).

    The reverse-KL regulariser of DPO replaced by an f-divergence, whose implicit reward is
    beta f'(pi_theta / pi_ref):

        Delta = f'(u_w) - f'(u_l)     (:func:`fdpo_logits`; u = pi_theta / pi_ref)
        loss  = mean(-(1 - eps) log sigmoid(beta Delta) - eps log sigmoid(-beta Delta)),  eps = label_smoothing

    divergence: "reverse_kl" (exactly :func:`kto_jax.losses.dpo`), "forward_kl", "js" (Jensen-Shannon)
    or "alpha" (the alpha-divergence with ``alpha`` in (0, 1), the paper's and TRL v0.28's convention
    f'(u) = (1 - u^-alpha) / alpha: alpha -> 0 is reverse KL, alpha = 1 forward KL; TRL >= v1 writes the
    same family with alpha' = 1 - alpha). ``alpha`` must be in (0, 1) whatever the divergence.
    Exponents are clamped at MAX_EXPONENT = 50 before exp (TRL's cap_exp clamps too), which changes
    nothing unless |alpha r| or |r| > 50. Reward metrics are beta (pc - rc), beta (pr - rr) (TRL's).
    """
    check(divergence in DIVERGENCES, f"fdpo: divergence must be one of {DIVERGENCES}; got {divergence!r}")
    check(0 < alpha < 1, f"fdpo: alpha must be in (0, 1) (the alpha-divergence); got alpha={alpha}")
    check(0 <= label_smoothing < 0.5, f"fdpo: label_smoothing must be in [0, 0.5); got {label_smoothing}")
    args = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    if divergence == "reverse_kl":
        return dpo(*args, beta=beta, label_smoothing=label_smoothing, example_mask=example_mask)
    pc, pr, rc, rr = f32(*args)
    z = beta * fdpo_logits(pc - rc, pr - rr, divergence, alpha)
    losses = -(1.0 - label_smoothing) * log_sigmoid(z) - label_smoothing * log_sigmoid(-z)
    return _paired(losses, pc, pr, rc, rr, beta, example_mask)


def sigmoid_norm(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float = 0.1,
    example_mask=None,
) -> tuple[jax.Array, Metrics]:
    """Length-normalised DPO (TRL DPOTrainer ``loss_type="sigmoid_norm"``, TRL PR #5406, after SimPO's
    length normalisation, Meng et al. 2024, arXiv 2405.14734).

    TRL divides each completion's log-ratio score (pc - rc, pr - rr) by its completion token count
    (clamped at 1): loss = mean(-log sigmoid(beta (rw / |y_w| - rl / |y_l|))), no label smoothing.
    Dividing the policy and the reference log-prob of a completion by the same count is the same, so
    this is :func:`dpo` on length-normalised log-probs: the registry marks it ``length_normalized``
    and the engine passes per-token mean log-probs (``kto_jax.logprobs.mean_logps``, also clamped at 1).
    """
    pc, pr, rc, rr = f32(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    losses = -log_sigmoid(beta * ((pc - rc) - (pr - rr)))
    return _paired(losses, pc, pr, rc, rr, beta, example_mask)
