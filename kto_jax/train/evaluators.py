"""Evaluators by name: ``config.eval.evaluators = "held_out,judged"`` runs these at the end of a run.

Each is ``evaluator(run, state) -> dict`` whose entries go into ``eval.json``:

  held_out  loss and reward metrics of the held-out batches (``eval/loss``, ...), also
            every ``config.train.eval_every`` steps
  judged    when ``config.eval.judge`` names a judge: samples completions for held-out
            prompts (``samples.jsonl``), the judged desirable rate with its 90% interval,
            and the win rate against ``config.eval.baseline``'s samples

A new evaluator is one function registered in ``EVALUATORS`` and named in the config.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from kto_jax import sharding
from kto_jax.train import setup
from kto_jax.train.hooks import note


def held_out(run, state) -> dict:
    """Mean loss and metrics over the held-out batches (reference log-probs from the cache when cached)."""
    rows = []
    for i, batch in enumerate(run.eval_batches):
        if run.eval_cache is not None:
            batch = {**batch, **{k: setup.local_rows(v) for k, v in run.eval_cache[i].items()}}
        with sharding.activation_rules(run.mesh):
            metrics = run.engine.eval_fn(state.params, setup.to_global(batch, run.mesh), run.reference_params, state.loss_state)
        rows.append(jax.device_get(metrics))
    return {"held_out": {f"eval/{k}": float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}}


def judged(run, state) -> dict:
    """Sample completions for held-out prompts, judge them, and compare with a baseline run."""
    from kto_jax.data.chat import render_prompt
    from kto_jax.data.tokenize import cut_prompt, encode_prompt
    from kto_jax.evaluate import eval_prompts, generate, get_judge, judged_rate, winrate

    config, tokenizer = run.config, run.tokenizer
    if not config.eval.judge:
        return {}
    judge = get_judge(config.eval.judge)
    prompts = eval_prompts([ex.prompt for ex in run.eval_data.examples], int(config.eval.num_prompts))
    template = run.loader.cfg.chat_template
    texts = [render_prompt(p, template) for p in prompts]  # the whole dialogue, as trained
    # as samples.jsonl shows them (and baselines match them): with the BOS a Jinja template writes first
    shown = [template.bos_token + t if getattr(template, "renders_bos", False) else t for t in texts]
    ids = [cut_prompt(encode_prompt(tokenizer, t), int(config.data.max_prompt_length), bos_id=tokenizer.bos_id) for t in texts]
    if run.plan.loss.control_tokens:  # CSFT samples conditioned on the "good" token
        ids = [i + [tokenizer.token_id(run.plan.loss.control_tokens[0])] for i in ids]
    completions = generate(
        run.model, state.params["model"], ids, max_new_tokens=int(config.eval.max_new_tokens), eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id, temperature=float(config.eval.temperature), top_p=float(config.eval.top_p), top_k=int(config.eval.top_k),
        batch_size=int(config.eval.batch_size), seed=config.seed,
    )
    decoded = [tokenizer.decode(c) for c in completions]
    flags = [bool(judge(p, c)) for p, c in zip(prompts, decoded)]  # the whole conversation
    results = {"generation": judged_rate(flags)}
    if jax.process_index() == 0:
        with open(os.path.join(run.workdir, "samples.jsonl"), "w", encoding="utf-8") as f:
            for p, c, ok in zip(shown, decoded, flags):
                f.write(json.dumps({"prompt": p, "completion": c, "desirable": ok}) + "\n")
    if config.eval.baseline:
        baseline = os.path.join(os.path.expanduser(config.eval.baseline), "samples.jsonl")
        with open(baseline, encoding="utf-8") as f:
            base = {row["prompt"]: row["desirable"] for row in map(json.loads, f)}
        common = [(ok, base[p]) for p, ok in zip(shown, flags) if p in base]
        results["winrate"] = winrate([a for a, _ in common], [b for _, b in common])
    note(f"judged desirable rate {results['generation']['desirable_rate']:.3f} on {len(flags)} held-out prompts")
    return results


EVALUATORS = {"held_out": held_out, "judged": judged}
