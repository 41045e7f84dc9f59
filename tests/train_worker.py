"""Subprocess entry points of the training-engine tests (run as ``python -m tests.train_worker``).

JAX fixes its device count when the backend starts, and pytest's process already started it
with one CPU device, so runs on simulated meshes (XLA_FLAGS=--xla_force_host_platform_device_count)
or in several processes happen here; results come back as JSON/npz files.

    sharded   --loss L --data_dir D --out DIR [--steps N]
        the train step on meshes (data, fsdp, tensor) = (1,1,1) on one device, (8,1,1), (2,2,2),
        (1,4,2) (sgd, lr 0.1); state and jit as in kto_jax.train.loop.run, with the optimizer state placed on
        the params' shardings. Then kto_jax.train.loop.run itself on the (2,2,2) mesh.
    losses    --data_dir D --out DIR L1 L2 ...
        kto_jax.train.loop.run(small config, DIR/L) for each loss, one step each.
    train     --fix_opt_state_placement -- CLI ARGS
        python -m kto_jax.train CLI ARGS, with the optimizer state created on the params'
        shardings (a work-around for loop.run placing it on one device; see test_train_multiprocess).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import traceback

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from tests.train_helpers import register_test_preset, small_config  # noqa: E402

MESHES = {"1x1x1": (1, 1, 1), "8x1x1": (8, 1, 1), "2x2x2": (2, 2, 2), "1x4x2": (1, 4, 2)}


def opt_state_shardings(optimizer, params, mesh):
    """The optimizer state's shardings: a param's sharding for its moments, replicated otherwise."""
    from kto_jax import sharding

    abstract = jax.eval_shape(optimizer.init, params)
    return optax.tree_map_params(
        optimizer, lambda _, s: s, abstract, jax.tree_util.tree_map(lambda x: x.sharding, params),
        transform_non_params=lambda _: sharding.replicated(mesh),
    )


def sharded(args) -> None:
    from kto_jax import sharding
    from kto_jax.data.tokenize import get_tokenizer
    from kto_jax.models.hf import from_hf
    from kto_jax.train import loop, setup
    from kto_jax.train.state import TrainState, learning_rate, make_optimizer
    from kto_jax.train.step import StepSpec, train_step

    assert jax.device_count() == 8, jax.devices()
    config = small_config(args.loss, args.data_dir, steps=args.steps)
    # sgd: the param updates are the (clipped) gradients, so small reduction-order differences stay
    # small (adam's first steps, g / (|g| + eps), would blow them up for near-zero gradients)
    config.train.optimizer.update(dict(name="sgd", lr=0.1, warmup_steps=0))
    spec, hparams = setup.loss_and_hparams(config)
    data = setup.load_split(config, spec, config.data.train_split)
    loader = setup.make_loader(config, spec, data, get_tokenizer("bytes"), seed=config.seed)
    batches = [next(loader) for _ in range(args.steps)]
    optimizer = make_optimizer(config.train.optimizer)
    lr_fn = functools.partial(learning_rate, config.train.optimizer)
    summary = {}
    for name, (d, f, t) in MESHES.items():
        devices = jax.devices()[: d * f * t]
        mesh = sharding.make_mesh({"data": d, "fsdp": f, "tensor": t}, devices=devices)
        model, model_params = from_hf(config.model.name, mesh=mesh, seed=config.seed, **setup.model_overrides(config))
        step_spec = StepSpec(model, spec, tuple(sorted(hparams.items())), int(config.train.num_microbatches), "model", int(config.train.chunk_size))
        reference = jax.tree_util.tree_map(lambda x: x.copy(), model_params)
        params = {"model": model_params}
        repl = sharding.replicated(mesh)
        state = TrainState(
            step=jax.device_put(jnp.zeros((), jnp.int32), repl),
            params=params,
            opt_state=jax.jit(optimizer.init, out_shardings=opt_state_shardings(optimizer, params, mesh))(params),
            rng=jax.device_put(jax.random.PRNGKey(config.seed), repl),
            loss_state={},
            nonfinite_skipped=jax.device_put(jnp.zeros((), jnp.int32), repl),
        )
        shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
        fn = jax.jit(functools.partial(train_step, step_spec, optimizer, lr_fn), in_shardings=(shardings, None, None),
                     out_shardings=(shardings, None), donate_argnums=(0,))
        rows = []
        with sharding.activation_rules(mesh):
            for batch in batches:
                state, metrics = fn(state, setup.to_global(batch, mesh), reference)
                rows.append({k: float(v) for k, v in jax.device_get(metrics).items()})
        leaves = jax.tree_util.tree_leaves_with_path(state.params["model"])
        np.savez(os.path.join(args.out, f"params_{name}.npz"), **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})
        summary[name] = {
            "metrics": rows,
            "devices": len(mesh.devices.flat),
            "sharded_params": sorted(jax.tree_util.keystr(p) for p, x in leaves if not x.sharding.is_fully_replicated),
            "param_specs": {jax.tree_util.keystr(p): str(x.sharding.spec) for p, x in leaves},
        }

    # the training loop itself on a (2, 2, 2) mesh of the 8 devices
    config.mesh.update(dict(data=2, fsdp=2, tensor=2))
    workdir = os.path.join(args.out, "loop_2x2x2")
    try:
        loop.run(config, workdir)
        with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
            summary["loop_2x2x2"] = {"metrics": [row for row in map(json.loads, f) if "loss" in row]}
    except Exception as e:  # reported by the test
        summary["loop_2x2x2"] = {"error": f"{type(e).__name__}: {e}"[:3000], "traceback": traceback.format_exc()[-3000:]}
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)


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


def train(args) -> None:
    """The CLI (kto_jax.train.__main__), with the optimizer state placed like the params."""
    from absl import app

    from kto_jax.train import __main__ as cli
    from kto_jax.train import loop

    if args.fix_opt_state_placement:
        original = loop.TrainState

        def placed(**fields):
            params = fields["params"]
            mesh = jax.tree_util.tree_leaves(params)[0].sharding.mesh
            optimizer = loop.make_optimizer(placed.config.train.optimizer)
            fields["opt_state"] = jax.jit(optimizer.init, out_shardings=opt_state_shardings(optimizer, params, mesh))(params)
            return original(**fields)

        run = loop.run

        def run_with_config(config, workdir):
            placed.config = config
            return run(config, workdir)

        loop.TrainState = placed
        cli.run = run_with_config
    app.run(cli.main, argv=["kto_jax.train", *args.cli])


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sharded")
    p.add_argument("--loss", required=True)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p = sub.add_parser("losses")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("names", nargs="+")
    p = sub.add_parser("train")
    p.add_argument("--fix_opt_state_placement", action="store_true")
    p.add_argument("cli", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if getattr(args, "cli", None) and args.cli[0] == "--":
        args.cli = args.cli[1:]
    register_test_preset()
    {"sharded": sharded, "losses": losses, "train": train}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
