"""Evaluation (kto_jax/evaluate.py): KV-cache generation equals decoding by recomputing the whole
sequence, sampling follows the (nucleus-truncated) softmax, the 90% Wilson interval and the win
rate match hand-derived values, and every run of a split is judged on the same prompts."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kto_jax.data import synthetic
from kto_jax.data.feedback import Paired, paired_to_unary
from kto_jax.evaluate import _normal_quantile, eval_prompts, generate, judged_rate, sample_token, wilson_interval, winrate
from kto_jax.models import build_model
from tests.test_models_scan import LLAMA, NEOX, random_params

MISTRAL = LLAMA.replace(hf_model_type="mistral", sliding_window=5)
EOS = 3


def greedy_by_recompute(model, params, prompt, max_new_tokens, width=24):
    """Reference decoding: the whole sequence through the model for every new token (right-padded
    to one width, so one compile; causal attention keeps the padding out of the last real logit)."""
    apply = jax.jit(model.apply)
    seq, new = list(prompt), []
    for _ in range(max_new_tokens):
        ids = np.zeros((1, width), np.int32)
        ids[0, : len(seq)] = seq
        mask = (np.arange(width) < len(seq)).astype(np.int32)[None]
        logits = apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
        token = int(jnp.argmax(logits[0, len(seq) - 1]))
        if token == EOS:
            break
        new.append(token)
        seq.append(token)
    return new


@pytest.mark.parametrize("config", [LLAMA, NEOX, MISTRAL], ids=["llama", "gpt_neox", "mistral_window5"])
def test_greedy_kv_cache_generation_equals_recomputing_the_sequence(config):
    model, params = build_model(config), random_params(config, seed=11)
    rng = np.random.default_rng(0)
    # different lengths: left padding inside a batch, two buckets, a last batch filled with copies
    prompts = [rng.integers(4, config.vocab_size, size=n).tolist() for n in (3, 9, 5, 12, 1)]
    got = generate(model, params, prompts, max_new_tokens=8, eos_id=EOS, pad_id=0, temperature=0.0, batch_size=2, bucket=8)
    want = [greedy_by_recompute(model, params, p, 8) for p in prompts]
    assert got == want
    assert len({tuple(w) for w in want}) > 1 and max(len(w) for w in want) > 2  # the check is not vacuous


def test_generation_stops_at_eos_and_drops_it():
    config = LLAMA
    model, params = build_model(config), random_params(config, seed=11)
    prompt = np.random.default_rng(0).integers(4, config.vocab_size, size=6).tolist()
    first = greedy_by_recompute(model, params, prompt, 1)[0]
    # make the first greedy token the EOS: nothing is generated
    assert generate(model, params, [prompt], max_new_tokens=5, eos_id=first, pad_id=0, temperature=0.0, batch_size=1) == [[]]


def empirical(logits, temperature, top_p, n=40000):
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    draws = jax.vmap(lambda k: sample_token(jnp.asarray(logits), k, temperature, top_p))(keys)
    return np.bincount(np.asarray(draws), minlength=len(logits)) / n


def test_sampling_follows_the_softmax_at_temperature():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    np.testing.assert_allclose(empirical(logits, 1.0, 1.0), [0.4, 0.3, 0.2, 0.1], atol=0.01)
    # temperature 0.5 squares the probabilities: p_i^2 / sum p^2 = [16, 9, 4, 1] / 30
    np.testing.assert_allclose(empirical(logits, 0.5, 1.0), np.array([16, 9, 4, 1]) / 30, atol=0.01)
    assert int(sample_token(jnp.asarray(logits), jax.random.PRNGKey(1), 0.0, 1.0)) == 0


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = np.log(np.array([0.1, 0.4, 0.2, 0.3]))
    # mass 0.4 + 0.3 = 0.7 >= 0.5: tokens 1 and 3, renormalised to 4/7 and 3/7
    np.testing.assert_allclose(empirical(logits, 1.0, 0.5), [0, 4 / 7, 0, 3 / 7], atol=0.01)
    # 0.4 alone reaches 0.4: only token 1
    np.testing.assert_allclose(empirical(logits, 1.0, 0.4), [0, 1, 0, 0])


def test_wilson_interval_hand_values():
    assert _normal_quantile(0.95) == pytest.approx(1.6448536269514722, abs=1e-9)
    # 7 of 10 at 90%: z^2 = 2.70554; center (0.7 + z^2/20) / (1 + z^2/10) = 0.657408,
    # half-width z sqrt(0.021 + z^2/400) / (1 + z^2/10) = 0.215712
    lo, hi = wilson_interval(7, 10)
    assert (lo, hi) == (pytest.approx(0.441700, abs=2e-6), pytest.approx(0.873123, abs=2e-6))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(2.70554 / 20 / (1 + 2.70554 / 20), abs=1e-5)  # z^2/n / (1 + z^2/n)
    # 95%: z = 1.959964
    lo, hi = wilson_interval(50, 100, level=0.95)
    assert hi - 0.5 == pytest.approx(1.959964 * math.sqrt(0.25 / 100 + 1.959964**2 / 40000) / (1 + 1.959964**2 / 100), abs=1e-6)


def test_judged_rate_and_winrate_counts():
    assert judged_rate([True, False, True, True]) == {"desirable_rate": 0.75, "ci90": list(wilson_interval(3, 4)), "n": 4}
    policy, baseline = [True, True, False, False, True], [False, True, True, False, True]
    wr = winrate(policy, baseline)
    assert (wr["wins"], wr["ties"], wr["losses"], wr["n"]) == (1, 3, 1, 5)
    assert wr["winrate"] == pytest.approx(2.5 / 5) and wr["win_fraction"] == pytest.approx(1 / 5)
    assert wr["ci90"] == list(wilson_interval(2.5, 5))
    with pytest.raises(ValueError, match="one policy and one baseline judgment per prompt"):
        winrate([True], [True, False])


def test_every_view_of_a_split_is_judged_on_the_same_prompts():
    """The SFT run (unary view) and the KTO and DPO runs (unary, paired) compare on one prompt set."""
    records = [synthetic.paired_example("test", i) for i in range(600)]
    pairs = [Paired(r["id"], (("user", r["prompt"]),), r["chosen"], r["rejected"]) for r in records]
    unary = paired_to_unary(pairs, seed=0)
    paired_prompts = eval_prompts([p.prompt for p in pairs], 256)
    assert len(paired_prompts) == 256
    assert eval_prompts([u.prompt for u in unary], 256) == paired_prompts
    assert eval_prompts([u.prompt for u in paired_to_unary(pairs, seed=1)], 256) == paired_prompts
    assert eval_prompts([u.prompt for u in unary[::-1]], 256) == paired_prompts
