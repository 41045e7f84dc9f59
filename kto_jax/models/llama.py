"""Llama 1/2/3 and Mistral: RMSNorm, SwiGLU MLP, grouped-query attention with RoPE.

The family's pieces: :func:`build` (the Flax decoder), :func:`tensor_maps` (its Hugging Face
tensors), :func:`from_hf_config` / :func:`to_hf_config` (its config.json fields) and
:func:`checks` (its ModelConfig constraints); registered in ``kto_jax.models.families``.
"""

from __future__ import annotations

import flax.linen as nn

from kto_jax.errors import InputError
from kto_jax.models.common import Attention, Decoder, RMSNorm, constrain, dense
from kto_jax.models.config import ACTIVATIONS, GEMMA_FIELDS, ModelConfig, unset
from kto_jax.models.tensor_map import TensorMap, linear, proj_in, proj_out, same

HF_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
HF_CLASSIFIERS = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification"}
BACKBONE_PREFIX = "model."  # the decoder's tensors, in *ForCausalLM and *ForSequenceClassification alike


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "gate")(x)
        up = dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "up")(x)
        h = constrain(
            ACTIVATIONS[cfg.hidden_act](gate) * up, ("activation_batch", "activation_length", "activation_mlp")
        )
        return dense(cfg, cfg.hidden_size, ("mlp", "embed"), "down")(h)


class LlamaBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + mlp(norm(h)). Scan-compatible."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, local=None):
        cfg = self.config
        attn, cache = Attention(cfg, name="attention")(
            RMSNorm(cfg, name="attention_norm")(x), positions, mask, cache, local
        )
        h = x + attn
        out = h + MLP(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(h))
        return constrain(out, ("activation_batch", "activation_length", "activation_embed")), cache


def build(config: ModelConfig) -> Decoder:
    """The Llama/Mistral decoder for ``config``."""
    return Decoder(config, block_cls=LlamaBlock, norm_cls=RMSNorm)


def tensor_maps(config: ModelConfig) -> list[TensorMap]:
    """Every ``LlamaForCausalLM`` / ``MistralForCausalLM`` tensor and where it lives in our params."""
    c = config
    d, h, kv, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    att, p = ("layers", "attention"), "model.layers.{i}."
    maps = [
        same(("embed", "embedding"), "model.embed_tokens.weight", per_layer=False),
        same(("final_norm", "scale"), "model.norm.weight", per_layer=False),
        same(("layers", "attention_norm", "scale"), p + "input_layernorm.weight"),
        same(("layers", "mlp_norm", "scale"), p + "post_attention_layernorm.weight"),
        proj_in(att + ("q", "kernel"), p + "self_attn.q_proj.weight", d, h, hd),
        proj_in(att + ("k", "kernel"), p + "self_attn.k_proj.weight", d, kv, hd),
        proj_in(att + ("v", "kernel"), p + "self_attn.v_proj.weight", d, kv, hd),
        proj_out(att + ("o", "kernel"), p + "self_attn.o_proj.weight", d, h, hd),
        linear(("layers", "mlp", "gate", "kernel"), p + "mlp.gate_proj.weight"),
        linear(("layers", "mlp", "up", "kernel"), p + "mlp.up_proj.weight"),
        linear(("layers", "mlp", "down", "kernel"), p + "mlp.down_proj.weight"),
    ]
    if c.attention_bias:
        maps += [
            same(att + ("q", "bias"), p + "self_attn.q_proj.bias", shape=(h, hd)),
            same(att + ("k", "bias"), p + "self_attn.k_proj.bias", shape=(kv, hd)),
            same(att + ("v", "bias"), p + "self_attn.v_proj.bias", shape=(kv, hd)),
            same(att + ("o", "bias"), p + "self_attn.o_proj.bias"),
        ]
    if not c.tie_word_embeddings:
        maps.append(linear(("lm_head", "kernel"), "lm_head.weight", per_layer=False))
    return maps


def from_hf_config(hf: dict, rope: dict) -> dict:
    """config.json -> the Llama/Mistral ModelConfig fields: num_key_value_heads -> num_kv_heads,
    head_dim, rms_norm_eps -> norm_eps, attention_bias and (Mistral only) sliding_window.
    The rope fields (``rope``) are all shared ones, read in ``hf_config``."""
    if hf.get("mlp_bias"):
        raise InputError("config.json mlp_bias=true is not supported (no Llama/Mistral release uses it)")
    return dict(
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        attention_bias=bool(hf.get("attention_bias", False)),
        sliding_window=hf.get("sliding_window") if hf["model_type"] == "mistral" else None,
    )


def to_hf_config(config: ModelConfig) -> dict:
    """The Llama/Mistral config.json fields: num_kv_heads -> num_key_value_heads, head_dim,
    norm_eps -> rms_norm_eps, attention_bias, mlp_bias=false and (Mistral only) sliding_window."""
    out = dict(
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.norm_eps,
        attention_bias=config.attention_bias,
        mlp_bias=False,
    )
    if config.hf_model_type == "mistral":
        out["sliding_window"] = config.sliding_window
    return out


def checks(config: ModelConfig) -> list[tuple[bool, str, str]]:
    """(ok, field, expected) for the fields a Llama/Mistral config.json constrains."""
    return [
        *unset(config, "Llama/Mistral", *GEMMA_FIELDS),
        (
            not config.qkv_bias,
            "qkv_bias",
            "False (Llama/Mistral has no q/k/v-only biases: attention_bias biases o too)",
        ),
        (not config.qk_norm, "qk_norm", "False (Llama/Mistral has no q/k norms)"),
        (
            config.sliding_window is None or config.hf_model_type == "mistral",
            "sliding_window",
            "None unless hf_model_type='mistral' (only Mistral's config.json carries a window)",
        ),
    ]
