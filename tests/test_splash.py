"""Splash attention (model.attention_impl="splash", kto_jax/models/splash.py) equals XLA's.

On this CPU host the TPU Pallas kernel runs in Pallas's interpreter: the same kernel code, block
skipping and segment-id masking, executed as JAX ops. The model's logits at every real token and
the gradient of a masked sum of log-probs equal those of ``jax.nn.dot_product_attention`` with
the explicit mask (fp32), for padded rows (left and right padding), packed rows (segment ids),
GQA, a sliding window and Pythia's partial rotary; on 8 simulated devices (batch over data x
fsdp, heads over tensor, each shard under ``shard_map``) as on one. The TPU compile of the
kernel inside the paper's step is in tests/test_aot.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kto_jax.models import build_model
from kto_jax.models.hf import init_params
from kto_jax.models.presets import get_preset
from kto_jax.models.splash import block_size
from tests.train_helpers import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTH = 256  # two 128-token blocks: the kernel skips the masked upper block


def rows(batch: int = 4, length: int = LENGTH, seed: int = 0) -> dict:
    """Token ids with a left-padded, a right-padded and two full rows, and packed segment ids
    (3 sequences, then padding; one sequence crosses the block boundary)."""
    r = np.random.default_rng(seed)
    ids = r.integers(1, 384, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    mask[0, :70] = 0  # left padding
    mask[1, 200:] = 0  # right padding
    segments = np.zeros((batch, length), np.int32)
    for b in range(batch):
        cuts = np.sort(r.choice(np.arange(10, length - 20), size=3, replace=False))
        for s, (lo, hi) in enumerate(zip([0, *cuts[:2]], cuts)):
            segments[b, lo:hi] = s + 1
    return {"ids": ids, "mask": mask, "segments": segments}


def logits_and_grad(config, params, batch: dict, packed: bool):
    """Logits and the gradient (w.r.t. params) of sum over real tokens of log p(next token)."""
    model = build_model(config)
    ids = jnp.asarray(batch["ids"])
    real = jnp.asarray(batch["segments"] if packed else batch["mask"]) > 0

    def forward(p):
        kwargs = {"segment_ids": jnp.asarray(batch["segments"])} if packed else {}
        return model.apply({"params": p}, ids, None if packed else jnp.asarray(batch["mask"]), **kwargs)

    def objective(p):
        logits = forward(p)
        logps = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        picked = jnp.take_along_axis(logps, ids[:, 1:, None], axis=-1)[..., 0]
        return (picked * (real[:, 1:] & real[:, :-1])).sum()

    logits = jax.jit(forward)(params)
    kernels = str(jax.make_jaxpr(forward)(params)).count("pallas_call")
    assert (kernels > 0) == (config.attention_impl == "splash"), kernels  # the kernel is in the program (or not)
    return np.asarray(logits), jax.jit(jax.grad(objective))(params), np.asarray(real)


def assert_same(config, packed: bool, atol: float = 2e-5):
    params = init_params(config, seed=1)
    batch = rows()
    ref_logits, ref_grad, real = logits_and_grad(config.replace(attention_impl="xla"), params, batch, packed)
    logits, grad, _ = logits_and_grad(config.replace(attention_impl="splash"), params, batch, packed)
    np.testing.assert_allclose(logits[real], ref_logits[real], rtol=0, atol=atol)
    leaves = jax.tree_util.tree_leaves_with_path(ref_grad)
    assert max(float(jnp.abs(g).max()) for _, g in leaves) > 1e-3
    for (path, g), s in zip(leaves, jax.tree_util.tree_leaves(grad)):
        np.testing.assert_allclose(s, g, rtol=1e-4, atol=atol, err_msg=jax.tree_util.keystr(path))


LLAMA_GQA = get_preset("tiny-1m", num_layers=2, num_kv_heads=2)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_splash_equals_xla_on_llama_with_gqa(packed):
    assert_same(LLAMA_GQA, packed)


def test_splash_equals_xla_with_a_sliding_window():
    assert_same(LLAMA_GQA.replace(sliding_window=40, hf_model_type="mistral"), packed=True)


def test_splash_equals_xla_on_pythia_partial_rotary():
    assert_same(get_preset("tiny-pythia-1m", num_layers=2), packed=True)


@pytest.mark.parametrize("preset", ["tiny-qwen2-1m", "tiny-qwen3-1m"])
def test_splash_equals_xla_on_qwen_biases_and_qk_norms(preset):
    """Qwen2's q/k/v biases; Qwen3's per-head q/k RMSNorms before RoPE, head_dim 64 != 128 / 4."""
    assert_same(get_preset(preset, num_layers=2), packed=True)


GEMMA_KINDS = dict(num_layers=2, layer_types=("sliding_attention", "full_attention"), sliding_window=40)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_splash_equals_xla_on_gemma2_soft_caps_and_alternating_windows(packed):
    """Gemma 2: a 40-token window on the first layer, full attention on the second (each layer's kind
    picks its kernel under the scan), attention logits soft-capped inside the kernel (caps small enough
    to bend them at this init), query_pre_attn_scalar != head_dim, (1 + w) sandwich norms."""
    config = get_preset(
        "tiny-gemma2-1m",
        **GEMMA_KINDS,
        initializer_range=0.1,
        attn_logit_softcap=1.0,
        final_logit_softcap=2.0,
        query_pre_attn_scalar=24,
    )
    assert_same(config, packed)


def test_splash_equals_xla_on_gemma3_local_rope_and_qk_norms():
    """Gemma 3: q/k (1 + w) norms, the sliding layer's own RoPE base, linear scaling on the global one."""
    config = get_preset("tiny-gemma3-1m", **GEMMA_KINDS, rope_local_theta=100.0, rope_type="linear", rope_factor=4.0)
    assert_same(config, packed=True)


