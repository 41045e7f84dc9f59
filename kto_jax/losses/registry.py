"""The loss registry: one entry per name, looked up by ``config.loss.name``.

Each entry says which data the loss needs (``kind``), whether a reference model and KL
sequences are needed, whether it wants length-normalised log-probs, and where its
formula comes from. Hyperparameter defaults live in one place, the function signature,
and are read from it.
"""

from __future__ import annotations

import functools

from kto_jax.errors import InputError
from kto_jax.losses import mixture, paired, reference_free
from kto_jax.losses.aot import aot, aot_pair, aot_unpaired
from kto_jax.losses.fdpo import fdpo, sigmoid_norm
from kto_jax.losses.halo import halo_unary
from kto_jax.losses.ppo import ppo_offline
from kto_jax.losses.spec import KINDS, NOT_HYPERPARAMETERS, OPTIONAL_INPUTS, LossSpec
from kto_jax.losses.unary import bco, kto, kto_zero

__all__ = ["KINDS", "LOSSES", "NOT_HYPERPARAMETERS", "OPTIONAL_INPUTS", "LossSpec", "get_loss"]


def _halo_unused(hparams) -> tuple[str, ...]:
    """``halo`` around z = 0 takes no KL log-probs."""
    return ("policy_kl_logps", "reference_kl_logps") if hparams["reference_point"] == "zero" else ()


_ENTRIES = [
    # Unary (binary feedback).
    LossSpec("kto", kto, "unary", "Ethayarajh et al. 2024, arXiv 2402.01306"),
    LossSpec("kto_zero", kto_zero, "unary", "HALOs kto-zero ablation (KTO with z0 = 0)"),
    LossSpec("apo_zero_unpaired", kto_zero, "unary", "D'Oosterlinck et al. 2024, arXiv 2408.06266 (TRL KTO loss_type)"),
    LossSpec("halo", halo_unary, "unary", "Ethayarajh et al. 2024, def. 3.4", unused_inputs=_halo_unused),
    LossSpec(
        "bco",
        bco,
        "unary",
        "Jung et al. 2024, arXiv 2404.04656 (TRL BCOTrainer; no UDM weights)",
        state_metrics=(("running_mean", "bco/running_mean"), ("running_count", "bco/running_count")),
    ),
    LossSpec("aot_unpaired", aot_unpaired, "unary", "Melnyk et al. 2024, arXiv 2406.05882 (quantile grid)"),
    LossSpec("ppo_offline", ppo_offline, "unary", "Schulman et al. 2017; KTO paper's offline PPO", feed="token"),
    # Paired, with a reference model.
    LossSpec("dpo", paired.dpo, "paired", "Rafailov et al. 2023, arXiv 2305.18290; cDPO with label_smoothing"),
    LossSpec("cdpo", paired.cdpo, "paired", "Mitchell 2023, cDPO; HALOs cdpo (dpo with label_smoothing 0.2)"),
    LossSpec("ipo", paired.ipo, "paired", "Azar et al. 2023, arXiv 2310.12036", length_normalized=True),
    LossSpec("hinge", paired.hinge, "paired", "Zhao et al. 2023, arXiv 2305.10425 (TRL loss_type)"),
    LossSpec("robust", paired.robust, "paired", "Chowdhury et al. 2024, arXiv 2403.00409"),
    LossSpec("exo_pair", paired.exo_pair, "paired", "Ji et al. 2024, arXiv 2402.00856"),
    LossSpec(
        "bco_pair",
        paired.bco_pair,
        "paired",
        "Jung et al. 2024, arXiv 2404.04656",
        state_metrics=(("running_mean", "bco/running_mean"), ("running_count", "bco/running_count")),
        batch_coupled=True,
    ),
    LossSpec("sppo_hard", paired.sppo_hard, "paired", "Wu et al. 2024, arXiv 2405.00675"),
    LossSpec("nca_pair", paired.nca_pair, "paired", "Chen et al. 2024, arXiv 2402.05369"),
    LossSpec("apo_zero", paired.apo_zero, "paired", "D'Oosterlinck et al. 2024, arXiv 2408.06266"),
    LossSpec("apo_down", paired.apo_down, "paired", "D'Oosterlinck et al. 2024, arXiv 2408.06266"),
    LossSpec("discopop", paired.discopop, "paired", "Lu et al. 2024, arXiv 2406.08414"),
    LossSpec("aot", aot, "paired", "Melnyk et al. 2024, arXiv 2406.05882 (TRL loss_type)", batch_coupled=True),
    LossSpec(
        "aot_pair",
        aot_pair,
        "paired",
        "Melnyk et al. 2024, arXiv 2406.05882 (TRL loss_type aot_pair)",
        batch_coupled=True,
    ),
    LossSpec("fdpo", fdpo, "paired", "Wang et al. 2023, arXiv 2309.16240 (TRL f_divergence_type)"),
    LossSpec(
        "sigmoid_norm",
        sigmoid_norm,
        "paired",
        "TRL loss_type sigmoid_norm (DPO on length-normalised log-ratios)",
        length_normalized=True,
    ),
    # Paired, reference-free.
    LossSpec("slic", reference_free.slic, "paired", "Zhao et al. 2023, arXiv 2305.10425 (HALOs)"),
    LossSpec("simpo", reference_free.simpo, "paired", "Meng et al. 2024, arXiv 2405.14734", length_normalized=True),
    LossSpec(
        "orpo",
        reference_free.orpo,
        "paired",
        "Hong et al. 2024, arXiv 2403.07691",
        length_normalized=True,
        batch_coupled=True,  # its NLL averages over the batch's chosen tokens
    ),
    # Supervised.
    LossSpec("sft", reference_free.sft, "sft", "token-averaged NLL"),
    LossSpec(
        "csft",
        reference_free.sft,
        "sft",
        "Korbak et al. 2023, arXiv 2302.08582 (control tokens in the data)",
        control_tokens=("<|good|>", "<|bad|>"),
    ),
]

LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in _ENTRIES}


def get_loss(name: str) -> LossSpec:
    """The registered loss ``name``, or the mixture of registered losses ``"dpo+sft"`` / a preset
    (``rpo``, ``mpo``: ``kto_jax.losses.mixture``); an unknown name fails listing the known ones."""
    if mixture.is_mixture(name):
        return _mixture(name)
    try:
        return LOSSES[name]
    except KeyError:
        raise InputError(
            f"unknown loss {name!r} (config.loss.name); known losses: {', '.join(sorted(LOSSES))}"
        ) from None


@functools.cache
def _mixture(name: str) -> LossSpec:
    """One spec per mixture name, so steps compiled for it are shared."""
    return mixture.get_mixture(name, get_loss)
