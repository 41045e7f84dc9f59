"""Which model a run's config names, and its ModelConfig, read without touching any weights.

    path = model_source(config)                            # a preset name or a Hugging Face folder
    model = model_config(path, model_fields(config))       # from the preset or the folder's config.json

``kto_jax.train.plan.make_plan`` checks a run's model with these, and ``kto_jax.train.setup.load_run``
rebuilds a finished run's model from its saved config with them.
"""

from __future__ import annotations

import json
import os

from kto_jax.errors import InputError, MissingInput
from kto_jax.models import ModelConfig, lora
from kto_jax.models.hf_config import config_from_hf
from kto_jax.models.presets import PRESETS, get_preset
from kto_jax.train import trainable


def model_fields(config) -> dict:
    """The ModelConfig fields a run's config sets (``config.model``)."""
    m = config.model
    return dict(
        compute_dtype=m.compute_dtype,
        param_dtype=m.param_dtype,
        remat_policy=m.remat_policy,
        attention_impl=m.attention_impl or None,
    )


def model_source(config) -> str:
    """Where the weights come from: ``init.source=hf:PATH``, else ``config.model.name`` (preset or folder)."""
    source = config.init.source
    if source and not source.startswith(("hf:", "orbax:")):
        raise InputError(f"config.init.source={source!r}: use '', 'hf:PATH' or 'orbax:WORKDIR[@STEP]'")
    if source.startswith("hf:"):
        path = os.path.expanduser(source[3:])
        if not os.path.isdir(path):
            raise MissingInput(
                f"config.init.source={source}: {source[3:]!r} is not a folder (a Hugging Face model folder with config.json and safetensors)"
            )
        return path
    name = config.model.name
    if name in PRESETS:
        return name
    if not os.path.isdir(os.path.expanduser(name)):
        raise InputError(f"config.model.name={name!r} is neither a preset ({', '.join(PRESETS)}) nor a model folder")
    return os.path.expanduser(name)


def model_config(path: str, fields: dict) -> ModelConfig:
    """The ModelConfig of a preset or of a Hugging Face folder's config.json (no weights read); a
    run's is :func:`run_model_config` (with its LoRA)."""
    file = os.path.join(path, "config.json")
    if path not in PRESETS and not os.path.exists(file):
        raise MissingInput(f"config.model: {file!r} not found: a Hugging Face model folder needs config.json")
    try:
        if path in PRESETS:
            return get_preset(path, **fields)
        with open(file, encoding="utf-8") as f:
            return config_from_hf(json.load(f), **fields)
    except (InputError, json.JSONDecodeError) as e:
        raise InputError(f"config.model: {e}") from None


def with_lora(config, model: ModelConfig) -> ModelConfig:
    """``model`` with ``config.model.lora``'s adapters (rank, alpha, rsLoRA, the targets resolved for its
    family, ``kto_jax.models.lora.resolve_targets``); ``model`` itself when rank is 0."""
    spec = config.model.get("lora")
    if spec is None or int(spec.rank) == 0:
        return model
    if int(spec.rank) < 0:
        raise InputError(f"config.model.lora.rank={spec.rank}: expected 0 (no LoRA) or a positive rank")
    if float(spec.get("dropout", 0.0)) != 0.0:
        raise InputError(
            f"config.model.lora.dropout={spec.dropout}: LoRA dropout is not implemented (the step has no dropout RNG); set it to 0"
        )
    try:
        return model.replace(
            lora_rank=int(spec.rank),
            lora_alpha=float(spec.alpha),
            lora_rslora=bool(spec.rslora),
            lora_targets=lora.resolve_targets(spec.targets, model),
        )
    except InputError as e:
        raise InputError(f"config.model.lora: {e}") from None


def run_model_config(config, path: str, fields: dict) -> ModelConfig:
    """The ModelConfig a run trains: :func:`model_config` with :func:`with_lora`."""
    return with_lora(config, model_config(path, fields))


def run_freeze(config) -> tuple[str, ...]:
    """The regexes of the leaves a run freezes: ``config.train.freeze`` and, with LoRA, every model leaf
    but the adapters (``kto_jax.models.lora.FREEZE_BASE``)."""
    freeze = trainable.parse_freeze(config.train.get("freeze", ""))
    spec = config.model.get("lora")
    if spec is not None and int(spec.rank) > 0:
        freeze = (*freeze, lora.FREEZE_BASE)
    return freeze


def check_lora(config, model: ModelConfig, mode: str) -> None:
    """A LoRA run's reference is its frozen base (the params less the adapters). A moving reference
    (mode "sync") would need a second copy of the merged weights: refused, naming the field; and
    ``config.init.adapter`` needs LoRA on."""
    if model.lora_rank and mode == "sync":
        raise InputError(
            "config.reference.mode='sync' with config.model.lora.rank > 0: a LoRA run's reference is its frozen base "
            "(the model without adapters); a moving reference would need a second copy of the weights. Use "
            "reference.mode='model' or 'cached', or full fine-tuning (config.model.lora.rank=0)"
        )
    adapter = config.init.get("adapter", "")
    if adapter and not model.lora_rank:
        raise InputError(
            f"config.init.adapter={adapter!r} is a LoRA adapter, but config.model.lora.rank=0: set config.model.lora "
            "to the adapter's rank, alpha and targets"
        )
