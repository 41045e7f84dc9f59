"""Evaluators by name: ``config.eval.evaluators = "held_out,judged"`` runs these at the end of a run.

Each is ``evaluator(run, state) -> dict`` whose entries go into ``eval.json``:

  held_out  loss and reward metrics of the held-out batches (``eval/loss``, ...), also
            every ``config.train.eval_every`` steps
  samples   only samples completions for the held-out prompts (``samples.jsonl``: the
            conversation, the completion and the prompt's SFT target), to judge later with
            scripts/judge.py where the judge is reachable
  judged    when ``config.eval.judge`` names a unary judge: samples completions for
            held-out prompts (``samples.jsonl``), the judged desirable rate with its 90%
            interval, and the win rate against ``config.eval.baseline``'s samples
  pairwise  the paper's protocol: each sample against ``config.eval.against`` (the dataset's
            SFT target, or another run's sample), judged pairwise in a random order per
            prompt; wins / total with its exact 90% interval; verdicts in ``judgments.jsonl``

A new evaluator is one function registered in ``EVALUATORS`` and named in the config.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from kto_jax import files, sharding
from kto_jax.data.feedback import sft_targets_per_prompt
from kto_jax.errors import InputError, MissingInput
from kto_jax.generate import eval_prompts, generate, prompt_inputs
from kto_jax.judges import make_judge
from kto_jax.judges.protocol import pairwise_winrate
from kto_jax.judges.store import JudgmentStore
from kto_jax.log import note
from kto_jax.stats import judged_rate, winrate
from kto_jax.train.step import step_reference
from kto_jax.train.subplans import EvalPlan


def held_out(run, state) -> dict:
    """Mean loss and metrics over the held-out batches (reference log-probs from the cache when cached)."""
    rows = []
    for i, batch in enumerate(run.eval_batches):
        if run.eval_cache is not None:
            batch = {**batch, **{k: sharding.local_rows(v) for k, v in run.eval_cache[i].items()}}
        with sharding.activation_rules(run.mesh):
            reference = step_reference(run.engine.spec, state, run.reference_params)
            metrics = run.engine.eval_fn(
                run.policy_params(state), sharding.to_global(batch, run.mesh), reference, state.loss_state
            )
        rows.append(jax.device_get(metrics))
    return {"held_out": {f"eval/{k}": float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}}


def samples(run, state) -> list[dict]:
    """Completions for the held-out prompts (``config.eval.num_prompts``), sampled once per run and
    written to ``samples.jsonl``: per prompt its conversation (``turns``), the rendered ``prompt``
    (with the BOS a Jinja template writes first), the ``completion`` and the dataset's
    ``sft_target`` (HALOs' per-prompt target, the paper's judging baseline; null when none)."""
    if run.sample_rows is not None:
        return run.sample_rows

    e, tokenizer = run.plan.eval, run.tokenizer
    # the split's prompts and SFT targets before the loss's view (pairing, subsampling), so every
    # run of a split, whatever its loss, is judged on the same prompts against the same targets
    split = run.eval_data.source or run.eval_data.examples
    prompts = eval_prompts([ex.prompt for ex in split], e.num_prompts)
    targets = {ex.prompt: ex.completion for ex in sft_targets_per_prompt(split)[0]}
    shown, ids = prompt_inputs(
        prompts,
        run.loader.cfg.chat_template,
        tokenizer,
        run.plan.data.max_prompt_length,
        (run.plan.loss.control_tokens or [None])[0],
    )  # the whole dialogue, as trained
    completions = generate(
        run.model,
        run.policy_params(state)["model"],
        ids,
        max_new_tokens=e.max_new_tokens,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        temperature=e.temperature,
        top_p=e.top_p,
        top_k=e.top_k,
        batch_size=e.batch_size,
        seed=run.plan.seed,
    )
    run.sample_rows = [
        {"turns": [list(t) for t in p], "prompt": s, "completion": tokenizer.decode(c), "sft_target": targets.get(p)}
        for p, s, c in zip(prompts, shown, completions)
    ]
    _write_samples(run)
    return run.sample_rows


def write_samples(run, state) -> dict:
    """Only sample the held-out prompts (``samples.jsonl``), for judging later (scripts/judge.py)."""
    note(f"sampled {len(samples(run, state))} held-out prompts into samples.jsonl")
    return {}


def _write_samples(run) -> None:
    if jax.process_index() == 0:
        files.write_jsonl(os.path.join(run.workdir, "samples.jsonl"), run.sample_rows)


def _judge(run):
    if run.judge is None:
        run.judge = make_judge(run.plan.eval.settings)
    return run.judge


def judged(run, state) -> dict:
    """The unary view: the judged desirable rate of the samples and, with ``config.eval.baseline``, the
    per-prompt win rate against that run's samples (a tie counts half)."""
    e = run.plan.eval
    if not e.judge:
        return {}
    rows, judge = samples(run, state), _judge(run)
    if not judge.unary:
        note(
            f"judge {e.judge!r} gives pairwise verdicts only: no unary judged rate (the pairwise evaluator reports its win rate)"
        )
        return {}
    flags = judge.desirable([(tuple(map(tuple, r["turns"])), r["completion"]) for r in rows])  # the whole conversation
    for r, ok in zip(rows, flags):
        r["desirable"] = bool(ok)
    _write_samples(run)
    results = {"generation": judged_rate(flags)}
    if e.baseline:
        base = {row["prompt"]: row["desirable"] for row in read_samples(e.baseline)}
        common = [(r["desirable"], base[r["prompt"]]) for r in rows if r["prompt"] in base]
        results["winrate"] = winrate([a for a, _ in common], [b for _, b in common])
    note(f"judged desirable rate {results['generation']['desirable_rate']:.3f} on {len(flags)} held-out prompts")
    return results


