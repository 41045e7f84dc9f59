"""Gemma 3 (text): Gemma 2's blocks (``gemma2.GemmaBlock``: sandwich (1 + w) norms, GeGLU, scaled
embeddings, query_pre_attn_scalar) with an RMSNorm (1 + w) over each head's q and k
(``ModelConfig.qk_norm``), five sliding-window layers to one global (``layer_types``), a RoPE base
of its own on the sliding layers (``rope_local_theta``, unscaled) and rope scaling on the global
ones, and no attention soft-capping.

``Gemma3ForCausalLM`` folders (config.json model_type ``gemma3_text``) load as they are;
``Gemma3ForConditionalGeneration`` folders (``gemma3``, the 4B-27B releases) load their language
model: the ``text_config`` and the tensors under ``language_model`` (``kto_jax.models.hf``), the
vision tower left out with a one-line notice. Exports are ``Gemma3ForCausalLM`` folders.

The family's pieces: :func:`build`, :func:`tensor_maps`, :func:`from_hf_config` /
:func:`to_hf_config` and :func:`checks`; registered in ``kto_jax.models.families``.
"""

from __future__ import annotations

from kto_jax.errors import InputError
from kto_jax.models import gemma2
from kto_jax.models.common import Decoder
from kto_jax.models.config import ModelConfig
from kto_jax.models.tensor_map import TensorMap

HF_MODEL_TYPES = {"gemma3_text": "Gemma3ForCausalLM"}
HF_CLASSIFIERS = {"gemma3_text": "Gemma3TextForSequenceClassification"}
HF_MULTIMODAL = {"gemma3": "gemma3_text"}  # model_type whose config.json nests ours under text_config
BACKBONE_PREFIX = "model."  # the decoder's tensors, in *ForCausalLM and *ForSequenceClassification alike
DEFAULTS = dict(
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    rms_norm_eps=1e-6,
    max_position_embeddings=131072,
    final_logit_softcapping=None,
)  # Gemma3TextConfig's
GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0  # Gemma3TextConfig.default_theta


def build(config: ModelConfig) -> Decoder:
    """The Gemma 3 decoder for ``config``: Gemma 2's blocks (the q/k norms are ``qk_norm``)."""
    return gemma2.build(config)


def tensor_maps(config: ModelConfig) -> list[TensorMap]:
    """Every ``Gemma3ForCausalLM`` tensor: Gemma 2's names plus ``self_attn.{q,k}_norm.weight``."""
    return gemma2.tensor_maps(config)


def _rope(hf: dict) -> tuple[dict, dict]:
    """(global, local) RoPE dicts of a config.json: 5.x ``rope_parameters`` per layer kind, or 4.x
    ``rope_theta`` + ``rope_scaling`` (global) and ``rope_local_base_freq`` (local)."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:
        full = {"rope_theta": hf.get("rope_theta", GLOBAL_THETA), **params, **(hf.get("rope_scaling") or {})}
        local = {"rope_theta": hf.get("rope_local_base_freq", LOCAL_THETA)}
    full.setdefault("rope_theta", GLOBAL_THETA)
    local.setdefault("rope_theta", LOCAL_THETA)
    return full, local


def from_hf_config(hf: dict, rope: dict) -> dict:
    """config.json -> the Gemma 3 ModelConfig fields: ``gemma2.shared_from_hf``, qk_norm=True,
    layer_types (default: five sliding layers, then a full one), the global layers' RoPE (theta,
    rope_type, factor) and the local layers' base (``rope_local_theta``). A scaled RoPE on the local
    layers and ``attn_logit_softcapping`` (transformers' Gemma 3 ignores it) are refused."""
    full, local = _rope(hf)
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise InputError(
            f"config.json rope_parameters.sliding_attention={local!r} is not supported for model_type="
            f"{hf.get('model_type')!r}: the sliding layers' RoPE must be unscaled (rope_type 'default'), as in every "
            "Gemma 3 release"
        )
    if hf.get("attn_logit_softcapping") is not None:
        raise InputError(
            f"config.json attn_logit_softcapping={hf['attn_logit_softcapping']!r} is not supported for model_type="
            f"{hf.get('model_type')!r}: Gemma 3 has no attention soft-capping (transformers ignores the field); set it "
            "to null"
        )
    fields = gemma2.shared_from_hf(hf, DEFAULTS)
    return dict(
        fields,
        qk_norm=True,
        layer_types=gemma2.layer_types(hf, int(hf.get("sliding_window_pattern", 6))),
        rope_theta=float(full["rope_theta"]),
        rope_type=full.get("rope_type", full.get("type", "default")),
        rope_factor=float(full.get("factor", 1.0)),
        rope_local_theta=float(local["rope_theta"]),
    )


def text_config(hf: dict) -> dict:
    """A ``Gemma3ForConditionalGeneration`` config.json's language model (its ``text_config``, model_type
    ``gemma3_text``); any other config.json as it is."""
    if hf.get("model_type") not in HF_MULTIMODAL:
        return hf
    if not isinstance(hf.get("text_config"), dict):
        raise InputError(
            f"config.json model_type={hf['model_type']!r} has no text_config: a Gemma3ForConditionalGeneration "
            "folder keeps its language model's fields there"
        )
    text = {"tie_word_embeddings": hf.get("tie_word_embeddings", True), **hf["text_config"]}
    return {**text, "model_type": HF_MULTIMODAL[hf["model_type"]]}


def to_hf_config(config: ModelConfig) -> dict:
    """The Gemma 3 config.json fields: ``gemma2.shared_to_hf``, rope_local_base_freq (the global RoPE is
    the shared rope_theta / rope_scaling) and attn_logit_softcapping null."""
    return dict(
        gemma2.shared_to_hf(config),
        rope_local_base_freq=config.rope_local_theta,
        attn_logit_softcapping=None,
    )


def checks(config: ModelConfig) -> list[tuple[bool, str, str]]:
    """(ok, field, expected) for what a Gemma 3 config.json fixes or cannot express."""
    return [
        *gemma2.shared_checks(config, "Gemma 3"),
        (config.qk_norm, "qk_norm", "True (Gemma 3 norms each head's q and k)"),
        (config.attn_logit_softcap is None, "attn_logit_softcap", "None (Gemma 3 has no attention soft-capping)"),
        (
            config.rope_local_theta is not None,
            "rope_local_theta",
            "the sliding layers' RoPE base (Gemma 3's rope_local_base_freq, 10000 in every release)",
        ),
    ]
