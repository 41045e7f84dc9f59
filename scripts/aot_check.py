"""Compile the real train step ahead of time for a TPU topology, from a CPU host.

    python scripts/aot_check.py --config experiments/paper.py:model=llama-30b,loss=kto --topology v5p-64
    python scripts/aot_check.py --sweep experiments/sweeps/paper_fit.py --out fit   # fit.md + fit.json

Prints per-chip memory (arguments, outputs, temporaries, total against the chip's HBM),
whether it fits, and XLA's FLOPs (loops counted in full: kto_jax.train.aot.xla_step_flops) beside the
analytic count of kto_jax/train/flops.py. Needs libtpu
(``pip install -e '.[tpu]'``); nothing is allocated and no TPU is needed.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from kto_jax.sweeps import expand, load_config, load_sweep  # noqa: E402
from kto_jax.train.aot import compile_train_step, topology_devices  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/NAME.py[:ARGS]", lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", "", "Cloud TPU accelerator type, e.g. v5p-64 (default: the config's target)."
)
_SWEEP = flags.DEFINE_string("sweep", "", "A sweep file: compile every config of it.")
_OUT = flags.DEFINE_string("out", "", "With --sweep: write OUT.md and OUT.json.")

COLUMNS = (
    "model",
    "loss",
    "topology",
    "mesh",
    "remat",
    "attention",
    "arguments_gib",
    "temporaries_gib",
    "total_gib",
    "hbm_gib",
    "fits",
    "headroom_gib",
    "xla_tflops_per_chip",
    "analytic_tflops_per_chip",
    "xla_over_analytic",
)


def check(config, topology: str) -> dict:
    report = compile_train_step(config, topology_devices(topology))
    report["topology"] = topology
    report["xla_tflops_per_chip"] = report["xla_flops_per_chip"] / 1e12
    report["analytic_tflops_per_chip"] = report["analytic_flops_per_chip"] / 1e12
    report["xla_over_analytic"] = report["xla_flops_per_chip"] / report["analytic_flops_per_chip"]
    return report


def row(report: dict) -> str:
    cells = []
    for c in COLUMNS:
        v = report.get(c)
        cells.append(
            f"{v:.2f}"
            if c == "xla_over_analytic"
            else f"{v:.1f}"
            if isinstance(v, float)
            else ("x".join(f"{k}{n}" for k, n in v.items()) if isinstance(v, dict) else str(v))
        )
    return "| " + " | ".join(cells) + " |"


def main(argv):
    del argv
    reports = []
    if _SWEEP.value:
        for entry in expand(load_sweep(_SWEEP.value)):
            config = load_config(entry["config"])
            reports.append(check(config, config.target.topology or _TOPOLOGY.value))
            print(json.dumps(reports[-1]), flush=True)
    else:
        if _CONFIG.value is None:
            raise app.UsageError("give --config or --sweep")
        topology = _TOPOLOGY.value or _CONFIG.value.target.topology
        if not topology:
            raise app.UsageError("the config names no target topology (config.target.topology): pass --topology")
        reports.append(check(_CONFIG.value, topology))
        print(json.dumps(reports[-1], indent=2))
    table = "\n".join(["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)] + [row(r) for r in reports])
    print(table)
    if _OUT.value:
        with open(_OUT.value + ".md", "w", encoding="utf-8") as f:
            f.write(table + "\n")
        with open(_OUT.value + ".json", "w", encoding="utf-8") as f:
            json.dump(reports, f, indent=2)


if __name__ == "__main__":
    app.run(main)
