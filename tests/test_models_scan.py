"""The scanned decoder stack (kto_jax/models/common.py Decoder): layers are one scanned body,
remat policies leave gradients unchanged, bf16 compute tracks fp32, and every param carries
logical axis names (stacked layer params lead with "layers")."""

from __future__ import annotations

import contextlib
import io
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from kto_jax.models import abstract_params, build_model, param_count
from kto_jax.models.config import REMAT_POLICIES, ModelConfig
from kto_jax.models.presets import PRESETS

LLAMA = ModelConfig(
    architecture="llama",
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    initializer_range=0.2,
)
NEOX = ModelConfig(
    architecture="gpt_neox",
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    rotary_pct=0.5,
    attention_bias=True,
    use_parallel_residual=True,
    hidden_act="gelu",
    initializer_range=0.2,
)
CONFIGS = {"llama": LLAMA, "gpt_neox": NEOX}


def random_params(config: ModelConfig, seed: int):
    """Params of the abstract shapes from numpy (no init compile): N(0, initializer_range), norm
    scales 1 + N(0, 0.2)."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        noise = rng.normal(size=x.shape).astype(np.float32)
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return jnp.asarray(1.0 + 0.2 * noise)
        return jnp.asarray(config.initializer_range * noise)

    return jax.tree_util.tree_map_with_path(leaf, nn.unbox(abstract_params(config)))


def batch(seed=0, size=2, length=12, vocab=100):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(size, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    return ids, mask


def hlo_text(config: ModelConfig) -> str:
    model = build_model(config)
    params = nn.unbox(abstract_params(config))  # ShapeDtypeStructs: lowering allocates nothing
    ids = jax.ShapeDtypeStruct((2, 12), jnp.int32)
    return jax.jit(model.apply).lower({"params": params}, ids, ids).as_text()


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_layers_are_scanned(arch):
    two, sixteen = hlo_text(CONFIGS[arch]), hlo_text(CONFIGS[arch].replace(num_layers=16))
    assert param_count(CONFIGS[arch].replace(num_layers=16)) > 4 * param_count(CONFIGS[arch])
    assert max(len(two), len(sixteen)) / min(len(two), len(sixteen)) < 1.2
    assert "stablehlo.while" in sixteen


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_unrolled_scan_is_straight_line_code_with_the_same_logits(arch):
    """scan_unroll=num_layers (what the AOT FLOP count compiles) changes the program, not the model."""
    config = CONFIGS[arch]
    unrolled = config.replace(scan_unroll=config.num_layers)
    assert "stablehlo.while" in hlo_text(config) and "stablehlo.while" not in hlo_text(unrolled)
    params = random_params(config, seed=4)
    ids, mask = batch()
    np.testing.assert_allclose(
        build_model(unrolled).apply({"params": params}, ids, mask),
        build_model(config).apply({"params": params}, ids, mask),
        atol=1e-5,
    )


def token_loss(model, params, ids, mask):
    logits = model.apply({"params": params}, ids, mask)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    weight = mask[:, 1:]
    return (nll * weight).sum() / weight.sum()


@pytest.mark.slow
def test_remat_policies_give_the_same_gradient():
    """Every policy in REMAT_POLICIES: the same loss and gradient as "none", and a remat in the jaxpr."""
    config = LLAMA
    params = random_params(config, seed=1)
    ids, mask = batch()
    results = {}
    assert "none" in REMAT_POLICIES and REMAT_POLICIES["none"] is None
    for policy in sorted(REMAT_POLICIES):
        model = build_model(config.replace(remat_policy=policy))
        traced = jax.jit(jax.value_and_grad(lambda p, model=model: token_loss(model, p, ids, mask))).trace(params)
        assert bool(re.search(r"remat|checkpoint", str(traced.jaxpr))) == (policy != "none"), policy
        results[policy] = traced.lower().compile()(params)
    ref_loss, ref_grad = results["none"]
    assert np.isfinite(ref_loss) and ref_loss > 1.0
    assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(ref_grad)) > 1e-3
    for policy in sorted(set(REMAT_POLICIES) - {"none"}):
        loss, grad = results[policy]
        np.testing.assert_allclose(loss, ref_loss, atol=1e-6)
        for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grad), jax.tree_util.tree_leaves(ref_grad)):
            np.testing.assert_allclose(g, r, atol=1e-5, err_msg=f"{policy}: {jax.tree_util.keystr(path)}")


def saved_residuals(policy: str) -> list[str]:
    """What the backward pass keeps from the forward for ``token_loss`` under ``policy``: one line per
    residual, "dtype[shape] ..." (jax.ad_checkpoint.print_saved_residuals)."""
    model = build_model(LLAMA.replace(remat_policy=policy))
    ids, mask = batch()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(lambda p: token_loss(model, p, ids, mask), random_params(LLAMA, seed=1))
    return out.getvalue().splitlines()


def residual_elements(lines: list[str]) -> int:
    sizes = [re.match(r"\w+\[([\d,]*)\]", line) for line in lines]
    return sum(int(np.prod([int(d) for d in m.group(1).split(",") if d])) for m in sizes if m)


def test_remat_policies_change_what_is_saved():
    """Each policy changes what the backward pass keeps: none saves every layer activation, dots the
    matmul outputs, dots_no_batch only those without batch dimensions (not attention's q.k and p.v),
    full only each layer's input, so strictly fewer residual elements in that order."""
    size = {policy: residual_elements(saved_residuals(policy)) for policy in REMAT_POLICIES}
    assert size["none"] > size["dots"] > size["dots_no_batch"] > size["full"], size


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_bfloat16_compute_tracks_float32(arch):
    config = CONFIGS[arch]
    params = random_params(config, seed=2)
    ids, mask = batch(seed=1)
    fp32 = jax.jit(build_model(config).apply)({"params": params}, ids, mask)
    bf16_model = build_model(config.replace(compute_dtype="bfloat16"))
    bf16 = jax.jit(bf16_model.apply)({"params": params}, ids, mask)
    assert bf16.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    assert np.all(np.isfinite(np.asarray(bf16, np.float32)))
    diff = np.abs(np.asarray(bf16, np.float32) - np.asarray(fp32))
    assert float(np.std(np.asarray(fp32))) > 0.3
    assert diff.max() < 5e-2 * max(1.0, float(np.abs(np.asarray(fp32)).max()))
    assert diff.mean() < 2e-2


@pytest.mark.parametrize("name", ["tiny-1m", "tiny-pythia-1m", "mistral-7b", "qwen2.5-7b", "qwen3-8b"])
def test_logical_axis_names(name):
    config = PRESETS[name]
    boxed = abstract_params(config)
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    allowed = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "norm", "layers"}
    for path, leaf in leaves:
        key = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.Partitioned), key
        assert len(leaf.names) == leaf.value.ndim, key
        assert set(leaf.names) <= allowed, key
        stacked = key.startswith("['layers']")
        assert (leaf.names[0] == "layers") == stacked, key
        if stacked:
            assert leaf.value.shape[0] == config.num_layers, key
    spec = nn.get_partition_spec(boxed)
    q_spec = spec["layers"]["attention"]["q"]["kernel"]
    assert q_spec == jax.sharding.PartitionSpec("layers", "embed", "heads", "head_dim")
    if config.qk_norm:  # each head's norm scale [head_dim], replicated as every norm
        assert spec["layers"]["attention"]["q_norm"]["scale"] == jax.sharding.PartitionSpec("layers", "norm")
    if config.qkv_bias:
        assert spec["layers"]["attention"]["k"]["bias"] == jax.sharding.PartitionSpec("layers", "kv_heads", "head_dim")
