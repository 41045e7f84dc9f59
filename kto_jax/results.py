"""Scale-curve results: the KTO authors' judgment logs and this project's runs, as one table.

A row is one judged run: method (``sft``, ``kto``, ``sft+kto``, ``unaligned``, ...), model,
its parameter count, wins, total and the win rate with its 90% binomial interval. The paper
(Figure 3) plots win rate - 0.5 against model size, methods with and without SFT first.

    rows = read_judgments("archangel_gpt4_judgments.jsonl")   # exp_name archangel_{method}_{model}
    rows += read_runs(["runs/tiny_kto", ...])                  # eval.json + config.json of our runs
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable

from kto_jax.errors import InputError
from kto_jax.models import param_count
from kto_jax.models.hf_config import config_from_hf
from kto_jax.models.presets import PRESETS
from kto_jax.stats import clopper_pearson_interval

# model names used in the authors' experiment names -> presets
PAPER_MODELS = {
    "pythia1-4b": "pythia-1.4b",
    "pythia2-8b": "pythia-2.8b",
    "pythia6-9b": "pythia-6.9b",
    "pythia12-0b": "pythia-12b",
    "llama7b": "llama-7b",
    "llama13b": "llama-13b",
    "llama30b": "llama-30b",
    "mistral7b": "mistral-7b",
}


@dataclasses.dataclass(frozen=True)
class Result:
    method: str
    model: str
    params: int
    wins: float
    total: int
    source: str
    extra: tuple = ()
    # how the win rate was judged: "paper" (pairwise against the dataset's SFT target, wins / total:
    # the authors' logs and kto-jax's pairwise evaluator), "pairwise-run" (pairwise against another
    # run's samples), "unary-run" (a unary judge on both runs' samples, ties counted half)
    protocol: str = "paper"

    @property
    def label(self) -> str:
        """The method, with the protocol when it is not the paper's (such rows are not on its scale)."""
        return self.method if self.protocol == "paper" else f"{self.method} [{self.protocol}]"

    @property
    def winrate(self) -> float:
        return self.wins / self.total

    @property
    def ci90(self) -> tuple[float, float]:
        return clopper_pearson_interval(self.wins, self.total, 0.9)

    @property
    def sft_first(self) -> bool:
        return self.method.startswith("sft+")

    @property
    def base_method(self) -> str:
        return self.method.split("+", 1)[1] if self.sft_first else self.method


def _params(preset: str) -> int:
    return param_count(PRESETS[preset]) if preset in PRESETS else 0


