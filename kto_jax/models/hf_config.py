"""Hugging Face config.json <-> ModelConfig (transformers 4.x and 5.x field names).

The fields every family shares (sizes, RoPE, embeddings, activation) are read and written
here; each family (``kto_jax.models.families``) adds its own over them.
"""

from __future__ import annotations

from kto_jax.models.config import ModelConfig
from kto_jax.models.families import FAMILIES, family_of_model_type, get_family

# config.json model_type -> HF architectures class name, over all families
HF_ARCHITECTURES = {t: a for family in FAMILIES.values() for t, a in family.hf_model_types.items()}


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json dict (transformers 4.x and 5.x field names).

    Shared fields: vocab_size, hidden_size, intermediate_size, num_hidden_layers -> num_layers,
    num_attention_heads -> num_heads, max_position_embeddings, hidden_act, initializer_range,
    tie_word_embeddings, and RoPE from rope_parameters (5.x) or rope_theta + rope_scaling (4.x);
    then the family of ``model_type`` adds its own; ``overrides`` set any field last. A
    vision-language config.json (Gemma 3's ``gemma3``) gives its language model's config.
    """
    family = family_of_model_type(hf.get("model_type"))
    hf = family.text_config(hf)
    model_type = hf.get("model_type")
    rope = dict(hf.get("rope_parameters") or {})
    rope.update(hf.get("rope_scaling") or {})
    shared = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_type=rope.get("rope_type", rope.get("type", "default")),
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        hidden_act=hf.get("hidden_act", "silu"),
        initializer_range=hf.get("initializer_range", 0.02),
        hf_model_type=model_type,
    )
    fields = {**shared, **family.from_hf_config(hf, rope)}
    return ModelConfig(architecture=family.name, **fields).replace(**overrides)


def config_to_hf(config: ModelConfig) -> dict:
    """The config.json dict transformers needs to rebuild ``config``: the shared fields (4.x
    names; ``torch_dtype`` is param_dtype's canonical name), then the family's own."""
    family = get_family(config.architecture)
    out = {
        "model_type": config.hf_model_type,
        "architectures": [family.hf_model_types[config.hf_model_type]],
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
    return {**out, **family.to_hf_config(config)}
