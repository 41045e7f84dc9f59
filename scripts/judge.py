"""Judge a finished run's samples the paper's way: pairwise against the SFT target (or another run).

    python scripts/judge.py --workdir runs/pythia-1.4b-kto --config.eval.judge=api \
        --config.eval.api.base_url=https://api.openai.com/v1 --config.eval.api.model=gpt-4-0613
    python scripts/judge.py --workdir runs/smol-kto --config.eval.judge=api --config.eval.api.model=smollm2 \
        --config.eval.api.base_url=http://127.0.0.1:8000/v1          # a judge served by scripts/serve.py
    python scripts/judge.py --workdir runs/smol-kto --config.eval.judge=reward_model --config.eval.reward_model.path=RM
    python scripts/judge.py --workdir runs/kto --config.eval.against=runs/sft   # against another run's samples

Reads WORKDIR/samples.jsonl (written by the run's evaluators), asks the judge for every
comparison not yet in WORKDIR/judgments.jsonl (so a rerun asks nothing and an interrupted one
resumes), and writes the result into eval.json's ``pairwise`` entry (read by
scripts/plot_scale.py). Only ``--config.eval.*`` fields are used; the run's own config.json is
not changed. Generation happens in the run, so judging needs no accelerator.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kto_jax import files  # noqa: E402
from kto_jax.config import base_config  # noqa: E402
from kto_jax.errors import InputError  # noqa: E402
from kto_jax.judges.api import JudgeUnavailable  # noqa: E402
from kto_jax.train.evaluators import pairwise_from_samples, read_samples  # noqa: E402
from kto_jax.train.subplans import eval_plan  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished run's directory (with samples.jsonl).", required=True)
_CONFIG = config_flags.DEFINE_config_dict("config", base_config())


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")

    config, workdir = _CONFIG.value, os.path.abspath(os.path.expanduser(_WORKDIR.value))
    if not config.eval.judge:
        raise app.UsageError("name a judge: --config.eval.judge=api (or reward_model, synthetic, feedback)")
    try:
        rows = read_samples(workdir)
        results = pairwise_from_samples(eval_plan(config, evaluators=("pairwise",)), rows, workdir)
    except JudgeUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = os.path.join(workdir, "eval.json")
    evaluation = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            evaluation = json.load(f)
    evaluation.update(results)
    files.write_json(path, evaluation)
    p = results["pairwise"]
    print(
        f"win rate {p['winrate']:.3f} [90% {p['ci90'][0]:.3f}, {p['ci90'][1]:.3f}] against {p['against']}: {p['wins']} wins, "
        f"{p['baseline_wins']} losses, {p['ties']} ties, {p['unparseable']} unparseable of {p['n']} "
        f"({p['cached']} verdicts from judgments.jsonl); wrote {path}"
    )
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
