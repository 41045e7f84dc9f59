"""Reward models: Hugging Face ``*ForSequenceClassification`` folders of every family (Llama, Mistral,
GPT-NeoX, Qwen2, Qwen3: each family's ``hf_classifiers``, ``kto_jax.models.families``) as our Decoder (its final normed hidden states) plus the score head.

    model, params, score_kernel = load_reward_model("path/to/rm_folder", mesh=mesh)
    scores = sequence_scores(model, params, score_kernel, ids, mask)      # [B, num_labels], float32

A classification checkpoint holds the causal LM's backbone under the same names (the family's
``backbone_prefix``: ``model.*`` for Llama/Mistral/Qwen, ``gpt_neox.*`` for GPT-NeoX: the families'
tensor maps read it as is) and,
instead of an LM head, ``score.weight`` ``[num_labels, hidden]`` (a Linear without bias). The
backbone is built with ``tie_word_embeddings=True``: that Decoder, and so its tensor map, holds
no ``lm_head`` leaf; its logits are never computed here (scoring runs ``return_hidden=True``).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from kto_jax import sharding as sharding_lib
from kto_jax.errors import InputError, MissingInput
from kto_jax.models import build_model
from kto_jax.models.common import Decoder
from kto_jax.models.config import ModelConfig
from kto_jax.models.families import FAMILIES
from kto_jax.models.hf import (
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    SafetensorsReader,
    load_params,
    tensor_maps,
)
from kto_jax.models.hf_config import config_from_hf

SCORE_HEAD = "score.weight"
# where each family's backbone lives in a *ForSequenceClassification checkpoint (as in *ForCausalLM)
BACKBONE_PREFIX = {name: family.backbone_prefix for name, family in FAMILIES.items()}
# config.json model_type -> its *ForSequenceClassification class, over all families
CLASSIFIERS = {t: c for family in FAMILIES.values() for t, c in family.hf_classifiers.items()}


def read_hf_config(path: str, field: str = "config.eval.reward_model.path") -> dict:
    """``path``'s config.json as a dict; a missing file names ``field`` and the fix."""
    config_file = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(config_file):
        raise MissingInput(
            f"{config_file!r} not found: {field}={path!r} must be a Hugging Face *ForSequenceClassification "
            f"folder ({', '.join(sorted(set(CLASSIFIERS.values())))}) saved with save_pretrained"
        )
    with open(config_file, encoding="utf-8") as f:
        return json.load(f)


def reward_config(hf: dict, **overrides) -> ModelConfig:
    """The backbone's ModelConfig: ``config_from_hf`` with ``tie_word_embeddings=True`` (no LM head leaf)."""
    return config_from_hf(hf, **overrides).replace(tie_word_embeddings=True)


def weights_file(path: str) -> str:
    """The safetensors file (or index) errors name: model.safetensors.index.json, else model.safetensors."""
    index = os.path.join(path, INDEX_FILE)
    return index if os.path.exists(index) else os.path.join(path, SINGLE_FILE)


def check_checkpoint(reader: SafetensorsReader, config: ModelConfig, hf: dict) -> int:
    """``num_labels`` read off ``score.weight`` ``[num_labels, hidden]``, after checking that the score
    head and every backbone tensor are present; errors name the file and what is missing."""
    file = weights_file(reader.path)
    arch = (hf.get("architectures") or ["?"])[0]
    wanted = CLASSIFIERS.get(config.hf_model_type, "a *ForSequenceClassification model")
    if SCORE_HEAD not in reader.files:
        raise InputError(
            f"{file!r} has no tensor {SCORE_HEAD!r} (the reward model's score head, [num_labels, hidden], no bias); "
            f"its config.json says architectures={hf.get('architectures')}. A reward model is a {wanted} "
            f"checkpoint: point config.eval.reward_model.path at one (a {arch} folder has no score head)"
        )
    prefix = BACKBONE_PREFIX[config.architecture]
    names = [
        t.hf_name.format(i=i) for t in tensor_maps(config) for i in (range(config.num_layers) if t.per_layer else [0])
    ]
    missing = [n for n in names if n not in reader.files]
    if missing:
        raise InputError(
            f"{file!r} lacks {len(missing)} of the {len(names)} backbone tensors, e.g. {missing[:3]}: a {wanted} "
            f"checkpoint keeps its backbone under {prefix!r} (config.eval.reward_model.path={reader.path!r})"
        )
    shape = reader.shape(SCORE_HEAD)
    if len(shape) != 2 or shape[1] != config.hidden_size:
        raise InputError(
            f"tensor {SCORE_HEAD!r} in {file!r} has shape {shape}; expected [num_labels, hidden_size={config.hidden_size}]"
        )
    return shape[0]


def load_reward_model(path: str, param_dtype="float32", compute_dtype=None, mesh=None, **overrides):
    """``(model, params, score_kernel)`` from a *ForSequenceClassification folder.

    ``params`` are the backbone's (``load_params``, each leaf on its sharding over ``mesh``);
    ``score_kernel`` is ``score.weight`` transposed, ``[hidden, num_labels]`` in ``param_dtype``,
    replicated over ``mesh``. ``overrides`` set other ModelConfig fields (``attention_impl``, ...).
    """
    hf = read_hf_config(path)
    compute_dtype = param_dtype if compute_dtype is None else compute_dtype
    config = reward_config(hf, param_dtype=param_dtype, compute_dtype=compute_dtype, **overrides)
    reader = SafetensorsReader(path)
    check_checkpoint(reader, config, hf)
    params = load_params(config, path, mesh)
    kernel = np.asarray(reader.read(SCORE_HEAD)).T.astype(jnp.dtype(config.param_dtype))
    target = sharding_lib.replicated(mesh) if mesh is not None else jax.local_devices()[0]
    return build_model(config), params, jax.device_put(kernel, target)


def last_token_index(mask: jax.Array) -> jax.Array:
    """``[B]``: the last position where ``mask == 1``, ``argmax_t(t * mask[b, t])`` (0 for an all-pad row).

    transformers takes ``argmax_t(t * (ids[b, t] != pad_token_id))``, the rightmost non-pad token;
    with right padding and the matching mask the two agree, and the mask stays right when the pad
    id also occurs in the text (pad = EOS).
    """
    t = jnp.arange(mask.shape[-1], dtype=jnp.int32)
    return jnp.argmax(t[None, :] * mask.astype(jnp.int32), axis=-1)


def sequence_scores(model: Decoder, params, score_kernel: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """``[B, num_labels]`` float32: ``score(h[b, last_b])``, ``h`` the final normed hidden states.

    ``score(h) = h @ score.weight.T`` (no bias), taken at ``last_b = last_token_index(mask)[b]``, as
    transformers' ``*ForSequenceClassification`` pools its per-token logits; the head runs in float32.
    """
    hidden = model.apply({"params": params}, ids, mask, return_hidden=True)  # [B, T, H]
    last = last_token_index(mask)
    pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, H]
    return pooled.astype(jnp.float32) @ score_kernel.astype(jnp.float32)
