"""The server's generation: ``kto_jax.generate.generate``'s tokens, ``chunk`` tokens per device call.

``generate_batch`` (kto_jax/generate.py) samples a whole row in one ``lax.scan``: nothing can be
streamed until the row ends, and a batch runs its full ``max_new_tokens`` even when every row
has ended. Here the same two parts (``kto_jax.generate.prefill`` and ``decode_steps``) run as a prefill call, then scans of
``chunk`` steps whose carry (KV cache, logits, positions, done flags) stays on the device; after
each, only the ``[B, chunk]`` new tokens come to the host, where ``on_chunk`` may stream them
and say whether to go on. The keys are ``generate``'s (``split(key, max_new_tokens)``, sliced
per chunk), so the tokens equal ``generate``'s for the same seed, shapes and sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kto_jax.generate import decode_steps, left_pad, prefill
from kto_jax.models import Decoder

CHUNK = 16


def generate_chunked(
    model: Decoder,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 64,
    seed: int = 0,
    bucket: int = 16,
    chunk: int = CHUNK,
    on_chunk: Callable[[int, list[list[int]], int], bool] | None = None,
) -> list[list[int]]:
    """``kto_jax.generate.generate``'s completions (tokens up to, not including, EOS), made ``chunk``
    tokens per device call.

    After each chunk of the batch holding prompts ``start..start+b``, ``on_chunk(start, rows, n)``
    gets those rows' tokens so far (cut before EOS; ``n`` tokens were generated per row, so a row
    shorter than ``n`` has met EOS) and returns False to end that batch there
    (its rows are then what was generated so far). A batch also ends once every row has met EOS.
    """
    if int(top_k) < 0:
        raise ValueError(f"generate_chunked: top_k must be >= 0 (0 = off); got top_k={top_k}")
    statics = dict(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k))
    statics.update(eos_id=int(eos_id), pad_id=int(pad_id))
    out: list[list[int]] = []
    rng = jax.random.PRNGKey(seed)
    for start in range(0, len(prompts), batch_size):
        rows = list(prompts[start : start + batch_size])
        real = len(rows)
        ids, mask = left_pad(rows + [rows[0]] * (batch_size - real), bucket, pad_id)
        rng, key = jax.random.split(rng)
        keys = jax.random.split(key, max_new_tokens)
        carry, slots = prefill(model, params, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=max_new_tokens)
        made: list[np.ndarray] = []
        for at in range(0, max_new_tokens, chunk):
            carry, tokens = decode_steps(model, params, carry, slots, keys[at : at + chunk], **statics)
            made.append(np.asarray(tokens)[:real])
            generated = sum(m.shape[1] for m in made)
            sofar = _cut_at_eos(np.concatenate(made, axis=1), eos_id)
            ended = all(len(r) < generated for r in sofar)
            go_on = on_chunk(start, sofar, generated) if on_chunk is not None else True
            if ended or not go_on:
                break
        out.extend(sofar)
    return out


def _cut_at_eos(tokens: np.ndarray, eos_id: int) -> list[list[int]]:
    """Each row of ``tokens`` up to, not including, its first ``eos_id``."""
    rows = []
    for row in tokens.tolist():
        rows.append(row[: row.index(eos_id)] if eos_id in row else row)
    return rows
