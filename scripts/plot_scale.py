"""Scale curves: win rate - 0.5 against model size per method, like the KTO paper's Figure 3.

    python scripts/plot_scale.py runs/tiny_scale/* --out curves.png [--reference JUDGMENTS.jsonl] [--overlay-paper]

RUNS are workdirs whose eval.json has a win rate (others, such as the SFT baselines
themselves, are listed as skipped): the paper's quantity, wins / total of pairwise verdicts
against the dataset's SFT target (the ``pairwise`` evaluator or scripts/judge.py), or, drawn
dotted and labelled as not on the paper's scale, a pairwise or unary win rate against another run. ``--reference`` reads
the judgment log the KTO authors published (shared/reference/archangel_gpt4_judgments.jsonl);
``--overlay-paper`` draws those curves beside the runs. Two panels: without and with SFT
first (a panel only where there are runs); 90% binomial intervals as error bars. Prints a markdown table (and the paper's
imbalance table when the reference has one); ``--table`` writes it to a file too.
"""

from __future__ import annotations

import json
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kto_jax.results import imbalance_table, markdown_table, read_judgments, read_runs  # noqa: E402

_OUT = flags.DEFINE_string("out", "curves.png", "Output PNG.")
_REFERENCE = flags.DEFINE_string("reference", "", "The authors' judgment log (jsonl).")
_OVERLAY = flags.DEFINE_bool("overlay-paper", False, "Draw the reference curves beside the runs.")
_TABLE = flags.DEFINE_string("table", "", "Also write the markdown table here.")


def family(model: str) -> str:
    """Model family for line grouping: pythia1-4b -> pythia, llama-7b -> llama, tiny-5m -> tiny."""
    match = re.match(r"[a-z]+", model)
    return match.group(0) if match else model


def plot(rows, out: str, title: str = "") -> None:
    """One panel per setting that has rows: alignment from the base model, and SFT first."""
    panels = [
        (sft_first, [r for r in rows if r.sft_first == sft_first or (sft_first and r.method == "sft")])
        for sft_first in (False, True)
    ]
    panels = [(sft_first, panel) for sft_first, panel in panels if any(r.method != "sft" for r in panel)] or panels[:1]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 0.5, 4.2), sharey=True, squeeze=False)
    axes = axes[0]
    methods = sorted({r.base_method for r in rows})
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    for ax, (sft_first, panel) in zip(axes, panels):
        labelled = set()
        keys = sorted({(r.source.split(":")[0], r.protocol, r.base_method, family(r.model)) for r in panel})
        for source, protocol, method, fam in keys:
            series = sorted(
                (
                    r
                    for r in panel
                    if r.base_method == method
                    and family(r.model) == fam
                    and r.protocol == protocol
                    and r.source.startswith(source)
                ),
                key=lambda r: r.params,
            )
            x = [max(r.params, 1) for r in series]
            y = [r.winrate - 0.5 for r in series]
            err = [[r.winrate - r.ci90[0] for r in series], [r.ci90[1] - r.winrate for r in series]]
            label = (
                f"{method} (paper)"
                if source == "paper"
                else method
                if protocol == "paper"
                else f"{method} [{protocol}]"
            )
            style = "--" if source == "paper" else "-" if protocol == "paper" else ":"  # dotted: not the paper's scale
            ax.errorbar(
                x,
                y,
                yerr=err,
                fmt="o" + style,
                capsize=3,
                color=colors[method],
                alpha=0.55 if source == "paper" and len({r.source.split(":")[0] for r in rows}) > 1 else 1.0,
                label=None if label in labelled else label,
            )
            labelled.add(label)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("parameters (one line per model family)")
        ax.set_title(
            "SFT first, then alignment (SFT shown for reference)" if sft_first else "alignment from the base model"
        )
        ax.legend(fontsize=7)
    axes[0].set_ylabel("win rate - 0.5 (90% CI)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def has_winrate(workdir: str) -> bool:
    try:
        with open(os.path.join(workdir, "eval.json"), encoding="utf-8") as f:
            results = json.load(f)
        return "pairwise" in results or "winrate" in results
    except (OSError, ValueError):
        return False


def main(argv):
    runs = [r for r in argv[1:] if has_winrate(r)]
    skipped = sorted(set(argv[1:]) - set(runs))
    if skipped:  # SFT baselines, unfinished or unjudged runs: counted, named, not plotted
        print(f"skipped {len(skipped)} run(s) with no win rate in eval.json: {', '.join(skipped)}", file=sys.stderr)
    if argv[1:] and not runs:
        raise app.UsageError(
            "no run has a win rate: judge runs pairwise (evaluator 'pairwise' or scripts/judge.py), "
            "or with config.eval.baseline set"
        )
    rows = read_runs(runs) if runs else []
    off_scale = [r for r in rows if r.protocol != "paper"]
    if off_scale:  # drawn dotted and labelled: the paper's numbers are pairwise against the SFT target
        print(
            f"{len(off_scale)} run(s) not judged by the paper's protocol (pairwise against the SFT target), not on its "
            f"scale: {', '.join(sorted({r.source[4:] + ' [' + r.protocol + ']' for r in off_scale}))}",
            file=sys.stderr,
        )
    reference = read_judgments(_REFERENCE.value) if _REFERENCE.value else []
    scale = [r for r in reference if r.source.startswith("paper:archangel_")]
    if not rows and not scale:
        raise app.UsageError("give run directories and/or --reference")
    drawn = rows + (scale if (_OVERLAY.value or not rows) else [])
    plot(drawn, _OUT.value)
    table = markdown_table(drawn)
    if any(r.source.startswith("paper:fracdata") for r in reference):
        table += "\n\nData imbalance (KTO paper, LLaMA-7B):\n\n" + imbalance_table(reference)
    print(table)
    if _TABLE.value:
        with open(_TABLE.value, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    print(f"wrote {_OUT.value}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
