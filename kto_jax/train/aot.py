"""Ahead-of-time compilation of the real train step for a TPU topology, from a CPU host.

As MaxText's train_compile.py: ``jax.experimental.topologies.get_topology_desc`` (libtpu)
gives the devices of a slice that need not exist; the step is lowered with abstract,
sharded arguments (nothing is allocated) and compiled by the TPU compiler, which reports
per-chip memory and FLOPs. Use it to know that a config fits before booking the slice.
The step is the loop's own (``kto_jax.train.engine.build_engine``: same jitted function,
in/out shardings and donation), for a preset or a Hugging Face folder (its config.json).
"""

from __future__ import annotations

import importlib.util
import os

import jax
import numpy as np

from kto_jax import sharding
from kto_jax.errors import InputError
from kto_jax.train.engine import build_engine
from kto_jax.train.flops import step_flops
from kto_jax.train.plan import Plan, make_plan

GiB = 1024**3
# Cloud TPU accelerator types -> (topology family, chip layout); v4/v5p count 2 cores per chip.
TOPOLOGIES = {
    **{
        f"v5p-{2 * n}": ("v5p", shape)
        for n, shape in (
            (4, "2x2x1"),
            (8, "2x2x2"),
            (16, "2x2x4"),
            (32, "2x4x4"),
            (64, "4x4x4"),
            (128, "4x4x8"),
            (256, "4x8x8"),
            (512, "8x8x8"),
        )
    },
    **{
        f"v4-{2 * n}": ("v4", shape)
        for n, shape in ((4, "2x2x1"), (8, "2x2x2"), (16, "2x2x4"), (32, "2x4x4"), (64, "4x4x4"))
    },
    **{
        f"v5e-{n}": ("v5e", shape)
        for n, shape in ((4, "2x2"), (8, "2x4"), (16, "4x4"), (32, "4x8"), (64, "8x8"), (128, "8x16"), (256, "16x16"))
    },
    **{
        f"v6e-{n}": ("v6e", shape)
        for n, shape in ((4, "2x2"), (8, "2x4"), (16, "4x4"), (32, "4x8"), (64, "8x8"), (128, "8x16"), (256, "16x16"))
    },
}
HBM_PER_CHIP = {"TPU v4": 32 * GiB, "TPU v5 lite": 16 * GiB, "TPU v5": 95 * GiB, "TPU v6 lite": 32 * GiB}


def topology_devices(name: str):
    """The devices of a Cloud TPU slice (e.g. ``v5p-128``) as seen by a compiler on this host."""
    if name not in TOPOLOGIES:
        raise InputError(f"unknown TPU topology {name!r}; known: {', '.join(TOPOLOGIES)}")
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


def lower_train_step(plan: Plan, devices):
    """The plan's train step for ``devices``, lowered with abstract, sharded inputs (nothing is
    allocated): the engine the loop builds (``kto_jax.train.engine``), the same jitted function,
    shardings and donation. Returns ``(lowered, engine)``."""
    mesh = sharding.make_mesh(plan.mesh, devices=np.asarray(devices))
    # a run of one epoch (steps=0) learns its step count from the data; the count only sets
    # constants of the schedule, not the program's shape, so a nominal one serves here
    engine = build_engine(plan.step_spec(), plan.optimizer, mesh, seed=plan.seed, total_steps=plan.steps or 1000)
    return engine.lower(plan.global_batch_size, plan.row_length, plan.packed_rows), engine


def xla_step_flops(config, plan: Plan | None = None) -> float:
    """XLA's FLOP count of the whole step (all chips together), every loop iteration counted.

    XLA's cost analysis counts a loop body once, and the step has three loops (microbatches,
    scanned layers, log-prob chunks); the TPU compiler adds loops of its own when it
    partitions (collective matmuls). So the count is taken from the program as lowered,
    before partitioning and optimisation (on this host's CPU backend, one device), twice,
    with no loop left: one microbatch, one log-prob chunk, and 1 or 2 layers (the 2-layer
    scan unrolled). With f1, f2 their counts, the L-layer step costs ``f1 + (L - 1) (f2 - f1)``.
    The count includes what the remat policy recomputes (hardware FLOPs, not model FLOPs).
    Splash and the default attention are counted as XLA's dense attention (a Pallas kernel is
    opaque to the cost analysis; the kernel itself skips the key blocks the causal mask rules out;
    on this CPU host the default would be the blocked attention, which the target does not run).
    """
    config = config.copy_and_resolve_references()
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    plan = plan or make_plan(config, 1)
    base = plan.replace(
        mesh_shape=(("data", 1), ("fsdp", 1), ("tensor", 1)), num_microbatches=1, chunk_size=plan.row_length
    )
    attention = plan.model_config.attention_impl
    counts = []
    for layers in (1, 2):
        model_config = plan.model_config.replace(
            num_layers=layers, scan_unroll=layers, attention_impl="xla" if attention in (None, "splash") else attention
        )
        lowered, _ = lower_train_step(base.replace(model_config=model_config), jax.devices("cpu")[:1])
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if not cost or "flops" not in cost:
            raise RuntimeError("XLA's cost analysis of the lowered step gave no FLOP count")
        counts.append(float(cost["flops"]))
    return counts[0] + (plan.model_config.num_layers - 1) * (counts[1] - counts[0])


def compile_train_step(config, devices) -> dict:
    """Compile ``config``'s train step for ``devices``; returns the per-chip memory/FLOPs report."""
    plan = make_plan(config, len(devices))
    lowered, engine = lower_train_step(plan, devices)
    compiled = lowered.compile()
    memory = compiled.memory_analysis()
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    hbm = hbm_bytes(devices[0])
    analytic = step_flops(
        plan.model_config,
        plan.loss,
        batch=plan.global_batch_size,
        length=plan.max_length,
        reference_mode=plan.reference_mode,
        hparams=dict(plan.hparams),
    )
    return {
        "model": config.model.name,
        "loss": plan.loss.name,
        "lora_rank": plan.model_config.lora_rank,  # 0: full fine-tuning
        "reference_mode": plan.reference_mode,
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "mesh": dict(engine.mesh.shape),
        "global_batch": plan.global_batch_size,
        "max_length": plan.max_length,
        "packing": plan.packing,
        "rows": plan.packed_rows or plan.global_batch_size,
        "row_length": plan.row_length,
        "num_microbatches": plan.num_microbatches,
        "remat": plan.model_config.remat_policy,
        "attention": plan.model_config.attention_impl or "xla",
        # Mosaic kernel calls in the lowered program (splash: forward, dq and dkv in the layer loop body)
        "tpu_kernels": lowered.as_text().count("@tpu_custom_call"),
        "arguments_gib": memory.argument_size_in_bytes / GiB,
        "outputs_gib": memory.output_size_in_bytes / GiB,
        "aliased_gib": memory.alias_size_in_bytes / GiB,
        "temporaries_gib": memory.temp_size_in_bytes / GiB,
        "total_gib": total / GiB,
        "hbm_gib": hbm / GiB if hbm else None,
        "fits": bool(hbm and total <= hbm),
        "headroom_gib": (hbm - total) / GiB if hbm else None,
        "xla_flops_per_chip": xla_step_flops(config, plan) / len(devices),
        "analytic_flops_per_chip": analytic / len(devices),
    }
