"""LoRA adapters as leaves of the model's own param tree.

A targeted projection (``ModelConfig.lora_targets``: q, k, v, o, gate, up, down) holds, beside its
``kernel``, ``lora_a`` ``[*in, rank]`` and ``lora_b`` ``[rank, *out]`` (logical axes: the kernel's,
with ``lora_rank`` between), and computes

    y = x W + scale * (x A) B,      scale = lora_alpha / rank   (rsLoRA: lora_alpha / sqrt(rank))

(``kto_jax.models.common.lora_delta``). The same model applied to the params less the adapters is
the base model, so a LoRA run's reference is its frozen base with no second copy:

    base, adapters = split_adapters(params)
    params = init_adapters(config, base, seed)        # fresh adapters (B = 0) over a base
    config0, merged = merge_weights(config, params)   # W + scale * A B, no adapters (for to_hf)

The PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``) is ``kto_jax.models.peft``.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from kto_jax import sharding as sharding_lib
from kto_jax.errors import InputError
from kto_jax.models import build_model
from kto_jax.models.config import LORA_MODULES, ModelConfig
from kto_jax.models.families import get_family

ADAPTER_LEAVES = ("lora_a", "lora_b")
TARGET_PRESETS = {
    "attention": ("q", "k", "v", "o"),
    "mlp": ("gate", "up", "down"),
    "all_linear": LORA_MODULES,
}
# config.train.freeze's regex for a LoRA run: every model leaf but the adapters (the value head trains)
FREEZE_BASE = r"model/(?!(.*/)?lora_[ab]$).*"


def adaptable(config: ModelConfig) -> tuple[str, ...]:
    """The projections of ``config``'s family LoRA can adapt: those of :data:`LORA_MODULES` whose kernel is
    one Hugging Face tensor of its own (GPT-NeoX's q/k/v are one fused ``query_key_value`` and are not)."""
    names = set()
    for tmap in get_family(config.architecture).tensor_maps(config.replace(lora_rank=0)):
        if len(tmap.paths) == 1 and tmap.paths[0][-1] == "kernel" and tmap.paths[0][-2] in LORA_MODULES:
            names.add(tmap.paths[0][-2])
    return tuple(m for m in LORA_MODULES if m in names)


def resolve_targets(text: str, config: ModelConfig, field: str = "config.model.lora.targets") -> tuple[str, ...]:
    """``config.model.lora.targets`` -> the module names: a preset (:data:`TARGET_PRESETS`) or
    comma-separated regexes, each matched in full against the family's adaptable projections
    (:func:`adaptable`); a regex (or preset) that matches none is an InputError naming it."""
    available = adaptable(config)
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise InputError(
            f"{field} is empty: name projections ({', '.join(available)}) or a preset ({', '.join(TARGET_PRESETS)})"
        )
    chosen: set[str] = set()
    for part in parts:
        if part in TARGET_PRESETS:
            hits = [m for m in TARGET_PRESETS[part] if m in available]
        else:
            try:
                hits = [m for m in available if re.fullmatch(part, m)]
            except re.error as e:
                raise InputError(f"{field}: {part!r} is not a regular expression ({e})") from None
        if not hits:
            raise InputError(
                f"{field}: {part!r} matches no projection of {config.architecture} (adaptable: {', '.join(available)}; "
                f"presets: {', '.join(TARGET_PRESETS)})"
            )
        chosen.update(hits)
    return tuple(m for m in LORA_MODULES if m in chosen)


def is_adapter(path: str | tuple) -> bool:
    """Whether a '/'-joined (or tuple) param path is an adapter leaf."""
    last = path.rsplit("/", 1)[-1] if isinstance(path, str) else path[-1]
    return last in ADAPTER_LEAVES


def split_adapters(params) -> tuple[dict, dict]:
    """``(base, adapters)``: the model params cut into the leaves without and with :data:`ADAPTER_LEAVES`
    (the same buffers, no copies)."""
    flat = traverse_util.flatten_dict(params)
    base = {k: v for k, v in flat.items() if not is_adapter(k)}
    adapters = {k: v for k, v in flat.items() if is_adapter(k)}
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters) if adapters else {}


def merge_trees(base, adapters) -> dict:
    """The whole params from :func:`split_adapters`'s halves."""
    flat = traverse_util.flatten_dict(base)
    flat.update(traverse_util.flatten_dict(adapters) if adapters else {})
    return traverse_util.unflatten_dict(flat)


def init_adapters(config: ModelConfig, base, seed: int = 0, mesh=None) -> dict:
    """``base`` plus fresh adapters (A uniform, B = 0) for ``config.lora_targets``, created on their
    shardings (only the adapters are initialised: XLA drops the rest of the init). ``base`` itself when
    ``config.lora_rank`` is 0 or the adapters are already there."""
    if not config.lora_rank or split_adapters(base)[1]:
        return base
    model = build_model(config)
    ids = jnp.zeros((1, 1), jnp.int32)

    def adapters():
        return split_adapters(nn.unbox(model.init(jax.random.PRNGKey(seed), ids)["params"]))[1]

    if mesh is None:
        return merge_trees(base, jax.jit(adapters)())
    boxed = jax.eval_shape(lambda: split_adapters(model.init(jax.random.PRNGKey(seed), ids)["params"])[1])
    shardings = sharding_lib.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
    return merge_trees(base, jax.jit(adapters, out_shardings=shardings)())


def scale(config: ModelConfig) -> float:
    """lora_alpha / rank, or lora_alpha / sqrt(rank) with rsLoRA."""
    return config.lora_alpha / (np.sqrt(config.lora_rank) if config.lora_rslora else config.lora_rank)


def merge_weights(config: ModelConfig, params) -> tuple[ModelConfig, dict]:
    """``(config without LoRA, params)`` with every adapted kernel W + scale * A B (in float32, cast back
    to W's dtype) and no adapter leaves: the model a ``to_hf`` export writes."""
    if not config.lora_rank:
        return config, params
    s = scale(config)
    flat = traverse_util.flatten_dict(params)
    out = {}
    for key, value in flat.items():
        if is_adapter(key):
            continue
        owner = key[:-1]
        if key[-1] == "kernel" and owner + ("lora_a",) in flat:
            a, b = flat[owner + ("lora_a",)], flat[owner + ("lora_b",)]
            delta = _ab(a.astype(jnp.float32), b.astype(jnp.float32), layered=key[0] == "layers")
            value = (value.astype(jnp.float32) + s * delta).astype(value.dtype)
        out[key] = value
    return config.replace(lora_rank=0, lora_targets=()), traverse_util.unflatten_dict(out)


def _ab(a, b, layered: bool):
    """A B over the rank axis: A ``[(L,) *in, r]``, B ``[(L,) r, *out]`` -> ``[(L,) *in, *out]``."""
    if not layered:
        return jnp.tensordot(a, b, axes=1)
    return jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a, b)
