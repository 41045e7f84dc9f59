"""The HALO family of alignment losses: pure functions of log-probs -> (loss, metrics).

Look a loss up by name with :func:`get_loss` (``config.loss.name``); each function's
docstring states its formula and paper. See the loss table in docs/losses.md.
"""

from kto_jax.losses.aot import aot, aot_pair, aot_unpaired
from kto_jax.losses.fdpo import fdpo, sigmoid_norm
from kto_jax.losses.halo import VALUE_FUNCTIONS, halo, halo_unary
from kto_jax.losses.paired import (
    apo_down,
    apo_zero,
    bco_pair,
    cdpo,
    discopop,
    dpo,
    exo_pair,
    hinge,
    ipo,
    nca_pair,
    robust,
    sppo_hard,
)
from kto_jax.losses.ppo import gae, ppo_offline
from kto_jax.losses.reference_free import orpo, sft, simpo, slic
from kto_jax.losses.registry import LOSSES, LossSpec, get_loss
from kto_jax.losses.unary import bco, kto, kto_reference_point, kto_zero

apo_zero_unpaired = kto_zero

__all__ = [
    "LOSSES",
    "LossSpec",
    "get_loss",
    "VALUE_FUNCTIONS",
    "halo",
    "halo_unary",
    "kto",
    "kto_zero",
    "apo_zero_unpaired",
    "kto_reference_point",
    "bco",
    "aot_unpaired",
    "ppo_offline",
    "gae",
    "dpo",
    "cdpo",
    "ipo",
    "hinge",
    "robust",
    "exo_pair",
    "bco_pair",
    "sppo_hard",
    "nca_pair",
    "apo_zero",
    "apo_down",
    "discopop",
    "aot",
    "aot_pair",
    "fdpo",
    "sigmoid_norm",
    "slic",
    "simpo",
    "orpo",
    "sft",
]
