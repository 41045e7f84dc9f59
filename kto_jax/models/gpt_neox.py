"""GPT-NeoX (Pythia): LayerNorm with bias, GELU MLP, partial rotary, parallel or sequential residual.

The family's pieces: :func:`build` (the Flax decoder), :func:`tensor_maps` (its Hugging Face
tensors), :func:`from_hf_config` / :func:`to_hf_config` (its config.json fields) and
:func:`checks` (its ModelConfig constraints); registered in ``kto_jax.models.families``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from kto_jax.models.common import Attention, Decoder, constrain, dense, ones, zeros
from kto_jax.models.config import ACTIVATIONS, GEMMA_FIELDS, ModelConfig, unset
from kto_jax.models.tensor_map import TensorMap, linear, proj_out, same

HF_MODEL_TYPES = {"gpt_neox": "GPTNeoXForCausalLM"}
HF_CLASSIFIERS = {"gpt_neox": "GPTNeoXForSequenceClassification"}
BACKBONE_PREFIX = "gpt_neox."  # the decoder's tensors, in *ForCausalLM and *ForSequenceClassification alike


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * scale + bias, in float32."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        scale = self.param("scale", ones(("norm",)), (x.shape[-1],), cfg.param_dtype)
        bias = self.param("bias", zeros(("norm",)), (x.shape[-1],), cfg.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        normed = (x32 - mean) / jnp.sqrt(var + cfg.norm_eps) * scale + bias
        return normed.astype(cfg.compute_dtype)


class MLP(nn.Module):
    """down(act(up(x))) with biases."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = ACTIVATIONS[cfg.hidden_act](dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "up", use_bias=True)(x))
        h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        return dense(cfg, cfg.hidden_size, ("mlp", "embed"), "down", use_bias=True)(h)


class GPTNeoXBlock(nn.Module):
    """parallel:   out = x + attn(ln1(x)) + mlp(ln2(x))
    sequential: h = x + attn(ln1(x)); out = h + mlp(ln2(h))"""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, local=None):
        cfg = self.config
        attn, cache = Attention(cfg, name="attention")(
            LayerNorm(cfg, name="attention_norm")(x), positions, mask, cache, local
        )
        mlp_norm, mlp = LayerNorm(cfg, name="mlp_norm"), MLP(cfg, name="mlp")
        if cfg.use_parallel_residual:
            out = x + attn + mlp(mlp_norm(x))
        else:
            h = x + attn
            out = h + mlp(mlp_norm(h))
        return constrain(out, ("activation_batch", "activation_length", "activation_embed")), cache


def build(config: ModelConfig) -> Decoder:
    """The GPT-NeoX decoder for ``config``."""
    return Decoder(config, block_cls=GPTNeoXBlock, norm_cls=LayerNorm)


