"""Shared pieces of the Hugging Face interop tests: tiny random transformers checkpoints (built once per
session, no downloads) and helpers to run our model on them."""

from __future__ import annotations

import functools

import jax
import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from kto_jax.models import build_model
from kto_jax.models.config import ModelConfig

TOL = 1e-4
VOCAB = 101
BATCH, LENGTH = 4, 12  # one shape everywhere, so each config compiles once
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, initializer_range=0.25)

# name -> transformers config; each one exercises one code path of the importer.
HF_CONFIGS = {
    "llama_mha": lambda: LlamaConfig(**SMALL, num_attention_heads=4),
    "llama_gqa": lambda: LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2),
    "llama3_rope": lambda: LlamaConfig(
        **SMALL,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
    ),
    # head_dim 16 and original length 32: wavelengths fall in all three llama3 bands
    # (unchanged < 8, smoothed 8..32, divided by factor > 32); also q/k/v/o biases.
    "llama3_rope_bias": lambda: LlamaConfig(
        **{**SMALL, "hidden_size": 64},
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
        attention_bias=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "llama_linear_rope": lambda: LlamaConfig(
        **SMALL, num_attention_heads=4, rope_scaling={"rope_type": "linear", "factor": 3.0}
    ),
    "llama_tied": lambda: LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mistral_window": lambda: MistralConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2, sliding_window=4),
    "mistral_head_dim": lambda: MistralConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=5
    ),
    "pythia_parallel": lambda: GPTNeoXConfig(
        **{**SMALL, "hidden_size": 64}, num_attention_heads=4, rotary_pct=0.25, use_parallel_residual=True
    ),
    "pythia_sequential": lambda: GPTNeoXConfig(
        **{**SMALL, "hidden_size": 64}, num_attention_heads=4, rotary_pct=0.25, use_parallel_residual=False
    ),
    "pythia_unbiased": lambda: GPTNeoXConfig(
        **{**SMALL, "hidden_size": 64}, num_attention_heads=4, rotary_pct=0.25, attention_bias=False
    ),
    # Qwen2: q/k/v biases (no o bias); rope_theta 1e6 as the releases
    "qwen2_gqa": lambda: Qwen2Config(**SMALL, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6),
    "qwen2_tied": lambda: Qwen2Config(**SMALL, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2_mqa": lambda: Qwen2Config(**SMALL, num_attention_heads=4, num_key_value_heads=1),
    # Qwen3: per-head q/k RMSNorm; head_dim 16 != hidden 32 / 4 heads
    "qwen3_head_dim": lambda: Qwen3Config(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6
    ),
    "qwen3_tied": lambda: Qwen3Config(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True
    ),
    "qwen3_bias": lambda: Qwen3Config(
        **SMALL, num_attention_heads=4, num_key_value_heads=1, head_dim=8, attention_bias=True
    ),
    # Gemma 2: windows shorter than the rows on the sliding layers, soft-caps small enough to bend
    # the logits (the releases' 50 / 30 barely would at this scale), head_dim 16 != 32 / 4 heads,
    # query_pre_attn_scalar != head_dim
    "gemma2_softcap": lambda: Gemma2Config(
        **SMALL,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=12,
        sliding_window=4,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
    ),
    "gemma2_mqa_untied": lambda: Gemma2Config(
        **{**SMALL, "num_hidden_layers": 3},
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        sliding_window=5,
        tie_word_embeddings=False,
        attn_logit_softcapping=1.0,
        final_logit_softcapping=5.0,
    ),
    # Gemma 3: q/k norms; sliding layers with their own RoPE base, the global one linearly scaled
    "gemma3_rope": lambda: Gemma3TextConfig(
        **{**SMALL, "num_hidden_layers": 3},
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        rope_local_base_freq=100.0,
    ),
    # the releases' 5:1 pattern (transformers' default layer_types for 7 layers), MQA, untied
    "gemma3_mqa_untied": lambda: Gemma3TextConfig(
        **{**SMALL, "num_hidden_layers": 7},
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        sliding_window=3,
        tie_word_embeddings=False,
    ),
}


def perturb_vectors(model: torch.nn.Module, seed: int) -> None:
    """Norm weights -> 1 + 0.3 N(0, 1), biases -> 0.3 N(0, 1) (HF initialises them to ones/zeros)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                noise = 0.3 * torch.randn(p.shape, generator=gen)
                p.copy_(noise if name.endswith("bias") else 1.0 + noise)


def make_hf_model(hf_config, seed: int = 0, attn_implementation: str | None = None):
    torch.manual_seed(seed)
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_config(hf_config, **kw).float().eval()
    perturb_vectors(model, seed)
    return model


def hf_logits(model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        ids_t = torch.tensor(np.asarray(ids), dtype=torch.long)
        mask_t = None if mask is None else torch.tensor(np.asarray(mask), dtype=torch.long)
        return model(input_ids=ids_t, attention_mask=mask_t).logits.float().numpy()


@functools.cache
def _jitted_apply(config: ModelConfig):
    return jax.jit(build_model(config).apply, static_argnames="return_hidden")


def forward(model, params, ids, mask=None, **kw):
    """``model.apply({"params": params}, ids, mask, **kw)``, jitted once per config (compiles
    dominate test time); a missing mask is passed as ones so that it is the same program."""
    mask = np.ones_like(ids) if mask is None else mask
    return _jitted_apply(model.config)({"params": params}, ids, mask, **kw)


def random_ids(batch=BATCH, length=LENGTH, seed=0, vocab=VOCAB):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length)).astype(np.int32)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
