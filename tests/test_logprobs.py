"""Sequence log-probs against the PyTorch recipe users know (HALOs/TRL get_batch_logps)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kto_jax import logprobs as lp


def torch_batch_logps(logits, labels, loss_mask):
    """HALOs/TRL get_batch_logps: shift, log_softmax, gather, sum over labels != -100."""
    logits = torch.tensor(np.asarray(logits, np.float32), dtype=torch.float64)
    labels = torch.tensor(np.asarray(labels)).long()
    labels = torch.where(torch.tensor(np.asarray(loss_mask)).bool(), labels, torch.full_like(labels, -100))
    labels, logits = labels[:, 1:].clone(), logits[:, :-1, :]
    mask = labels != -100
    labels[~mask] = 0
    per_token = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
    return (per_token * mask).sum(-1).numpy(), mask.sum(-1).numpy(), (per_token * mask).numpy()


def random_batch(seed, batch=3, length=11, vocab=17, dim=8):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(batch, length, dim)).astype(np.float32)
    kernel = (rng.normal(size=(dim, vocab)) * 0.5).astype(np.float32)
    labels = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
    # prompt tokens (0) then completion (1) then right padding (0), one row left-padded
    mask = np.zeros((batch, length), bool)
    for b in range(batch):
        start = rng.integers(1, length // 2)
        mask[b, start : rng.integers(start + 1, length + 1)] = True
    return hidden, kernel, labels, mask


@pytest.mark.parametrize("seed", range(4))
def test_sequence_logps_matches_torch(seed):
    hidden, kernel, labels, mask = random_batch(seed)
    logits = hidden @ kernel
    sums, counts = lp.sequence_logps(jnp.asarray(logits), labels, mask)
    ref_sums, ref_counts, ref_tokens = torch_batch_logps(logits, labels, mask)
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_allclose(lp.token_logps(jnp.asarray(logits), labels, mask), ref_tokens, atol=1e-5)


def test_only_completion_tokens_count_and_first_token_never_scored():
    logits = np.zeros((1, 4, 5), np.float32)  # uniform: every scored token has log-prob -log 5
    labels = np.array([[1, 2, 3, 4]])
    mask = np.array([[1, 0, 1, 1]], bool)  # position 0 has no prediction and is ignored
    sums, counts = lp.sequence_logps(logits, labels, mask)
    assert int(counts[0]) == 2
    np.testing.assert_allclose(sums[0], -2 * np.log(5), rtol=1e-6)


def test_masked_labels_may_hold_anything():
    hidden, kernel, labels, mask = random_batch(0)
    garbage = np.where(mask, labels, -100)
    a = lp.sequence_logps(jnp.asarray(hidden @ kernel), labels, mask)
    b = lp.sequence_logps(jnp.asarray(hidden @ kernel), garbage, mask)
    np.testing.assert_array_equal(a[0], b[0])


def test_bf16_logits_are_scored_in_float32():
    hidden, kernel, labels, mask = random_batch(1)
    logits = jnp.asarray(hidden @ kernel).astype(jnp.bfloat16)
    sums, _ = lp.sequence_logps(logits, labels, mask)
    assert sums.dtype == jnp.float32
    ref, _, _ = torch_batch_logps(np.asarray(logits.astype(jnp.float32)), labels, mask)
    np.testing.assert_allclose(sums, ref, rtol=1e-5, atol=1e-4)


def test_mean_logps_divides_by_token_count_and_survives_zero_tokens():
    np.testing.assert_allclose(lp.mean_logps(jnp.array([-6.0, 0.0]), jnp.array([3, 0])), [-2.0, 0.0])


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 10, 64])
def test_chunked_equals_full_value_and_gradient(chunk_size):
    hidden, kernel, labels, mask = random_batch(2, batch=2, length=13, vocab=23, dim=6)
    weights = jnp.arange(1.0, 3.0)  # make the two sequences' gradients differ

    def full(h, w):
        return (lp.sequence_logps(h @ w, labels, mask)[0] * weights).sum()

    def chunked(h, w):
        return (lp.chunked_sequence_logps(h, w, labels, mask, chunk_size=chunk_size)[0] * weights).sum()

    value, grads = jax.value_and_grad(full, (0, 1))(hidden, kernel)
    c_value, c_grads = jax.value_and_grad(chunked, (0, 1))(hidden, kernel)
    np.testing.assert_allclose(c_value, value, rtol=1e-6)
    for g, cg in zip(grads, c_grads):
        np.testing.assert_allclose(cg, g, rtol=1e-5, atol=1e-6)
    counts = lp.chunked_sequence_logps(hidden, kernel, labels, mask, chunk_size=chunk_size)[1]
    np.testing.assert_array_equal(counts, mask[:, 1:].sum(-1))


def test_chunked_bf16_hidden_matches_full_in_float32_accumulation():
    hidden, kernel, labels, mask = random_batch(3)
    h16, w16 = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16)
    full = lp.sequence_logps(jnp.einsum("btd,dv->btv", h16, w16, preferred_element_type=jnp.float32), labels, mask)[0]
    chunked = lp.chunked_sequence_logps(h16, w16, labels, mask, chunk_size=4)[0]
    np.testing.assert_allclose(chunked, full, rtol=1e-5, atol=1e-5)


def test_chunked_never_builds_the_full_logits():
    """value_and_grad at vocab 32k, 2k tokens: XLA's temp bytes at least 4x smaller chunked."""
    batch, length, dim, vocab = 2, 2048, 256, 32000
    shapes = (
        jax.ShapeDtypeStruct((batch, length, dim), jnp.float32),
        jax.ShapeDtypeStruct((dim, vocab), jnp.float32),
        jax.ShapeDtypeStruct((batch, length), jnp.int32),
        jax.ShapeDtypeStruct((batch, length), jnp.bool_),
    )

    def full(h, w, labels, mask):
        return lp.sequence_logps(h @ w, labels, mask)[0].sum()

    def chunked(h, w, labels, mask):
        return lp.chunked_sequence_logps(h, w, labels, mask, chunk_size=256)[0].sum()

    def temp_bytes(fn):
        compiled = jax.jit(jax.value_and_grad(fn, (0, 1))).lower(*shapes).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full_bytes, chunked_bytes = temp_bytes(full), temp_bytes(chunked)
    logits_bytes = batch * length * vocab * 4
    assert full_bytes >= logits_bytes  # the full path really holds [B, T, V] logits
    assert chunked_bytes * 4 <= full_bytes, (full_bytes, chunked_bytes)
    assert chunked_bytes < logits_bytes / 2
