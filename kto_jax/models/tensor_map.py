"""How one Hugging Face tensor maps onto our params, and the layouts the families share.

Each family module (``llama.py``, ``gpt_neox.py``) lists its tensors with these; ``hf.py``
reads and writes safetensors through them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One Hugging Face tensor (per layer when ``per_layer``) <-> one or more of our leaves.

    split(hf_array) -> [our arrays], one per path; merge([our arrays]) -> hf_array.
    For per-layer tensors our leaves carry a leading ``layers`` axis and ``{i}`` in the
    name is the layer index.
    """

    hf_name: str
    paths: tuple[tuple[str, ...], ...]
    split: Callable[[np.ndarray], list]
    merge: Callable[[list], np.ndarray]
    per_layer: bool = True


def proj_in(path, hf_name, dim, heads, head_dim):
    """HF [heads*head_dim, dim] <-> our [dim, heads, head_dim] (q/k/v projections)."""
    return TensorMap(
        hf_name,
        (path,),
        split=lambda w: [w.T.reshape(dim, heads, head_dim)],
        merge=lambda xs: xs[0].reshape(dim, heads * head_dim).T,
    )


def proj_out(path, hf_name, dim, heads, head_dim):
    """HF [dim, heads*head_dim] <-> our [heads, head_dim, dim] (the attention output projection)."""
    return TensorMap(
        hf_name,
        (path,),
        split=lambda w: [w.T.reshape(heads, head_dim, dim)],
        merge=lambda xs: xs[0].reshape(heads * head_dim, dim).T,
    )


def linear(path, hf_name, per_layer=True):
    """HF Linear weight [out, in] <-> our Dense kernel [in, out]."""
    return TensorMap(hf_name, (path,), split=lambda w: [w.T], merge=lambda xs: xs[0].T, per_layer=per_layer)


def same(path, hf_name, per_layer=True, shape=None):
    """Same layout (norms, biases, embeddings); ``shape`` reshapes ours (e.g. bias [H*Dh] -> [H, Dh])."""
    return TensorMap(
        hf_name,
        (path,),
        split=lambda w: [w.reshape(shape) if shape else w],
        merge=lambda xs: xs[0].reshape(-1) if shape else xs[0],
        per_layer=per_layer,
    )
