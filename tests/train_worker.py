"""Subprocess entry points of the training-engine tests (run as ``python -m tests.train_worker``).

JAX fixes its device count when the backend starts, and pytest's process already started it
with one CPU device, so runs on simulated meshes (XLA_FLAGS=--xla_force_host_platform_device_count)
happen here; results come back as JSON/npz files. Every run builds its state and step with the
shipped path (kto_jax.train.plan, setup and engine: the functions kto_jax.train.loop.run calls).

    sharded   --loss L --data_dir D --out DIR [--steps N]
        the train step on meshes (data, fsdp, tensor) = (1,1,1) on one device, (8,1,1), (2,2,2),
        (1,4,2) (sgd, lr 0.1). Then kto_jax.train.loop.run itself on the (2,2,2) mesh.
    packed    --loss L --data_dir D --out DIR [--steps N]
        padded on one device against packed (config.data.packing, rows of 64 tokens, 2
        microbatches of 8) on (1,1,1), (8,1,1) and (2,2,2) (sgd, lr 0.1).
    sync      --loss L --data_dir D --out DIR [--steps N]
        reference.mode=sync with humanline (sync every step) on (1,1,1), (8,1,1) and (2,2,2), packed
        (sgd, lr 0.1): metrics, params and the moving reference.
    losses    --data_dir D --out DIR L1 L2 ...
        kto_jax.train.loop.run(small config, DIR/L) for each loss, one step each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402

from tests.train_helpers import record_loop_lowering, register_test_preset, small_config  # noqa: E402

MESHES = {"1x1x1": (1, 1, 1), "8x1x1": (8, 1, 1), "2x2x2": (2, 2, 2), "1x4x2": (1, 4, 2)}


def sharded(args) -> None:
    from kto_jax import sharding
    from kto_jax.data.tokenize import get_tokenizer
    from kto_jax.train import loop, setup
    from kto_jax.train.engine import build_engine
    from kto_jax.train.plan import make_plan

    assert jax.device_count() == 8, jax.devices()
    config = small_config(args.loss, args.data_dir, steps=args.steps)
    # sgd: the param updates are the (clipped) gradients, so small reduction-order differences stay
    # small (adam's first steps, g / (|g| + eps), would blow them up for near-zero gradients)
    config.train.optimizer.update(dict(name="sgd", lr=0.1, warmup_steps=0))
    plan = make_plan(config, 1)
    data = setup.load_split(plan, plan.data.train_split)
    loader = setup.make_loader(plan, data, get_tokenizer("bytes"), seed=config.seed)
    batches = [next(loader) for _ in range(args.steps)]
    summary = {}
    for name, (d, f, t) in MESHES.items():
        devices = jax.devices()[: d * f * t]
        config.mesh.update(dict(data=d, fsdp=f, tensor=t))
        plan = make_plan(config, len(devices))
        mesh = sharding.make_mesh(plan.mesh, devices=devices)
        model, reference = setup.load_model(plan, mesh)
        engine = build_engine(plan.step_spec(model), config.train.optimizer, mesh, seed=plan.seed)
        state = engine.create_state(reference)
        rows = []
        with sharding.activation_rules(mesh):
            for batch in batches:
                state, metrics = engine.train_fn(state, sharding.to_global(batch, mesh), reference)
                rows.append({k: float(v) for k, v in jax.device_get(metrics).items()})
        leaves = jax.tree_util.tree_leaves_with_path(state.params["model"])
        np.savez(
            os.path.join(args.out, f"params_{name}.npz"), **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}
        )
        summary[name] = {
            "metrics": rows,
            "devices": len(mesh.devices.flat),
            "sharded_params": sorted(jax.tree_util.keystr(p) for p, x in leaves if not x.sharding.is_fully_replicated),
            "param_specs": {jax.tree_util.keystr(p): str(x.sharding.spec) for p, x in leaves},
        }

    # the training loop itself on a (2, 2, 2) mesh of the 8 devices; its first step's program is
    # recorded and compared with the AOT check's lowering for the same mesh
    config.mesh.update(dict(data=2, fsdp=2, tensor=2))
    config.data.bucket = config.data.max_length  # every batch padded to max_length, as the AOT batch is
    workdir = os.path.join(args.out, "loop_2x2x2")
    lowered = record_loop_lowering(loop)
    try:
        loop.run(config, workdir)
        with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
            summary["loop_2x2x2"] = {"metrics": [row for row in map(json.loads, f) if "loss" in row]}
        from kto_jax.train.aot import lower_train_step

        aot, _ = lower_train_step(make_plan(config, 8), jax.devices())
        summary["loop_2x2x2"]["aot_equals_loop"] = aot.as_text() == lowered[0]
        summary["loop_2x2x2"]["loop_program_is_sharded"] = all(
            f'"{axis}"' in lowered[0] for axis in ("data", "fsdp", "tensor")
        )
    except Exception as e:  # reported by the test
        summary["loop_2x2x2"] = {
            "error": f"{type(e).__name__}: {e}"[:3000],
            "traceback": traceback.format_exc()[-3000:],
        }
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)


def _train(config, devices, steps: int):
    """``steps`` train steps of ``config`` on ``devices`` (the shipped plan/setup/engine path):
    (metric rows, model params as {path: array})."""
    from kto_jax import sharding
    from kto_jax.data.tokenize import get_tokenizer
    from kto_jax.train import setup
    from kto_jax.train.engine import build_engine
    from kto_jax.train.plan import make_plan

    plan = make_plan(config, len(devices))
    mesh = sharding.make_mesh(plan.mesh, devices=devices)
    data = setup.load_split(plan, plan.data.train_split)
    loader = setup.make_loader(plan, data, get_tokenizer("bytes"), seed=config.seed)
    model, reference = setup.load_model(plan, mesh)
    engine = build_engine(plan.step_spec(model), config.train.optimizer, mesh, seed=plan.seed)
    state = engine.create_state(reference)
    if plan.reference_mode == "sync":
        reference = None  # the state carries the moving reference, as in the loop
    rows, shapes = [], []
    with sharding.activation_rules(mesh):
        for _ in range(steps):
            batch = next(loader)
            shapes.append({k: list(v.shape) for k, v in batch.items()})
            state, metrics = engine.train_fn(state, sharding.to_global(batch, mesh), reference)
            rows.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    leaves = jax.tree_util.tree_leaves_with_path({"params": state.params, "reference": state.reference})
    return rows, shapes, {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def packed(args) -> None:
    assert jax.device_count() == 8, jax.devices()
    config = small_config(args.loss, args.data_dir, steps=args.steps, batch=16)
    config.train.optimizer.update(dict(name="sgd", lr=0.1, warmup_steps=0))
    config.train.num_microbatches = 2  # 8 examples per microbatch: one per device on (8, 1, 1)
    packed, padded = dict(packing=True, pack_length=64), dict(packing=False, pack_length=0)
    _train_runs(
        config,
        {
            "padded_1x1x1": (padded, (1, 1, 1)),
            "packed_1x1x1": (packed, (1, 1, 1)),
            "packed_8x1x1": (packed, (8, 1, 1)),
            "packed_2x2x2": (packed, (2, 2, 2)),
        },
        args,
    )


def _train_runs(config, runs: dict, args) -> None:
    """:func:`_train` for each ``{name: (config.data changes, (data, fsdp, tensor))}``: OUT/params_NAME.npz
    and OUT/summary.json ({name: {"metrics", "shapes"}})."""
    summary = {}
    for name, (data, (d, f, t)) in runs.items():
        config.data.update(data)
        config.mesh.update(dict(data=d, fsdp=f, tensor=t))
        rows, shapes, params = _train(config, jax.devices()[: d * f * t], args.steps)
        np.savez(os.path.join(args.out, f"params_{name}.npz"), **params)
        summary[name] = {"metrics": rows, "shapes": shapes}
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)


def sync(args) -> None:
    assert jax.device_count() == 8, jax.devices()
    config = small_config(args.loss, args.data_dir, steps=args.steps)
    config.train.optimizer.update(dict(name="sgd", lr=0.1, warmup_steps=0))
    config.reference.update(dict(mode="sync", humanline=True, log_epsilon_P=-0.1, log_epsilon_R=0.1))
    packed = dict(packing=True, pack_length=64)
    _train_runs(
        config, {"1x1x1": (packed, (1, 1, 1)), "8x1x1": (packed, (8, 1, 1)), "2x2x2": (packed, (2, 2, 2))}, args
    )


def losses(args) -> None:
    from kto_jax.train import loop

    for name in args.names:
        config = small_config(name, args.data_dir, steps=1)
        workdir = os.path.join(args.out, name)
        os.makedirs(workdir, exist_ok=True)
        try:
            loop.run(config, workdir)
        except Exception:
            with open(os.path.join(workdir, "error.txt"), "w", encoding="utf-8") as f:
                f.write(traceback.format_exc())


FROZEN = "model/embed/.*,model/layers/mlp/gate/.*"  # embeddings and one stacked projection


def frozen(args) -> None:
    """``loop.run`` with ``config.train.freeze=FROZEN`` on the mesh ``--mesh`` over all devices (kto in
    reference mode "model", whose frozen leaves come from the reference; dpo with a cached reference,
    whose frozen leaves travel on their own): its metric rows, and its final weights
    (``setup.load_run``) and initial weights as npz."""
    from kto_jax.models.hf import init_params
    from kto_jax.train import loop, setup
    from kto_jax.train.plan import make_plan

    config = small_config(args.loss, args.data_dir, steps=args.steps)
    config.train.optimizer.update(dict(name="sgd", lr=0.1, warmup_steps=0))
    config.train.freeze = FROZEN
    if args.lora:  # LoRA instead: every base leaf frozen, the adapters train
        config.train.freeze = ""
        config.model.lora.update(dict(rank=4, targets="all_linear"))
    config.checkpoint.every_steps = 1
    if args.loss == "dpo":
        config.reference.mode = "cached"
    plan = make_plan(config, 1)
    initial = setup.load_model(plan, None)[1] if args.lora else init_params(plan.model_config, seed=config.seed)
    np.savez(os.path.join(args.out, "initial.npz"), **_named(initial))
    d, f, t = MESHES[args.mesh]
    config.mesh.update(dict(data=d, fsdp=f, tensor=t))
    workdir = os.path.join(args.out, "run")
    loop.run(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as fh:
        summary = {"metrics": [row for row in map(json.loads, fh) if "loss" in row], "devices": jax.device_count()}
    np.savez(os.path.join(args.out, "final.npz"), **_named(setup.load_run(workdir).params))
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)


def _named(params) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sharded")
    p.add_argument("--loss", required=True)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p = sub.add_parser("packed")
    p.add_argument("--loss", required=True)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p = sub.add_parser("sync")
    p.add_argument("--loss", required=True)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p = sub.add_parser("frozen")
    p.add_argument("--loss", required=True)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--mesh", required=True, choices=sorted(MESHES))
    p.add_argument("--data_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p = sub.add_parser("losses")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("names", nargs="+")
    args = parser.parse_args()
    register_test_preset()
    commands = {"sharded": sharded, "packed": packed, "sync": sync, "losses": losses, "frozen": frozen}
    commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
