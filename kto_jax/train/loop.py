"""The training loop: the only caller of ``train_step``; files, clocks and progress live in its hooks.

    for step in range(first, steps):
        state, metrics = engine.train_fn(state, next_batch(), reference_params)
        for hook in hooks: hook(run, step + 1, state, batch, metrics)     # kto_jax.train.hooks
    results = {name: evaluator(run, state) for name in plan.evaluators}   # kto_jax.train.evaluators

Writes to the workdir: ``config.json``, ``data_stats.json``, ``metrics.jsonl`` (one JSON
object per logged step), TensorBoard event files under ``tb/``, ``eval.json``,
``samples.jsonl`` and orbax checkpoints (``checkpoints/<step>``; the last is the final weights).
Rerunning the same command on the same workdir resumes from the latest complete checkpoint;
SIGTERM/SIGINT finish the current step, save and exit 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
from absl import logging

from kto_jax import checkpoint, sharding
from kto_jax.checkpoint import Checkpointer
from kto_jax.train import setup
from kto_jax.train.engine import Engine, build_engine
from kto_jax.train.evaluators import EVALUATORS
from kto_jax.train.hooks import MetricsWriter, Preemption, default_hooks, note
from kto_jax.train.plan import Plan, make_plan
from kto_jax.train.reference_cache import cached_reference


@dataclasses.dataclass
class Run:
    """What the hooks and evaluators of one run see."""

    config: Any
    plan: Plan
    workdir: str
    mesh: Any
    model: Any
    engine: Engine
    tokenizer: Any
    loader: Any
    eval_data: Any
    eval_batches: list
    steps: int
    checkpointer: Checkpointer
    writer: MetricsWriter
    meta: dict
    reference_params: Any = None
    eval_cache: list | None = None
    stop: str | None = None  # set by a hook: the loop saves nothing more and returns
    sample_rows: list | None = None  # the evaluators' held-out samples, generated once (evaluators.samples)
    judge: Any = None                # config.eval.judge, built once


def _truncate_metrics(workdir: str, step: int) -> None:
    """Drop metrics.jsonl rows past ``step`` (written by a run that died after its last checkpoint)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(rows)


def _restore(checkpointer: Checkpointer, state, loader, reference_meta: dict):
    """``(first step, state)``: the latest readable checkpoint's, with the loader moved to its position."""
    restored = checkpointer.restore_latest(state)
    if restored is None:
        return 0, state
    first, state, loader_state, saved_meta = restored
    if saved_meta.get("reference", {}).get("fingerprint") != reference_meta["fingerprint"]:
        raise checkpoint.IncompatibleCheckpoint(
            f"the reference model ({reference_meta['source']}) differs from the one {checkpointer.directory}/{first} "
            "was trained against (fingerprints differ): the init source changed. Use a new --workdir."
        )
    loader.restore(loader_state)
    note(f"resumed from {checkpointer.directory}/{first}")
    return first, state


def run(config, workdir: str) -> dict:
    """Train ``config`` in ``workdir`` (resuming from its latest checkpoint); returns the eval results."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    plan = make_plan(config, jax.device_count())  # bad config fails here, before any loading or compiling
    os.makedirs(workdir, exist_ok=True)
    mesh = setup.make_mesh(plan)
    model, model_params = setup.load_model(plan, mesh)
    tokenizer = setup.tokenizer_for(config, model)
    model, model_params = setup.add_control_tokens(plan, model, model_params, tokenizer, mesh)
    train_data = setup.load_split(config, plan, config.data.train_split)
    loader = setup.make_loader(config, plan, train_data, tokenizer, seed=config.seed)
    eval_data = setup.load_split(config, plan, config.data.eval_split)
    steps = 0 if config.eval.only else plan.resolve_steps(loader.steps_per_epoch)  # eval.only: the "before" of a table

    engine = build_engine(plan.step_spec(model), config.train.optimizer, mesh, seed=plan.seed, total_steps=max(steps, 1))
    state = engine.create_state(model_params)  # new buffers: model_params stay as the frozen reference
    reference_params = model_params if plan.needs_reference else None
    del model_params
    reference_meta = {"source": config.init.source or config.model.name,
                      "fingerprint": checkpoint.fingerprint(reference_params) if reference_params is not None else None}
    ckpt = config.checkpoint
    checkpointer = Checkpointer(workdir, every_steps=ckpt.every_steps, every_minutes=ckpt.every_minutes,
                                keep_last=ckpt.keep_last, best_metric=ckpt.best_metric, best_mode=ckpt.best_mode)
    meta = {"model": config.model.name, "loss": plan.loss.name, "reference": reference_meta,
            "param_shapes": checkpoint.param_shapes(state.params), "config": json.loads(config.to_json_best_effort())}
    first, state = _restore(checkpointer, state, loader, reference_meta)
    _truncate_metrics(workdir, first)  # rows past the restored step (or all, on a fresh start)
    if jax.process_index() == 0:  # written only once the checkpoint (if any) is known to fit this config
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2))
        with open(os.path.join(workdir, "data_stats.json"), "w", encoding="utf-8") as f:
            json.dump({"train": train_data.stats, "eval": eval_data.stats, "dropped_by_tokenization": loader.dropped}, f, indent=2)

    eval_loader = setup.make_loader(config, plan, eval_data, tokenizer, seed=config.seed + 1)
    eval_batches = [next(eval_loader) for _ in range(min(int(config.train.eval_batches), eval_loader.steps_per_epoch))]
    train_cache = eval_cache = None
    if plan.reference_mode == "cached":
        def cache_batches():
            cache_loader = setup.make_loader(config, plan, train_data, tokenizer, seed=config.seed)
            return (next(cache_loader) for _ in range(steps))

        train_cache, eval_cache = cached_reference(config, engine, reference_params, cache_batches, eval_batches, mesh,
                                                   workdir, steps)
        reference_params = None  # the reference model is not needed any more

    r = Run(config=config, plan=plan, workdir=workdir, mesh=mesh, model=model, engine=engine, tokenizer=tokenizer,
            loader=loader, eval_data=eval_data, eval_batches=eval_batches, steps=steps, checkpointer=checkpointer,
            writer=MetricsWriter(workdir), meta=meta, reference_params=reference_params, eval_cache=eval_cache)
    with Preemption() as preemption:
        hooks = default_hooks(r, first, preemption)
        for step in range(first, steps):
            batch = next(loader)
            if train_cache is not None:
                batch.update({k: setup.local_rows(v) for k, v in train_cache[step].items()})
            with sharding.activation_rules(mesh):
                state, metrics = engine.train_fn(state, setup.to_global(batch, mesh), r.reference_params)
            for hook in hooks:
                hook(r, step + 1, state, batch, metrics)
            if r.stop:
                _close(r, hooks)
                r.writer.close()
                logging.warning("%s", r.stop)
                print(r.stop, flush=True)
                return {"step": step + 1, "preempted": True}
    _close(r, hooks)
    results: dict = {"step": steps}
    for name in plan.evaluators:
        results.update(EVALUATORS[name](r, state))
        if name == "held_out":
            r.writer.write(steps, results["held_out"])
    r.writer.close()
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results


def _close(r: Run, hooks) -> None:
    """Wait for the last checkpoint and close the hooks (the writer stays open for the evaluators)."""
    r.checkpointer.close()
    for hook in hooks:
        getattr(hook, "close", lambda: None)()
