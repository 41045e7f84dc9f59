"""Presets (kto_jax/models/presets.py) and ModelConfig validation: every preset has exactly
transformers' parameter count for the same config.json (built on the meta device, allocating
nothing), the published totals, and config errors name the offending field."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig

from kto_jax.errors import InputError
from kto_jax.models import param_count
from kto_jax.models.config import ModelConfig
from kto_jax.models.hf import config_from_hf, config_to_hf
from kto_jax.models.presets import PRESETS, get_preset


def hf_config(config: ModelConfig):
    d = dict(config_to_hf(config))
    return AutoConfig.for_model(d.pop("model_type"), **d)


def hf_param_count(config: ModelConfig) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(config))
    assert all(p.is_meta for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_count_matches_transformers(name):
    config = get_preset(name)
    assert param_count(config) == hf_param_count(config)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_survives_transformers_config(name):
    """config_to_hf -> transformers' config class -> its to_dict() -> config_from_hf is the identity."""
    config = get_preset(name)
    assert config_from_hf(hf_config(config).to_dict()) == config
    assert config_from_hf(config_to_hf(config)) == config


@pytest.mark.parametrize(
    "name, total",
    [
        ("llama-7b", 6_738_415_616),
        ("llama2-7b", 6_738_415_616),
        ("llama-13b", 13_015_864_320),
        ("mistral-7b", 7_241_732_096),
        ("llama3-8b", 8_030_261_248),
        ("pythia-1.4b", 1_414_647_808),
        ("pythia-6.9b", 6_857_302_016),
        ("pythia-12b", 11_846_072_320),
        ("qwen2.5-0.5b", 494_032_768),
        ("qwen2.5-7b", 7_615_616_512),
        ("qwen3-0.6b", 596_049_920),
        ("qwen3-8b", 8_190_735_360),
        ("gemma2-2b", 2_614_341_888),
        ("gemma3-1b", 999_885_952),
    ],
)
def test_published_totals(name, total):
    assert param_count(get_preset(name)) == total


def test_param_count_tied_embeddings_counts_the_matrix_once():
    untied = get_preset("tiny-1m")
    tied = untied.replace(tie_word_embeddings=True)
    assert param_count(untied) - param_count(tied) == untied.vocab_size * untied.hidden_size
    assert param_count(tied) == hf_param_count(tied)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown model preset 'nope'.*tiny-1m.*llama3-8b"):
        get_preset("nope")


def test_get_preset_overrides():
    cfg = get_preset("tiny-1m", compute_dtype="bfloat16")
    assert cfg.compute_dtype == "bfloat16"
    assert cfg.param_dtype == "float32"
    assert cfg.replace(compute_dtype="float32") == PRESETS["tiny-1m"]
    assert PRESETS["tiny-1m"].compute_dtype == "float32"  # the registry entry is untouched
    with pytest.raises(ValueError, match="remat_policy"):
        get_preset("tiny-1m", remat_policy="bogus")


def test_preset_shapes():
    for name, cfg in PRESETS.items():
        assert cfg.num_heads % cfg.num_kv_heads == 0, name
        assert cfg.head_dim * cfg.num_heads == cfg.hidden_size or cfg.architecture in ("qwen3", "gemma2", "gemma3"), (
            name
        )
    assert get_preset("llama3-8b").num_kv_heads == 8 and get_preset("llama3-8b").rope_theta == 500000.0
    assert get_preset("mistral-7b").sliding_window == 4096 and get_preset("mistral-7b").hf_model_type == "mistral"
    assert get_preset("pythia-1.4b").rotary_dim == 32  # head_dim 128 * rotary_pct 0.25
    qwen2 = get_preset("qwen2.5-7b")
    assert (qwen2.qkv_bias, qwen2.attention_bias, qwen2.qk_norm, qwen2.head_dim) == (True, False, False, 128)
    qwen3 = get_preset("qwen3-0.6b")
    assert (qwen3.qk_norm, qwen3.qkv_bias, qwen3.head_dim, qwen3.hidden_size // qwen3.num_heads) == (
        True,
        False,
        128,
        64,
    )

    gemma2 = get_preset("gemma2-27b")
    assert (gemma2.head_dim, gemma2.query_pre_attn_scalar, gemma2.hidden_size // gemma2.num_heads) == (128, 144, 144)
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap, gemma2.sliding_window) == (50.0, 30.0, 4096)
    gemma3 = get_preset("gemma3-27b")
    assert (gemma3.head_dim, gemma3.query_pre_attn_scalar, gemma3.qk_norm) == (128, 168, True)
    assert (gemma3.attn_logit_softcap, gemma3.final_logit_softcap) == (None, None)
    assert (gemma3.rope_type, gemma3.rope_factor, gemma3.rope_theta, gemma3.rope_local_theta) == (
        "linear",
        8.0,
        1e6,
        1e4,
    )
    gemma3_1b = get_preset("gemma3-1b")
    assert (gemma3_1b.rope_type, gemma3_1b.sliding_window, gemma3_1b.vocab_size) == ("default", 512, 262144)
    for name, cfg in PRESETS.items():
        if cfg.architecture in ("gemma2", "gemma3"):
            assert (cfg.norm_unit_offset, cfg.scale_embeddings, cfg.tie_word_embeddings) == (True, True, True), name
            assert cfg.hidden_act == "gelu_pytorch_tanh", name


