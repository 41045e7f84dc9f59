"""Growing a model's vocabulary for tokens added to its tokenizer (CSFT's control tokens).

    config, params = grow_vocab(config, params, vocab_size, mesh)

The embedding gains rows ``[V, V')`` and an untied LM head the same columns, each new one the
mean of the existing ones (transformers' ``resize_token_embeddings`` default since 4.46; the
paper's code ran an older transformers that drew them from N(0, initializer_range^2)), so a
new token starts as an average token. Existing rows are untouched and the result is laid out
on the mesh like any param (the ``vocab`` axis over ``tensor``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kto_jax import sharding
from kto_jax.errors import InputError
from kto_jax.models import ModelConfig, abstract_params


def grown_config(config: ModelConfig, tokenizer_size: int) -> ModelConfig:
    """The model's config with room for a tokenizer of ``tokenizer_size`` tokens: its vocabulary
    grown to that size when it is smaller (a padded vocabulary such as Pythia's already has room)."""
    return config.replace(vocab_size=tokenizer_size) if tokenizer_size > config.vocab_size else config


def grow_vocab(config: ModelConfig, params, vocab_size: int, mesh=None):
    """``(config with vocab_size, params)`` with the new embedding rows and LM-head columns set
    to the mean of the existing ones; a smaller ``vocab_size`` than the model's is an error."""
    if vocab_size < config.vocab_size:
        raise ValueError(f"grow_vocab: vocab_size {vocab_size} is below the model's {config.vocab_size}")
    if vocab_size == config.vocab_size:
        return config, params
    new_config = grown_config(config, vocab_size)
    extra = vocab_size - config.vocab_size

    def grow(params):
        out = jax.tree_util.tree_map(lambda x: x, params)
        table = params["embed"]["embedding"]
        rows = jnp.broadcast_to(table.mean(axis=0, keepdims=True), (extra, table.shape[1])).astype(table.dtype)
        out["embed"] = {**params["embed"], "embedding": jnp.concatenate([table, rows], axis=0)}
        if not config.tie_word_embeddings:
            kernel = params["lm_head"]["kernel"]
            cols = jnp.broadcast_to(kernel.mean(axis=1, keepdims=True), (kernel.shape[0], extra)).astype(kernel.dtype)
            out["lm_head"] = {**params["lm_head"], "kernel": jnp.concatenate([kernel, cols], axis=1)}
        return out

    if mesh is None:
        return new_config, jax.jit(grow)(params)
    tensor = mesh.shape["tensor"]
    if vocab_size % tensor:
        raise InputError(
            f"the grown vocabulary ({vocab_size} tokens) does not split over config.mesh.tensor={tensor}: "
            f"use a tensor size that divides {vocab_size}"
        )
    shardings = sharding.logical_to_sharding(nn.get_partition_spec(abstract_params(new_config)), mesh)
    return new_config, jax.jit(grow, out_shardings=shardings)(params)
