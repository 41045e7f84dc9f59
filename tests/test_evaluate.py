"""Evaluation (kto_jax/generate.py, kto_jax/stats.py): KV-cache generation equals decoding by recomputing the whole
sequence, sampling follows the softmax truncated by top-k and then top-p (Hugging Face's warper
order, which HALOs samples with), the exact (Clopper-Pearson) interval matches scipy's and hand
values, the judged rate and win rate use it, and every run of a split is judged on the same prompts."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from kto_jax.config import base_config
from kto_jax.data import synthetic
from kto_jax.data.feedback import Paired, paired_to_unary
from kto_jax.generate import eval_prompts, generate, sample_token
from kto_jax.models import build_model
from kto_jax.stats import clopper_pearson_interval, judged_rate, winrate
from tests.test_models_scan import LLAMA, NEOX, random_params

MISTRAL = LLAMA.replace(hf_model_type="mistral", sliding_window=5)
QWEN3 = LLAMA.replace(
    architecture="qwen3", hf_model_type="qwen3", qk_norm=True, head_dim=16
)  # q/k norms in the cache path
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


@pytest.mark.parametrize(
    "config", [LLAMA, NEOX, MISTRAL, QWEN3], ids=["llama", "gpt_neox", "mistral_window5", "qwen3_head_dim16"]
)
def test_greedy_kv_cache_generation_equals_recomputing_the_sequence(config):
    model, params = build_model(config), random_params(config, seed=11)
    rng = np.random.default_rng(0)
    # different lengths: left padding inside a batch, two buckets, a last batch filled with copies
    prompts = [rng.integers(4, config.vocab_size, size=n).tolist() for n in (3, 9, 5, 12, 1)]
    got = generate(
        model, params, prompts, max_new_tokens=8, eos_id=EOS, pad_id=0, temperature=0.0, batch_size=2, bucket=8
    )
    want = [greedy_by_recompute(model, params, p, 8) for p in prompts]
    assert got == want
    assert len({tuple(w) for w in want}) > 1 and max(len(w) for w in want) > 2  # the check is not vacuous


def test_generation_stops_at_eos_and_drops_it():
    config = LLAMA
    model, params = build_model(config), random_params(config, seed=11)
    prompt = np.random.default_rng(0).integers(4, config.vocab_size, size=6).tolist()
    first = greedy_by_recompute(model, params, prompt, 1)[0]
    # make the first greedy token the EOS: nothing is generated
    assert generate(
        model, params, [prompt], max_new_tokens=5, eos_id=first, pad_id=0, temperature=0.0, batch_size=1
    ) == [[]]


def test_top_k_1_generation_equals_greedy_and_top_k_is_off_by_default():
    """top_k reaches the sampler through generate: sampling at temperature 1 from the one largest
    logit is greedy decoding; config.eval.top_k is 0 (off, today's behaviour) unless set."""
    config = LLAMA
    model, params = build_model(config), random_params(config, seed=11)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(4, config.vocab_size, size=n).tolist() for n in (4, 7, 2)]
    greedy = generate(
        model, params, prompts, max_new_tokens=6, eos_id=EOS, pad_id=0, temperature=0.0, batch_size=4, bucket=8
    )
    top1 = generate(
        model,
        params,
        prompts,
        max_new_tokens=6,
        eos_id=EOS,
        pad_id=0,
        temperature=1.0,
        top_k=1,
        top_p=0.95,
        batch_size=4,
        bucket=8,
        seed=3,
    )
    assert top1 == greedy and max(len(g) for g in greedy) > 2
    assert base_config().eval.top_k == 0
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        generate(model, params, prompts, max_new_tokens=2, eos_id=EOS, pad_id=0, top_k=-1)


def draws(logits, temperature, top_p, top_k=0, n=40000):
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    return np.asarray(jax.vmap(lambda k: sample_token(jnp.asarray(logits), k, temperature, top_p, top_k))(keys))


def empirical(logits, temperature, top_p, top_k=0, n=40000):
    return np.bincount(draws(logits, temperature, top_p, top_k, n), minlength=len(logits)) / n


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


def test_top_k_1_sampling_is_greedy():
    logits = jax.random.normal(jax.random.PRNGKey(5), (64, 50)) * 3.0
    keys = jax.random.split(jax.random.PRNGKey(6), 200)
    greedy = np.asarray(jnp.argmax(logits, axis=-1))
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.95), (2.0, 0.5)):
        sampled = np.asarray(jax.vmap(lambda k, t=temperature, p=top_p: sample_token(logits, k, t, p, 1))(keys))
        assert (sampled == greedy[None]).all(), (temperature, top_p)


def test_top_k_draws_only_the_k_largest_logits_with_their_renormalised_softmax():
    logits = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (40,)), np.float64)
    k = 5
    top = np.argsort(logits)[::-1][:k]
    got = draws(logits, 1.0, 1.0, top_k=k)
    assert set(np.unique(got)) == set(top.tolist())  # always among the k largest, and each of them drawn
    want = np.zeros(40)
    want[top] = np.exp(logits[top]) / np.exp(logits[top]).sum()
    np.testing.assert_allclose(np.bincount(got, minlength=40) / len(got), want, atol=0.01)
    # batched rows each keep their own k largest
    batch = jax.random.normal(jax.random.PRNGKey(8), (8, 40))
    keys = jax.random.split(jax.random.PRNGKey(9), 2000)
    sampled = np.asarray(jax.vmap(lambda key: sample_token(batch, key, 1.3, 1.0, 3))(keys))
    top3 = np.argsort(np.asarray(batch), axis=-1)[:, ::-1][:, :3]
    assert all(set(sampled[:, row]) <= set(top3[row]) for row in range(8))


