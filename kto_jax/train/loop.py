"""The training loop: the only caller of ``train_step``; files, clocks and progress live in its hooks.

    for step in range(first, steps):
        state, metrics = engine.train_fn(state, next_batch(), reference_params, frozen_params)
        for hook in hooks: hook(run, step + 1, state, batch, metrics)     # kto_jax.train.hooks
    results = {name: evaluator(run, state) for name in plan.evaluators}   # kto_jax.train.evaluators

Writes to the workdir: ``config.json``, ``data_stats.json``, ``metrics.jsonl`` (one JSON
object per logged step), TensorBoard event files under ``tb/``, ``eval.json``,
``samples.jsonl``, orbax checkpoints (``checkpoints/<step>``; the last is the final weights) and,
with ``config.logging.wandb``, ``wandb_run_id`` and ``wandb/`` (kto_jax/train/tracking.py).
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

from kto_jax import checkpoint, files, sharding
from kto_jax.checkpoint import Checkpointer
from kto_jax.log import note
from kto_jax.models import lora
from kto_jax.train import record, setup, trainable
from kto_jax.train.engine import Engine, build_engine
from kto_jax.train.evaluators import EVALUATORS
from kto_jax.train.feeds import get_feed
from kto_jax.train.hooks import MetricsWriter, Preemption, default_hooks
from kto_jax.train.plan import Plan, make_plan
from kto_jax.train.reference_cache import cached_reference
from kto_jax.train.step import policy_params
from kto_jax.train.tracking import check_available


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
    checkpointer: Checkpointer | None  # made when the run starts writing (execute)
    writer: MetricsWriter | None
    meta: dict
    reference_params: Any = None
    frozen_params: Any = None  # config.train.freeze's leaves, the step's frozen_params (never donated)
    eval_cache: list | None = None
    stop: str | None = None  # set by a hook: the loop saves nothing more and returns
    sample_rows: list | None = None  # the evaluators' held-out samples, generated once (evaluators.samples)
    judge: Any = None  # config.eval.judge, built once

    def policy_params(self, state) -> dict:
        """The whole policy of ``state``: its trainable leaves over the frozen ones."""
        return policy_params(self.engine.spec, state.params, self.reference_params, self.frozen_params)


def _restore(checkpointer: Checkpointer, state, loader, reference_meta: dict):
    """``(first step, state)``: the latest readable checkpoint's, with the loader moved to its position."""
    restored = checkpointer.restore_latest(state)
    if restored is None:
        return 0, state
    first, state, loader_state, saved_meta = restored
    saved_reference = saved_meta.get("reference", {})
    if saved_reference.get("frozen_fingerprint") != reference_meta.get("frozen_fingerprint"):
        raise checkpoint.IncompatibleCheckpoint(
            f"the frozen parameters (config.train.freeze, from {reference_meta['source']}) differ from those "
            f"{checkpointer.directory}/{first} was trained with (fingerprints differ): the init source changed. "
            "Use a new --workdir."
        )
    if saved_reference.get("fingerprint") != reference_meta["fingerprint"]:
        raise checkpoint.IncompatibleCheckpoint(
            f"the reference model ({reference_meta['source']}) differs from the one {checkpointer.directory}/{first} "
            "was trained against (fingerprints differ): the init source changed. Use a new --workdir."
        )
    loader.restore(loader_state)
    return first, state


@dataclasses.dataclass
class Prepared:
    """A run whose every check has passed and which has written nothing yet (:func:`prepare`)."""

    run: Run | None
    state: Any = None
    first: int = 0
    train_data: Any = None
    resume: record.Resume | None = None
    finished: dict | None = None  # the results of a finished run rerun with the same config


