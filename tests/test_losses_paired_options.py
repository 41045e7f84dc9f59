"""The paired feed's options: LD-DPO's ``config.loss.ld_alpha`` and WPO's ``config.loss.use_weighting``.

LD-DPO (Liu et al. 2024, arXiv 2409.06411) counts a completion's tokens past the pair's shared length
l_p = min(|y_w|, |y_l|) with weight alpha, in the policy's and the reference's log-probs. WPO (Zhou et
al. 2024, arXiv 2406.11827 eq. 2) weights each pair's loss by w(y_w) w(y_l), w(y) = exp(mean_t
[log p(y_t) - log sum_v p(v)^2]) under the policy, without gradient. The reference here is TRL main's
code (``DPOTrainer._compute_loss``, ld_alpha and use_weighting branches) written in float64 numpy on
the full logits of the same model; the step's value is the chunked head's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kto_jax.data.loader import FeedbackLoader
from kto_jax.data.tokenize import get_tokenizer
from kto_jax.errors import InputError
from kto_jax.losses import get_loss
from kto_jax.losses.registry import LOSSES
from kto_jax.train.feeds import PAIR_WEIGHTS, StepSpec
from kto_jax.train.step import microbatch_loss, weighted_pair_loss
from tests.test_packing import MODEL, TOKENIZE, batches, params
from tests.train_helpers import FAST_COMPILER_OPTIONS, small_config

BETA = 0.1


def spec_with(name="dpo", *, ld_alpha=1.0, weighting=False, packing=False) -> StepSpec:
    loss = get_loss(name)
    mode = "model" if loss.needs_reference else "none"
    return StepSpec(
        MODEL, loss, tuple(sorted(loss.defaults.items())), 1, mode, 8, packing=packing,
        ld_alpha=ld_alpha, pair_weighting=weighting,
    )  # fmt: skip


def run(spec: StepSpec, batch: dict):
    policy, reference, _ = params()
    fn = jax.jit(
        jax.value_and_grad(lambda p: microbatch_loss(spec, p, reference, batch, {}), has_aux=True),
        compiler_options=FAST_COMPILER_OPTIONS,
    )
    (loss, (metrics, _)), grads = fn({"model": policy})
    return float(loss), jax.device_get(metrics), grads


# ---------------------------------------------------------------- TRL main's code, in numpy


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _logsumexp(z):
    m = z.max(-1)
    return m + np.log(np.exp(z - m[..., None]).sum(-1))


def trl_logps_and_weights(model_params, batch: dict, ld_alpha: float | None, use_weighting: bool):
    """(chosen logps, rejected logps, pair weights) as TRL main computes them (batch = [chosen; rejected])."""
    ids = np.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    attention = np.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    completion_mask = np.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
    logits = np.asarray(MODEL.apply({"params": model_params}, jnp.asarray(ids), jnp.asarray(attention)), np.float64)
    shift_logits, shift_labels, shift_mask = logits[:, :-1], ids[:, 1:], completion_mask[:, 1:].astype(np.float64)
    per_token = np.take_along_axis(_log_softmax(shift_logits), shift_labels[..., None], -1)[..., 0] * shift_mask
    if ld_alpha is None:
        logps = per_token.sum(1)
    else:
        comp_pos = shift_mask.cumsum(1)
        comp_lens = shift_mask.sum(1)
        chosen_lens, rejected_lens = np.split(comp_lens, 2)
        shared = np.tile(np.minimum(chosen_lens, rejected_lens), 2)
        shared_mask = (comp_pos > 0) & (comp_pos <= shared[:, None])
        tail_mask = comp_pos > shared[:, None]
        logps = (per_token * shared_mask).sum(1) + ld_alpha * (per_token * tail_mask).sum(1)
    weights = None
    if use_weighting:
        lengths = np.maximum(shift_mask.sum(1), 1)
        log_denom = _logsumexp(2.0 * shift_logits) - 2.0 * _logsumexp(shift_logits)
        mean = ((per_token - log_denom) * shift_mask).sum(1) / lengths
        chosen_w, rejected_w = np.split(np.exp(mean), 2)
        weights = chosen_w * rejected_w
    chosen, rejected = np.split(logps, 2)
    return chosen, rejected, weights


def trl_dpo_loss(batch, ld_alpha, use_weighting) -> float:
    policy, reference, _ = params()
    pc, pr, weights = trl_logps_and_weights(policy, batch, ld_alpha, use_weighting)
    rc, rr, _ = trl_logps_and_weights(reference, batch, ld_alpha, False)
    z = BETA * ((pc - pr) - (rc - rr))
    per_sequence = np.log1p(np.exp(-z))  # -log sigmoid(z)
    if use_weighting:
        per_sequence = per_sequence * weights
    return float(per_sequence.mean())


@pytest.fixture(scope="module")
def paired_batches(examples):
    """(padded, packed): the same 8 pairs, the synthetic set's with replies of unequal lengths (its own
    chosen and rejected replies are equally long: LD-DPO would change nothing)."""
    paired = [
        dataclasses.replace(e, chosen=e.chosen + " (and so on)" * (i % 3), rejected=e.rejected + " no" * (i % 2))
        for i, e in enumerate(examples["paired"])
    ]
    padded, _ = batches({"paired": paired}, "dpo")
    spec = spec_with(packing=True)
    loader = FeedbackLoader(
        paired, get_tokenizer("bytes"), TOKENIZE, global_batch_size=8, seed=0, bucket=16, process_index=0,
        process_count=1, packing=True, pack_length=96, schema=spec.feed.schema(spec.inputs, "none", True),
    )  # fmt: skip
    packed = next(loader)
    assert (np.asarray(packed["chosen_segment_ids"]).max(1) - np.asarray(packed["chosen_segment_ids"])[:, 0] > 0).any()
    return padded, packed


@pytest.mark.parametrize(
    "ld_alpha, weighting", [(0.5, False), (0.0, False), (1.0, True), (0.3, True)], ids=["ld", "ld0", "wpo", "ld+wpo"]
)
def test_dpo_with_ld_alpha_and_wpo_equals_trls_code(ld_alpha, weighting, paired_batches):
    padded, _ = paired_batches
    lengths = [np.asarray(padded[f"{g}_loss_mask"])[:, 1:].sum(1) for g in ("chosen", "rejected")]
    assert (lengths[0] != lengths[1]).sum() >= 4  # most pairs have a tail to discount
    loss, metrics, _ = run(spec_with(ld_alpha=ld_alpha, weighting=weighting), padded)
    expected = trl_dpo_loss(padded, ld_alpha if ld_alpha != 1.0 else None, weighting)
    np.testing.assert_allclose(loss, expected, rtol=2e-5, atol=1e-6)
    assert abs(expected - trl_dpo_loss(padded, None, False)) > 1e-4  # the option changes the loss
    if weighting:
        _, _, w = trl_logps_and_weights(params()[0], padded, None, True)
        np.testing.assert_allclose(metrics[PAIR_WEIGHTS], w.mean(), rtol=2e-5)


def test_packed_rows_give_the_padded_loss_and_gradient(paired_batches):
    padded, packed = paired_batches
    loss, metrics, grads = run(spec_with(ld_alpha=0.4, weighting=True), padded)
    packed_loss, packed_metrics, packed_grads = run(spec_with(ld_alpha=0.4, weighting=True, packing=True), packed)
    np.testing.assert_allclose(packed_loss, loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(packed_metrics[PAIR_WEIGHTS], metrics[PAIR_WEIGHTS], rtol=1e-5)
    for g, p in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(packed_grads)):
        np.testing.assert_allclose(p, g, rtol=1e-5, atol=1e-5)


def test_wpo_weights_carry_no_gradient(paired_batches):
    """The gradient is that of mean_i(w_i l_i) with the weights held as constants (WPO eq. 2: the weights
    are computed under torch.no_grad in TRL)."""
    padded, _ = paired_batches
    spec = spec_with(ld_alpha=0.5, weighting=True)
    _, metrics, grads = run(spec, padded)
    policy, reference, _ = params()
    plain = dataclasses.replace(spec, pair_weighting=False)

    weights = jax.jit(lambda p: spec.feed.loss_inputs(spec, p, reference, padded)[PAIR_WEIGHTS])({"model": policy})
    weights = jnp.asarray(np.asarray(weights))  # a constant
    np.testing.assert_allclose(weights.mean(), metrics[PAIR_WEIGHTS], rtol=1e-6)

    def constant_weights_loss(p):
        x = plain.feed.loss_inputs(plain, p, reference, padded)
        z = BETA * ((x["policy_chosen_logps"] - x["policy_rejected_logps"]) - (
            x["reference_chosen_logps"] - x["reference_rejected_logps"]))  # fmt: skip
        return (jax.nn.softplus(-z) * weights).mean()

    expected = jax.jit(jax.grad(constant_weights_loss), compiler_options=FAST_COMPILER_OPTIONS)({"model": policy})
    for g, e in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the weighting identity, every loss

WEIGHTABLE = sorted(n for n, s in LOSSES.items() if s.feed == "paired" and not s.batch_coupled)


@pytest.mark.parametrize("name", WEIGHTABLE)
def test_weighted_loss_is_the_mean_of_weighted_per_pair_losses(name):
    """weighted_pair_loss = mean_i(w_i l_i) with l_i the loss of pair i alone: every paired loss that
    claims no batch coupling is a mean of per-pair terms."""
    spec = LOSSES[name]
    rng = np.random.default_rng(3)
    n = 6
    inputs = {}
    for key in spec.inputs():
        if key.endswith("token_counts"):
            inputs[key] = jnp.asarray(rng.integers(3, 20, n), jnp.int32)
        else:
            inputs[key] = jnp.asarray(-rng.uniform(5, 40, n), jnp.float32)
    weights = jnp.asarray(rng.uniform(0.05, 1.5, n), jnp.float32)
    loss, metrics = weighted_pair_loss(spec.fn, inputs, weights, spec.defaults)
    singles = [float(spec.fn(**{k: v[i : i + 1] for k, v in inputs.items()}, **spec.defaults)[0]) for i in range(n)]
    np.testing.assert_allclose(float(loss), np.mean(np.asarray(weights) * singles), rtol=2e-5, atol=1e-7)
    plain = spec.fn(**inputs, **spec.defaults)[1]
    for key, value in plain.items():  # the metrics are the unweighted loss's
        np.testing.assert_allclose(metrics[key], value, rtol=1e-6, err_msg=key)


# ---------------------------------------------------------------- the config


def _plan(loss="dpo", **changes):
    from kto_jax.train.plan import make_plan

    config = small_config(loss, "/nonexistent")
    for key, value in changes.items():
        node, field = config, key.split(".")
        for part in field[:-1]:
            node = node[part]
        node[field[-1]] = value
    return make_plan(config, 1)


def test_the_plan_carries_the_options_into_the_step():
    spec = _plan(**{"loss.ld_alpha": 0.5, "loss.use_weighting": True}).step_spec(MODEL)
    assert (spec.ld_alpha, spec.pair_weighting) == (0.5, True)
    assert _plan("rpo", **{"loss.ld_alpha": 0.25}).step_spec(MODEL).ld_alpha == 0.25  # a paired mixture: LD applies


@pytest.mark.parametrize(
    "loss, changes, expected",
    [
        ("dpo", {"loss.ld_alpha": 1.5}, "config.loss.ld_alpha=1.5: must be in [0, 1]"),
        ("dpo", {"loss.ld_alpha": -0.1}, "config.loss.ld_alpha=-0.1: must be in [0, 1]"),
        ("dpo", {"loss.ld_alpha": 0.5, "reference.mode": "cached"}, "set config.reference.mode='model'"),
        ("dpo", {"loss.use_weighting": True, "reference.humanline": True}, "use one of them"),
        ("bco_pair", {"loss.use_weighting": True}, "'bco_pair' is batch-coupled"),
        ("aot", {"loss.use_weighting": True}, "'aot' is batch-coupled"),
        ("rpo", {"loss.use_weighting": True}, "'rpo' is a mixture"),
    ],
)
def test_bad_options_are_one_line_errors_naming_the_field(loss, changes, expected):
    with pytest.raises(InputError) as e:
        _plan(loss, **changes)
    assert expected in str(e.value)


def test_a_unary_loss_has_no_paired_options():
    config = small_config("kto", "/nonexistent")
    assert "ld_alpha" not in config.loss and "use_weighting" not in config.loss
    from kto_jax.train.plan import make_plan

    with pytest.raises(InputError, match="ld_alpha"):
        config.loss.unlock()
        config.loss.ld_alpha = 0.5
        make_plan(config, 1)


def test_a_run_trains_with_both_options_and_logs_the_weights(synthetic_data_dir, tmp_path):
    import json

    from kto_jax.train import loop

    config = small_config("dpo", synthetic_data_dir, steps=2)
    config.loss.update(dict(ld_alpha=0.5, use_weighting=True))
    loop.run(config, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all(np.isfinite(r["loss"]) and 0 < r[PAIR_WEIGHTS] for r in train)
    assert any(f"eval/{PAIR_WEIGHTS}" in r for r in rows)
    saved = json.load(open(tmp_path / "config.json"))
    assert (saved["loss"]["ld_alpha"], saved["loss"]["use_weighting"]) == (0.5, True)