@pytest.mark.parametrize("name", sorted(n for n, c in PRESETS.items() if c.architecture in ("gemma2", "gemma3")))
def test_gemma_layer_types_are_transformers_defaults(name):
    """A Gemma preset's layer_types are what transformers' config class gives for its depth: Gemma 2
    alternates sliding and full from layer 0; Gemma 3 has a full layer every sliding_window_pattern
    (6; 2 for tiny-gemma3-1m, so that its 4 layers have both kinds)."""
    cfg = get_preset(name)
    if cfg.architecture == "gemma2":
        expected = Gemma2Config(num_hidden_layers=cfg.num_layers).layer_types
    else:
        pattern = 2 if name == "tiny-gemma3-1m" else 6
        expected = Gemma3TextConfig(num_hidden_layers=cfg.num_layers, sliding_window_pattern=pattern).layer_types
    assert cfg.layer_types == tuple(expected)
    assert {"sliding_attention", "full_attention"} <= set(cfg.layer_types)


BASE = dict(architecture="llama", vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_kv_heads", 3),
        ("num_kv_heads", 0),
        ("sliding_window", 4),  # a window exports only as Mistral
        ("remat_policy", "bogus"),
        ("architecture", "bert"),
        ("rope_type", "yarn"),
        ("rotary_pct", 0.0),
        ("rotary_pct", 1.5),
        ("attention_impl", "flash"),
        ("hidden_act", "relu6"),
        ("hf_model_type", "gpt2"),
        ("scan_unroll", 0),
        ("scan_unroll", 3),  # more than num_layers=2
        ("compute_dtype", "float33"),
        ("compute_dtype", None),
        ("param_dtype", "int32"),
    ],
)
def test_invalid_field_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}={value!r} is invalid: expected"):
        ModelConfig(**{**BASE, field: value})


def test_gpt_neox_rejects_what_its_config_json_cannot_hold():
    neox = {**BASE, "architecture": "gpt_neox"}
    for field, value in [("num_kv_heads", 2), ("head_dim", 16), ("sliding_window", 4), ("hf_model_type", "llama")]:
        with pytest.raises(ValueError, match=rf"ModelConfig\.{field}={value!r} is invalid: expected"):
            ModelConfig(**{**neox, field: value})


def test_qwen_layers_belong_to_their_families():
    """qkv_bias (Qwen2) and qk_norm (Qwen3) are refused where the family's config.json cannot hold them,
    and required where it always has them."""
    qwen2 = {**BASE, "architecture": "qwen2", "qkv_bias": True}
    qwen3 = {**BASE, "architecture": "qwen3", "qk_norm": True}
    cases = [
        ({**BASE, "qkv_bias": True}, "qkv_bias", True),
        ({**BASE, "qk_norm": True}, "qk_norm", True),
        ({**BASE, "architecture": "gpt_neox", "qkv_bias": True}, "qkv_bias", True),
        ({**BASE, "architecture": "gpt_neox", "qk_norm": True}, "qk_norm", True),
        ({**qwen2, "qkv_bias": False}, "qkv_bias", False),
        ({**qwen2, "attention_bias": True}, "attention_bias", True),
        ({**qwen2, "qk_norm": True}, "qk_norm", True),
        ({**qwen2, "sliding_window": 4}, "sliding_window", 4),
        ({**qwen3, "qk_norm": False}, "qk_norm", False),
        ({**qwen3, "qkv_bias": True}, "qkv_bias", True),
        ({**qwen3, "sliding_window": 4}, "sliding_window", 4),
        ({**qwen3, "hf_model_type": "qwen2"}, "hf_model_type", "qwen2"),
    ]
    for fields, field, value in cases:
        with pytest.raises(InputError, match=rf"ModelConfig\.{field}={value!r} is invalid: expected"):
            ModelConfig(**fields)
    assert ModelConfig(**qwen2).hf_model_type == "qwen2"
    assert ModelConfig(**qwen3, head_dim=16, attention_bias=True).hf_model_type == "qwen3"


def test_dtype_fields_hold_canonical_names():
    for value in (jnp.float32, np.float32, jnp.dtype("float32"), "float32"):
        assert ModelConfig(**BASE, param_dtype=value).param_dtype == "float32"
    for value in (jnp.bfloat16, jnp.dtype("bfloat16"), "bfloat16"):
        assert ModelConfig(**BASE, compute_dtype=value).compute_dtype == "bfloat16"
    assert get_preset("tiny-1m", compute_dtype=jnp.bfloat16) == get_preset("tiny-1m", compute_dtype="bfloat16")
    expected = "ModelConfig.compute_dtype='fp8' is invalid: expected a dtype name such as 'float32' or 'bfloat16'"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        ModelConfig(**BASE, compute_dtype="fp8")


def test_config_defaults():
    cfg = ModelConfig(**BASE)
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.hf_model_type, cfg.rotary_dim) == (4, 8, "llama", 8)
    assert ModelConfig(**{**BASE, "architecture": "gpt_neox", "rotary_pct": 0.25}).rotary_dim == 2