def read_samples(workdir: str) -> list[dict]:
    """A run's ``samples.jsonl``."""
    path = os.path.join(os.path.expanduser(workdir), "samples.jsonl")
    if not os.path.exists(path):
        raise MissingInput(
            f"{path} not found: the baseline must be a finished run judged with the same held-out prompts"
        )
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pairwise(run, state) -> dict:
    """The paper's protocol (kto_jax/judges/protocol.py) on the samples, verdicts in ``judgments.jsonl``."""
    if not run.plan.eval.judge:
        return {}
    results = pairwise_from_samples(run.plan.eval, samples(run, state), run.workdir, judge=_judge(run))
    p = results["pairwise"]
    note(
        f"pairwise win rate {p['winrate']:.3f} [{p['ci90'][0]:.3f}, {p['ci90'][1]:.3f}] against {p['against']} "
        f"on {p['n']} prompts ({p['ties']} ties, {p['unparseable']} unparseable)"
    )
    return results


def pairwise_from_samples(e: EvalPlan, rows: list[dict], workdir: str, judge=None, progress: bool = True) -> dict:
    """``{"pairwise": ...}`` for sample rows judged against ``config.eval.against``: "sft_target" (each
    row's target; rows without one are counted in ``no_baseline``) or a workdir's samples (same prompts)."""
    against = e.against
    if against == "sft_target":
        baseline = {r["prompt"]: r.get("sft_target") for r in rows}
    else:
        baseline = {r["prompt"]: r["completion"] for r in read_samples(against)}
    items = [
        (tuple(map(tuple, r["turns"])), r["completion"], baseline[r["prompt"]])
        for r in rows
        if baseline.get(r["prompt"]) is not None
    ]
    if not items:
        raise InputError(
            f"config.eval.against={against!r}: none of the {len(rows)} samples has a baseline answer "
            "(no SFT target in the data, or a run judged on other prompts)"
        )
    store = JudgmentStore(os.path.join(workdir, "judgments.jsonl"))
    result = pairwise_winrate(
        judge or make_judge(e.settings), items, store, seed=e.order_seed, against=against, progress=progress
    )
    result["no_baseline"] = len(rows) - len(items)
    result["torn_lines_dropped"] = store.torn
    return {"pairwise": result}


EVALUATORS = {"held_out": held_out, "samples": write_samples, "judged": judged, "pairwise": pairwise}
