"""CLI: python -m kto_jax.train --config experiments/NAME.py[:ARGS] --workdir DIR [--config.key=value ...]

The console shows the progress bar, the run's events (resume, caches, judged rates) and
warnings; ``--verbosity=0`` (absl's flag) brings back every library's INFO log (orbax's
per-checkpoint lines among them).
"""

from __future__ import annotations

import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from kto_jax import sharding
from kto_jax.train.loop import run

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/NAME.py[:ARGS]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, evals and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def check_overrides(argv: list[str]) -> str | None:
    """A clear message for a ``--config.a.b=v`` whose key the config does not have (the locked
    config would otherwise fail with a bare AttributeError), else None."""
    spec, keys = None, []
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
        elif arg.startswith("--config."):
            keys.append(arg[len("--config."):].split("=", 1)[0])
    if not spec or not keys:
        return None
    try:
        from kto_jax.sweeps import load_config

        config = load_config(spec)
    except Exception:  # a bad --config itself: config_flags reports it
        return None
    for key in keys:
        node, parts = config, key.split(".")
        for j, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(["config", *parts[:j]])
                fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                message = f"--config.{key}: {where} has no field {part!r}; its fields: {fields}"
                if parts[0] == "loss":
                    message += (f". Loss {config.loss.name!r} takes {sorted(k for k in config.loss if k != 'name')}; "
                                f"for another loss choose it in the experiment argument ({spec.split(':')[0]}:loss=NAME)")
                return message
            node = node[part]
    return None


def quiet_by_default() -> None:
    """Library INFO logs (orbax writes ~30 lines per checkpoint) stay hidden unless --verbosity is given."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()  # dataset preparation's per-split bars; data_stats.json has the counts


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_by_default()
    sharding.initialize_distributed()
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    problem = check_overrides(sys.argv)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    app.run(main)
