"""Named model sizes: tiny CPU models and the published configurations of the paper's suite."""

from __future__ import annotations

from kto_jax.errors import InputError
from kto_jax.models.config import ModelConfig


def _llama(**kw) -> ModelConfig:
    return ModelConfig(architecture="llama", hidden_act="silu", **kw)


def _pythia(**kw) -> ModelConfig:
    base = dict(
        architecture="gpt_neox",
        hidden_act="gelu",
        rotary_pct=0.25,
        attention_bias=True,
        use_parallel_residual=True,
        norm_eps=1e-5,
        max_position_embeddings=2048,
    )
    return ModelConfig(**{**base, **kw})


def _qwen2(**kw) -> ModelConfig:
    base = dict(
        architecture="qwen2",
        hidden_act="silu",
        qkv_bias=True,
        norm_eps=1e-6,
        rope_theta=1000000.0,
        vocab_size=151936,
        max_position_embeddings=32768,
    )
    return ModelConfig(**{**base, **kw})


def _qwen3(**kw) -> ModelConfig:
    base = dict(
        architecture="qwen3",
        hidden_act="silu",
        qk_norm=True,
        head_dim=128,
        norm_eps=1e-6,
        rope_theta=1000000.0,
        vocab_size=151936,
        max_position_embeddings=40960,
    )
    return ModelConfig(**{**base, **kw})


PRESETS: dict[str, ModelConfig] = {
    # CPU-sized (vocab 384 covers the byte tokenizer; tiny-25m is the bench shape of
    # scripts/bench.py and shared/anchors).
    "tiny-1m": _llama(vocab_size=384, hidden_size=128, intermediate_size=344, num_layers=4, num_heads=4, norm_eps=1e-6),
    "tiny-5m": _llama(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=688,
        num_layers=5,
        num_heads=4,
        num_kv_heads=2,
        norm_eps=1e-6,
    ),
    "tiny-25m": _llama(
        vocab_size=2048, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8, norm_eps=1e-6
    ),
    "tiny-qwen2-1m": _qwen2(
        vocab_size=384, hidden_size=128, intermediate_size=344, num_layers=4, num_heads=4, num_kv_heads=2
    ),
    "tiny-qwen3-1m": _qwen3(
        vocab_size=384,
        hidden_size=128,
        intermediate_size=344,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    "tiny-pythia-1m": _pythia(vocab_size=384, hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4),
    # Pythia (EleutherAI/pythia-* config.json): the paper's non-deduped checkpoints (HALOs legacy
    # config/model/pythia*.yaml name_or_path EleutherAI/pythia-1.4b, -2.8b, -6.9b, -12b); the -deduped
    # models have the same configurations (they differ only in training data, the deduplicated Pile).
    "pythia-1.4b": _pythia(vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_layers=24, num_heads=16),
    "pythia-2.8b": _pythia(vocab_size=50304, hidden_size=2560, intermediate_size=10240, num_layers=32, num_heads=32),
    "pythia-6.9b": _pythia(vocab_size=50432, hidden_size=4096, intermediate_size=16384, num_layers=32, num_heads=32),
    "pythia-12b": _pythia(vocab_size=50688, hidden_size=5120, intermediate_size=20480, num_layers=36, num_heads=40),
    # LLaMA-1 (huggyllama/llama-*).
    "llama-7b": _llama(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, norm_eps=1e-6
    ),
    "llama-13b": _llama(
        vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, norm_eps=1e-6
    ),
    "llama-30b": _llama(
        vocab_size=32000, hidden_size=6656, intermediate_size=17920, num_layers=60, num_heads=52, norm_eps=1e-6
    ),
    # Llama 2, Mistral, Llama 3.
    "llama2-7b": _llama(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        max_position_embeddings=4096,
    ),
    "llama2-13b": _llama(
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_layers=40,
        num_heads=40,
        max_position_embeddings=4096,
    ),
    "mistral-7b": _llama(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        max_position_embeddings=32768,
        sliding_window=4096,
        hf_model_type="mistral",
    ),
    "llama3-8b": _llama(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    # Qwen2.5 (Qwen/Qwen2.5-*, the base models' config.json; the -Instruct ones differ only in
    # max_position_embeddings 32768): q/k/v biases, rope_theta 1e6, rms_norm_eps 1e-6 (1e-5 for 14B and 32B).
    "qwen2.5-0.5b": _qwen2(
        hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2, tie_word_embeddings=True
    ),
    "qwen2.5-1.5b": _qwen2(
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
    ),
    "qwen2.5-3b": _qwen2(
        hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16, num_kv_heads=2, tie_word_embeddings=True
    ),
    "qwen2.5-7b": _qwen2(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        max_position_embeddings=131072,
    ),
    "qwen2.5-14b": _qwen2(
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=13824,
        num_layers=48,
        num_heads=40,
        num_kv_heads=8,
        max_position_embeddings=131072,
        norm_eps=1e-5,
    ),
    "qwen2.5-32b": _qwen2(
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=27648,
        num_layers=64,
        num_heads=40,
        num_kv_heads=8,
        max_position_embeddings=131072,
        norm_eps=1e-5,
    ),
    # Qwen3 dense (Qwen/Qwen3-* config.json): per-head q/k norms, head_dim 128 whatever hidden_size /
    # num_heads is, rope_theta 1e6, rms_norm_eps 1e-6, max_position_embeddings 40960.
    "qwen3-0.6b": _qwen3(
        hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16, num_kv_heads=8, tie_word_embeddings=True
    ),
    "qwen3-1.7b": _qwen3(
        hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16, num_kv_heads=8, tie_word_embeddings=True
    ),
    "qwen3-4b": _qwen3(
        hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32, num_kv_heads=8, tie_word_embeddings=True
    ),
    "qwen3-8b": _qwen3(hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8),
    "qwen3-14b": _qwen3(hidden_size=5120, intermediate_size=17408, num_layers=40, num_heads=40, num_kv_heads=8),
    "qwen3-32b": _qwen3(hidden_size=5120, intermediate_size=25600, num_layers=64, num_heads=64, num_kv_heads=8),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """The preset ``name`` with field overrides (e.g. ``compute_dtype="bfloat16"``); unknown names list the known ones."""
    if name not in PRESETS:
        raise InputError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
