"""Per-token and per-sequence log-probabilities of completions.

Convention (the house plan): position t of the logits predicts token t+1, so
``logits[:, :-1]`` is scored against ``labels[:, 1:]`` and only positions where
``loss_mask[:, 1:]`` is set (the completion tokens) count. Log-softmax is always
taken in float32, whatever the compute dtype of the model.

Two paths with the same value and gradient:

* :func:`token_logps` / :func:`sequence_logps` take full logits ``[B, T, V]``.
* :func:`chunked_token_logps` / :func:`chunked_sequence_logps` take the final hidden
  states ``[B, T, D]`` and the LM-head kernel ``[D, V]`` and never build the full
  logits: the length axis is cut into chunks, each chunk's logits are made, reduced
  to one log-prob per token and dropped, and rebuilt in the backward pass
  (``jax.checkpoint``). Peak temporary memory is ``B * chunk_size * V`` floats
  instead of ``B * T * V``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _shift(labels: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """labels[:, 1:] with masked positions set to token 0 (never read), and mask[:, 1:]."""
    mask = loss_mask[:, 1:].astype(bool)
    return jnp.where(mask, labels[:, 1:], 0), mask


def _label_logps(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """log softmax(logits)[label] = logits[label] - logsumexp(logits), in float32."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def token_logps(logits: jax.Array, labels: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Per-token log-probs ``[B, T-1]``: log p(labels[t+1] | logits[t]), 0 where masked."""
    labels, mask = _shift(labels, loss_mask)
    return jnp.where(mask, _label_logps(logits[:, :-1], labels), 0.0)


