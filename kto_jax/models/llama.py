"""Llama 1/2/3 and Mistral: RMSNorm, SwiGLU MLP, grouped-query attention with RoPE."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kto_jax.models.common import ACTIVATIONS, Attention, Decoder, ModelConfig, constrain, dense, ones


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32 (as transformers does)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        scale = self.param("scale", ones(("norm",)), (x.shape[-1],), cfg.params_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
        return scale.astype(cfg.compute_dtype) * normed.astype(cfg.compute_dtype)


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "gate")(x)
        up = dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "up")(x)
        h = constrain(ACTIVATIONS[cfg.hidden_act](gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
        return dense(cfg, cfg.hidden_size, ("mlp", "embed"), "down")(h)


class LlamaBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + mlp(norm(h)). Scan-compatible."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask, cache=None):
        cfg = self.config
        attn, cache = Attention(cfg, name="attention")(RMSNorm(cfg, name="attention_norm")(x), positions, mask, cache)
        h = x + attn
        out = h + MLP(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(h))
        return constrain(out, ("activation_batch", "activation_length", "activation_embed")), cache


def build(config: ModelConfig) -> Decoder:
    """The Llama/Mistral decoder for ``config``."""
    return Decoder(config, block_cls=LlamaBlock, norm_cls=RMSNorm)
