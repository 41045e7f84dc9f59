"""Where each token sits and what it sees: positions, attention masks (padded, packed, KV cache)
and rotary embeddings (RoPE), shared by every decoder family (``kto_jax.models.common``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from kto_jax.models.config import ModelConfig


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position of each token among the real tokens of its row: cumsum(mask) - 1, >= 0.

    Left- and right-padded rows therefore give their real tokens positions 0, 1, 2, ...
    """
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def attention_mask_4d(attention_mask: jax.Array, sliding_window: int | None = None) -> jax.Array:
    """``[B, 1, T, T]`` bool: query i sees key j iff j <= i, j is a real token (and i - j <
    sliding_window). Every query also sees itself, so padded rows never softmax over nothing."""
    return cache_attention_mask(attention_mask, 0, attention_mask.shape[-1], sliding_window)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Position of each token within its segment of a packed row: t - (first t' of its segment).

    A segment starts where ``segment_ids`` changes (and at t = 0), so each packed sequence's
    tokens get positions 0, 1, 2, ... as they would alone in a padded row.
    """
    t = jnp.broadcast_to(jnp.arange(segment_ids.shape[-1], dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=-1
    )
    return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=segment_ids.ndim - 1)


def segment_attention_mask(segment_ids: jax.Array, sliding_window: int | None = None) -> jax.Array:
    """``[B, 1, T, T]`` bool for packed rows: query i sees key j iff j <= i, both are in the same
    segment, j is not padding (segment 0) (and i - j < sliding_window); every query sees itself."""
    length = segment_ids.shape[-1]
    i, j = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
    allowed = j <= i
    if sliding_window is not None:
        allowed &= (i - j) < sliding_window
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)
    return (allowed[None] & same | (i == j)[None])[:, None]


def rope_inv_freq(config: ModelConfig) -> jax.Array:
    """Inverse frequencies theta^(-2k/d) over the rotary dims, with linear or llama3 scaling
    (Meta's Llama 3.1 rule: long wavelengths divided by ``factor``, a smooth ramp between)."""
    dim = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if config.rope_type == "linear":
        return inv_freq / config.rope_factor
    if config.rope_type == "llama3":
        factor, old_len = config.rope_factor, config.rope_original_max_position
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return jnp.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate the first ``2 * len(inv_freq)`` dims of each head (HF's rotate-half layout).

    x: ``[B, T, H, Dh]``; positions: ``[B, T]``. x_rot * cos + rotate_half(x_rot) * sin,
    computed in float32; the remaining dims pass through unchanged (partial rotary).
    """
    rot = 2 * inv_freq.shape[0]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, rot/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x_rot, x_pass = x[..., :rot].astype(jnp.float32), x[..., rot:]
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = (x_rot * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out


def cache_attention_mask(slot_mask: jax.Array, index, length: int, sliding_window: int | None = None) -> jax.Array:
    """``[B, 1, T, S]``: query t (cache slot index + t) sees slot j iff j <= index + t, slot j
    holds a real token, and (with a window) index + t - j < sliding_window; always itself
    (so padded rows never softmax over nothing)."""
    slots = slot_mask.shape[-1]
    i = index + jnp.arange(length)[:, None]
    j = jnp.arange(slots)[None, :]
    allowed = j <= i
    if sliding_window is not None:
        allowed &= (i - j) < sliding_window
    allowed = allowed[None, None] & slot_mask.astype(bool)[:, None, None, :]
    return allowed | (i == j)[None, None]
