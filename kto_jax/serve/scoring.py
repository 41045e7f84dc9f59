"""Per-token log-probs of served rows (``logprobs``, ``echo``): training's forward and log-probs.

A row (prompt tokens, then the completion's) is right-padded and run through
``model.apply(..., return_hidden=True)``, and its tokens' log-probs are
``kto_jax.logprobs.chunked_token_logps`` through the model's LM head (its kernel and final
soft-cap), in float32: what ``kto_jax.train.feeds.head_token_logps`` computes in training, so
a served log-likelihood is the training code's sequence log-prob. The ``top_k`` most probable
tokens of each position come from the same hidden states, chunked over the length so the full
``[B, T, V]`` logits are never built. Log-probs are of the model's own distribution (before
temperature, top-k or top-p), as vLLM reports them by default.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kto_jax.logprobs import chunked_token_logps
from kto_jax.models import Decoder, lm_head_kernel

TOP_CHUNK = 64
TOP_K_SHAPES = (5, 20)  # top-k counts compiled: a request's k is rounded up to one of these


@dataclasses.dataclass
class Scores:
    """Log-probs of tokens 1.. of a row (token 0 has none): each token's, and per position the
    ``top_ids`` / ``top_logprobs`` of the k most probable tokens (empty lists when k = 0)."""

    token_logprobs: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]

    def tail(self, start: int) -> Scores:
        """The scores of tokens ``start``.. of the row (``start >= 1``)."""
        s = start - 1
        return Scores(self.token_logprobs[s:], self.top_ids[s:], self.top_logprobs[s:])


def _top_k_logps(hidden, kernel, softcap, k: int):
    """The ``k`` largest log-probs ``[B, L, k]`` and their token ids, of ``softcap(hidden @ kernel)``
    (``hidden`` ``[B, L, D]``), ``TOP_CHUNK`` positions at a time."""
    batch, length, dim = hidden.shape
    chunks = -(-length // TOP_CHUNK)
    hidden = jnp.pad(hidden, ((0, 0), (0, chunks * TOP_CHUNK - length), (0, 0)))
    hidden = hidden.reshape(batch, chunks, TOP_CHUNK, dim).swapaxes(0, 1)

    def one(h):
        logits = jnp.einsum("bcd,dv->bcv", h, kernel, preferred_element_type=jnp.float32)
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        return jax.lax.top_k(logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True), k)

    values, ids = jax.lax.map(one, hidden)
    values = values.swapaxes(0, 1).reshape(batch, chunks * TOP_CHUNK, k)[:, :length]
    ids = ids.swapaxes(0, 1).reshape(batch, chunks * TOP_CHUNK, k)[:, :length]
    return values, ids


@functools.partial(jax.jit, static_argnames=("model", "top_k"))
def score_batch(model: Decoder, params, ids, mask, *, top_k: int):
    """Right-padded rows ``[B, T]`` -> per-token log-probs ``[B, T-1]`` (training's
    ``chunked_token_logps``; 0 where padded) and, when ``top_k > 0``, the top-k log-probs and ids
    ``[B, T-1, top_k]`` of each position's next token."""
    config = model.config
    hidden = model.apply({"params": params}, ids, mask, return_hidden=True)
    kernel = lm_head_kernel(config, params)
    per_token = chunked_token_logps(hidden, kernel, ids, mask, softcap=config.final_logit_softcap)
    if top_k == 0:
        return per_token, None, None
    values, top_ids = _top_k_logps(hidden[:, :-1], kernel, config.final_logit_softcap, top_k)
    return per_token, values, top_ids


def top_k_shape(k: int) -> int:
    """The compiled top-k count for a request's ``k`` (0 stays 0)."""
    if k <= 0:
        return 0
    return next((s for s in TOP_K_SHAPES if k <= s), k)


def score_rows(
    model: Decoder, params, rows: Sequence[Sequence[int]], *, top_k: int, batch_size: int, bucket: int, pad_id: int
) -> list[Scores]:
    """``Scores`` of each row (at least 2 tokens long: the first token has no log-prob), in batches
    of ``batch_size`` rows right-padded to a multiple of ``bucket`` tokens."""
    k = top_k_shape(top_k)
    out: list[Scores] = []
    for start in range(0, len(rows), batch_size):
        chunk = [list(r) for r in rows[start : start + batch_size]]
        real = len(chunk)
        chunk += [chunk[0]] * (batch_size - real)
        length = -(-max(len(r) for r in chunk) // bucket) * bucket
        ids = np.full((batch_size, length), pad_id, np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        for i, r in enumerate(chunk):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        per_token, values, top_ids = score_batch(model, params, jnp.asarray(ids), jnp.asarray(mask), top_k=k)
        per_token = np.asarray(per_token, np.float64)
        values = None if values is None else np.asarray(values, np.float64)
        top_ids = None if top_ids is None else np.asarray(top_ids)
        for i in range(real):
            n = len(chunk[i]) - 1
            out.append(
                Scores(
                    per_token[i, :n].tolist(),
                    [] if top_ids is None else top_ids[i, :n, :top_k].tolist(),
                    [] if values is None else values[i, :n, :top_k].tolist(),
                )
            )
    return out
