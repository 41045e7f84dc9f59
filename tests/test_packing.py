"""Packed batches (config.data.packing): several examples per row, the padded path's numbers.

The layout (kto_jax/data/batch.py), the packing itself (loader.pack_lengths, first-fit
decreasing), positions and attention per segment (models/common.py), per-segment log-prob
sums (logprobs.segment_sums), and then the whole loss: for every registered loss the loss,
its metrics and its gradient from packed rows equal those from padded rows (fp32, 1e-5), on
the same 8 examples of the synthetic task, with the reference a second random init. The
8-device and loop checks are in tests/test_packing_sharded.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kto_jax.data.batch import feedback_schema
from kto_jax.data.loader import FeedbackLoader, pack_lengths
from kto_jax.data.tokenize import TokenizeConfig, get_tokenizer
from kto_jax.logprobs import segment_sums, token_logps, unpack_tokens
from kto_jax.losses import get_loss
from kto_jax.losses.registry import LOSSES
from kto_jax.models import build_model
from kto_jax.models.hf import init_params
from kto_jax.models.positions import positions_from_segments, segment_attention_mask
from kto_jax.models.presets import get_preset
from kto_jax.train.feeds import StepSpec
from kto_jax.train.step import microbatch_loss, split_microbatches
from tests.train_helpers import FAST_COMPILER_OPTIONS

TOKENIZE = TokenizeConfig(max_length=32, max_prompt_length=16, chat_template="plain")
CONFIG = get_preset("tiny-1m", num_layers=2)
MODEL = build_model(CONFIG)
LORA_CONFIG = CONFIG.replace(lora_rank=4, lora_targets=("q", "v", "o", "down"))


@pytest.fixture(scope="module")
def examples(synthetic_data_dir):
    from kto_jax.data.builders import load_examples
    from kto_jax.data.feedback import unary_view

    paired = load_examples("synthetic", "validation", synthetic_data_dir)
    return {"paired": paired, "unary": unary_view(paired, seed=0)[0]}


def make_loader(examples, kind: str, *, packing: bool, num_microbatches: int = 1, batch: int = 8, **kw):
    return FeedbackLoader(
        examples["paired" if kind == "paired" else "unary"],
        get_tokenizer("bytes"),
        TOKENIZE,
        global_batch_size=batch,
        seed=0,
        num_microbatches=num_microbatches,
        bucket=16,
        process_index=0,
        process_count=1,
        packing=packing,
        schema=feedback_schema(kind == "paired", kl_pairing=kind != "paired", packed=packing),
        **kw,
    )


# ---------------------------------------------------------------- the packing


def test_pack_lengths_is_first_fit_decreasing():
    """Longest first, each into the first row with room: 8 -> row 0, 6 -> row 1, 5 -> row 2,
    3 -> row 1 after the 6, 2 -> row 0 after the 8 (capacity 10)."""
    rows, where = pack_lengths([5, 3, 8, 2, 6], 10)
    assert rows == 3
    assert where == [(2, 0), (1, 6), (0, 0), (0, 8), (1, 0)]
    assert pack_lengths([4, 4, 4], 4) == (3, [(0, 0), (1, 0), (2, 0)])
    with pytest.raises(ValueError, match="does not fit a packed row of 4"):
        pack_lengths([5], 4)


def test_positions_restart_per_segment_and_attention_stays_inside():
    seg = jnp.array([[1, 1, 1, 2, 2, 0, 0]])
    np.testing.assert_array_equal(positions_from_segments(seg), [[0, 1, 2, 0, 1, 0, 1]])
    mask = np.asarray(segment_attention_mask(seg))[0, 0]
    expected = np.zeros((7, 7), bool)
    for i in range(7):
        for j in range(i + 1):
            expected[i, j] = seg[0, i] == seg[0, j] != 0
        expected[i, i] = True  # padding sees itself only, so no row softmaxes over nothing
    np.testing.assert_array_equal(mask, expected)
    windowed = np.asarray(segment_attention_mask(seg, sliding_window=2))[0, 0]
    np.testing.assert_array_equal(windowed, expected & (np.arange(7)[:, None] - np.arange(7)[None] < 2))


def test_segment_sums_equal_a_numpy_sum_per_sequence():
    rng = np.random.default_rng(0)
    per_token = rng.normal(size=(2, 9)).astype(np.float32)
    seg = np.array([[1, 1, 1, 1, 3, 3, 3, 0, 0, 0], [2, 2, 2, 2, 2, 2, 4, 4, 4, 0]])
    loss = rng.random((2, 10)) < 0.7
    sums, counts = segment_sums(jnp.asarray(per_token), jnp.asarray(seg), jnp.asarray(loss), 5)
    want_sums, want_counts = np.zeros(5), np.zeros(5, int)
    for r in range(2):
        for t in range(1, 10):  # token t is scored by per_token[t - 1]
            if seg[r, t] and loss[r, t]:
                want_sums[seg[r, t] - 1] += per_token[r, t - 1]
                want_counts[seg[r, t] - 1] += 1
    np.testing.assert_allclose(sums, want_sums, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(counts, want_counts)
    assert counts[4] == 0 and sums[4] == 0  # an index with no segment


@pytest.mark.parametrize("kind, num_microbatches", [("unary", 1), ("unary", 2), ("paired", 2)])
def test_packed_batch_holds_the_padded_batch(kind, num_microbatches, examples):
    """Every sequence of the padded batch appears once, whole and in order, in its microbatch's
    packed rows (found through unpack_index), with the same loss mask except on its first token;
    segments are contiguous, pad tokens have segment 0, and rows are fewer than examples."""
    padded = next(make_loader(examples, kind, packing=False, num_microbatches=num_microbatches))
    packed = next(make_loader(examples, kind, packing=True, num_microbatches=num_microbatches, row_multiple=4))
    M = num_microbatches
    groups = ("chosen", "rejected") if kind == "paired" else ("", "kl")
    packed_mbs = split_microbatches(packed, M)
    total_rows = packed[f"{groups[0] + '_' if groups[0] else ''}input_ids"].shape[0]
    assert total_rows % 4 == 0 and total_rows <= 8
    np.testing.assert_array_equal(packed["example_index"], np.arange(8))
    for g in groups:
        p = f"{g}_" if g else ""
        rows_used = 0
        for m in range(M):
            ids, seg, loss = (np.asarray(packed_mbs[f"{p}{k}"][m]) for k in ("input_ids", "segment_ids", "loss_mask"))
            rows_used += int((seg > 0).any(axis=1).sum())
            for k, i in enumerate(range(m, 8, M)):  # microbatch m holds examples m, m + M, ...
                n = int(padded[f"{p}attention_mask"][i].sum())
                where = np.argwhere(seg == k + 1)
                assert len(where) == n
                row, start = where[0]
                assert (where[:, 0] == row).all() and (where[:, 1] == np.arange(start, start + n)).all()
                np.testing.assert_array_equal(ids[row, start : start + n], padded[f"{p}input_ids"][i, :n])
                want = padded[f"{p}loss_mask"][i, :n].copy()
                want[0] = False
                np.testing.assert_array_equal(loss[row, start : start + n], want)
        assert rows_used < 8 * (2 if kind == "paired" else 1)  # some rows hold more than one sequence
        assert (
            np.asarray(packed[f"{p}input_ids"])[np.asarray(packed[f"{p}segment_ids"]) == 0]
            == get_tokenizer("bytes").pad_id
        ).all()
    if kind == "unary":
        np.testing.assert_array_equal(packed["desirable"], padded["desirable"])
        flat = split_microbatches({"x": packed["input_ids"]}, M)["x"].reshape(M, -1)
        index = np.asarray(packed["unpack_index"])
        for i in range(8):
            n = int(padded["attention_mask"][i].sum())
            np.testing.assert_array_equal(flat[i % M][index[i, :n]], padded["input_ids"][i, :n])
            assert (index[i, n:] == -1).all()


def test_unpack_tokens_gathers_rows_back_per_example():
    values = jnp.arange(12.0).reshape(2, 6)
    index = jnp.array([[0, 1, 2, -1], [7, 8, 9, 10]])
    np.testing.assert_array_equal(unpack_tokens(values, index), [[0, 1, 2, 0], [7, 8, 9, 10]])


GEMMA_KINDS = dict(num_layers=2, layer_types=("sliding_attention", "full_attention"), sliding_window=8)


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("tiny-1m", {}),
        ("tiny-pythia-1m", {}),
        pytest.param("tiny-qwen3-1m", {}, marks=pytest.mark.slow),
        ("tiny-gemma2-1m", GEMMA_KINDS),
        pytest.param("tiny-gemma3-1m", GEMMA_KINDS, marks=pytest.mark.slow),
    ],
)
def test_packed_rows_give_each_sequence_its_padded_log_probs(preset, overrides, examples):
    """The model on packed rows: per-token log-probs of every sequence equal the padded rows' (Llama
    and GPT-NeoX: full and partial rotary, so the positions restarting per segment matter; Qwen3: per-head
    q/k norms, GQA, head_dim apart from hidden/heads; Gemma: an 8-token window inside each segment on
    the sliding layer, soft-caps, Gemma 3's local RoPE base)."""
    config = get_preset(preset, **{"num_layers": 2, **overrides})
    model, params = build_model(config), init_params(config, seed=0)
    padded = next(make_loader(examples, "unary", packing=False))
    packed = next(make_loader(examples, "unary", packing=True))
    logits = model.apply({"params": params}, padded["input_ids"], padded["attention_mask"])
    want = token_logps(logits, padded["input_ids"], padded["loss_mask"])
    packed_logits = model.apply({"params": params}, packed["input_ids"], segment_ids=packed["segment_ids"])
    per_token = token_logps(packed_logits, packed["input_ids"], packed["loss_mask"])
    got = unpack_tokens(jnp.pad(per_token, ((0, 0), (0, 1))), packed["unpack_index"])[:, :-1]
    mask = padded["loss_mask"][:, 1:]
    assert mask.sum() > 30
    np.testing.assert_allclose(np.where(mask, got, 0), np.where(mask, want, 0), rtol=0, atol=2e-5)