def test_top_k_is_applied_before_top_p():
    """Hugging Face's order (TopK, then TopP on what remains): top_k=2 leaves [0.4, 0.3] -> [4/7, 3/7];
    top_p 0.5 then keeps token 0 alone (4/7 >= 0.5). Nucleus first would keep tokens 0 and 1
    (0.4 + 0.3 >= 0.5 on the full distribution) and top-k 2 would keep both."""
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    np.testing.assert_allclose(empirical(logits, 1.0, 0.5, top_k=2), [1, 0, 0, 0])
    np.testing.assert_allclose(empirical(logits, 1.0, 1.0, top_k=2), [4 / 7, 3 / 7, 0, 0], atol=0.01)
    # top_k 0 (off) and top_k >= vocab leave the nucleus alone
    np.testing.assert_allclose(empirical(logits, 1.0, 0.5, top_k=0), [4 / 7, 3 / 7, 0, 0], atol=0.01)
    np.testing.assert_allclose(empirical(logits, 1.0, 0.5, top_k=4), [4 / 7, 3 / 7, 0, 0], atol=0.01)


def test_sampling_distribution_equals_hugging_face_warpers():
    """Temperature, TopK, TopP as transformers' generate(do_sample=True) chains them (HALOs' sampler):
    the sampled frequencies equal the softmax of the warped logits."""
    import torch
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = np.asarray(jax.random.normal(jax.random.PRNGKey(10), (12,)) * 1.5, np.float32)
    for temperature, top_k, top_p in ((1.0, 5, 0.95), (0.7, 6, 0.8), (1.5, 3, 0.6), (1.0, 50, 0.95)):
        scores = torch.tensor(logits)[None]
        for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)):
            scores = warper(None, scores)
        want = torch.softmax(scores, dim=-1)[0].numpy()
        got = empirical(logits, temperature, top_p, top_k=top_k)
        np.testing.assert_allclose(got, want, atol=0.01, err_msg=str((temperature, top_k, top_p)))
        assert set(np.flatnonzero(got)) <= set(np.flatnonzero(want))


def binomial_tail(k_from, k_to, n, p):
    return sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(k_from, k_to + 1))


def test_clopper_pearson_hand_values():
    # 0 of 10 at 90%: lower 0; upper solves (1 - p)^10 = 0.05
    assert clopper_pearson_interval(0, 10) == (0.0, pytest.approx(1 - 0.05**0.1, abs=1e-12))
    # 10 of 10: upper 1; lower solves p^10 = 0.05
    assert clopper_pearson_interval(10, 10) == (pytest.approx(0.05**0.1, abs=1e-12), 1.0)
    # 5 of 10: P(X >= 5 | lower) = 0.05 = P(X <= 5 | upper), symmetric about 1/2
    lo, hi = clopper_pearson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.222441, abs=1e-6), pytest.approx(0.777559, abs=1e-6))
    assert binomial_tail(5, 10, 10, lo) == pytest.approx(0.05, abs=1e-10)
    assert binomial_tail(0, 5, 10, hi) == pytest.approx(0.05, abs=1e-10)
    assert lo + hi == pytest.approx(1.0, abs=1e-12)
    # 7 of 20 at 95%: the tails are 0.025 each
    lo, hi = clopper_pearson_interval(7, 20, level=0.95)
    assert binomial_tail(7, 20, 20, lo) == pytest.approx(0.025, abs=1e-10)
    assert binomial_tail(0, 7, 20, hi) == pytest.approx(0.025, abs=1e-10)
    assert clopper_pearson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        clopper_pearson_interval(11, 10)


@pytest.mark.parametrize("level", [0.9, 0.95])
def test_clopper_pearson_equals_scipy_exact_binomtest(level):
    for n in (1, 2, 5, 10, 37, 512):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            ci = stats.binomtest(k, n).proportion_ci(level, method="exact")
            assert clopper_pearson_interval(k, n, level) == (
                pytest.approx(ci.low, abs=1e-10),
                pytest.approx(ci.high, abs=1e-10),
            ), (k, n)


def test_judged_rate_and_winrate_take_the_exact_interval():
    def exact(k, n):
        return [pytest.approx(v, abs=1e-10) for v in stats.binomtest(k, n).proportion_ci(0.9, method="exact")]

    assert judged_rate([True, False, True, True]) == {"desirable_rate": 0.75, "ci90": exact(3, 4), "n": 4}
    assert judged_rate([True] * 10)["ci90"] == [pytest.approx(0.05**0.1, abs=1e-12), 1.0]
    policy, baseline = [True, True, False, False, True], [False, True, True, False, True]
    wr = winrate(policy, baseline)
    assert (wr["wins"], wr["ties"], wr["losses"], wr["n"]) == (1, 3, 1, 5)
    assert wr["winrate"] == pytest.approx(2.5 / 5) and wr["win_fraction"] == pytest.approx(1 / 5)
    assert wr["win_fraction_ci90"] == exact(1, 5)
    # the half-integer score 2.5 of 5: the same beta quantiles, between the bounds for 2 and 3 of 5
    lo, hi = wr["ci90"]
    assert (lo, hi) == (pytest.approx(stats.beta.ppf(0.05, 2.5, 3.5)), pytest.approx(stats.beta.ppf(0.95, 3.5, 2.5)))
    assert clopper_pearson_interval(2, 5)[0] < lo < clopper_pearson_interval(3, 5)[0]
    assert clopper_pearson_interval(2, 5)[1] < hi < clopper_pearson_interval(3, 5)[1]
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