def sum_and_count(per_token: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row sums of shifted per-token values ``[B, T-1]`` and the row's scored-token counts."""
    counts = loss_mask[:, 1:].astype(jnp.int32).sum(axis=-1)
    return per_token.sum(axis=-1), counts


def sequence_logps(logits: jax.Array, labels: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed completion log-prob of each sequence and its completion token count.

    sum_logps[b] = sum_{t>=1} loss_mask[b, t] * log softmax(logits[b, t-1])[labels[b, t]]
    token_counts[b] = sum_{t>=1} loss_mask[b, t]

    Args:
      logits: ``[B, T, V]`` in any float dtype.
      labels: ``[B, T]`` int token ids (the input ids); masked positions may hold anything.
      loss_mask: ``[B, T]`` bool/int, 1 on completion tokens.

    Returns:
      ``(sum_logps [B] float32, token_counts [B] int32)``. Length-normalised log-probs
      are ``sum_logps / max(token_counts, 1)`` (see :func:`mean_logps`).
    """
    return sum_and_count(token_logps(logits, labels, loss_mask), loss_mask)


def mean_logps(sum_logps: jax.Array, token_counts: jax.Array) -> jax.Array:
    """Length-normalised log-probs: sum_logps / max(token_counts, 1)."""
    return sum_logps / jnp.maximum(token_counts, 1).astype(jnp.float32)


def _chunk_label_logps(
    hidden: jax.Array, kernel: jax.Array, labels: jax.Array, softcap: float | None, collision: bool = False
):
    """Label log-probs of one length chunk: logits = hidden ``[B, C, D]`` @ kernel ``[D, V]``, then
    cap * tanh(logits / cap) when the model soft-caps its logits (Gemma 2's final_logit_softcap).
    With ``collision``, also :func:`log_collision` of each position's distribution, no gradient."""
    logits = jnp.einsum("bcd,dv->bcv", hidden, kernel, preferred_element_type=jnp.float32)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    picked = _label_logps(logits, labels)
    return (picked, log_collision(jax.lax.stop_gradient(logits))) if collision else picked


def log_collision(logits: jax.Array) -> jax.Array:
    """log sum_v p_v^2 of p = softmax(logits) over the last axis, in float32:
    logsumexp(2 z) - 2 logsumexp(z) (the log of the distribution's collision probability; WPO's
    per-token normaliser, Zhou et al. 2024, arXiv 2406.11827 eq. 2)."""
    logits = logits.astype(jnp.float32)
    return jax.nn.logsumexp(2.0 * logits, axis=-1) - 2.0 * jax.nn.logsumexp(logits, axis=-1)


@functools.partial(jax.jit, static_argnames=("chunk_size", "softcap", "collision"))
def chunked_token_logps(
    hidden: jax.Array,
    kernel: jax.Array,
    labels: jax.Array,
    loss_mask: jax.Array,
    *,
    chunk_size: int = 256,
    softcap: float | None = None,
    collision: bool = False,
):
    """:func:`token_logps` of ``logits = softcap(hidden @ kernel)`` without the full logits.

    Args:
      hidden: final hidden states ``[B, T, D]`` (after the final norm).
      kernel: LM-head kernel ``[D, V]`` (pass ``embedding.T`` for tied embeddings).
      labels, loss_mask: as in :func:`sequence_logps`.
      chunk_size: tokens per chunk along the length axis; temporary memory is
        ``B * chunk_size * V`` float32 in the forward and the backward pass.
      softcap: the model's final logit soft-cap (``ModelConfig.final_logit_softcap``; None: off),
        logits -> softcap * tanh(logits / softcap), as the model's own LM head applies it.
      collision: also return :func:`log_collision` of each scored position (WPO's weights), from
        the same chunked logits, with no gradient.

    Returns:
      ``[B, T-1]`` float32 per-token log-probs, 0 where masked; with ``collision``, the pair
      ``(log-probs, log collision)``, both ``[B, T-1]`` and 0 where masked.
    """
    labels, mask = _shift(labels, loss_mask)
    hidden = hidden[:, :-1]
    batch, length, dim = hidden.shape
    chunk = max(1, min(chunk_size, length))
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    padded_labels = jnp.pad(labels, ((0, 0), (0, pad)))
    # [num_chunks, B, C, ...]: scan over chunks, rematerialising each chunk's logits.
    hidden = hidden.reshape(batch, num_chunks, chunk, dim).swapaxes(0, 1)
    padded_labels = padded_labels.reshape(batch, num_chunks, chunk).swapaxes(0, 1)

    step = jax.checkpoint(
        lambda _, xs: (None, _chunk_label_logps(xs[0], kernel, xs[1], softcap, collision)),
        policy=jax.checkpoint_policies.nothing_saveable,
    )
    _, per_chunk = jax.lax.scan(step, None, (hidden, padded_labels))

    def unchunk(x):
        return jnp.where(mask, x.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :length], 0.0)

    return tuple(unchunk(x) for x in per_chunk) if collision else unchunk(per_chunk)


def chunked_sequence_logps(
    hidden: jax.Array,
    kernel: jax.Array,
    labels: jax.Array,
    loss_mask: jax.Array,
    *,
    chunk_size: int = 256,
    softcap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """:func:`sequence_logps` of ``logits = softcap(hidden @ kernel)``, chunked over length.

    Same value and gradient (with respect to ``hidden`` and ``kernel``) as
    ``sequence_logps(hidden @ kernel, labels, loss_mask)``; see
    :func:`chunked_token_logps` for the memory it saves.
    """
    per_token = chunked_token_logps(hidden, kernel, labels, loss_mask, chunk_size=chunk_size, softcap=softcap)
    return sum_and_count(per_token, loss_mask)


def segment_sums(
    per_token: jax.Array, segment_ids: jax.Array, loss_mask: jax.Array, num_segments: int
) -> tuple[jax.Array, jax.Array]:
    """Per-sequence sums of a packed batch: the log-prob and token count of each segment.

    With the shifted convention (``per_token[r, t]`` scores token ``t + 1`` of row r):

      sum_logps[k]    = sum_{r, t >= 1: segment_ids[r, t] = k + 1} loss_mask[r, t] * per_token[r, t - 1]
      token_counts[k] = sum_{r, t >= 1: segment_ids[r, t] = k + 1} loss_mask[r, t]

    Args:
      per_token: ``[R, T-1]`` per-token log-probs (0 where masked), e.g. from :func:`chunked_token_logps`.
      segment_ids: ``[R, T]`` int, 1 + the sequence's index (0 on padding).
      loss_mask: ``[R, T]`` completion tokens; the first token of each segment must be off (the
        packed loader guarantees it), as position 0 of a padded row is never scored.
      num_segments: the number of sequences K.

    Returns:
      ``(sum_logps [K] float32, token_counts [K] int32)``, equal to :func:`sequence_logps` of the
      same sequences padded one per row.
    """
    ids = segment_ids[:, 1:].reshape(-1) - 1
    mask = loss_mask[:, 1:].astype(bool).reshape(-1) & (ids >= 0)
    ids = jnp.where(mask, ids, num_segments)  # out of range: dropped by segment_sum
    values = jnp.where(mask, per_token.reshape(-1).astype(jnp.float32), 0.0)
    sums = jax.ops.segment_sum(values, ids, num_segments=num_segments)
    counts = jax.ops.segment_sum(mask.astype(jnp.int32), ids, num_segments=num_segments)
    return sums, counts


def unpack_tokens(values: jax.Array, unpack_index: jax.Array) -> jax.Array:
    """Per-token values of packed rows ``[R, T]`` laid out per example ``[K, T]``: out[k, t] =
    values.flat[unpack_index[k, t]], 0 where the index is -1 (past the sequence's end)."""
    flat = jnp.asarray(values).reshape(-1)
    valid = unpack_index >= 0
    return jnp.where(valid, flat[jnp.where(valid, unpack_index, 0)], jnp.zeros((), values.dtype))
