"""Gemma 2: embeddings scaled by sqrt(hidden), RMSNorm by (1 + w), a norm before and after both the
attention and the MLP, GeGLU (gelu, tanh form), attention logits scaled by
query_pre_attn_scalar^-1/2 and soft-capped, sliding-window and global layers alternating
(``layer_types``), and the final logits soft-capped.

The family's pieces: :func:`build` (the Flax decoder), :func:`tensor_maps` (its Hugging Face
tensors), :func:`from_hf_config` / :func:`to_hf_config` (its config.json fields) and
:func:`checks` (its ModelConfig constraints); registered in ``kto_jax.models.families``. Gemma 3
(``gemma3.py``) reuses the block and the tensor names.

The alternating layers stay one scanned stack (compile time does not grow with depth): a layer's
kind is scanned data (``ModelConfig.layer_types``, ``kto_jax.models.common.Attention``), not a
repeating group of layers, since Gemma 3's 5:1 pattern does not divide its depths (26, 34, 62).
"""

from __future__ import annotations

import flax.linen as nn

from kto_jax.errors import InputError
from kto_jax.models import llama
from kto_jax.models.common import Attention, Decoder, RMSNorm, constrain
from kto_jax.models.config import ModelConfig
from kto_jax.models.qwen3 import qk_norm_maps
from kto_jax.models.tensor_map import TensorMap, same

HF_MODEL_TYPES = {"gemma2": "Gemma2ForCausalLM"}
HF_CLASSIFIERS = {"gemma2": "Gemma2ForSequenceClassification"}
BACKBONE_PREFIX = "model."  # the decoder's tensors, in *ForCausalLM and *ForSequenceClassification alike
DEFAULTS = dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=4096, rms_norm_eps=1e-6)  # Gemma2Config's


