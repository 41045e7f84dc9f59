"""Evaluation: batched KV-cache generation, judges, judged rates and win rates with 90% intervals.

    completions = generate(model, params, prompt_ids, max_new_tokens=16, eos_id=..., pad_id=...)
    rate = judged_rate(flags)                # {"desirable_rate", "ci90", "n"}
    wr = winrate(policy_flags, baseline_flags)

The synthetic task's judge is exact; other judges plug into ``JUDGES`` by name.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kto_jax.data import synthetic
from kto_jax.models import Decoder, init_cache

JUDGES: dict[str, Callable[[str, str], bool]] = {"synthetic": synthetic.judge}


def get_judge(name: str) -> Callable[[str, str], bool]:
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r} (config.eval.judge); known: {sorted(JUDGES)}")
    return JUDGES[name]


# ---------------------------------------------------------------- statistics


def wilson_interval(successes: float, n: int, level: float = 0.9) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (90% by default, as the KTO paper reports)."""
    if n == 0:
        return (0.0, 1.0)
    z = _normal_quantile(0.5 + level / 2)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def _normal_quantile(q: float) -> float:
    """Inverse standard normal CDF by bisection on erf (no scipy needed)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def judged_rate(flags: Sequence[bool], level: float = 0.9) -> dict:
    """Fraction judged desirable with its binomial interval."""
    flags = np.asarray(flags, bool)
    lo, hi = wilson_interval(float(flags.sum()), len(flags), level)
    return {"desirable_rate": float(flags.mean()) if len(flags) else 0.0, "ci90": [lo, hi], "n": int(len(flags))}


def winrate(policy: Sequence[bool], baseline: Sequence[bool], level: float = 0.9) -> dict:
    """Per-prompt comparison of the policy with a baseline under a unary judge: a win when only
    the policy's completion is desirable, a loss when only the baseline's is, a tie otherwise.

    ``winrate`` counts a tie as half a win; ``win_fraction`` = wins / n is the paper's
    convention (GPT-4's pairwise verdicts, ties counted as non-wins). Intervals are 90% Wilson.
    """
    policy, baseline = np.asarray(policy, bool), np.asarray(baseline, bool)
    if policy.shape != baseline.shape:
        raise ValueError(f"winrate needs one policy and one baseline judgment per prompt; got {policy.shape} and {baseline.shape}")
    n = len(policy)
    wins, losses = int((policy & ~baseline).sum()), int((~policy & baseline).sum())
    ties = n - wins - losses
    score = wins + 0.5 * ties
    return {
        "winrate": score / n if n else 0.0, "ci90": list(wilson_interval(score, n, level)),
        "win_fraction": wins / n if n else 0.0, "win_fraction_ci90": list(wilson_interval(wins, n, level)),
        "wins": wins, "ties": ties, "losses": losses, "n": n,
    }


def eval_prompts(prompts, n: int) -> list:
    """The ``n`` held-out prompts every run of a split is judged on: the distinct prompts in
    order of their SHA-1, so the choice does not depend on the data view (unary, paired,
    shuffled) and runs of different losses are compared on the same prompts."""
    by_hash = {hashlib.sha1(json.dumps(p).encode("utf-8")).hexdigest(): p for p in prompts}
    return [by_hash[h] for h in sorted(by_hash)[:n]]


# ---------------------------------------------------------------- generation


def sample_token(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Greedy at temperature 0, else nucleus sampling: keep the smallest set of tokens whose
    probability mass reaches ``top_p``, renormalise, sample at ``temperature``."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_p", "eos_id", "pad_id"))
def generate_batch(model: Decoder, params, ids, mask, rng, *, max_new_tokens: int, temperature: float, top_p: float, eos_id: int, pad_id: int):
    """Left-padded prompts ``[B, P]`` -> new tokens ``[B, max_new_tokens]`` (pad after EOS)."""
    batch, prompt_len = ids.shape
    slots = jnp.concatenate([mask, jnp.ones((batch, max_new_tokens), mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    cache = init_cache(model.config, batch, prompt_len + max_new_tokens)
    logits, cache = model.apply({"params": params}, ids, slots, cache=cache, positions=positions)
    next_position = mask.sum(-1, keepdims=True)

    def step(carry, key):
        cache, logits, position, done = carry
        token = sample_token(logits, key, temperature, top_p)
        token = jnp.where(done, pad_id, token)
        done = done | (token == eos_id)
        logits, cache = model.apply({"params": params}, token[:, None], slots, cache=cache, positions=position)
        return (cache, logits[:, -1], position + 1, done), token

    keys = jax.random.split(rng, max_new_tokens)
    init = (cache, logits[:, -1], next_position, jnp.zeros((batch,), bool))
    _, tokens = jax.lax.scan(step, init, keys)
    return tokens.T


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
    batch_size: int = 64,
    seed: int = 0,
    bucket: int = 16,
) -> list[list[int]]:
    """Completions (token ids up to, not including, EOS) for tokenized prompts, in batches.

    Prompts are left-padded to a multiple of ``bucket`` so few shapes are compiled; the last
    batch is padded with copies of the first prompt (results dropped).
    """
    out: list[list[int]] = []
    rng = jax.random.PRNGKey(seed)
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        real = len(chunk)
        chunk += [chunk[0]] * (batch_size - real)
        length = -(-max(len(p) for p in chunk) // bucket) * bucket
        ids = np.full((batch_size, length), pad_id, np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        for i, p in enumerate(chunk):
            ids[i, length - len(p) :] = p
            mask[i, length - len(p) :] = 1
        rng, key = jax.random.split(rng)
        tokens = np.asarray(generate_batch(
            model, params, jnp.asarray(ids), jnp.asarray(mask), key, max_new_tokens=max_new_tokens,
            temperature=float(temperature), top_p=float(top_p), eos_id=int(eos_id), pad_id=int(pad_id),
        ))
        for row in tokens[:real]:
            row = row.tolist()
            out.append(row[: row.index(eos_id)] if eos_id in row else row)
    return out
