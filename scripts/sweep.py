"""Launch a sweep of runs: locally one after another, as a SLURM array, or on a TPU VM slice.

    python scripts/sweep.py experiments/sweeps/tiny_scale.py --launcher local
    python scripts/sweep.py experiments/sweeps/paper.py --launcher slurm --nodes 2 --gpus-per-node 8 --dry-run
    python scripts/sweep.py experiments/sweeps/paper.py --launcher tpu --tpu_name my-v5p-64 --zone us-east5-a --dry-run

Rerunning skips finished runs (those with eval.json) and resumes unfinished ones. Flags take
dashes or underscores (``--dry-run`` = ``--dry_run``).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kto_jax import launch  # noqa: E402
from kto_jax.sweeps import expand, load_sweep  # noqa: E402

_LAUNCHER = flags.DEFINE_enum("launcher", "local", ["local", "slurm", "tpu"], "Where to run.")
_ROOT = flags.DEFINE_string("root", "runs", "Workdirs go under ROOT/<run name>.")
_DRY = flags.DEFINE_bool("dry_run", False, "Print what would be run or submitted, do nothing.")
_NODES = flags.DEFINE_integer("nodes", 1, "SLURM: hosts per run.")
_PARTITION = flags.DEFINE_string("partition", "", "SLURM partition.")
_GPUS = flags.DEFINE_integer("gpus_per_node", 0, "SLURM: GPUs per host.")
_TIME = flags.DEFINE_string("time", "", "SLURM time limit.")
_TPU = flags.DEFINE_string("tpu_name", "", "TPU VM name.")
_ZONE = flags.DEFINE_string("zone", "", "TPU VM zone.")
_PROJECT = flags.DEFINE_string("project", "", "GCP project.")
_REPO = flags.DEFINE_string("repo_dir", "~/kto-jax", "TPU: the repository's path on the TPU VM hosts.")


def dashes_to_underscores(arg: str) -> str:
    """``--dry-run`` -> ``--dry_run``, ``--gpus-per-node=8`` -> ``--gpus_per_node=8`` (absl's spelling)."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg.partition("=")
    return name[:2] + name[2:].replace("-", "_") + eq + value


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: scripts/sweep.py SWEEP_FILE --launcher local|slurm|tpu [--dry-run]")
    runs = expand(load_sweep(argv[1]), _ROOT.value)
    print(f"{len(runs)} runs in {argv[1]}: {', '.join(r['name'] for r in runs)}")
    if _LAUNCHER.value == "local":
        launch.local(runs, dry_run=_DRY.value)
    elif _LAUNCHER.value == "slurm":
        launch.slurm(
            runs,
            _ROOT.value,
            dry_run=_DRY.value,
            nodes=_NODES.value,
            partition=_PARTITION.value,
            gpus_per_node=_GPUS.value,
            time_limit=_TIME.value,
        )
    else:
        if not (_TPU.value and _ZONE.value):
            raise app.UsageError("--launcher tpu needs --tpu_name and --zone")
        for cmd in launch.tpu_commands(runs, _TPU.value, _ZONE.value, _PROJECT.value, _REPO.value):
            print(("would run: " if _DRY.value else "run: ") + shlex.join(cmd), flush=True)
            if not _DRY.value:
                subprocess.run(cmd, check=True)


if __name__ == "__main__":
    app.run(main, argv=[dashes_to_underscores(a) for a in sys.argv])
