"""Ahead-of-time compilation of the real train step for a TPU topology, from a CPU host.

As MaxText's train_compile.py: ``jax.experimental.topologies.get_topology_desc`` (libtpu)
gives the devices of a slice that need not exist; the step is lowered with abstract,
sharded arguments (nothing is allocated) and compiled by the TPU compiler, which reports
per-chip memory and FLOPs. Use it to know that a config fits before booking the slice.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from kto_jax import sharding
from kto_jax.flops import step_flops
from kto_jax.models import abstract_params, build_model
from kto_jax.models.presets import get_preset
from kto_jax.train import setup
from kto_jax.train.state import TrainState, learning_rate, make_optimizer, opt_state_shardings
from kto_jax.train.step import StepSpec, ValueHead, train_step

GiB = 1024**3
# Cloud TPU accelerator types -> (topology family, chip layout); v4/v5p count 2 cores per chip.
TOPOLOGIES = {
    **{f"v5p-{2 * n}": ("v5p", shape) for n, shape in ((4, "2x2x1"), (8, "2x2x2"), (16, "2x2x4"), (32, "2x4x4"),
                                                       (64, "4x4x4"), (128, "4x4x8"), (256, "4x8x8"), (512, "8x8x8"))},
    **{f"v4-{2 * n}": ("v4", shape) for n, shape in ((4, "2x2x1"), (8, "2x2x2"), (16, "2x2x4"), (32, "2x4x4"), (64, "4x4x4"))},
    **{f"v5e-{n}": ("v5e", shape) for n, shape in ((4, "2x2"), (8, "2x4"), (16, "4x4"), (32, "4x8"), (64, "8x8"), (128, "8x16"), (256, "16x16"))},
    **{f"v6e-{n}": ("v6e", shape) for n, shape in ((4, "2x2"), (8, "2x4"), (16, "4x4"), (32, "4x8"), (64, "8x8"), (128, "8x16"), (256, "16x16"))},
}
HBM_PER_CHIP = {"TPU v4": 32 * GiB, "TPU v5 lite": 16 * GiB, "TPU v5": 95 * GiB, "TPU v6 lite": 32 * GiB}


def topology_devices(name: str):
    """The devices of a Cloud TPU slice (e.g. ``v5p-128``) as seen by a compiler on this host."""
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown TPU topology {name!r}; known: {', '.join(TOPOLOGIES)}")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only use: no chips to guard
    from jax.experimental import topologies

    family, shape = TOPOLOGIES[name]
    try:
        return topologies.get_topology_desc(topology_name=f"{family}:{shape}", platform="tpu").devices
    except Exception as e:
        hint = " Install libtpu: pip install -e '.[tpu]'." if importlib.util.find_spec("libtpu") is None else ""
        raise RuntimeError(f"cannot describe {name} ({family}:{shape}): {e}.{hint}") from None


def hbm_bytes(device) -> int | None:
    for kind in sorted(HBM_PER_CHIP, key=len, reverse=True):
        if device.device_kind.startswith(kind):
            return HBM_PER_CHIP[kind]
    return None


def _abstract(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_batch(config, spec, mesh) -> dict:
    """A global batch of ``global_batch_size`` sequences of ``max_length`` tokens, abstract."""
    g, length = int(config.train.global_batch_size), int(config.data.max_length)

    def arr(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))

    groups = ["chosen_", "rejected_"] if spec.kind == "paired" else [""] + (["kl_"] if spec.needs_kl else [])
    batch = {}
    for prefix in groups:
        batch.update({f"{prefix}input_ids": arr((g, length), jnp.int32), f"{prefix}attention_mask": arr((g, length), jnp.int32),
                      f"{prefix}loss_mask": arr((g, length), jnp.bool_)})
    if spec.kind != "paired":
        batch["desirable"] = arr((g,), jnp.bool_)
    if config.reference.mode == "cached" and spec.needs_reference:
        names = (["reference_chosen_logps", "reference_rejected_logps"] if spec.kind == "paired"
                 else ["reference_logps"] + (["reference_kl_logps"] if spec.needs_kl else []))
        batch.update({n: arr((g,), jnp.float32) for n in names})
    return batch


def lower_train_step(config, devices, model_config, num_microbatches: int, chunk_size: int):
    """``config``'s train step for ``devices``, lowered with abstract, sharded inputs (nothing is
    allocated); returns ``(lowered, loss spec, reference mode, mesh)``."""
    spec, hparams = setup.loss_and_hparams(config)
    model = build_model(model_config)
    mesh = sharding.make_mesh({k: int(v) for k, v in config.mesh.items()}, devices=np.asarray(devices))
    boxed = abstract_params(model_config)
    param_shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
    params = _abstract(nn.unbox(boxed), param_shardings)
    replicated = NamedSharding(mesh, PartitionSpec())
    policy = {"model": params}
    if spec.token_level:
        head = jax.eval_shape(lambda: ValueHead().init(jax.random.PRNGKey(0), jnp.zeros((1, 1, model_config.hidden_size)))["params"])
        policy["value_head"] = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), head)
    optimizer = make_optimizer(config.train.optimizer)
    boxed_policy = {"model": boxed, **({"value_head": policy["value_head"]} if "value_head" in policy else {})}
    opt_state = _abstract(nn.unbox(jax.eval_shape(optimizer.init, boxed_policy)), opt_state_shardings(optimizer, boxed_policy, mesh))
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=replicated)  # noqa: E731
    state = TrainState(step=scalar(jnp.int32), params=policy, opt_state=opt_state,
                       rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
                       loss_state={arg: scalar(jnp.float32) for arg, _ in spec.state_metrics},
                       nonfinite_skipped=scalar(jnp.int32))
    mode = config.reference.mode if spec.needs_reference else "none"
    reference = params if mode == "model" else None
    step_spec = StepSpec(model, spec, tuple(sorted(hparams.items())), num_microbatches, mode, chunk_size,
                         bool(config.train.skip_nonfinite))
    fn = jax.jit(functools.partial(train_step, step_spec, optimizer, functools.partial(learning_rate, config.train.optimizer)),
                 donate_argnums=(0,))
    with sharding.activation_rules(mesh):
        lowered = fn.lower(state, abstract_batch(config, spec, mesh), reference)
    return lowered, spec, mode, mesh


def xla_step_flops(config) -> float:
    """XLA's FLOP count of the whole step (all chips together), every loop iteration counted.

    XLA's cost analysis counts a loop body once, and the step has three loops (microbatches,
    scanned layers, log-prob chunks); the TPU compiler adds loops of its own when it
    partitions (collective matmuls). So the count is taken from the program as lowered,
    before partitioning and optimisation (on this host's CPU backend, one device), twice,
    with no loop left: one microbatch, one log-prob chunk, and 1 or 2 layers (the 2-layer
    scan unrolled). With f1, f2 their counts, the L-layer step costs ``f1 + (L - 1) (f2 - f1)``.
    The count includes what the remat policy recomputes (hardware FLOPs, not model FLOPs).
    """
    config = config.copy_and_resolve_references()
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    counts = []
    for layers in (1, 2):
        model_config = get_preset(config.model.name, **_model_fields(config), num_layers=layers, scan_unroll=layers)
        lowered, *_ = lower_train_step(config, jax.devices("cpu")[:1], model_config, num_microbatches=1,
                                       chunk_size=int(config.data.max_length))
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if not cost or "flops" not in cost:
            raise RuntimeError("XLA's cost analysis of the lowered step gave no FLOP count")
        counts.append(float(cost["flops"]))
    num_layers = get_preset(config.model.name).num_layers
    return counts[0] + (num_layers - 1) * (counts[1] - counts[0])


def compile_train_step(config, devices) -> dict:
    """Compile ``config``'s train step for ``devices``; returns the per-chip memory/FLOPs report."""
    model_config = get_preset(config.model.name, **_model_fields(config))
    lowered, spec, mode, mesh = lower_train_step(config, devices, model_config, int(config.train.num_microbatches),
                                                 int(config.train.chunk_size))
    compiled = lowered.compile()
    memory = compiled.memory_analysis()
    total = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes + memory.temp_size_in_bytes
    hbm = hbm_bytes(devices[0])
    analytic = step_flops(model_config, spec, batch=int(config.train.global_batch_size), length=int(config.data.max_length), reference_mode=mode)
    return {
        "model": config.model.name, "loss": spec.name, "reference_mode": mode, "devices": len(devices),
        "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape),
        "global_batch": int(config.train.global_batch_size), "max_length": int(config.data.max_length),
        "num_microbatches": int(config.train.num_microbatches), "remat": config.model.remat_policy,
        "arguments_gib": memory.argument_size_in_bytes / GiB, "outputs_gib": memory.output_size_in_bytes / GiB,
        "aliased_gib": memory.alias_size_in_bytes / GiB, "temporaries_gib": memory.temp_size_in_bytes / GiB,
        "total_gib": total / GiB, "hbm_gib": hbm / GiB if hbm else None,
        "fits": bool(hbm and total <= hbm), "headroom_gib": (hbm - total) / GiB if hbm else None,
        "xla_flops_per_chip": xla_step_flops(config) / len(devices),
        "analytic_flops_per_chip": analytic / len(devices),
    }


def _model_fields(config) -> dict:
    return dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                remat_policy=config.model.remat_policy, attention_impl=config.model.attention_impl or None)
