"""kto_jax.models.blocked: the block-causal attention equals XLA's reference attention
(``kto_jax.models.common.xla_attention``: the full ``[T, T]`` scores, masked) in outputs and gradients,
float32 within 2e-5, for padded, left-padded, packed, windowed, GQA and soft-capped rows, at block sizes
that do and do not divide the length; on 8 simulated devices with the batch and heads sharded as on
1; and a model with ``attention_impl="blocked"`` gives XLA's logits and a training run XLA's metrics.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kto_jax.models.blocked import blocked_attention, key_range
from kto_jax.models.common import xla_attention
from kto_jax.models.positions import attention_mask_4d, segment_attention_mask
from tests.train_helpers import REPO, subprocess_env

TOL = 2e-5
B, T, D = 2, 50, 8


def inputs(heads: int, kv_heads: int, seed: int = 0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(B, T, heads, D)), jnp.float32)
    k, v = (jnp.asarray(r.normal(size=(B, T, kv_heads, D)), jnp.float32) for _ in range(2))
    cotangent = jnp.asarray(r.normal(size=(B, T, heads, D)), jnp.float32)
    return q, k, v, cotangent


def masks(window: int | None) -> dict:
    """The model's masks: right- and left-padded rows, and packed rows (segments of 10, padding after)."""
    right = np.ones((B, T), np.int32)
    right[1, 40:] = 0
    left = np.ones((B, T), np.int32)
    left[0, :7] = 0
    segments = np.repeat(np.arange(1, 6), 10)[None].repeat(B, 0)
    segments[1, 45:] = 0
    return {
        "right-padded": attention_mask_4d(jnp.asarray(right), window),
        "left-padded": attention_mask_4d(jnp.asarray(left), window),
        "packed": segment_attention_mask(jnp.asarray(segments), window),
    }


def outputs_and_grads(attend, q, k, v, cotangent):
    out = attend(q, k, v)
    grads = jax.grad(lambda *a: jnp.sum(attend(*a) * cotangent), argnums=(0, 1, 2))(q, k, v)
    return out, grads


@pytest.mark.parametrize("block", [16, 64, 7])
@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("window", [None, 13], ids=["full", "window13"])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_equals_the_reference_attention(heads, kv_heads, window, softcap, block):
    q, k, v, cotangent = inputs(heads, kv_heads)
    for name, mask in masks(window).items():
        got = outputs_and_grads(
            lambda q, k, v, mask=mask: blocked_attention(
                q, k, v, mask, scale=0.3, softcap=softcap, window=window, block=block
            ),
            q, k, v, cotangent,
        )  # fmt: skip
        want = outputs_and_grads(
            lambda q, k, v, mask=mask: xla_attention(q, k, v, mask, 0.3, softcap), q, k, v, cotangent
        )
        for label, a, b in zip(("out", "dq", "dk", "dv"), (got[0], *got[1]), (want[0], *want[1])):
            np.testing.assert_allclose(a, b, rtol=0, atol=TOL, err_msg=f"{name} {label}")


def test_key_ranges_cover_the_causal_band_and_skip_the_rest():
    """Block i sees keys up to its own end; with a window, from the block of its first query's
    earliest key: every allowed (query, key) pair is inside, and at 2048 tokens in blocks of 128 the
    causal rows hold (1 + 16) / 2 / 16 = 53% of the full score matrix."""
    length, block = 2048, 128
    for window in (None, 300):
        for i in range(length // block):
            lo, hi = key_range(i, block, length, window)
            first_query, last_query = i * block, (i + 1) * block - 1
            earliest = 0 if window is None else max(0, first_query - window + 1)
            assert lo <= earliest and hi == last_query + 1 and lo % block == 0
            assert earliest - lo < block  # no whole key block before the band
    computed = sum(hi - lo for lo, hi in (key_range(i, block, length, None) for i in range(16)))
    assert computed / (16 * length) == pytest.approx(17 / 32)


WORKER = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
jax.config.update("jax_default_matmul_precision", "highest")
sys.path.insert(0, ".")
from tests.test_blocked_attention import inputs, masks
from kto_jax.models.blocked import blocked_attention
q, k, v, w = inputs(4, 2)
mask = masks(13)["packed"]
def loss(q, k, v):
    return jnp.sum(blocked_attention(q, k, v, mask, scale=0.3, softcap=5.0, window=13, block=16) * w)
fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
single = fn(q, k, v)
mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", None, "tensor", None)))
sharded = fn(*map(shard, (q, k, v)))
diffs = [float(jnp.abs(a - b).max() / max(1.0, float(jnp.abs(a).max())))
         for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded))]  # the loss relative to its size
print(json.dumps({"devices": len(jax.devices()), "diffs": diffs,
                  "sharded": str(jax.tree.leaves(sharded)[1].sharding.spec)}))
"""


def test_eight_devices_give_the_single_device_result():
    out = subprocess.run(
        [sys.executable, "-c", WORKER], cwd=REPO, env=subprocess_env(devices=8), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["devices"] == 8 and "tensor" in row["sharded"], row
    assert max(row["diffs"]) < TOL, row


@pytest.mark.parametrize("name", ["llama_gqa", "mistral_window", "gemma2_softcap", "gemma3_rope"])
def test_a_model_gives_xlas_logits(loaded, name):
    """Whole models (local/global layers by a traced flag, windows, soft-caps, GQA), padded rows."""
    _, _, model, params = loaded(name)
    from tests.hf_checkpoints import LENGTH, VOCAB, random_ids
    from tests.test_models_hf import pad_rows

    padded, mask = pad_rows(random_ids(seed=3), [LENGTH, 7, 5, 1], "left", pad_id=VOCAB - 1)
    logits = {}
    for impl in ("xla", "blocked"):
        m = model.clone(config=model.config.replace(attention_impl=impl))
        logits[impl] = np.asarray(m.apply({"params": params}, jnp.asarray(padded), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(logits["blocked"][real], logits["xla"][real], rtol=0, atol=1e-4)


def test_a_training_run_gives_xlas_metrics(synthetic_data_dir, tmp_path):
    """Three KTO steps of the tiny config, packed rows: every logged metric as with XLA's attention."""
    from kto_jax.train import loop
    from tests.train_helpers import small_config

    rows = {}
    for impl in ("xla", "blocked"):
        config = small_config("kto", synthetic_data_dir, steps=3)
        config.model.attention_impl = impl
        config.data.packing = True
        loop.run(config, str(tmp_path / impl))
        rows[impl] = [json.loads(line) for line in open(tmp_path / impl / "metrics.jsonl")]
    assert len(rows["xla"]) == len(rows["blocked"]) >= 3
    for a, b in zip(rows["xla"], rows["blocked"]):
        for key, value in a.items():
            if key in ("step_time_s", "tokens_per_s", "mfu") or not isinstance(value, float):
                continue
            assert b[key] == pytest.approx(value, rel=1e-4, abs=TOL), key
