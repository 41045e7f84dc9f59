"""Named model sizes: tiny CPU models and the published configurations of the paper's suite."""

from __future__ import annotations

from kto_jax.errors import InputError
from kto_jax.models import gemma2
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


_GEMMA = dict(
    hidden_act="gelu_pytorch_tanh",
    norm_unit_offset=True,
    scale_embeddings=True,
    tie_word_embeddings=True,
    norm_eps=1e-6,
    initializer_range=0.02,
)  # what every Gemma has


def _gemma2(**kw) -> ModelConfig:
    """Gemma 2: soft-caps 50 (attention) and 30 (final), window 4096 on the sliding layers, which
    alternate with full ones from layer 0 (transformers' Gemma2Config default)."""
    base = dict(
        _GEMMA,
        architecture="gemma2",
        vocab_size=256000,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
        rope_theta=10000.0,
        max_position_embeddings=8192,
    )
    kw.setdefault("layer_types", gemma2.layer_types({"num_hidden_layers": kw["num_layers"]}, 2))
    return ModelConfig(**{**base, **kw})


def _gemma3(**kw) -> ModelConfig:
    """Gemma 3 text: q/k norms, no soft-caps, five sliding layers to one full (transformers'
    Gemma3TextConfig default, sliding_window_pattern 6), RoPE base 1e6 on the full layers and 1e4
    on the sliding ones."""
    base = dict(
        _GEMMA,
        architecture="gemma3",
        vocab_size=262208,
        qk_norm=True,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=1024,
        rope_theta=1000000.0,
        rope_local_theta=10000.0,
        max_position_embeddings=131072,
    )
    kw.setdefault("layer_types", gemma2.layer_types({"num_hidden_layers": kw["num_layers"]}, 6))
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
    "tiny-gemma2-1m": _gemma2(
        vocab_size=384,
        hidden_size=128,
        intermediate_size=344,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=64,
    ),
    "tiny-gemma3-1m": _gemma3(
        vocab_size=384,
        hidden_size=128,
        intermediate_size=344,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=64,
        layer_types=("sliding_attention", "full_attention", "sliding_attention", "full_attention"),
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
    # Gemma 2 (google/gemma-2-* config.json): head_dim 256 (128 for 27B, whose query_pre_attn_scalar
    # is hidden / heads = 144), rms_norm_eps 1e-6, rope_theta 1e4, max_position_embeddings 8192, tied.
    "gemma2-2b": _gemma2(hidden_size=2304, intermediate_size=9216, num_layers=26, num_heads=8, num_kv_heads=4),
    "gemma2-9b": _gemma2(hidden_size=3584, intermediate_size=14336, num_layers=42, num_heads=16, num_kv_heads=8),
    "gemma2-27b": _gemma2(
        hidden_size=4608,
        intermediate_size=36864,
        num_layers=46,
        num_heads=32,
        num_kv_heads=16,
        head_dim=128,
        query_pre_attn_scalar=144,
    ),
    # Gemma 3 (google/gemma-3-1b-pt config.json; the 4B-27B releases are Gemma3ForConditionalGeneration
    # folders, whose text_config these are): 1B has vocab 262144, window 512, 32768 positions and an
    # unscaled RoPE; 4B-27B vocab 262208, window 1024, 131072 positions and a linear RoPE factor 8 on
    # the full layers. head_dim 256 (128 for 27B, query_pre_attn_scalar hidden / heads = 168).
    "gemma3-1b": _gemma3(
        vocab_size=262144,
        hidden_size=1152,
        intermediate_size=6912,
        num_layers=26,
        num_heads=4,
        num_kv_heads=1,
        sliding_window=512,
        max_position_embeddings=32768,
    ),
    "gemma3-4b": _gemma3(
        hidden_size=2560,
        intermediate_size=10240,
        num_layers=34,
        num_heads=8,
        num_kv_heads=4,
        rope_type="linear",
        rope_factor=8.0,
    ),
    "gemma3-12b": _gemma3(
        hidden_size=3840,
        intermediate_size=15360,
        num_layers=48,
        num_heads=16,
        num_kv_heads=8,
        rope_type="linear",
        rope_factor=8.0,
    ),
    "gemma3-27b": _gemma3(
        hidden_size=5376,
        intermediate_size=21504,
        num_layers=62,
        num_heads=32,
        num_kv_heads=16,
        head_dim=128,
        query_pre_attn_scalar=168,
        rope_type="linear",
        rope_factor=8.0,
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """The preset ``name`` with field overrides (e.g. ``compute_dtype="bfloat16"``); unknown names list the known ones."""
    if name not in PRESETS:
        raise InputError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
