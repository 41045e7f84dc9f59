"""Hugging Face config.json <-> ModelConfig (transformers 4.x and 5.x field names)."""

from __future__ import annotations

from kto_jax.models.common import ModelConfig

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json dict (transformers 4.x and 5.x field names)."""
    model_type = hf.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise ValueError(
            f"config.json model_type={model_type!r} is not supported; supported: {sorted(HF_ARCHITECTURES)}"
        )
    rope = dict(hf.get("rope_parameters") or {})
    rope.update(hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if hf.get("mlp_bias"):
        raise ValueError("config.json mlp_bias=true is not supported (no Llama/Mistral release uses it)")
    common = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))),
        rope_type=rope_type,
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        hidden_act=hf.get("hidden_act", "silu"),
        initializer_range=hf.get("initializer_range", 0.02),
        hf_model_type=model_type,
    )
    if model_type == "gpt_neox":
        cfg = ModelConfig(
            architecture="gpt_neox",
            norm_eps=hf.get("layer_norm_eps", 1e-5),
            rotary_pct=float(rope.get("partial_rotary_factor", hf.get("rotary_pct", 1.0))),
            attention_bias=bool(hf.get("attention_bias", True)),
            use_parallel_residual=bool(hf.get("use_parallel_residual", True)),
            **common,
        )
    else:
        cfg = ModelConfig(
            architecture="llama",
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            attention_bias=bool(hf.get("attention_bias", False)),
            sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
            **common,
        )
    return cfg.replace(**overrides)


def config_to_hf(config: ModelConfig) -> dict:
    """The config.json dict transformers needs to rebuild ``config``."""
    out = {
        "model_type": config.hf_model_type,
        "architectures": [HF_ARCHITECTURES[config.hf_model_type]],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_act": config.hidden_act,
        "initializer_range": config.initializer_range,
        "tie_word_embeddings": config.tie_word_embeddings,
        "rope_theta": config.rope_theta,
        "torch_dtype": config.param_dtype,
    }
    if config.rope_type != "default":
        out["rope_scaling"] = {"rope_type": config.rope_type, "factor": config.rope_factor}
        if config.rope_type == "llama3":
            out["rope_scaling"].update(
                low_freq_factor=config.rope_low_freq_factor,
                high_freq_factor=config.rope_high_freq_factor,
                original_max_position_embeddings=config.rope_original_max_position,
            )
    if config.architecture == "gpt_neox":
        out.update(
            layer_norm_eps=config.norm_eps,
            rotary_pct=config.rotary_pct,
            partial_rotary_factor=config.rotary_pct,
            rotary_emb_base=config.rope_theta,
            use_parallel_residual=config.use_parallel_residual,
            attention_bias=config.attention_bias,
        )
    else:
        out.update(
            num_key_value_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            rms_norm_eps=config.norm_eps,
            attention_bias=config.attention_bias,
            mlp_bias=False,
        )
        if config.hf_model_type == "mistral":
            out["sliding_window"] = config.sliding_window
    return out
