"""Qwen3 (dense): Llama's blocks (RMSNorm, SwiGLU, grouped-query attention with RoPE) with an
RMSNorm over each head's q and k vectors before RoPE (``ModelConfig.qk_norm``, implemented in
``kto_jax.models.common.Attention``), a head_dim independent of hidden_size / num_heads, and
q/k/v/o biases only when config.json says ``attention_bias: true`` (no release does).

The family's pieces: :func:`build` (the Flax decoder), :func:`tensor_maps` (its Hugging Face
tensors), :func:`from_hf_config` / :func:`to_hf_config` (its config.json fields) and
:func:`checks` (its ModelConfig constraints); registered in ``kto_jax.models.families``.
The sliding window (``use_sliding_window: true``) is not implemented: such a config.json is refused.
"""

from __future__ import annotations

from kto_jax.models import llama
from kto_jax.models.common import Decoder
from kto_jax.models.config import GEMMA_FIELDS, ModelConfig, unset
from kto_jax.models.qwen2 import refuse_sliding_window
from kto_jax.models.tensor_map import TensorMap, same

HF_MODEL_TYPES = {"qwen3": "Qwen3ForCausalLM"}
HF_CLASSIFIERS = {"qwen3": "Qwen3ForSequenceClassification"}
BACKBONE_PREFIX = "model."  # the decoder's tensors, in *ForCausalLM and *ForSequenceClassification alike
DEFAULT_HEAD_DIM = 128  # Qwen3Config's default when config.json has no head_dim


def build(config: ModelConfig) -> Decoder:
    """The Qwen3 decoder for ``config``: Llama's (the q/k norms are ``qk_norm``)."""
    return llama.build(config)


def tensor_maps(config: ModelConfig) -> list[TensorMap]:
    """Every ``Qwen3ForCausalLM`` tensor: Llama's names (with all four biases when attention_bias)
    plus ``self_attn.{q,k}_norm.weight`` ``[head_dim]``."""
    return llama.tensor_maps(config) + qk_norm_maps()


def qk_norm_maps() -> list[TensorMap]:
    """The per-head q/k norms' tensors, ``self_attn.{q,k}_norm.weight`` ``[head_dim]`` (Qwen3, Gemma 3)."""
    att, p = ("layers", "attention"), "model.layers.{i}."
    return [
        same(att + ("q_norm", "scale"), p + "self_attn.q_norm.weight"),
        same(att + ("k_norm", "scale"), p + "self_attn.k_norm.weight"),
    ]


def from_hf_config(hf: dict, rope: dict) -> dict:
    """config.json -> the Qwen3 ModelConfig fields: num_key_value_heads -> num_kv_heads, head_dim
    (default 128, as Qwen3Config's), rms_norm_eps -> norm_eps, attention_bias (default false),
    qk_norm=True. ``use_sliding_window: true`` is refused."""
    refuse_sliding_window(hf)
    return dict(
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim", DEFAULT_HEAD_DIM) or hf["hidden_size"] // hf["num_attention_heads"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        attention_bias=bool(hf.get("attention_bias", False)),
        qk_norm=True,
    )


def to_hf_config(config: ModelConfig) -> dict:
    """The Qwen3 config.json fields: num_kv_heads -> num_key_value_heads, head_dim, norm_eps ->
    rms_norm_eps, attention_bias, use_sliding_window=false (sliding_window null)."""
    return dict(
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.norm_eps,
        attention_bias=config.attention_bias,
        use_sliding_window=False,
        sliding_window=None,
    )


def checks(config: ModelConfig) -> list[tuple[bool, str, str]]:
    """(ok, field, expected) for what a Qwen3 config.json fixes or cannot express."""
    return [
        *unset(config, "Qwen3", *GEMMA_FIELDS),
        (config.qk_norm, "qk_norm", "True (Qwen3 always norms each head's q and k)"),
        (not config.qkv_bias, "qkv_bias", "False (Qwen3's biases are attention_bias, on q/k/v/o alike)"),
        (config.sliding_window is None, "sliding_window", "None (Qwen3's sliding window is not implemented)"),
    ]
