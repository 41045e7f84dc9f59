"""Block-causal attention for XLA (``attention_impl="blocked"``): the key blocks a causal mask rules
out are never computed, on any backend, with a backward that recomputes instead of storing ``[T, T]``.

XLA's attention (``jax.nn.dot_product_attention`` on CPU, :func:`kto_jax.models.common.xla_attention`)
builds the full ``[B, H, T, T]`` scores and masks half of them away. Here the length is cut into query
blocks of ``block`` tokens; query block i (tokens ``[i b, (i + 1) b)``) scores only the keys

    [lo_i, (i + 1) b),   lo_i = 0, or with a sliding window w: b * floor(max(0, i b - w + 1) / b)

(static slices: every later key is causally masked, every earlier one outside the window), heads-major
(``[B, KV, G, b, D]`` against ``[B, KV, L, D]``; G = heads per KV head, GQA), softmax over that row in
float32, the model's mask (padding, packed segments, the window's diagonal) applied inside it. At most
one block row of scores ``[B, H, b, <= T]`` exists at a time. Output per row:

    s = scale * q k^T  (cap * tanh(s / cap) when soft-capped),   p = softmax(where(mask, s, -inf)),   o = p v

The backward (``jax.custom_vjp``) keeps q, k, v, o and each row's max and sum of exponentials, and
recomputes each block row: e = exp(s - max), p = e / sum, dv += p^T do = e^T (do / sum), dp = do v^T, ds = p (dp - rowsum(do * o)) (times
1 - tanh^2 under a soft-cap), dq = scale ds k, dk += scale ds^T q. So the saved activations are
``O(T)`` per head, not ``O(T^2)``.

The mask is the model's ``[B, 1, T, T]`` bool mask (every query sees at least itself: no empty row).
Blocks inside the causal, windowed band that a packed row's segments rule out are still computed
(masked), as their emptiness is data, not shape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BLOCK = 128


def key_range(i: int, block: int, length: int, window: int | None) -> tuple[int, int]:
    """The keys ``[lo, hi)`` query block i can see: up to the end of its own block (causal), from the
    start of the key block holding its first query's earliest key in the window."""
    hi = min((i + 1) * block, length)
    if window is None:
        return 0, hi
    first = max(0, i * block - window + 1)
    return (first // block) * block, hi


def _rows(q, k, mask, i, block, window, scale, softcap):
    """Block row i: (its keys' slice, raw scores, capped + masked scores) in float32."""
    length = q.shape[3]
    lo, hi = key_range(i, block, length, window)
    a, b = i * block, min((i + 1) * block, length)
    raw = jnp.einsum("bkgqd,bksd->bkgqs", q[:, :, :, a:b], k[:, :, lo:hi], preferred_element_type=jnp.float32)
    raw = raw * scale
    s = raw if softcap is None else softcap * jnp.tanh(raw / softcap)
    allowed = mask[:, :, None, a:b, lo:hi]  # [B, 1, 1, bq, L]
    return (a, b, lo, hi), raw, jnp.where(allowed, s, -jnp.inf), allowed


def _forward(q, k, v, mask, block, window, scale, softcap):
    """(out, (row max, row sum)) heads-major: q ``[B, KV, G, T, D]``, k/v ``[B, KV, T, D]``."""
    outs, maxes, sums = [], [], []
    for i in range(-(-q.shape[3] // block)):
        (_, _, lo, hi), _, s, _ = _rows(q, k, mask, i, block, window, scale, softcap)
        row_max = jnp.max(s, axis=-1)
        e = jnp.exp(s - row_max[..., None])
        row_sum = jnp.sum(e, axis=-1)
        o = jnp.einsum("bkgqs,bksd->bkgqd", e.astype(v.dtype), v[:, :, lo:hi], preferred_element_type=jnp.float32)
        outs.append((o * (1.0 / row_sum)[..., None]).astype(v.dtype))  # p v = (e v) / sum: [b, D], not [b, L]
        maxes.append(row_max)
        sums.append(row_sum)
    return jnp.concatenate(outs, axis=3), (jnp.concatenate(maxes, axis=3), jnp.concatenate(sums, axis=3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention(q, k, v, mask, block, window, scale, softcap):
    return _forward(q, k, v, mask, block, window, scale, softcap)[0]


def _attention_fwd(q, k, v, mask, block, window, scale, softcap):
    out, stats = _forward(q, k, v, mask, block, window, scale, softcap)
    return out, (q, k, v, mask, out, stats)


def _attention_bwd(block, window, scale, softcap, residuals, d_out):
    q, k, v, mask, out, (row_max, row_sum) = residuals
    dq_rows = []
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)  # rowsum(do * o): [B, KV, G, T]
    for i in range(-(-q.shape[3] // block)):
        (a, b, lo, hi), raw, s, allowed = _rows(q, k, mask, i, block, window, scale, softcap)
        e = jnp.exp(s - row_max[:, :, :, a:b, None])  # p = e / sum, 0 where masked
        inv = (1.0 / row_sum[:, :, :, a:b])[..., None]
        do = d_out[:, :, :, a:b]
        dv = dv.at[:, :, lo:hi].add(jnp.einsum("bkgqs,bkgqd->bksd", e, do * inv))  # p^T do = e^T (do / sum)
        dp = jnp.einsum("bkgqd,bksd->bkgqs", do, v[:, :, lo:hi].astype(jnp.float32))
        ds = e * ((dp - delta[:, :, :, a:b, None]) * inv)
        if softcap is not None:
            ds = ds * (1.0 - jnp.tanh(raw / softcap) ** 2)
        ds = jnp.where(allowed, ds, 0.0) * scale
        dq_rows.append(jnp.einsum("bkgqs,bksd->bkgqd", ds, k[:, :, lo:hi].astype(jnp.float32)))
        dk = dk.at[:, :, lo:hi].add(jnp.einsum("bkgqs,bkgqd->bksd", ds, q[:, :, :, a:b].astype(jnp.float32)))
    dq = jnp.concatenate(dq_rows, axis=3)
    d_mask = np.zeros(mask.shape, jax.dtypes.float0)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_mask


_attention.defvjp(_attention_fwd, _attention_bwd)


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
    block: int = DEFAULT_BLOCK,
) -> jax.Array:
    """Causal self-attention skipping the key blocks the causal band rules out (module docstring).

    Args:
      q: ``[B, T, H, D]``; k, v: ``[B, T, KV, D]`` with H a multiple of KV (GQA).
      mask: ``[B, 1, T, T]`` bool, the model's (causal, padding or packed segments, window); every
        query must see at least one key (the model's masks let each see itself).
      scale: the logits' scale; softcap: cap * tanh(logits / cap) (Gemma 2) or None.
      window: the sliding window the mask applies (keys further back are skipped as blocks), or None.
      block: query and key block length.

    Returns:
      ``[B, T, H, D]`` in q's dtype.
    """
    batch, length, heads, head_dim = q.shape
    kv = k.shape[2]
    if k.shape[1] != length or mask.shape[-2:] != (length, length):
        raise ValueError(f"blocked attention is self-attention: q {q.shape}, k {k.shape}, mask {mask.shape}")
    qh = q.reshape(batch, length, kv, heads // kv, head_dim).transpose(0, 2, 3, 1, 4)  # [B, KV, G, T, D]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, D]
    block = max(1, min(int(block), length))
    out = _attention(qh, kh, vh, mask, block, window, float(scale), softcap)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim).astype(q.dtype)
