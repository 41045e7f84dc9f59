"""A markdown table of finished runs: judged desirable rate and pairwise win rate, one row per run.

    python scripts/runs_table.py runs/smol-base runs/smol-kto runs/smol-dpo [--out table.md]

(kto_jax/results.py:runs_table; the SmolLM2 before/after table in docs/paper.md is made with it.)
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kto_jax.results import runs_table  # noqa: E402

_OUT = flags.DEFINE_string("out", "", "Also write the table here.")


def main(argv):
    if len(argv) < 2:
        raise app.UsageError("give one or more run directories")
    missing = [w for w in argv[1:] if not os.path.exists(os.path.join(w, "eval.json"))]
    if missing:
        raise app.UsageError(f"no eval.json in {', '.join(missing)}: finish (or evaluate) those runs first")
    table = runs_table(argv[1:])
    print(table)
    if _OUT.value:
        with open(_OUT.value, "w", encoding="utf-8") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    app.run(main)
