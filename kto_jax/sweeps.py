"""Sweeps: named lists of runs built from config arguments (products and zips).

A sweep file (``experiments/sweeps/NAME.py``) defines ``get_sweep()`` returning a list of
runs, each ``{"config": "experiments/paper.py:model=llama-7b,loss=kto", "overrides": {...}}``;
``product`` and ``zipped`` build such lists. Every run gets a workdir named from its
arguments, so rerunning a sweep finds its finished and unfinished runs.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re

from kto_jax.errors import InputError, MissingInput


def config_args(spec: str) -> dict:
    """``experiments/x.py:a=1,b=2`` -> {"a": "1", "b": "2"}."""
    _, _, arg = spec.partition(":")
    return dict(item.split("=", 1) for item in filter(None, arg.split(",")))


def _module(path: str, name: str):
    if not os.path.exists(path):
        raise MissingInput(f"{path!r} not found")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(spec: str):
    """The ConfigDict of ``experiments/NAME.py[:ARGS]`` (as the CLI's --config builds it)."""
    path, _, arg = spec.partition(":")
    return _module(path, "experiment_config").get_config(arg)


def load_sweep(path: str) -> list[dict]:
    return _module(path, "sweep").get_sweep()


def product(config: str, overrides: dict | None = None, module: str = "kto_jax.train", **axes) -> list[dict]:
    """Every combination of the axes' values: product("experiments/paper.py", model=[...], loss=[...]);
    ``module`` is the CLI that runs them (``kto_jax.online`` for online rounds)."""
    keys = list(axes)
    return [_run(config, dict(zip(keys, values)), overrides, module) for values in itertools.product(*axes.values())]


def zipped(config: str, overrides: dict | None = None, module: str = "kto_jax.train", **axes) -> list[dict]:
    """The axes' values taken together, position by position (all axes the same length)."""
    lengths = {len(v) for v in axes.values()}
    if len(lengths) != 1:
        raise InputError(f"zipped sweep axes have different lengths: { {k: len(v) for k, v in axes.items()} }")
    keys = list(axes)
    return [_run(config, dict(zip(keys, values)), overrides, module) for values in zip(*axes.values())]


def _run(config: str, args: dict, overrides: dict | None, module: str = "kto_jax.train") -> dict:
    arg = ",".join(f"{k}={v}" for k, v in args.items())
    return {"config": f"{config}:{arg}", "args": args, "overrides": dict(overrides or {}), "module": module}


def run_name(run: dict) -> str:
    """A workdir name from a run's arguments: model=llama-7b,loss=kto -> llama-7b_kto (values only)."""
    parts = [str(v) for v in run["args"].values()] + [
        f"{k.split('.')[-1]}{v}" for k, v in sorted(run["overrides"].items())
    ]
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", "_".join(parts)).strip("-")


def apply_overrides(config, overrides: dict):
    """``config`` with a run's ``overrides`` ({"model.lora.rank": 16, ...}) set, as the CLI's
    ``--config.KEY=VALUE`` flags set them (the scripts that build configs in-process: aot_check)."""
    for key, value in overrides.items():
        node = config
        *parents, field = key.split(".")
        for part in parents:
            node = node[part]
        if field not in node:
            raise InputError(f"sweep override {key}={value!r}: the config has no {key}")
        node[field] = type(node[field])(value) if node[field] is not None else value
    return config


def expand(runs: list[dict], root: str = "runs") -> list[dict]:
    """Runs with their workdir (``root/name``) filled in; names must be unique."""
    out, seen = [], set()
    for run in runs:
        name = run.get("name") or run_name(run)
        if name in seen:
            raise InputError(f"two runs of the sweep are both named {name!r}; give them distinct arguments or names")
        seen.add(name)
        out.append({**run, "name": name, "workdir": os.path.join(root, name)})
    return out
