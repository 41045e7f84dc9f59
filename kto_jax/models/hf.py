"""Hugging Face interop: config.json <-> ModelConfig, safetensors <-> params, tokenizers.

    model, params = from_hf("path/to/hf_folder", param_dtype="bfloat16", mesh=mesh)
    to_hf(model, params, "out_dir")            # transformers.from_pretrained("out_dir") loads it
    tokenizer = load_tokenizer("path/to/hf_folder")

Weights are read one Hugging Face tensor at a time and placed straight onto their target
sharding with ``jax.make_array_from_callback``, so host memory stays near the largest
tensor, not the whole model. ``from_hf`` also takes a preset name (random init).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.flax import save_file

from kto_jax import sharding as sharding_lib
from kto_jax.errors import InputError, MissingInput
from kto_jax.files import write_json
from kto_jax.log import note
from kto_jax.models import abstract_params, build_model, lora
from kto_jax.models.common import Decoder
from kto_jax.models.config import ModelConfig
from kto_jax.models.families import get_family
from kto_jax.models.hf_config import config_from_hf, config_to_hf
from kto_jax.models.presets import PRESETS, get_preset
from kto_jax.models.tensor_map import TensorMap

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# ---------------------------------------------------------------- tensor maps


def tensor_maps(config: ModelConfig) -> list[TensorMap]:
    """Every Hugging Face tensor of ``config``'s architecture and where it lives in our params
    (its family's ``tensor_maps``)."""
    return get_family(config.architecture).tensor_maps(config)


def _hf_names(tmap: TensorMap, num_layers: int) -> list[str]:
    return [tmap.hf_name.format(i=i) for i in range(num_layers)] if tmap.per_layer else [tmap.hf_name]


def _tree_get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _tree_set(tree: dict, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------- safetensors reading


class CorruptedWeights(InputError):
    """A safetensors file that cannot be read (truncated, corrupted)."""


@contextlib.contextmanager
def _open(file: str):
    """``safe_open`` with an unreadable file (truncated, not safetensors) as an error naming it."""
    try:
        handle = safe_open(file, framework="flax")
    except SafetensorError as e:
        raise CorruptedWeights(
            f"{file}: not a readable safetensors file ({e}): it is damaged or truncated; copy or "
            "export the model folder again"
        ) from None
    with handle as f:
        yield f


LANGUAGE_MODEL_PREFIXES = ("model.language_model.", "language_model.model.")  # transformers 5.x, 4.x
LANGUAGE_MODEL_HEAD = "language_model.lm_head.weight"  # 4.x vision-language folders' LM head


class SafetensorsReader:
    """Lazy reader over a single-file or sharded (index.json) safetensors checkpoint.

    A vision-language folder (Gemma 3's ``Gemma3ForConditionalGeneration``) keeps its language
    model's ``model.*`` tensors under ``model.language_model.*`` (transformers 5.x) or
    ``language_model.model.*`` (4.x): a name missing as asked is looked up there.
    """

    def __init__(self, path: str):
        index = os.path.join(path, INDEX_FILE)
        single = os.path.join(path, SINGLE_FILE)
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            self.files = {name: os.path.join(path, file) for name, file in weight_map.items()}
        elif os.path.exists(single):
            with _open(single) as f:
                self.files = {name: single for name in f.keys()}
        else:
            raise MissingInput(f"no {SINGLE_FILE} or {INDEX_FILE} in {path!r}: is it a Hugging Face model folder?")
        self.path = path

    def stored_name(self, name: str) -> str:
        """``name`` as the checkpoint stores it (itself, or under a vision-language folder's prefix)."""
        if name in self.files:
            return name
        if name.startswith("model."):
            for prefix in LANGUAGE_MODEL_PREFIXES:
                if prefix + name[len("model.") :] in self.files:
                    return prefix + name[len("model.") :]
        if name == "lm_head.weight" and LANGUAGE_MODEL_HEAD in self.files:
            return LANGUAGE_MODEL_HEAD
        return name

    def file_of(self, name: str) -> str:
        return self.files[self.stored_name(name)]

    def shape(self, name: str) -> tuple[int, ...]:
        with _open(self._file(name)) as f:
            return tuple(f.get_slice(self.stored_name(name)).get_shape())

    def read(self, name: str) -> np.ndarray:
        """One tensor as a host numpy array (bf16 via ml_dtypes), never on an accelerator."""
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            with _open(self._file(name)) as f:
                try:
                    return np.asarray(f.get_tensor(self.stored_name(name)))
                except SafetensorError as e:
                    raise CorruptedWeights(
                        f"{self._file(name)}: tensor {name!r} cannot be read ({e}): the file is damaged "
                        "or truncated; copy or export the model folder again"
                    ) from None

    def _file(self, name: str) -> str:
        if self.stored_name(name) not in self.files:
            raise KeyError(f"tensor {name!r} is missing from the checkpoint in {self.path!r}")
        file = self.file_of(name)
        if not os.path.exists(file):
            raise MissingInput(f"{file!r} (holding tensor {name!r}) is listed in {INDEX_FILE} but missing")
        return file


def _expected_hf_shape(tmap: TensorMap, our_shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    zeros = [np.zeros(s[1:] if tmap.per_layer else s, np.float32) for s in our_shapes]
    return tuple(tmap.merge(zeros).shape)


def load_params(config: ModelConfig, path: str, mesh=None):
    """Read ``path``'s safetensors into our param tree, each leaf straight onto its sharding.

    Every tensor is checked first (present, right shape); the error names the tensor, the
    file and the expected shape.
    """
    reader = SafetensorsReader(path)
    boxed = abstract_params(config)
    abstract = nn.unbox(boxed)
    if mesh is None:
        device = jax.local_devices()[0]
        shardings = jax.tree_util.tree_map(lambda _: jax.sharding.SingleDeviceSharding(device), abstract)
    else:
        shardings = sharding_lib.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
    dtype = jnp.dtype(config.param_dtype)
    maps = tensor_maps(config)
    shapes = {id(t): [tuple(_tree_get(abstract, p).shape) for p in t.paths] for t in maps}
    for tmap in maps:  # check every tensor before loading any
        expected = _expected_hf_shape(tmap, shapes[id(tmap)])
        for name in _hf_names(tmap, config.num_layers):
            got = reader.shape(name)
            if got != expected:
                raise InputError(
                    f"tensor {name!r} in {reader.file_of(name)!r} has shape {got}; the config "
                    f"({config.hf_model_type}, hidden {config.hidden_size}) expects {expected}"
                )
    params: dict = {}
    for tmap in maps:
        for j, (p, shape) in enumerate(zip(tmap.paths, shapes[id(tmap)])):
            leaf = _load_leaf(reader, tmap, j, shape, config.num_layers, dtype, _tree_get(shardings, p))
            _tree_set(params, p, leaf)
    return params


def _load_leaf(reader, tmap, j, shape, num_layers, dtype, sharding):
    """One of our leaves as a global array; each device's block is read layer by layer."""

    def block(index):
        if not tmap.per_layer:
            return np.asarray(tmap.split(reader.read(tmap.hf_name))[j][index], dtype)
        layers = range(num_layers)[index[0]]
        rows = [tmap.split(reader.read(tmap.hf_name.format(i=i)))[j][index[1:]] for i in layers]
        return np.stack(rows).astype(dtype)

    return jax.make_array_from_callback(shape, sharding, block)


# ---------------------------------------------------------------- public API


def init_params(config: ModelConfig, seed: int = 0, mesh=None):
    """Random init (normal(initializer_range)), created directly with its sharding on ``mesh``."""
    model = build_model(config)
    ids = jnp.zeros((1, 1), jnp.int32)

    def init():
        return nn.unbox(model.init(jax.random.PRNGKey(seed), ids)["params"])

    if mesh is None:
        return jax.jit(init)()
    shardings = sharding_lib.logical_to_sharding(nn.get_partition_spec(abstract_params(config)), mesh)
    return jax.jit(init, out_shardings=shardings)()


def from_hf(path: str, param_dtype="float32", compute_dtype=None, mesh=None, seed: int = 0, **overrides):
    """``(model, params)`` from a Hugging Face folder (config.json + safetensors) or a preset name.

    param_dtype: storage dtype of the params; compute_dtype: dtype of the activations (default:
    ``param_dtype``); each a dtype name or any dtype ``jnp.dtype`` reads (``jnp.bfloat16``).
    A preset name (see ``kto_jax.models.presets``) gives random weights, for tests and AOT work.
    ``overrides`` set other ModelConfig fields (``remat_policy``, ``attention_impl``, ...).
    """
    if "dtype" in overrides:
        raise TypeError("from_hf(dtype=...) is ambiguous: pass param_dtype= (storage) and compute_dtype= (activations)")
    compute_dtype = param_dtype if compute_dtype is None else compute_dtype
    overrides = dict(param_dtype=param_dtype, compute_dtype=compute_dtype, **overrides)
    if path in PRESETS:
        config = get_preset(path, **overrides)
        return build_model(config), init_params(config, seed, mesh)
    config_file = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(config_file):
        hint = f"; or a preset name: {', '.join(PRESETS)}" if not os.path.isdir(path) else ""
        raise MissingInput(f"{config_file!r} not found: from_hf needs a Hugging Face model folder{hint}")
    with open(config_file, encoding="utf-8") as f:
        hf = json.load(f)
    config = config_from_hf(hf, **overrides)
    if hf.get("model_type") in get_family(config.architecture).hf_multimodal:
        note(
            f"{path}: a vision-language folder (model_type={hf['model_type']!r}): loading its language model "
            f"({config.hf_model_type}); the vision tower and projector are left out"
        )
    return build_model(config), load_params(config, path, mesh)


def to_hf(model: Decoder, params, out_dir: str, max_shard_bytes: int = 2 * 1024**3) -> list[str]:
    """Write ``config.json`` and sharded ``model-0000i-of-0000n.safetensors`` + index to ``out_dir``.

    Tensors are gathered one at a time; a shard is written as soon as it is full. Returns
    the written weight files. ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)``
    loads the result. A LoRA model (``config.lora_rank``) is written merged, W + scale * A B
    (``kto_jax.models.lora.merge_weights``; its adapters in PEFT's format: ``kto_jax.models.peft``).
    """
    config, params = lora.merge_weights(model.config, params)
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, CONFIG_FILE), config_to_hf(config))

    # Tensors are gathered one at a time; a shard is written as soon as the next tensor would
    # overflow it, so host memory holds at most one shard. The shard count is known only at the
    # end, so shards are written under temporary names and renamed model-0000k-of-0000n.
    pending: dict = {}
    pending_bytes, total, written = 0, 0, []

    def flush():
        nonlocal pending, pending_bytes
        path = os.path.join(out_dir, f"shard-{len(written):05d}.tmp.safetensors")
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            save_file({n: jnp.asarray(t) for n, t in pending.items()}, path, metadata={"format": "pt"})
        written.append((path, list(pending)))
        pending, pending_bytes = {}, 0

    for tmap in tensor_maps(config):
        leaves = [_tree_get(params, p) for p in tmap.paths]
        for i, name in enumerate(_hf_names(tmap, config.num_layers)):
            parts = [np.asarray(jax.device_get(leaf[i] if tmap.per_layer else leaf)) for leaf in leaves]
            tensor = np.ascontiguousarray(tmap.merge(parts))
            if pending and pending_bytes + tensor.nbytes > max_shard_bytes:
                flush()
            pending[name] = tensor
            pending_bytes += tensor.nbytes
            total += tensor.nbytes
    if pending:
        flush()
    files, weight_map = [], {}
    for k, (tmp_path, names) in enumerate(written):
        file = f"model-{k + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(tmp_path, os.path.join(out_dir, file))
        weight_map.update({n: file for n in names})
        files.append(os.path.join(out_dir, file))
    write_json(os.path.join(out_dir, INDEX_FILE), {"metadata": {"total_size": int(total)}, "weight_map": weight_map})
    return files


def load_tokenizer(path: str):
    """The ``tokenizers.Tokenizer`` of a model folder (its tokenizer.json)."""
    from tokenizers import Tokenizer

    file = path if path.endswith(".json") else os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
        raise MissingInput(f"{file!r} not found: load_tokenizer needs a tokenizer.json (the fast-tokenizer file)")
    return Tokenizer.from_file(file)