def test_decoding_with_the_kv_cache_stays_on_xla():
    """A splash model generates: the cache path's ``[B, 1, T, S]`` mask goes to XLA's attention."""
    from kto_jax.models.common import init_cache

    config = LLAMA_GQA.replace(attention_impl="splash")
    params = init_params(config, seed=1)
    ids = jnp.asarray(rows()["ids"][:2, :8])
    cache = init_cache(config, 2, 16)
    logits, _ = build_model(config).apply(
        {"params": params},
        ids,
        jnp.ones((2, 16), jnp.int32),
        cache=cache,
        positions=jnp.broadcast_to(jnp.arange(8), (2, 8)),
    )
    full = build_model(config.replace(attention_impl="xla")).apply({"params": params}, ids)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full), rtol=0, atol=2e-5)


def test_block_size_and_row_lengths_it_refuses():
    assert block_size(2048) == 512 and block_size(384) == 128 and block_size(256) == 256
    with pytest.raises(ValueError, match="multiple of 128 tokens.*data.pack_length"):
        block_size(200)


def test_plan_names_the_row_length_field_splash_cannot_take():
    from kto_jax.config import base_config
    from kto_jax.train.plan import make_plan

    config = base_config()
    config.model.attention_impl = "splash"
    config.data.update(dict(max_length=256, max_prompt_length=128, bucket=64))
    with pytest.raises(
        ValueError, match=r"config.data.bucket=64: model.attention_impl='splash' needs rows of a multiple of 128"
    ):
        make_plan(config, 1)
    config.data.update(dict(packing=True, pack_length=320))
    with pytest.raises(ValueError, match=r"config.data.pack_length=320"):
        make_plan(config, 1)
    config.data.pack_length = 512
    assert make_plan(config, 1).model_config.attention_impl == "splash"


# ---------------------------------------------------------------- 8 simulated devices


def sharded_result() -> dict:
    """Run in a subprocess with 8 CPU devices: splash on a data=2, fsdp=2, tensor=2 mesh (params
    sharded by the logical rules) against XLA attention on one device."""
    from kto_jax import sharding

    config = get_preset("tiny-1m", num_layers=2, num_kv_heads=2)
    batch = rows(batch=8)
    params = init_params(config, seed=1)
    out = {}
    for packed in (False, True):
        ref_logits, ref_grad, real = logits_and_grad(config.replace(attention_impl="xla"), params, batch, packed)
        mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
        with sharding.activation_rules(mesh):
            sharded = init_params(config, seed=1, mesh=mesh)
            logits, grad, _ = logits_and_grad(config.replace(attention_impl="splash"), sharded, batch, packed)
        diffs = jax.tree_util.tree_map(
            lambda a, b: float(jnp.abs(jnp.asarray(a) - jnp.asarray(b)).max()), grad, ref_grad
        )
        out["packed" if packed else "padded"] = {
            "logits": float(np.abs(logits[real] - ref_logits[real]).max()),
            "grad": max(jax.tree_util.tree_leaves(diffs)),
            "devices": len(jax.devices()),
            "sharded": not grad["layers"]["attention"]["q"]["kernel"].sharding.is_fully_replicated,
        }
    return out


def test_splash_sharded_on_8_devices_equals_xla_on_one():
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_splash"],
        cwd=ROOT,
        env=subprocess_env(devices=8),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for layout, r in result.items():
        assert r["devices"] == 8 and r["sharded"], (layout, r)
        assert r["logits"] < 2e-5 and r["grad"] < 1e-4, (layout, r)


if __name__ == "__main__":
    print(json.dumps(sharded_result()))
