"""LoRA adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

    save_peft(config, params, "out/adapter", base="path/to/base")   # peft.PeftModel.from_pretrained loads it
    config, params = load_peft("in/adapter", config, base_params)   # an adapter trained with peft / TRL

PEFT names each adapter tensor after the Hugging Face module it adapts, ``base_model.model.`` +
``model.layers.{i}.self_attn.q_proj`` + ``.lora_A.weight`` ``[rank, in]`` / ``.lora_B.weight``
``[out, rank]``; ours are ``lora_a`` ``[*in, rank]`` / ``lora_b`` ``[rank, *out]`` beside the kernel
(``kto_jax.models.lora``), the in / out axes flattened as the family's tensor map flattens the kernel.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from kto_jax.errors import InputError, MissingInput
from kto_jax.files import write_json
from kto_jax.models import lora
from kto_jax.models.config import ModelConfig
from kto_jax.models.families import get_family
from kto_jax.models.hf import _tree_get

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _targets(config: ModelConfig) -> dict[str, tuple]:
    """Our module name -> (its kernel's TensorMap hf_name, the kernel path) for config.lora_targets."""
    out = {}
    for tmap in get_family(config.architecture).tensor_maps(config.replace(lora_rank=0, lora_targets=())):
        path = tmap.paths[0]
        if len(tmap.paths) == 1 and path[-1] == "kernel" and path[-2] in config.lora_targets:
            out[path[-2]] = (tmap.hf_name, path)
    return out


def _module(hf_name: str) -> str:
    """``model.layers.{i}.self_attn.q_proj.weight`` -> ``q_proj`` (the name PEFT's target_modules use)."""
    return hf_name.split(".")[-2]


def _names(hf_name: str, i: int) -> tuple[str, str]:
    stem = PREFIX + hf_name.format(i=i)[: -len(".weight")]
    return stem + ".lora_A.weight", stem + ".lora_B.weight"


def adapter_config(config: ModelConfig, base: str = "") -> dict:
    """The adapter_config.json of ``config``'s LoRA (PEFT's LoraConfig fields)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base or None,
        "r": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "use_rslora": config.lora_rslora,
        "target_modules": sorted({_module(n) for n, _ in _targets(config).values()}),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "inference_mode": True,
    }


def save_peft(config: ModelConfig, params, out_dir: str, base: str = "") -> str:
    """Write ``params``' adapters as a PEFT folder (``base``: the base model's folder or name, for
    ``base_model_name_or_path``); returns the weights file."""
    if not config.lora_rank:
        raise InputError("save_peft: the model has no LoRA adapters (ModelConfig.lora_rank=0)")
    tensors = {}
    for hf_name, path in _targets(config).values():
        a_all, b_all = (
            np.asarray(jax.device_get(_tree_get(params, path[:-1] + (leaf,)))) for leaf in lora.ADAPTER_LEAVES
        )
        for i in range(config.num_layers):
            a, b = a_all[i], b_all[i]
            a_name, b_name = _names(hf_name, i)
            tensors[a_name] = np.ascontiguousarray(a.reshape(-1, config.lora_rank).T)  # [rank, in]
            tensors[b_name] = np.ascontiguousarray(b.reshape(config.lora_rank, -1).T)  # [out, rank]
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, CONFIG_FILE), adapter_config(config, base))
    file = os.path.join(out_dir, WEIGHTS_FILE)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def read_adapter_config(folder: str, field: str = "config.init.adapter") -> dict:
    """A PEFT folder's adapter_config.json, checked for what kto-jax's LoRA is (plain LoRA on linear
    layers, one rank and alpha, no biases or extra trained modules); anything else names the field."""
    file = os.path.join(folder, CONFIG_FILE)
    if not os.path.exists(file):
        raise MissingInput(f"{field}={folder!r}: no {CONFIG_FILE} (a PEFT adapter folder, as save_pretrained writes)")
    with open(file, encoding="utf-8") as f:
        cfg = json.load(f)
    unsupported = [
        ("peft_type", cfg.get("peft_type") != "LORA", "LORA"),
        ("use_dora", bool(cfg.get("use_dora")), "false"),
        ("bias", cfg.get("bias", "none") != "none", "'none'"),
        ("modules_to_save", bool(cfg.get("modules_to_save")), "null"),
        ("rank_pattern", bool(cfg.get("rank_pattern")), "{} (one rank)"),
        ("alpha_pattern", bool(cfg.get("alpha_pattern")), "{} (one alpha)"),
        ("fan_in_fan_out", bool(cfg.get("fan_in_fan_out")), "false"),
        ("layers_to_transform", cfg.get("layers_to_transform") is not None, "null (every layer)"),
    ]
    for key, bad, expected in unsupported:
        if bad:
            raise InputError(
                f"{field}={folder!r}: {CONFIG_FILE} {key}={cfg.get(key)!r} is not supported (expected {expected})"
            )
    return cfg


def load_peft(folder: str, config: ModelConfig, base_params, field: str = "config.init.adapter"):
    """``(config with the adapter's LoRA fields, base_params + its adapters)`` from a PEFT folder made
    on this base; a module it targets that this family cannot adapt, or a tensor of the wrong shape
    (an adapter of another base), is an InputError naming the field."""
    cfg = read_adapter_config(folder, field)
    modules = cfg.get("target_modules") or []
    modules = [modules] if isinstance(modules, str) else list(modules)
    by_hf = {_module(hf): ours for ours, (hf, _) in _targets(config.replace(lora_targets=lora.LORA_MODULES)).items()}
    unknown = [m for m in modules if m not in by_hf]
    if unknown:
        raise InputError(
            f"{field}={folder!r}: target_modules {unknown} are not projections kto-jax adapts on {config.architecture} "
            f"(those are {sorted(by_hf)})"
        )
    lora_config = config.replace(
        lora_rank=int(cfg["r"]),
        lora_alpha=float(cfg.get("lora_alpha", 8)),
        lora_rslora=bool(cfg.get("use_rslora", False)),
        lora_targets=tuple(m for m in lora.LORA_MODULES if m in {by_hf[t] for t in modules}),
    )
    file = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.exists(file):
        raise MissingInput(f"{field}={folder!r}: no {WEIGHTS_FILE}")
    adapters: dict = {}
    dtype = jnp.dtype(config.param_dtype)
    with safe_open(file, framework="numpy") as f:
        names = set(f.keys())
        for _, (hf_name, path) in _targets(lora_config).items():
            kernel = _tree_get(base_params, path)
            in_dims, out_dims = _split_dims(path[-2], kernel.shape[1:])
            rows_a, rows_b = [], []
            for i in range(config.num_layers):
                a_name, b_name = _names(hf_name, i)
                for name in (a_name, b_name):
                    if name not in names:
                        raise InputError(f"{field}={folder!r}: tensor {name!r} is missing from {WEIGHTS_FILE}")
                a, b = f.get_tensor(a_name), f.get_tensor(b_name)
                want_a, want_b = (
                    (lora_config.lora_rank, int(np.prod(in_dims))),
                    (int(np.prod(out_dims)), lora_config.lora_rank),
                )
                if a.shape != want_a or b.shape != want_b:
                    raise InputError(
                        f"{field}={folder!r}: {a_name} / {b_name} have shapes {a.shape} / {b.shape}, but this base "
                        f"({config.hf_model_type}, hidden {config.hidden_size}) needs {want_a} / {want_b}: an adapter of "
                        "another base model"
                    )
                rows_a.append(a.T.reshape(*in_dims, lora_config.lora_rank))
                rows_b.append(b.T.reshape(lora_config.lora_rank, *out_dims))
            owner = adapters
            for key in path[:-1]:
                owner = owner.setdefault(key, {})
            owner["lora_a"] = jnp.asarray(np.stack(rows_a), dtype)
            owner["lora_b"] = jnp.asarray(np.stack(rows_b), dtype)
    return lora_config, lora.merge_trees(base_params, adapters)


def _split_dims(module: str, kernel_shape: tuple) -> tuple[tuple, tuple]:
    """A kernel's (in, out) dims: q/k/v ``[D, H, Dh]`` -> ((D,), (H, Dh)); o ``[H, Dh, D]`` ->
    ((H, Dh), (D,)); a Dense ``[in, out]`` -> ((in,), (out,))."""
    if module == "o":
        return tuple(kernel_shape[:2]), tuple(kernel_shape[2:])
    return tuple(kernel_shape[:1]), tuple(kernel_shape[1:])
