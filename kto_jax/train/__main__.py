"""CLI: python -m kto_jax.train --config experiments/NAME.py[:ARGS] --workdir DIR [--config.key=value ...]"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from kto_jax import sharding
from kto_jax.train.loop import run

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/NAME.py[:ARGS]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, evals and weights.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    sharding.initialize_distributed()
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
