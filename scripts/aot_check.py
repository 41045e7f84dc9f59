"""Compile the real train step ahead of time for a TPU topology, from a CPU host.

    python scripts/aot_check.py --config experiments/paper.py:model=llama-30b,loss=kto --topology v5p-64
    python scripts/aot_check.py --sweep experiments/sweeps/paper_fit.py --out fit   # fit.md + fit.json
    python scripts/aot_check.py --sweep experiments/sweeps/qwen3_fit.py --smallest --out qwen3_fit

Prints per-chip memory (arguments, outputs, temporaries, total against the chip's HBM),
whether it fits, and XLA's FLOPs (loops counted in full: kto_jax.train.aot.xla_step_flops) beside the
analytic count of kto_jax/train/flops.py. ``--smallest``: instead of the config's target, the
smallest slice of the target's TPU generation the step fits on (compiled for each size upward from
the smallest until one fits; the row says which, and the JSON lists every size tried). Needs libtpu
(``pip install -e '.[tpu]'``); nothing is allocated and no TPU is needed.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from kto_jax.errors import InputError  # noqa: E402
from kto_jax.sweeps import apply_overrides, expand, load_config, load_sweep  # noqa: E402
from kto_jax.train.aot import TOPOLOGIES, compile_train_step, topology_devices  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/NAME.py[:ARGS]", lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", "", "Cloud TPU accelerator type, e.g. v5p-64 (default: the config's target)."
)
_SWEEP = flags.DEFINE_string("sweep", "", "A sweep file: compile every config of it.")
_OUT = flags.DEFINE_string("out", "", "With --sweep: write OUT.md and OUT.json.")
_SMALLEST = flags.DEFINE_bool(
    "smallest", False, "The smallest slice of the target's generation that fits, instead of the target."
)

COLUMNS = (
    "model",
    "loss",
    "lora_rank",
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


def slices_upward(topology: str) -> list[str]:
    """The slices of ``topology``'s generation, smallest first (``v5p-64`` -> v5p-8, v5p-16, ...)."""
    family = TOPOLOGIES[topology][0]
    return sorted((t for t, (f, _) in TOPOLOGIES.items() if f == family), key=lambda t: int(t.rsplit("-", 1)[1]))


def smallest_fit(config, topology: str) -> dict:
    """The report of the smallest slice of ``topology``'s generation whose per-chip memory fits;
    ``tried`` lists (slice, total GiB per chip or the plan's error) of every size compiled."""
    tried = []
    for candidate in slices_upward(topology):
        try:
            report = check(config, candidate)
        except InputError as e:  # e.g. more batch shards than examples: no larger slice will do
            tried.append((candidate, str(e).splitlines()[0]))
            break
        except Exception as e:  # the TPU compiler refuses a program that cannot fit (CompileTimeHbmOom)
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            tried.append((candidate, "out of memory at compile time"))
            print(f"  {config.model.name} on {candidate}: out of memory at compile time", flush=True)
            continue
        tried.append((candidate, round(report["total_gib"], 2)))
        print(
            f"  {config.model.name} {report['loss']} on {candidate}: {report['total_gib']:.1f} GiB per chip", flush=True
        )
        if report["fits"]:
            return {**report, "tried": tried}
    raise InputError(f"{config.model.name}: fits on no slice of {topology}'s generation; tried {tried}")


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
            config = apply_overrides(load_config(entry["config"]), entry.get("overrides", {}))
            topology = config.target.topology or _TOPOLOGY.value
            reports.append(smallest_fit(config, topology) if _SMALLEST.value else check(config, topology))
            print(json.dumps(reports[-1]), flush=True)
    else:
        if _CONFIG.value is None:
            raise app.UsageError("give --config or --sweep")
        topology = _TOPOLOGY.value or _CONFIG.value.target.topology
        if not topology:
            raise app.UsageError("the config names no target topology (config.target.topology): pass --topology")
        reports.append(smallest_fit(_CONFIG.value, topology) if _SMALLEST.value else check(_CONFIG.value, topology))
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