# ---------------------------------------------------------------- every loss


def step_spec(name: str, packing: bool, num_microbatches: int = 1, lora: bool = False) -> StepSpec:
    loss = get_loss(name)
    return StepSpec(
        build_model(LORA_CONFIG) if lora else MODEL,
        loss,
        tuple(sorted(loss.defaults.items())),
        num_microbatches,
        "model" if loss.needs_reference else "none",
        256,
        packing=packing,
    )


@functools.cache
def params():
    from kto_jax.train.feeds import get_feed

    policy, reference = init_params(CONFIG, seed=0), init_params(CONFIG, seed=1)
    extra = {name: get_feed(name).init_params(CONFIG, seed=0) for name in ("token",)}
    return policy, reference, extra


@functools.cache
def lora_policy():
    """The policy of the LoRA variant: the reference's base with adapters whose A and B are random."""
    from kto_jax.models import lora

    _, reference, _ = params()
    adapters = lora.split_adapters(lora.init_adapters(LORA_CONFIG, reference, seed=2))[1]
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
    noisy = [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    return lora.merge_trees(reference, jax.tree_util.tree_unflatten(tree, noisy))


def loss_and_grad(name: str, batch: dict, packing: bool, lora: bool = False):
    spec = step_spec(name, packing, lora=lora)
    policy, reference, extra = params()
    if lora:  # the reference is the policy's base: the same model less the adapters
        policy = lora_policy()
    full = {"model": policy, **(extra["token"] if spec.loss.feed == "token" else {})}
    fn = jax.jit(
        jax.value_and_grad(lambda p: microbatch_loss(spec, p, reference, batch, {}), has_aux=True),
        compiler_options=FAST_COMPILER_OPTIONS,
    )
    (loss, (metrics, _)), grads = fn(full)
    return float(loss), jax.device_get(metrics), grads


def batches(examples, name: str) -> tuple[dict, dict]:
    spec = step_spec(name, packing=True)
    kind = "paired" if spec.loss.kind == "paired" else "unary"
    out = []
    for packing in (False, True):
        s = dataclasses.replace(spec, packing=packing)
        loader = FeedbackLoader(
            examples[kind],
            get_tokenizer("bytes"),
            TOKENIZE,
            global_batch_size=8,
            seed=0,
            bucket=16,
            process_index=0,
            process_count=1,
            packing=packing,
            schema=s.feed.schema(s.inputs, "none", packing),
        )
        out.append(next(loader))
    return tuple(out)


FAST_LOSSES = ("sft", "kto", "dpo", "ppo_offline")  # one per feed in the fast tier; the others run in the full one


@pytest.mark.parametrize(
    "name", [n if n in FAST_LOSSES else pytest.param(n, marks=pytest.mark.slow) for n in sorted(LOSSES)]
)
def test_every_loss_and_gradient_equal_the_padded_path(name, examples):
    assert_packed_equals_padded(name, examples, lora=False)


@pytest.mark.parametrize(
    "name", [n if n in ("kto", "dpo") else pytest.param(n, marks=pytest.mark.slow) for n in sorted(LOSSES)]
)
def test_every_loss_with_lora_adapters_equals_the_padded_path(name, examples):
    """The same with LoRA adapters on q, v, o and down (random A and B) and the base as the reference."""
    assert_packed_equals_padded(name, examples, lora=True)


def assert_packed_equals_padded(name, examples, lora: bool):
    padded, packed = batches(examples, name)
    loss, metrics, grads = loss_and_grad(name, padded, packing=False, lora=lora)
    packed_loss, packed_metrics, packed_grads = loss_and_grad(name, packed, packing=True, lora=lora)
    assert np.isfinite(loss)
    np.testing.assert_allclose(packed_loss, loss, rtol=0, atol=1e-5)
    assert sorted(packed_metrics) == sorted(metrics)
    for key in metrics:
        np.testing.assert_allclose(
            np.float64(packed_metrics[key]), np.float64(metrics[key]), rtol=1e-5, atol=1e-5, err_msg=key
        )
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert max(float(jnp.abs(g).max()) for _, g in leaves) > 1e-4  # the gradient is not trivially zero
    for (path, g), p in zip(leaves, jax.tree_util.tree_leaves(packed_grads)):
        # fp32 sums in a different order: 1e-5 relative to the entry's size, 1e-5 absolute near zero
        np.testing.assert_allclose(p, g, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
