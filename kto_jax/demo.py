"""The embedded default: SFT a tiny Llama on the synthetic task, then align it with KTO and DPO.

    python -m kto_jax.demo [--workdir runs/demo] [--sft_steps 600] [--align_steps 200]

1. SFT from scratch on the synthetic mixture (desirable and undesirable completions alike):
   the model learns to write both kinds, about half the time each.
2. KTO, starting from the SFT weights (also the reference model), on unary feedback.
3. DPO, likewise, on the paired view.
Each model samples completions for held-out prompts; the exact judge scores them. Prints a
table of judged desirable rates with 90% intervals and writes ``WORKDIR/summary.json``.
"""

from __future__ import annotations

import os
import time

from absl import app, flags, logging

from kto_jax import files
from kto_jax.config import tiny_config
from kto_jax.train.loop import run

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where the three runs and summary.json go.")
_SFT_STEPS = flags.DEFINE_integer("sft_steps", 600, "SFT steps (batch 32).")
_ALIGN_STEPS = flags.DEFINE_integer("align_steps", 200, "KTO / DPO steps (batch 32).")
_LOSSES = flags.DEFINE_list("losses", ["kto", "dpo"], "Alignment losses to run after SFT.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    root = os.path.abspath(_WORKDIR.value)
    data_dir = os.path.join(root, "tensorflow_datasets")
    sft_dir = os.path.join(root, "sft")
    summary, start = {}, time.perf_counter()

    def train(name, steps, init="", baseline=""):
        config = tiny_config(loss=name, steps=steps, init=init)
        config.data.data_dir = data_dir
        config.eval.baseline = baseline
        results = run(config, os.path.join(root, name))
        row = dict(results["generation"])
        if "winrate" in results:
            row["winrate_vs_sft"] = results["winrate"]
        summary[name] = row
        print(
            f"{name}: judged desirable {row['desirable_rate']:.1%} ({time.perf_counter() - start:.0f}s elapsed)",
            flush=True,
        )

    train("sft", _SFT_STEPS.value)
    for loss in _LOSSES.value:
        train(loss, _ALIGN_STEPS.value, init=f"orbax:{sft_dir}", baseline=sft_dir)

    files.write_json(os.path.join(root, "summary.json"), summary)
    print(f"\n{'model':<6} {'judged desirable':>17} {'90% interval':>17} {'win rate vs SFT':>16}")
    for name, row in summary.items():
        lo, hi = row["ci90"]
        win = f"{row['winrate_vs_sft']['winrate']:.1%}" if "winrate_vs_sft" in row else ""
        print(f"{name:<6} {row['desirable_rate']:>17.1%} {f'[{lo:.1%}, {hi:.1%}]':>17} {win:>16}")
    print(f"\nwrote {os.path.join(root, 'summary.json')} in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    app.run(main)
