"""Orbax checkpoints of model weights.

``save_params(path, params)`` writes a (sharded) param tree; ``load_params(path, like)``
restores it onto the shardings of ``like`` (a tree of arrays or ShapeDtypeStructs), each
process reading only its shards.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

PARAMS_DIR = "params"


def save_params(path: str, params) -> None:
    path = os.path.abspath(path)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, params, force=True)


def load_params(path: str, like):
    """Restore a param tree saved by :func:`save_params` with ``like``'s shapes and shardings."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like
    )
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path, abstract)


def run_params_path(workdir: str) -> str:
    """Where a run's final weights live."""
    return os.path.join(os.path.abspath(os.path.expanduser(workdir)), PARAMS_DIR)
