"""Online rounds, HALOs main's online loop as one resumable job: sample from the current policy,
judge every sample, write the round's feedback file, train on it from the current weights; R times.

    python -m kto_jax.online --config experiments/online.py:init=orbax:runs/sft --workdir runs/online

Round r (0-based) takes prompts r*P ... (r+1)*P - 1 of ``config.online.prompt_split`` (the
distinct prompts of ``config.data.sources`` in a seeded order, P = ``prompts_per_round``),
samples ``samples_per_prompt`` completions of each from the policy (round 0:
``config.init.source``; round r: round r-1's final weights), judges them with
``config.online.judge`` and trains ``config.train.steps`` steps of ``config.loss`` on that
feedback, its starting weights the reference (HALOs' ``model.load_from`` per round); with
``online.carry_optimizer`` (default, HALOs' ``model.from_checkpoint``) the optimizer's moments
and schedule go on from the last round's, else each round's optimizer starts afresh. Every round's run is evaluated by ``config.eval`` on
``config.data.eval_split`` of the task's own sources (``data.eval_sources``), so each round is
judged on the same held-out prompts as the starting weights and an offline run.

Labels (kto_jax/online/labels.py): a unary judge's flag is the label (reward 1 or 0); a
reward model's score is thresholded (``threshold``: a number, "mean" or "median") for
``feedback="binary"``, or paired per prompt (``pair_mode``, ``pair_gap``) for ``"pairwise"``.

WORKDIR holds:
    config.json                         the online config (a rerun with another config is an error)
    initial/                            the starting weights evaluated (eval.only): the "before" row
    round_{r}/sampling/part-{c}.jsonl   chunk c of the samples (``chunk_prompts`` prompts each)
    round_{r}/samples.json              HALOs' sample file: prompt_id, sample_id, prompt, output, type "sample"
    round_{r}/labelling/part-{c}.jsonl  chunk c's rewards
    round_{r}/feedback.json             HALOs' binary_feedback / pairwise_feedback rows (the files source reads them)
    round_{r}/labels.json               counts, the threshold, the samples' judged rate
    round_{r}/train/                    the round's training run (kto_jax.train.loop)
    rounds.json                         one row per finished round, rewritten after each
    eval.json                           at the end: the initial row, the rounds, the last round's results

Resuming: every file is written atomically and a phase whose file exists is skipped, so the
same command rerun after ``kill -9`` restarts at the chunk (sampling, labelling) or checkpoint
(training) where it stopped. Chunk c of round r samples with the seed (config.seed, r, c): the
samples do not depend on where a run was stopped.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from kto_jax import files
from kto_jax.data.builders import load_mixture
from kto_jax.errors import InputError
from kto_jax.generate import eval_prompts
from kto_jax.judges import JUDGES
from kto_jax.log import note
from kto_jax.models.presets import PRESETS
from kto_jax.online.labels import PAIR_MODES, resolve_threshold
from kto_jax.online.phases import round_dir, sample, write_feedback
from kto_jax.train import loop
from kto_jax.train.plan import make_plan
from kto_jax.train.rules import config_diff, disallowed_on_resume
from kto_jax.train.subplans import DataPlan, data_plan

FEEDBACK_TYPES = ("binary", "pairwise")
PAIRWISE_ONLY_JUDGES = ("api",)  # verdicts between two answers only: no per-sample label
CONFIG_FILE, ROUNDS_FILE, EVAL_FILE = "config.json", "rounds.json", "eval.json"


# ---------------------------------------------------------------- config


def check_config(config) -> None:
    """Every ``config.online`` field, before anything is loaded (each error names its field and the fix)."""
    o = config.online
    for field in ("rounds", "prompts_per_round", "samples_per_prompt", "chunk_prompts", "batch_size", "max_new_tokens"):
        if int(o[field]) < 1:
            raise InputError(f"config.online.{field}={o[field]}: must be >= 1")
    if o.feedback not in FEEDBACK_TYPES:
        raise InputError(f"config.online.feedback={o.feedback!r}: use one of {FEEDBACK_TYPES}")
    if o.feedback == "pairwise" and int(o.samples_per_prompt) < 2:
        raise InputError(
            f"config.online.samples_per_prompt={o.samples_per_prompt}: pairwise feedback pairs samples of "
            "one prompt, so it needs >= 2"
        )
    if o.pair_mode not in PAIR_MODES:
        raise InputError(f"config.online.pair_mode={o.pair_mode!r}: use one of {PAIR_MODES}")
    try:
        resolve_threshold([0.0], o.threshold)
    except InputError as e:
        raise InputError(f"config.online.threshold: {e}") from None
    if o.judge not in JUDGES:
        raise InputError(f"unknown judge {o.judge!r} (config.online.judge); known: {sorted(JUDGES)}")
    if o.judge in PAIRWISE_ONLY_JUDGES:
        raise InputError(
            f"config.online.judge={o.judge!r} only compares two answers, so it cannot label one sample: "
            "use a unary judge (an exact checker) or judge='reward_model'"
        )
    if config.data.columns or config.data.file_schema != "auto":
        raise InputError(
            "config.data.columns / config.data.file_schema apply to every files: source, the rounds' "
            "feedback files too: give your own files canonical columns and leave these at their defaults"
        )


def base(config):
    """The config without its ``online`` section: what each round's run starts from."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
        del c["online"]
    return c