class GemmaBlock(nn.Module):
    """Sandwich-norm block: h = x + post_attention_norm(attn(attention_norm(x)));
    out = h + post_mlp_norm(mlp(mlp_norm(h))), every norm ``(1 + w)``. Scan-compatible."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, local=None):
        cfg = self.config
        attn, cache = Attention(cfg, name="attention")(
            RMSNorm(cfg, name="attention_norm")(x), positions, mask, cache, local
        )
        h = x + RMSNorm(cfg, name="post_attention_norm")(attn)
        out = h + RMSNorm(cfg, name="post_mlp_norm")(llama.MLP(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(h)))
        return constrain(out, ("activation_batch", "activation_length", "activation_embed")), cache


def build(config: ModelConfig) -> Decoder:
    """The Gemma 2 decoder for ``config``."""
    return Decoder(config, block_cls=GemmaBlock, norm_cls=RMSNorm)


def tensor_maps(config: ModelConfig) -> list[TensorMap]:
    """Every ``Gemma2ForCausalLM`` tensor (and Gemma 3's) and where it lives in our params: Llama's
    names (embedding, projections with attention_bias's biases, MLP, final norm, untied LM head), except
    that ``post_attention_layernorm`` is the norm after the attention here, not before the MLP; plus
    ``pre_feedforward_layernorm``, ``post_feedforward_layernorm`` and, with config.qk_norm (Gemma 3),
    Qwen3's ``self_attn.{q,k}_norm.weight``."""
    p = "model.layers.{i}."
    maps = [m for m in llama.tensor_maps(config) if m.hf_name != p + "post_attention_layernorm.weight"]
    maps += [
        same(("layers", "post_attention_norm", "scale"), p + "post_attention_layernorm.weight"),
        same(("layers", "mlp_norm", "scale"), p + "pre_feedforward_layernorm.weight"),
        same(("layers", "post_mlp_norm", "scale"), p + "post_feedforward_layernorm.weight"),
    ]
    return maps + (qk_norm_maps() if config.qk_norm else [])


def layer_types(hf: dict, pattern: int) -> tuple[str, ...]:
    """config.json ``layer_types``, or (older files) transformers' default: layer i is
    "full_attention" when (i + 1) % pattern == 0, else "sliding_attention"."""
    kinds = hf.get("layer_types")
    if kinds is None:
        kinds = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(hf["num_hidden_layers"])
        ]
    return tuple(kinds)


def shared_from_hf(hf: dict, defaults: dict) -> dict:
    """The config.json fields Gemma 2 and 3 share: num_key_value_heads, head_dim, rms_norm_eps,
    hidden_activation (or hidden_act), query_pre_attn_scalar, sliding_window, attention_bias,
    final_logit_softcapping, tie_word_embeddings (default true), the (1 + w) norms and the scaled
    embeddings. ``use_bidirectional_attention: true`` is refused."""
    if hf.get("use_bidirectional_attention"):
        raise InputError(
            f"config.json use_bidirectional_attention={hf['use_bidirectional_attention']!r} is not supported for "
            f"model_type={hf.get('model_type')!r}: kto-jax trains causal language models"
        )
    return dict(
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or defaults["head_dim"],
        norm_eps=hf.get("rms_norm_eps", defaults["rms_norm_eps"]),
        hidden_act=hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
        query_pre_attn_scalar=_int(hf.get("query_pre_attn_scalar", defaults["query_pre_attn_scalar"])),
        sliding_window=hf.get("sliding_window", defaults["sliding_window"]),
        attention_bias=bool(hf.get("attention_bias", False)),
        final_logit_softcap=_cap(hf.get("final_logit_softcapping", defaults.get("final_logit_softcapping"))),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        max_position_embeddings=hf.get("max_position_embeddings", defaults.get("max_position_embeddings", 8192)),
        norm_unit_offset=True,
        scale_embeddings=True,
    )


def _int(value) -> int | None:
    return None if value is None else int(value)


def _cap(value) -> float | None:
    return None if value is None else float(value)


def from_hf_config(hf: dict, rope: dict) -> dict:
    """config.json -> the Gemma 2 ModelConfig fields: :func:`shared_from_hf`, attn_logit_softcapping
    (default 50) and layer_types (default: sliding, full, sliding, ...); final_logit_softcapping
    defaults to 30."""
    fields = shared_from_hf(hf, {**DEFAULTS, "final_logit_softcapping": 30.0})
    return dict(
        fields,
        attn_logit_softcap=_cap(hf.get("attn_logit_softcapping", 50.0)),
        layer_types=layer_types(hf, 2),
    )


def shared_to_hf(config: ModelConfig) -> dict:
    """The Gemma 2 / 3 config.json fields: num_key_value_heads, head_dim, rms_norm_eps,
    hidden_activation, query_pre_attn_scalar, sliding_window, layer_types, attention_bias,
    final_logit_softcapping."""
    return dict(
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.norm_eps,
        hidden_activation=config.hidden_act,
        query_pre_attn_scalar=config.query_pre_attn_scalar,
        sliding_window=config.sliding_window,
        layer_types=list(config.layer_types or ["full_attention"] * config.num_layers),
        attention_bias=config.attention_bias,
        final_logit_softcapping=config.final_logit_softcap,
    )


def to_hf_config(config: ModelConfig) -> dict:
    """The Gemma 2 config.json fields: :func:`shared_to_hf` and attn_logit_softcapping."""
    return dict(shared_to_hf(config), attn_logit_softcapping=config.attn_logit_softcap)


def shared_checks(config: ModelConfig, family: str) -> list[tuple[bool, str, str]]:
    """(ok, field, expected) for what every Gemma fixes."""
    return [
        (config.norm_unit_offset, "norm_unit_offset", f"True ({family}'s RMSNorm scales by 1 + w)"),
        (config.scale_embeddings, "scale_embeddings", f"True ({family} scales its embeddings by sqrt(hidden))"),
        (not config.qkv_bias, "qkv_bias", f"False ({family}'s biases are attention_bias, on q/k/v/o alike)"),
        (not config.use_parallel_residual, "use_parallel_residual", f"False ({family}'s blocks are sequential)"),
        (config.rotary_pct == 1.0, "rotary_pct", f"1.0 ({family} rotates every head dim)"),
        (
            config.sliding_window is None or config.layer_types is not None,
            "layer_types",
            f"one kind per layer: {family}'s window applies to its 'sliding_attention' layers only, and its "
            "config.json always lists them",
        ),
        (
            config.query_pre_attn_scalar is not None,
            "query_pre_attn_scalar",
            f"an integer ({family}'s config.json always sets it; head_dim in most releases)",
        ),
    ]


def checks(config: ModelConfig) -> list[tuple[bool, str, str]]:
    """(ok, field, expected) for what a Gemma 2 config.json fixes or cannot express."""
    return [
        *shared_checks(config, "Gemma 2"),
        (not config.qk_norm, "qk_norm", "False (Gemma 2 has no q/k norms: that is Gemma 3)"),
        (config.rope_local_theta is None, "rope_local_theta", "None (Gemma 2 has one RoPE on every layer)"),
    ]
