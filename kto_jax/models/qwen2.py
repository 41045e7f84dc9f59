"""Qwen2 / Qwen2.5: Llama's blocks (RMSNorm, SwiGLU, grouped-query attention with RoPE) with biases
on the q/k/v projections only (``ModelConfig.qkv_bias``; o_proj has none), tied or untied embeddings.

The family's pieces: :func:`build` (the Flax decoder), :func:`tensor_maps` (its Hugging Face
tensors), :func:`from_hf_config` / :func:`to_hf_config` (its config.json fields) and
:func:`checks` (its ModelConfig constraints); registered in ``kto_jax.models.families``.
Qwen2's sliding window (``use_sliding_window: true``) is not implemented: such a config.json is refused.
"""

from __future__ import annotations

from kto_jax.errors import InputError
from kto_jax.models import llama
from kto_jax.models.common import Decoder
from kto_jax.models.config import GEMMA_FIELDS, ModelConfig, unset
from kto_jax.models.tensor_map import TensorMap, same

HF_MODEL_TYPES = {"qwen2": "Qwen2ForCausalLM"}
HF_CLASSIFIERS = {"qwen2": "Qwen2ForSequenceClassification"}
BACKBONE_PREFIX = "model."  # the decoder's tensors, in *ForCausalLM and *ForSequenceClassification alike


def build(config: ModelConfig) -> Decoder:
    """The Qwen2 decoder for ``config``: Llama's (the q/k/v biases are ``qkv_bias``)."""
    return llama.build(config)


def tensor_maps(config: ModelConfig) -> list[TensorMap]:
    """Every ``Qwen2ForCausalLM`` tensor: Llama's names plus ``self_attn.{q,k,v}_proj.bias``."""
    h, kv, hd = config.num_heads, config.num_kv_heads, config.head_dim
    att, p = ("layers", "attention"), "model.layers.{i}."
    return llama.tensor_maps(config) + [
        same(att + ("q", "bias"), p + "self_attn.q_proj.bias", shape=(h, hd)),
        same(att + ("k", "bias"), p + "self_attn.k_proj.bias", shape=(kv, hd)),
        same(att + ("v", "bias"), p + "self_attn.v_proj.bias", shape=(kv, hd)),
    ]


def refuse_sliding_window(hf: dict) -> None:
    """Qwen2/Qwen3's ``use_sliding_window: true`` (a window on layers from ``max_window_layers`` on)
    is not implemented: an InputError naming both fields and their values."""
    if hf.get("use_sliding_window"):
        raise InputError(
            f"config.json use_sliding_window={hf['use_sliding_window']!r} (sliding_window="
            f"{hf.get('sliding_window')!r}, max_window_layers={hf.get('max_window_layers')!r}) is not supported "
            f"for model_type={hf.get('model_type')!r}: only full attention on every layer is implemented "
            "(every published Qwen2/Qwen2.5/Qwen3 config.json has use_sliding_window=false)"
        )


def from_hf_config(hf: dict, rope: dict) -> dict:
    """config.json -> the Qwen2 ModelConfig fields: num_key_value_heads -> num_kv_heads, head_dim
    (transformers reads it when present; default hidden_size / num_attention_heads), rms_norm_eps ->
    norm_eps, qkv_bias=True. ``use_sliding_window: true`` is refused (:func:`refuse_sliding_window`)."""
    refuse_sliding_window(hf)
    return dict(
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=True,
    )


def to_hf_config(config: ModelConfig) -> dict:
    """The Qwen2 config.json fields: num_kv_heads -> num_key_value_heads, head_dim, norm_eps ->
    rms_norm_eps, use_sliding_window=false (sliding_window null)."""
    return dict(
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.norm_eps,
        use_sliding_window=False,
        sliding_window=None,
    )


def checks(config: ModelConfig) -> list[tuple[bool, str, str]]:
    """(ok, field, expected) for what a Qwen2 config.json fixes or cannot express."""
    return [
        *unset(config, "Qwen2", *GEMMA_FIELDS),
        (config.qkv_bias, "qkv_bias", "True (Qwen2's q/k/v projections always have biases)"),
        (not config.attention_bias, "attention_bias", "False (Qwen2's o_proj has no bias: qkv_bias=True)"),
        (not config.qk_norm, "qk_norm", "False (Qwen2 has no q/k norms: that is Qwen3)"),
        (config.sliding_window is None, "sliding_window", "None (Qwen2's sliding window is not implemented)"),
    ]
