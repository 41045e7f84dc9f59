"""Device mesh and the one table of logical-axis rules.

Params and activations carry logical axis names; ``LOGICAL_AXIS_RULES`` maps them to the
mesh axes ``data``, ``fsdp`` and ``tensor``. No PartitionSpec is written anywhere else.

    data    pure data parallelism (params replicated)
    fsdp    data parallelism with params, grads and optimizer state sharded (ZeRO-3)
    tensor  Megatron-style tensor parallelism over heads, MLP and vocab

Host <-> global arrays: :func:`to_global` (this process's rows -> a global array sharded over the
data axes) and :func:`local_rows` (this process's rows of a global host array).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from kto_jax.errors import InputError

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: tuple[tuple[str, object], ...] = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # params
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("lora_rank", None),  # LoRA's A [in, rank] / B [rank, out]: sharded as the projection's in / out axes
)


def mesh_shape(shape: Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
    """Axis sizes of a ``(data, fsdp, tensor)`` mesh over ``num_devices``; one axis may be -1 (the rest).

    ``mesh_shape({"fsdp": -1}, 8)`` is ``{"data": 1, "fsdp": 8, "tensor": 1}``. Errors name the
    sizes and the device count.
    """
    sizes = {axis: 1 for axis in MESH_AXES}
    unknown = set(shape or {}) - set(MESH_AXES)
    if unknown:
        raise InputError(f"mesh axes {sorted(unknown)} are not known; use {MESH_AXES}")
    sizes.update(shape or {"data": -1})
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise InputError(f"at most one mesh axis may be -1; got {sizes}")
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if fill:
        if num_devices % known:
            raise InputError(f"mesh {sizes}: {num_devices} devices are not divisible by {known}")
        sizes[fill[0]] = num_devices // known
    if int(np.prod(list(sizes.values()))) != num_devices:
        raise InputError(f"mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices; there are {num_devices}")
    return sizes


def make_mesh(shape: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all) with :func:`mesh_shape`'s sizes."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    sizes = mesh_shape(shape, devices.size)
    return Mesh(
        devices.reshape([sizes[a] for a in MESH_AXES]),
        MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES),
    )


def logical_to_sharding(logical_axes, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings for a pytree of logical axis tuples (e.g. ``nn.get_partition_spec(boxed)``)."""
    return nn.logical_to_mesh_sharding(logical_axes, mesh, rules)


def abstract_on(boxed, mesh: Mesh | None):
    """``jax.ShapeDtypeStruct`` leaves of logically boxed shapes (``abstract_params``), each with its
    sharding on ``mesh`` by the rules table, or on the first local device when ``mesh`` is None."""
    shapes = nn.unbox(boxed)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, shapes)
    else:
        shardings = logical_to_sharding(nn.get_partition_spec(boxed), mesh)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a batch array: the leading (example) axis over the data axes."""
    spec = PartitionSpec("activation_batch", *([None] * (ndim - 1)))
    return nn.logical_to_mesh_sharding(spec, mesh, LOGICAL_AXIS_RULES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def to_global(batch: dict, mesh: Mesh) -> dict:
    """Host-local numpy batch slices -> global arrays sharded over the data axes."""
    return {
        key: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(value)), value)
        for key, value in batch.items()
    }


def local_rows(array: np.ndarray) -> np.ndarray:
    """This process's rows of a global ``[G, ...]`` host array (process p holds rows p*G/P ... (p+1)*G/P)."""
    per = array.shape[0] // jax.process_count()
    return array[jax.process_index() * per : (jax.process_index() + 1) * per]


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Context in which the models' ``nn.with_logical_constraint`` calls take effect on ``mesh``."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def initialize_distributed() -> None:
    """``jax.distributed.initialize`` when this is one of several processes.

    Automatic on TPU pods and under SLURM (``SLURM_NTASKS`` > 1); otherwise set
    ``KTO_JAX_COORDINATOR`` (host:port), ``KTO_JAX_NUM_PROCESSES`` and ``KTO_JAX_PROCESS_ID``.
    A single process does nothing.
    """
    env = os.environ
    if "KTO_JAX_COORDINATOR" in env:
        jax.distributed.initialize(
            coordinator_address=env["KTO_JAX_COORDINATOR"],
            num_processes=int(env["KTO_JAX_NUM_PROCESSES"]),
            process_id=int(env["KTO_JAX_PROCESS_ID"]),
        )
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize()