def round_config(config, workdir: str, r: int):
    """Round r's training run: ``config`` less ``online``, trained on the round's feedback file
    from round r-1's final weights (round 0: ``config.init.source``) and, with
    ``online.carry_optimizer``, its optimizer state; evaluated on the task."""
    c = base(config)
    if r > 0:
        c.init.source = f"orbax:{os.path.join(round_dir(workdir, r - 1), 'train')}"
        if config.online.carry_optimizer:  # HALOs' from_checkpoint: the optimizer and schedule go on
            c.init.optimizer = c.init.source
    c.data.eval_sources = config.data.eval_sources or config.data.sources
    c.data.sources = f"files:{os.path.join(round_dir(workdir, r), 'feedback.json')}"
    return c


def initial_config(config):
    """The starting weights evaluated on the task (``eval.only``): the rounds' "before"."""
    c = base(config)
    c.eval.only = True
    return c


def check_workdir(config, workdir: str) -> None:
    """A workdir holding an online run of another config is an error; a new one gets ``config.json``."""
    path = os.path.join(workdir, CONFIG_FILE)
    now = json.loads(config.to_json_best_effort())
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        bad = disallowed_on_resume(config_diff(saved, now))
        if bad:
            listed = "; ".join(f"config.{field}: {old!r} (saved) -> {new!r} (now)" for field, old, new in bad)
            raise InputError(f"{workdir} holds an online run with another config ({listed}): use a new --workdir")
    elif jax.process_index() == 0:
        files.write_json(path, now)


# ---------------------------------------------------------------- prompts


def round_prompts(prompts, rounds: int, per_round: int, seed: int) -> list[list]:
    """The prompts of each round: the distinct prompts in SHA-1 order (independent of file order),
    permuted by ``seed``, cut into ``rounds`` disjoint slices of ``per_round``."""
    distinct = eval_prompts(prompts, len(prompts))
    need = rounds * per_round
    if len(distinct) < need:
        raise InputError(
            f"config.online: {rounds} rounds x {per_round} prompts_per_round = {need} prompts, but the split "
            f"has {len(distinct)} distinct prompts: lower config.online.rounds or prompts_per_round"
        )
    order = np.random.default_rng(seed).permutation(len(distinct))
    return [[distinct[i] for i in order[r * per_round : (r + 1) * per_round]] for r in range(rounds)]


def load_prompts(d: DataPlan, split: str) -> list:
    """The prompts of split ``split`` (``config.online.prompt_split``) of ``config.data.sources``."""
    examples, _ = load_mixture(
        d.sources,
        split,
        d.data_dir,
        d.manual_dir,
        skip_bad_records=d.skip_bad_records,
        seed=d.seed,
        files=dict(d.files),
    )
    if not examples:
        raise InputError(
            f"config.data.sources={d.sources!r} split {split!r} (config.online.prompt_split) "
            "has no examples to take prompts from"
        )
    return [ex.prompt for ex in examples]


# ---------------------------------------------------------------- the rounds


def run(config, workdir: str) -> dict:
    """All rounds of ``config`` in ``workdir`` (resuming where a run stopped); returns eval.json's contents."""
    check_config(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    o = config.online
    for r in range(int(o.rounds)):  # every round's training config is checked before anything runs
        make_plan(round_config(config, workdir, r), jax.device_count())
    check_workdir(config, workdir)
    done = os.path.join(workdir, EVAL_FILE)
    if os.path.exists(done):
        note(f"this online run already finished with this config; nothing to do (its results: {done})")
        with open(done, encoding="utf-8") as f:
            return json.load(f)
    initial = loop.run(initial_config(config), os.path.join(workdir, "initial"))
    prompts = round_prompts(
        load_prompts(data_plan(config, PRESETS), o.prompt_split), int(o.rounds), int(o.prompts_per_round), config.seed
    )
    rows_out: list[dict] = []
    for r in range(int(o.rounds)):
        train_config = round_config(config, workdir, r)  # its init source is the policy the round samples from
        samples = sample(config, workdir, r, prompts[r], train_config)
        counts = write_feedback(config, workdir, r, samples)
        results = loop.run(train_config, os.path.join(round_dir(workdir, r), "train"))
        row = {
            "round": r + 1,
            "init": train_config.init.source,
            "labels": counts,
            **{k: results[k] for k in ("generation", "held_out", "winrate") if k in results},
        }
        rows_out.append(row)
        if "generation" in row:
            g = row["generation"]
            note(
                f"round {r + 1}/{o.rounds}: judged desirable {g['desirable_rate']:.3f} [{g['ci90'][0]:.3f}, {g['ci90'][1]:.3f}] "
                f"on {g['n']} held-out prompts"
            )
        if jax.process_index() == 0:
            files.write_json(os.path.join(workdir, ROUNDS_FILE), rows_out)
    summary = {
        "initial": {k: initial[k] for k in ("generation", "held_out") if k in initial},
        "rounds": rows_out,
        **{k: rows_out[-1][k] for k in ("generation", "held_out") if k in rows_out[-1]},
    }
    if jax.process_index() == 0:
        files.write_json(os.path.join(workdir, EVAL_FILE), summary)
    return summary
