"""Batched KV-cache generation: the held-out prompts, their tokens, sampling (HALOs' top-k / top-p).

    completions = generate(model, params, prompt_ids, max_new_tokens=16, eos_id=..., pad_id=...,
                           temperature=1.0, top_k=50, top_p=0.95)   # HALOs' sampling

Judges (exact, API, reward model) are in kto_jax/judges/; judged rates and win rates with their
90% intervals in kto_jax/stats.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kto_jax import faults
from kto_jax.data.chat import render_prompt
from kto_jax.data.tokenize import cut_prompt, encode_prompt
from kto_jax.models import Decoder, init_cache


def eval_prompts(prompts, n: int) -> list:
    """The ``n`` held-out prompts every run of a split is judged on: the distinct prompts in
    order of their SHA-1, so the choice does not depend on the data view (unary, paired,
    shuffled) and runs of different losses are compared on the same prompts."""
    by_hash = {hashlib.sha1(json.dumps(p).encode("utf-8")).hexdigest(): p for p in prompts}
    return [by_hash[h] for h in sorted(by_hash)[:n]]


def prompt_inputs(prompts, template, tokenizer, max_prompt_length: int, control_token: str | None = None):
    """``(shown, ids)`` of conversations to sample from, as training renders them: ``shown`` the
    template's text of each whole dialogue (with the BOS a Jinja template writes first), ``ids``
    its tokens cut to ``max_prompt_length`` (keeping the end), then ``control_token`` appended
    (CSFT samples conditioned on its "good" token)."""
    texts = [render_prompt(p, template) for p in prompts]
    shown = [template.bos_token + t if getattr(template, "renders_bos", False) else t for t in texts]
    ids = [cut_prompt(encode_prompt(tokenizer, t), int(max_prompt_length), bos_id=tokenizer.bos_id) for t in texts]
    if control_token:
        ids = [i + [tokenizer.token_id(control_token)] for i in ids]
    return shown, ids


def sample_token(
    logits: jax.Array, rng: jax.Array, temperature: float, top_p: float = 1.0, top_k: int = 0
) -> jax.Array:
    """Greedy at temperature 0, else sampling at ``temperature`` from the logits left after top-k
    and then nucleus truncation, in the order of Hugging Face's warpers (Temperature, TopK, TopP;
    ``GenerationMixin._get_logits_warper`` in transformers 4.35), which HALOs'
    ``policy.generate(do_sample=True)`` uses.

    top_k > 0: keep the ``top_k`` largest logits (with ties at the k-th value, as ``TopKLogitsWarper``);
    0 is off. top_p < 1: of what remains, keep the smallest set of tokens, most probable first, whose
    renormalised probability mass reaches ``top_p``.
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits.astype(jnp.float32) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def prefill(model: Decoder, params, ids, mask, *, max_new_tokens: int):
    """Left-padded prompts ``[B, P]`` -> the decoding carry ``(KV cache, last logits, next position,
    done)`` and the cache-slot mask ``[B, P + max_new_tokens]``: one forward over the prompts
    (``prefill=True``: their own slots, with the training self-attention)."""
    batch, prompt_len = ids.shape
    slots = jnp.concatenate([mask, jnp.ones((batch, max_new_tokens), mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    cache = init_cache(model.config, batch, prompt_len + max_new_tokens)
    logits, cache = model.apply({"params": params}, ids, slots, cache=cache, positions=positions, prefill=True)
    carry = (cache, logits[:, -1], mask.sum(-1, keepdims=True), jnp.zeros((batch,), bool))
    return carry, slots


@functools.partial(jax.jit, static_argnames=("model", "temperature", "top_p", "top_k", "eos_id", "pad_id"))
def decode_steps(model: Decoder, params, carry, slots, keys, *, temperature, top_p, top_k, eos_id, pad_id):
    """``len(keys)`` decoding steps from ``carry`` in one ``lax.scan`` (no host round trip per token):
    each samples a token per row (:func:`sample_token`; pad after the row's EOS) and runs it through
    the model with the KV cache. Returns ``(carry, tokens [B, len(keys)])``."""

    def step(carry, key):
        cache, logits, position, done = carry
        token = sample_token(logits, key, temperature, top_p, top_k)
        token = jnp.where(done, pad_id, token)
        done = done | (token == eos_id)
        logits, cache = model.apply({"params": params}, token[:, None], slots, cache=cache, positions=position)
        return (cache, logits[:, -1], position + 1, done), token

    carry, tokens = jax.lax.scan(step, carry, keys)
    return carry, tokens.T


def generate_batch(
    model: Decoder,
    params,
    ids,
    mask,
    rng,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_id: int,
    pad_id: int,
    top_k: int = 0,
):
    """Left-padded prompts ``[B, P]`` -> new tokens ``[B, max_new_tokens]`` (pad after EOS): :func:`prefill`,
    then :func:`decode_steps` with the keys ``split(rng, max_new_tokens)`` (the server runs the same
    two in chunks of these keys, ``kto_jax.serve.engine``, and so writes the same tokens)."""
    carry, slots = prefill(model, params, ids, mask, max_new_tokens=max_new_tokens)
    keys = jax.random.split(rng, max_new_tokens)
    statics = dict(temperature=temperature, top_p=top_p, top_k=top_k, eos_id=eos_id, pad_id=pad_id)
    return decode_steps(model, params, carry, slots, keys, **statics)[1]


def left_pad(prompts: Sequence[Sequence[int]], bucket: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)`` ``[B, L]`` of prompts left-padded to L, the longest rounded up to a multiple of
    ``bucket`` (few shapes to compile)."""
    length = -(-max(len(p) for p in prompts) // bucket) * bucket
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = p
        mask[i, length - len(p) :] = 1
    return ids, mask


def generate(
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
) -> list[list[int]]:
    """Completions (token ids up to, not including, EOS) for tokenized prompts, in batches.

    Sampling: :func:`sample_token` (``top_k`` 0 = no top-k truncation; HALOs samples at
    temperature 1, top_k 50, top_p 0.95). Prompts are left-padded to a multiple of ``bucket`` so
    few shapes are compiled; the last batch is padded with copies of the first prompt (results dropped).
    """
    if int(top_k) < 0:
        raise ValueError(f"generate: top_k must be >= 0 (0 = off); got top_k={top_k}")
    out: list[list[int]] = []
    rng = jax.random.PRNGKey(seed)
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        real = len(chunk)
        chunk += [chunk[0]] * (batch_size - real)
        ids, mask = left_pad(chunk, bucket, pad_id)
        rng, key = jax.random.split(rng)
        tokens = generate_batch(
            model,
            params,
            jnp.asarray(ids),
            jnp.asarray(mask),
            key,
            max_new_tokens=max_new_tokens,
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            eos_id=int(eos_id),
            pad_id=int(pad_id),
        )
        if not tokens.is_fully_addressable:  # params sharded over several hosts: every host gets every row
            from jax.experimental import multihost_utils

            tokens = multihost_utils.process_allgather(tokens, tiled=True)
        tokens = np.asarray(tokens)
        for row in tokens[:real]:
            row = row.tolist()
            out.append(row[: row.index(eos_id)] if eos_id in row else row)
        faults.point("eval.generate")
    return out
