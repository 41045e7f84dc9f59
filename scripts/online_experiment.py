"""Online KTO rounds against offline KTO on the same budget, on the synthetic task (CPU, minutes).

    python scripts/online_experiment.py --workdir runs/online_experiment

1. SFT from scratch on the synthetic mixture (the demo's first run): both arms start from it.
2. Offline KTO: ``rounds * steps`` steps on the shipped synthetic feedback, from the SFT weights.
3. Online KTO (kto_jax/online/rounds.py, experiments/online.py): ``rounds`` rounds, each
   sampling ``samples`` completions for ``prompts`` new training prompts from the current
   policy, labelling them with the exact judge and training ``steps`` steps on them.
Same batch (32), learning rate and step count for both arms; every model is judged on the same
512 held-out prompts. Prints judged desirable rates with 90% intervals per round, writes
``WORKDIR/online_vs_offline_LOSS.json`` and ``.png`` (and ``--out`` copies). Rerunning resumes (each run's
own resume) and skips what is finished.
"""

from __future__ import annotations

import os
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags, logging  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kto_jax import files  # noqa: E402
from kto_jax.config import tiny_config  # noqa: E402
from kto_jax.online import rounds  # noqa: E402
from kto_jax.sweeps import load_config  # noqa: E402
from kto_jax.train.loop import run  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/online_experiment", "Where the runs, the summary and the plot go.")
_SFT_STEPS = flags.DEFINE_integer("sft_steps", 600, "SFT steps (batch 32).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Online rounds.")
_STEPS = flags.DEFINE_integer("steps", 64, "KTO steps per round (offline: rounds * steps).")
_PROMPTS = flags.DEFINE_integer("prompts", 256, "New prompts per round.")
_SAMPLES = flags.DEFINE_integer("samples", 4, "Completions per prompt.")
_LOSS = flags.DEFINE_string("loss", "kto", "The alignment loss of both arms.")
_FEEDBACK = flags.DEFINE_enum(
    "feedback",
    "binary",
    ["binary", "pairwise"],
    "The online rounds' feedback (pairwise: best against worst sample of each prompt, for DPO).",
)
_CARRY = flags.DEFINE_bool(
    "carry_optimizer",
    True,
    "Rounds > 1 go on with the last round's optimizer state (HALOs main); "
    "--nocarry_optimizer starts each round's optimizer afresh.",
)
_OUT = flags.DEFINE_string(
    "out",
    "",
    "Also write the summary and the plot as OUT.json and OUT.png (docs/training.md's: "
    "experiments/results/online_vs_offline).",
)


def rate(results: dict) -> dict:
    g = results["generation"]
    return {"desirable_rate": g["desirable_rate"], "ci90": g["ci90"], "n": g["n"]}


def plot(summary: dict, path: str) -> None:
    """Judged desirable rate per round (online) with the offline run at the same step count."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    online = [summary["sft"]] + summary["online"]
    xs = list(range(len(online)))
    ys = [r["desirable_rate"] for r in online]
    errors = [[y - r["ci90"][0] for y, r in zip(ys, online)], [r["ci90"][1] - y for y, r in zip(ys, online)]]
    ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=f"online {summary['loss']} (rounds)")
    off = summary["offline"]
    ax.errorbar(
        [xs[-1]],
        [off["desirable_rate"]],
        yerr=[[off["desirable_rate"] - off["ci90"][0]], [off["ci90"][1] - off["desirable_rate"]]],
        marker="s",
        color="tab:red",
        capsize=3,
        linestyle="none",
        label=f"offline {summary['loss']}, same steps",
    )
    ax.set_xticks(xs, ["SFT"] + [f"round {i}" for i in xs[1:]])
    ax.set_ylabel("judged desirable rate (90% CI)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"synthetic task, {summary['feedback']} feedback, {summary['steps_per_round']} steps per round")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # dataset preparation's bars; each run's data_stats.json has the counts
    root = os.path.abspath(_WORKDIR.value)
    data_dir = os.path.join(root, "tensorflow_datasets")
    start = time.perf_counter()
    rounds_, steps = _ROUNDS.value, _STEPS.value

    sft = tiny_config(loss="sft", steps=_SFT_STEPS.value)
    sft.data.data_dir = data_dir
    sft_results = run(sft, os.path.join(root, "sft"))
    init = f"orbax:{os.path.join(root, 'sft')}"

    online = load_config(
        f"{os.path.join(os.path.dirname(__file__), '..', 'experiments', 'online.py')}:"
        f"loss={_LOSS.value},init={init},rounds={rounds_},steps={steps},prompts={_PROMPTS.value},samples={_SAMPLES.value},"
        f"feedback={_FEEDBACK.value}"
    )
    online.data.data_dir = data_dir
    online.online.carry_optimizer = _CARRY.value
    online_results = rounds.run(
        online,
        os.path.join(root, f"online_{_LOSS.value}_{_FEEDBACK.value}{'' if _CARRY.value else '_fresh_optimizer'}"),
    )

    offline = tiny_config(loss=_LOSS.value, steps=rounds_ * steps, init=init)
    offline.train.optimizer.warmup_steps = online.train.optimizer.warmup_steps
    offline.data.data_dir = data_dir
    offline_results = run(offline, os.path.join(root, f"offline_{_LOSS.value}"))

    summary = {
        "loss": _LOSS.value,
        "feedback": _FEEDBACK.value,
        "carry_optimizer": _CARRY.value,
        "steps_per_round": steps,
        "sft": rate(sft_results),
        "online": [rate(r) for r in online_results["rounds"]],
        "online_sampled": [r["labels"].get("sampled") for r in online_results["rounds"]],
        "offline": rate(offline_results),
        "offline_steps": rounds_ * steps,
        "seconds": round(time.perf_counter() - start),
    }
    name = f"online_vs_offline_{_LOSS.value}{'' if _CARRY.value else '_fresh_optimizer'}"
    for stem in [os.path.join(root, name)] + ([_OUT.value] if _OUT.value else []):
        files.write_json(f"{stem}.json", summary)
        plot(summary, f"{stem}.png")
    print(f"\n{'model':<28} {'judged desirable':>17} {'90% interval':>17}")
    rows = [("SFT (start of both)", summary["sft"])]
    rows += [(f"online round {i + 1} ({(i + 1) * steps} steps)", r) for i, r in enumerate(summary["online"])]
    rows.append((f"offline ({rounds_ * steps} steps)", summary["offline"]))
    for label, r in rows:
        lo, hi = r["ci90"]
        print(f"{label:<28} {r['desirable_rate']:>17.1%} {f'[{lo:.1%}, {hi:.1%}]':>17}")
    print(f"\nwrote {os.path.join(root, name)}.json and .png in {summary['seconds']}s")


if __name__ == "__main__":
    app.run(main)