def tensor_maps(config: ModelConfig) -> list[TensorMap]:
    """Every ``GPTNeoXForCausalLM`` tensor and where it lives in our params (the fused
    query_key_value weight, and bias when attention_bias, split into our q, k and v)."""
    c = config
    d, h, hd = c.hidden_size, c.num_heads, c.head_dim
    att, p = ("layers", "attention"), "gpt_neox.layers.{i}."
    qkv = tuple(att + (n, "kernel") for n in "qkv")
    maps = [
        same(("embed", "embedding"), "gpt_neox.embed_in.weight", per_layer=False),
        same(("final_norm", "scale"), "gpt_neox.final_layer_norm.weight", per_layer=False),
        same(("final_norm", "bias"), "gpt_neox.final_layer_norm.bias", per_layer=False),
        same(("layers", "attention_norm", "scale"), p + "input_layernorm.weight"),
        same(("layers", "attention_norm", "bias"), p + "input_layernorm.bias"),
        same(("layers", "mlp_norm", "scale"), p + "post_attention_layernorm.weight"),
        same(("layers", "mlp_norm", "bias"), p + "post_attention_layernorm.bias"),
        # fused [heads * (q, k, v) * head_dim, hidden], per head q then k then v
        TensorMap(
            p + "attention.query_key_value.weight",
            qkv,
            split=lambda w: [w.reshape(h, 3, hd, d)[:, j].transpose(2, 0, 1) for j in range(3)],
            merge=lambda xs: np.stack([x.transpose(1, 2, 0) for x in xs], axis=1).reshape(3 * h * hd, d),
        ),
        proj_out(att + ("o", "kernel"), p + "attention.dense.weight", d, h, hd),
        linear(("layers", "mlp", "up", "kernel"), p + "mlp.dense_h_to_4h.weight"),
        same(("layers", "mlp", "up", "bias"), p + "mlp.dense_h_to_4h.bias"),
        linear(("layers", "mlp", "down", "kernel"), p + "mlp.dense_4h_to_h.weight"),
        same(("layers", "mlp", "down", "bias"), p + "mlp.dense_4h_to_h.bias"),
    ]
    if c.attention_bias:
        maps += [
            TensorMap(
                p + "attention.query_key_value.bias",
                tuple(att + (n, "bias") for n in "qkv"),
                split=lambda b: [b.reshape(h, 3, hd)[:, j] for j in range(3)],
                merge=lambda xs: np.stack(xs, axis=1).reshape(-1),
            ),
            same(att + ("o", "bias"), p + "attention.dense.bias"),
        ]
    if not c.tie_word_embeddings:
        maps.append(linear(("lm_head", "kernel"), "embed_out.weight", per_layer=False))
    return maps


def from_hf_config(hf: dict, rope: dict) -> dict:
    """config.json -> the GPT-NeoX ModelConfig fields: layer_norm_eps -> norm_eps,
    partial_rotary_factor (5.x, in ``rope``) or rotary_pct (4.x) -> rotary_pct, rope_theta or
    rotary_emb_base (4.x) -> rope_theta, attention_bias and use_parallel_residual (both default true)."""
    return dict(
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        rotary_pct=float(rope.get("partial_rotary_factor", hf.get("rotary_pct", 1.0))),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))),
        attention_bias=bool(hf.get("attention_bias", True)),
        use_parallel_residual=bool(hf.get("use_parallel_residual", True)),
    )


def to_hf_config(config: ModelConfig) -> dict:
    """The GPT-NeoX config.json fields, in both spellings where 4.x and 5.x differ: norm_eps ->
    layer_norm_eps, rotary_pct -> rotary_pct and partial_rotary_factor, rope_theta ->
    rotary_emb_base, use_parallel_residual, attention_bias."""
    return dict(
        layer_norm_eps=config.norm_eps,
        rotary_pct=config.rotary_pct,
        partial_rotary_factor=config.rotary_pct,
        rotary_emb_base=config.rope_theta,
        use_parallel_residual=config.use_parallel_residual,
        attention_bias=config.attention_bias,
    )


def checks(config: ModelConfig) -> list[tuple[bool, str, str]]:
    """(ok, field, expected) for what a GPT-NeoX config.json cannot express: grouped-query
    heads, a head_dim other than hidden_size / num_heads, a window, q/k/v-only biases or q/k norms."""
    return [
        *unset(config, "GPT-NeoX", *GEMMA_FIELDS),
        (
            config.num_kv_heads == config.num_heads,
            "num_kv_heads",
            f"num_heads={config.num_heads} (GPT-NeoX has no grouped-query attention)",
        ),
        (
            config.head_dim * config.num_heads == config.hidden_size,
            "head_dim",
            f"hidden_size / num_heads = {config.hidden_size}/{config.num_heads} (GPT-NeoX has no head_dim field)",
        ),
        (config.sliding_window is None, "sliding_window", "None (GPT-NeoX has no attention window)"),
        (not config.qkv_bias, "qkv_bias", "False (GPT-NeoX has no q/k/v-only biases: attention_bias biases o too)"),
        (not config.qk_norm, "qk_norm", "False (GPT-NeoX has no q/k norms)"),
    ]