def prepare(config, workdir: str, *, resume_with_changes: bool = False) -> Prepared:
    """Every check of a run: the config's values and plan, the workdir's saved config, the model,
    tokenizer, data and the checkpoint to resume. Raises on bad input having written nothing."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    plan = make_plan(config, jax.device_count())  # bad config fails here, before any loading or compiling
    check_available(config)  # config.logging.wandb without the wandb package
    resume = record.check_resume(config, workdir, resume_with_changes)
    if resume.finished is not None:
        return Prepared(run=None, finished=resume.finished, resume=resume)
    mesh = setup.make_mesh(plan)
    model, model_params = setup.load_model(plan, mesh)
    tokenizer = setup.tokenizer_for(plan.data, model, config.model.name)
    model, model_params = setup.add_control_tokens(plan, model, model_params, tokenizer, mesh)
    train_data = setup.load_split(plan, plan.data.train_split)
    loader = setup.make_loader(plan, train_data, tokenizer, seed=plan.seed)
    eval_data = setup.load_split(plan, plan.data.eval_split, plan.data.eval_sources)
    steps = 0 if plan.eval.only else plan.resolve_steps(loader.steps_per_epoch)  # eval.only: the "before" of a table

    engine = build_engine(plan.step_spec(model), plan.optimizer, mesh, seed=plan.seed, total_steps=max(steps, 1))
    state = engine.create_state(model_params)  # new buffers: model_params stay as the frozen reference
    frozen_params = engine.frozen_params(model_params)  # config.train.freeze's leaves: model_params' own buffers
    if plan.init_optimizer:  # an earlier run's moments and schedule position (resuming this run's checkpoint wins)
        opt_state, at = checkpoint.load_opt_state(plan.init_optimizer, state.opt_state, plan.optimizer.to_dict())
        state = state.replace(opt_state=opt_state)
        note(f"optimizer state from orbax:{plan.init_optimizer} (step {at})")
    # the reference: the initial weights; a LoRA run's is its base, the same buffers less the adapters
    reference_params = lora.split_adapters(model_params)[0] if plan.needs_reference else None
    reference_meta = {
        "source": config.init.source or config.model.name,
        "fingerprint": checkpoint.fingerprint(reference_params) if reference_params is not None else None,
    }
    if plan.freeze:  # the frozen leaves are the init source's, not saved: a resume checks they are the same
        reference_meta["frozen_fingerprint"] = checkpoint.fingerprint(
            trainable.split({"model": model_params}, plan.freeze)[1]
        )
    del model_params
    if plan.reference_mode == "sync":
        reference_params = None  # the state holds the moving reference (these weights at step 0)
    meta = {
        "model": config.model.name,
        "loss": plan.loss.name,
        "reference": reference_meta,
        "param_shapes": checkpoint.param_shapes(state.params),
        "config": json.loads(config.to_json_best_effort()),
    }
    first, checkpointer = 0, None
    if record.checkpoint_steps(workdir):  # a Checkpointer on a fresh workdir would create its folder
        checkpointer = _checkpointer(plan, workdir)
        first, state = _restore(checkpointer, state, loader, reference_meta)
        if not plan.eval.only:
            record.check_steps(first, steps)
    eval_loader = setup.make_loader(plan, eval_data, tokenizer, seed=plan.seed + 1)
    eval_batches = [next(eval_loader) for _ in range(min(plan.eval.batches, eval_loader.steps_per_epoch))]
    r = Run(
        config=config,
        plan=plan,
        workdir=workdir,
        mesh=mesh,
        model=model,
        engine=engine,
        tokenizer=tokenizer,
        loader=loader,
        eval_data=eval_data,
        eval_batches=eval_batches,
        steps=steps,
        checkpointer=checkpointer,
        writer=None,
        meta=meta,
        reference_params=reference_params,
        frozen_params=frozen_params,
    )
    return Prepared(run=r, state=state, first=first, train_data=train_data, resume=resume)


def _checkpointer(plan: Plan, workdir: str) -> Checkpointer:
    ckpt = plan.loop
    return Checkpointer(
        workdir,
        every_steps=ckpt.every_steps,
        every_minutes=ckpt.every_minutes,
        keep_last=ckpt.keep_last,
        best_metric=ckpt.best_metric,
        best_mode=ckpt.best_mode,
    )


def run(config, workdir: str, *, resume_with_changes: bool = False) -> dict:
    """Train ``config`` in ``workdir`` (resuming from its latest checkpoint); returns the eval results."""
    return execute(prepare(config, workdir, resume_with_changes=resume_with_changes))


def execute(p: Prepared) -> dict:
    """Train and evaluate a prepared run, writing its files (the module docstring lists them)."""
    if p.finished is not None:
        where = f"step {p.resume.checkpoint_step}" if p.resume.checkpoint_step is not None else "its evaluation"
        note(f"this run already finished ({where}) with this config; nothing to do (its results: eval.json)")
        return p.finished
    r, state, first = p.run, p.state, p.first
    config, plan, workdir = r.config, r.plan, r.workdir
    train_data, steps = p.train_data, r.steps
    record.write_start(
        workdir,
        config,
        p.resume,
        {"train": train_data.stats, "eval": r.eval_data.stats, "dropped_by_tokenization": r.loader.dropped},
        first,
        steps,
    )
    r.checkpointer = r.checkpointer or _checkpointer(plan, workdir)
    if first:
        note(f"resumed from {r.checkpointer.directory}/{first}")
    r.writer = MetricsWriter(workdir, config)
    train_cache = None
    if plan.reference_mode == "cached":

        def cache_batches():
            cache_loader = setup.make_loader(plan, train_data, r.tokenizer, seed=plan.seed)
            return (next(cache_loader) for _ in range(steps))

        train_cache, r.eval_cache = cached_reference(
            plan.loop.reference_cache_dir,
            r.engine,
            r.reference_params,
            cache_batches,
            r.eval_batches,
            r.mesh,
            workdir,
            steps,
            r.meta["reference"],
            get_feed(plan.loss.feed).reference_inputs(plan.inputs),
        )
        r.reference_params = None  # the reference model is not needed any more

    with Preemption() as preemption:
        hooks = default_hooks(r, first, preemption)
        for step in range(first, steps):
            batch = next(r.loader)
            if train_cache is not None:
                batch.update({k: sharding.local_rows(v) for k, v in train_cache[step].items()})
            with sharding.activation_rules(r.mesh):
                state, metrics = r.engine.train_fn(
                    state, sharding.to_global(batch, r.mesh), r.reference_params, r.frozen_params
                )
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
    r.writer.close(results)
    if jax.process_index() == 0:
        files.write_json(os.path.join(workdir, record.EVAL_FILE), results)
    return results


def _close(r: Run, hooks) -> None:
    """Wait for the last checkpoint and close the hooks (the writer stays open for the evaluators)."""
    r.checkpointer.close()
    for hook in hooks:
        getattr(hook, "close", lambda: None)()