def read_judgments(path: str) -> list[Result]:
    """The authors' GPT-4 judgments: win rate = candidate wins / total (ties are not wins)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            name = row["exp_name"]
            config = row.get("config", {})
            extra = ()
            if name.startswith("archangel_"):
                _, method, model = name.split("_", 2)
            elif name.startswith("fracdata_"):  # KTO with a fraction of one class kept
                model = name.split("_")[2]
                method = f"kto[desirable={config.get('frac_unique_desirable')},undesirable={config.get('frac_unique_undesirable')}]"
                loss = config.get("loss", {})
                extra = (
                    ("desirable_fraction", config.get("frac_unique_desirable")),
                    ("undesirable_fraction", config.get("frac_unique_undesirable")),
                    ("desirable_weight", loss.get("desirable_weight")),
                    ("undesirable_weight", loss.get("undesirable_weight")),
                )
            else:  # {method}_{model}_{dataset}, the Mistral-7B OASST runs
                method, model, dataset = name.split("_")
                extra = (("dataset", dataset),)
            preset = PAPER_MODELS.get(model.replace("-instruct", ""), model)
            out.append(
                Result(
                    method,
                    model,
                    _params(preset),
                    float(row["candidate"]["wins"]),
                    int(row["total"]),
                    "paper:" + name,
                    extra,
                )
            )
    return out


def run_winrate(results: dict, workdir: str = "") -> tuple[float, int, str]:
    """(wins, total, protocol) of a run's eval.json: the pairwise protocol's wins / total when it was
    judged pairwise (against the SFT target: the paper's quantity), else the unary win rate against
    its baseline run (wins + half the ties)."""
    if "pairwise" in results:
        p = results["pairwise"]
        return float(p["wins"]), int(p["n"]), "paper" if p.get("against") == "sft_target" else "pairwise-run"
    if "winrate" in results:
        wr = results["winrate"]
        return wr["wins"] + 0.5 * wr["ties"], int(wr["n"]), "unary-run"
    raise InputError(
        f"{workdir}/eval.json has no win rate: judge the run pairwise (config.eval.evaluators with "
        "'pairwise', or scripts/judge.py) or set config.eval.baseline"
    )


def read_runs(workdirs: Iterable[str]) -> list[Result]:
    """This project's runs: ``eval.json``'s win rate (:func:`run_winrate`), ``config.json``'s model
    and loss; a run that started from another run's weights counts as SFT first when that run
    was an SFT run (its config.json says so)."""
    out = []
    for workdir in workdirs:
        with open(os.path.join(workdir, "eval.json"), encoding="utf-8") as f:
            results = json.load(f)
        with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        wins, total, protocol = run_winrate(results, workdir)
        method = config["loss"]["name"]
        init = config.get("init", {}).get("source", "")
        if init.startswith("orbax:") and method not in ("sft", "csft") and _is_sft_run(init[6:].split("@")[0]):
            method = "sft+" + method
        model, params = run_model(config["model"]["name"])
        out.append(Result(method, model, params, wins, total, "run:" + workdir, protocol=protocol))
    return out


def run_model(name: str) -> tuple[str, int]:
    """(model, parameter count) of a run's ``config.model.name``: a preset as itself; a Hugging Face
    folder (``weights=/models/Qwen3-8B-Base``) by its folder name, lower-cased, and the count of its
    config.json (0 when the folder is not on this machine: the row then has no size to plot at)."""
    if name in PRESETS:
        return name, _params(name)
    folder = os.path.expanduser(name.rstrip("/"))
    label = os.path.basename(folder).lower() or name
    file = os.path.join(folder, "config.json")
    if not os.path.isfile(file):
        return label, 0
    with open(file, encoding="utf-8") as f:
        return label, param_count(config_from_hf(json.load(f)))


def _is_sft_run(workdir: str) -> bool:
    try:
        with open(os.path.join(os.path.expanduser(workdir), "config.json"), encoding="utf-8") as f:
            return json.load(f)["loss"]["name"] in ("sft", "csft")
    except (OSError, KeyError, ValueError):
        return False


def markdown_table(rows: list[Result]) -> str:
    """Methods as rows, models (by size) as columns, win rate [90% interval] in the cells."""
    models = sorted({(r.params, r.model) for r in rows})
    methods = sorted({r.label for r in rows}, key=lambda m: (m.startswith("sft+"), m))
    cell = {(r.label, r.model): r for r in rows}
    lines = ["| method | " + " | ".join(m for _, m in models) + " |", "|---|" + "---|" * len(models)]
    for method in methods:
        cells = []
        for _, model in models:
            r = cell.get((method, model))
            cells.append(f"{r.winrate:.3f} [{r.ci90[0]:.3f}, {r.ci90[1]:.3f}]" if r else "")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def imbalance_table(rows: list[Result]) -> str:
    """The paper's data-imbalance runs (``fracdata_*``): fractions kept, weights, win rate."""
    lines = [
        "| model | desirable kept | undesirable kept | desirable_weight | undesirable_weight | win rate [90%] |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(
        (r for r in rows if r.source.startswith("paper:fracdata")),
        key=lambda r: (dict(r.extra)["desirable_fraction"], dict(r.extra)["undesirable_fraction"]),
    ):
        e = dict(r.extra)
        lines.append(
            f"| {r.model} | {e['desirable_fraction']} | {e['undesirable_fraction']} | {e['desirable_weight']} | "
            f"{e['undesirable_weight']} | {r.winrate:.3f} [{r.ci90[0]:.3f}, {r.ci90[1]:.3f}] |"
        )
    return "\n".join(lines)


def runs_table(workdirs: Iterable[str]) -> str:
    """One row per run (a before/after table): loss, steps trained, the judged desirable rate (unary
    view) and the pairwise win rate (wins / total, ties and unparseable as non-wins) with the counts
    and what it was judged against."""
    lines = [
        "| run | loss | steps | judged desirable [90%] | pairwise against | wins / ties / losses / unparseable | win rate [90%] |",
        "|---|---|---|---|---|---|---|",
    ]
    for workdir in workdirs:
        with open(os.path.join(workdir, "eval.json"), encoding="utf-8") as f:
            results = json.load(f)
        with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        g, p = results.get("generation"), results.get("pairwise")
        unary = f"{g['desirable_rate']:.3f} [{g['ci90'][0]:.3f}, {g['ci90'][1]:.3f}] (n={g['n']})" if g else ""
        against = (
            (p["against"] if p["against"] == "sft_target" else os.path.basename(os.path.normpath(p["against"])))
            if p
            else ""
        )
        counts = f"{p['wins']} / {p['ties']} / {p['baseline_wins']} / {p['unparseable']}" if p else ""
        rate = f"{p['winrate']:.3f} [{p['ci90'][0]:.3f}, {p['ci90'][1]:.3f}]" if p else ""
        loss = "(none: the starting model)" if config.get("eval", {}).get("only") else config["loss"]["name"]
        lines.append(
            f"| {os.path.basename(os.path.normpath(workdir))} | {loss} | {results.get('step', '')} | {unary} | {against} | {counts} | {rate} |"
        )
    return "\n".join(lines)
