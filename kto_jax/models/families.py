"""The registry of model families: ``ModelConfig.architecture`` -> its :class:`Family`.

Adding a family is one module (its Flax blocks plus the functions and constants of :class:`Family`,
see ``llama.py``; its reward models come with its ``HF_CLASSIFIERS`` and ``BACKBONE_PREFIX``) and one
line in :data:`FAMILIES`, its presets in ``presets.py``; a layer the shared blocks lack is a
``ModelConfig`` field (``config.py``) and a change in ``common.py`` (Qwen2's ``qkv_bias``, Qwen3's
``qk_norm``; docs/layout.md, "How far a change reaches").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from kto_jax.errors import InputError
from kto_jax.models import gemma2, gemma3, gpt_neox, llama, qwen2, qwen3
from kto_jax.models.common import Decoder
from kto_jax.models.config import FAMILY_RULES, ModelConfig
from kto_jax.models.tensor_map import TensorMap


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family and how its Hugging Face checkpoints map onto it.

    name: the ``ModelConfig.architecture`` that selects it.
    build: ModelConfig -> the Flax ``Decoder``.
    tensor_maps: ModelConfig -> [TensorMap], every HF tensor and where it lives in our params.
    from_hf_config: (config.json dict, its merged rope dict) -> this family's ModelConfig
      fields, over the shared ones that ``hf_config`` reads.
    to_hf_config: ModelConfig -> this family's config.json fields, over the shared ones.
    hf_model_types: config.json ``model_type`` -> its HF ``architectures`` class name; the
      first is the default ``ModelConfig.hf_model_type``.
    hf_classifiers: config.json ``model_type`` -> its ``*ForSequenceClassification`` class (the
      reward models of ``kto_jax.models.reward``).
    backbone_prefix: where the decoder's tensors live in both checkpoints ("model.", "gpt_neox.").
    checks: ModelConfig -> [(ok, field, expected)], the constraints the family adds to
      ``ModelConfig.__post_init__`` (which reads them, with hf_model_types, from
      ``kto_jax.models.config.FAMILY_RULES``).
    hf_multimodal: config.json ``model_type`` of the family's vision-language folders -> the
      ``model_type`` of their language model (Gemma 3's ``gemma3`` -> ``gemma3_text``), which
      ``text_config`` (config.json -> its language model's config.json) reads.
    """

    name: str
    build: Callable[[ModelConfig], Decoder]
    tensor_maps: Callable[[ModelConfig], list[TensorMap]]
    from_hf_config: Callable[[dict, dict], dict]
    to_hf_config: Callable[[ModelConfig], dict]
    hf_model_types: dict[str, str]
    hf_classifiers: dict[str, str]
    backbone_prefix: str
    checks: Callable[[ModelConfig], list[tuple[bool, str, str]]]
    hf_multimodal: dict[str, str] = dataclasses.field(default_factory=dict)
    text_config: Callable[[dict], dict] = lambda hf: hf


def _family(name: str, module) -> Family:
    """The Family defined by a module's build, tensor_maps, from_hf_config, to_hf_config,
    HF_MODEL_TYPES, HF_CLASSIFIERS, BACKBONE_PREFIX and checks (and, for vision-language folders,
    HF_MULTIMODAL and text_config)."""
    extra = {}
    if hasattr(module, "HF_MULTIMODAL"):
        extra = dict(hf_multimodal=module.HF_MULTIMODAL, text_config=module.text_config)
    return Family(
        name,
        module.build,
        module.tensor_maps,
        module.from_hf_config,
        module.to_hf_config,
        module.HF_MODEL_TYPES,
        module.HF_CLASSIFIERS,
        module.BACKBONE_PREFIX,
        module.checks,
        **extra,
    )


FAMILIES: dict[str, Family] = {
    "llama": _family("llama", llama),  # Llama 1/2/3, Mistral
    "gpt_neox": _family("gpt_neox", gpt_neox),  # Pythia
    "qwen2": _family("qwen2", qwen2),  # Qwen2, Qwen2.5 (Llama with q/k/v-only biases)
    "qwen3": _family("qwen3", qwen3),  # Qwen3 dense (Llama with per-head q/k norms)
    "gemma2": _family("gemma2", gemma2),  # Gemma 2 (sandwich norms, soft-caps, alternating windows)
    "gemma3": _family("gemma3", gemma3),  # Gemma 3 text (Gemma 2's blocks, q/k norms, 5:1 windows)
}
FAMILY_RULES.update(FAMILIES)  # what ModelConfig checks of each family (kto_jax.models.config)


def get_family(architecture: str) -> Family:
    """The family named ``architecture``; an unknown name lists the known ones."""
    if architecture not in FAMILIES:
        raise InputError(f"unknown architecture {architecture!r}; known architectures: {', '.join(FAMILIES)}")
    return FAMILIES[architecture]


def family_of_model_type(model_type: str) -> Family:
    """The family whose checkpoints carry config.json ``model_type``; an unknown one lists the supported ones."""
    for family in FAMILIES.values():
        if model_type in family.hf_model_types or model_type in family.hf_multimodal:
            return family
    supported = sorted(t for f in FAMILIES.values() for t in (*f.hf_model_types, *f.hf_multimodal))
    raise InputError(f"config.json model_type={model_type!r} is not supported; supported: {supported}")
