"""Decoder-only transformers as Flax Linen modules applied as pure functions.

``model = build_model(config)``; ``logits = model.apply({"params": params}, input_ids, attention_mask)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kto_jax.models.common import Decoder, init_cache, lm_head_kernel
from kto_jax.models.config import ModelConfig
from kto_jax.models.families import FAMILIES, Family, get_family

ARCHITECTURES = {name: family.build for name, family in FAMILIES.items()}  # architecture -> build


def build_model(config: ModelConfig) -> Decoder:
    """The Flax module for ``config.architecture`` (its family's ``build``)."""
    return get_family(config.architecture).build(config)


def abstract_params(config: ModelConfig):
    """Param shapes/dtypes with logical-axis metadata (``nn.Partitioned`` boxes), allocating nothing."""
    model = build_model(config)
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))["params"]


def param_count(config: ModelConfig) -> int:
    """Number of parameters of the model (read off the abstract param tree)."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract_params(config))))


__all__ = [
    "ARCHITECTURES",
    "FAMILIES",
    "Decoder",
    "Family",
    "ModelConfig",
    "abstract_params",
    "build_model",
    "get_family",
    "init_cache",
    "lm_head_kernel",
    "param_count",
]
