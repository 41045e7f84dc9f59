"""GPT-NeoX (Pythia): LayerNorm with bias, GELU MLP, partial rotary, parallel or sequential residual."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from kto_jax.models.common import ACTIVATIONS, Attention, Decoder, ModelConfig, constrain, dense, ones, zeros


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * scale + bias, in float32."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        scale = self.param("scale", ones(("norm",)), (x.shape[-1],), cfg.params_dtype)
        bias = self.param("bias", zeros(("norm",)), (x.shape[-1],), cfg.params_dtype)
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
    def __call__(self, x, positions, mask, cache=None):
        cfg = self.config
        attn, cache = Attention(cfg, name="attention")(LayerNorm(cfg, name="attention_norm")(x), positions, mask, cache)
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
