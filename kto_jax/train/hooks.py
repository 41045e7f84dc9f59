"""What happens around each train step, as hooks the loop calls in order after every step.

    hook(run, step, state, batch, metrics)      # step = steps done, state after the update

  FiniteCheck   stops the run at a non-finite loss or gradient norm (unless skip_nonfinite)
  LogMetrics    every log_every steps: metrics.jsonl, TensorBoard (and wandb, config.logging.wandb),
                progress bar, tokens/s, MFU
  PeriodicEval  every eval_every steps: the held-out evaluator
  Checkpoint    saves by the checkpoint policy; on SIGTERM/SIGINT or a preemption notice saves
                and asks the loop to stop (``run.stop``)

A new hook is a callable with that signature added to :func:`default_hooks` (levanter's
``Trainer.add_hook``); evaluators by name live in ``kto_jax.train.evaluators``.
"""

from __future__ import annotations

import json
import os
import signal
import time

import jax
import numpy as np
from tqdm import tqdm

from kto_jax.train.evaluators import held_out
from kto_jax.train.flops import device_peak_flops, step_flops
from kto_jax.train.tracking import WandbTracker


class MetricsWriter:
    """metrics.jsonl plus TensorBoard events (tensorboardX, no TensorFlow) and, when ``config``
    asks for it, the same rows in a wandb run (kto_jax/train/tracking.py); process 0 only."""

    def __init__(self, workdir: str, config=None):
        self.enabled = jax.process_index() == 0
        self.wandb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
            self.tb = SummaryWriter(os.path.join(workdir, "tb"))
            if config is not None:
                self.wandb = WandbTracker.open(config, workdir)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _py(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(step, row)

    def close(self, results: dict | None = None) -> None:
        """Close the files; ``results`` (eval.json's, at the end of training) go to wandb's summary."""
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
            if self.wandb is not None:
                self.wandb.close(results)


def _py(value):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


class Preemption:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves, and exits 0."""

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def finite_check(run, step, state, batch, metrics) -> None:
    """A non-finite loss or gradient norm stops the run naming the step, keeping the last good checkpoint."""
    if run.plan.skip_nonfinite or bool(jax.device_get(metrics["finite"])):
        return
    run.checkpointer.close()
    raise FloatingPointError(
        f"non-finite loss or gradient norm at step {step} (loss {float(metrics['loss'])}, grad_norm "
        f"{float(metrics['grad_norm'])}); the last good checkpoint is kept in {run.checkpointer.directory}. "
        "Lower config.train.optimizer.lr, check the data, or set config.train.skip_nonfinite=True."
    )


class LogMetrics:
    """Every ``log_every`` steps (and the last): one metrics.jsonl row with the step's metrics,
    step time and tokens/s since the last row, and MFU on devices with a known peak. The
    analytic FLOPs per step depend only on the padded length (one count per length)."""

    def __init__(self, run, first_step: int):
        self.every = run.plan.loop.log_every
        peak = device_peak_flops(jax.devices()[0].device_kind)
        self.peak = peak * jax.device_count() if peak else None
        self.flops: dict[int, float] = {}
        self.bar = tqdm(
            total=run.steps,
            initial=first_step,
            desc=run.plan.loss.name,
            disable=jax.process_index() != 0 or not run.steps,
            dynamic_ncols=True,
        )
        self.last_time, self.last_step, self.tokens = time.perf_counter(), first_step, 0.0

    def step_flops(self, run, batch: int, length: int) -> float:
        if (batch, length) not in self.flops:
            plan = run.plan
            self.flops[batch, length] = step_flops(
                plan.model_config,
                plan.loss,
                batch=batch,
                length=length,
                reference_mode=plan.reference_mode,
                hparams=dict(plan.hparams),
            )
        return self.flops[batch, length]

    def useful_flops(self, run, batch) -> float:
        """The step's model FLOPs: padded, G sequences of the batch's length; packed, R rows of the
        row length times the fraction of their tokens that are real (MFU on useful tokens)."""
        schema = run.engine.spec.schema
        rows, length = batch[schema.length_key].shape
        if not schema.packed:
            return self.step_flops(run, run.plan.global_batch_size, length)
        return self.step_flops(run, rows * jax.process_count(), length) * schema.real_fraction(batch)

    def __call__(self, run, step, state, batch, metrics) -> None:
        self.bar.update(1)
        if step % self.every and step != run.steps:
            self.tokens += float(run.engine.spec.schema.training_tokens(batch)) * jax.process_count()
            return
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        self.tokens += float(metrics["tokens"])
        row = {k: v for k, v in metrics.items() if k != "finite"}
        row["nonfinite_skipped"] = int(jax.device_get(state.nonfinite_skipped))
        step_time = (now - self.last_time) / (step - self.last_step)
        row.update(step_time_s=step_time, tokens_per_s=self.tokens / (now - self.last_time))
        if self.peak:
            row["mfu"] = self.useful_flops(run, batch) / step_time / self.peak
        run.writer.write(step, row)
        self.bar.set_postfix(
            {k: f"{float(row[k]):.4g}" for k in ("loss", "rewards/margins", "kl", "tokens_per_s") if k in row}
        )
        self.last_time, self.last_step, self.tokens = now, step, 0.0

    def close(self) -> None:
        self.bar.close()


class PeriodicEval:
    """The held-out evaluator every ``eval_every`` steps (not at the last step: the end evaluates)."""

    def __init__(self, run):
        self.every = run.plan.eval.every
        self.last = None  # the latest eval metrics, for the checkpoint's best-metric policy

    def __call__(self, run, step, state, batch, metrics) -> None:
        self.last = None
        if self.every and step % self.every == 0 and step != run.steps:
            self.last = held_out(run, state)["held_out"]
            run.writer.write(step, self.last)


class Checkpoint:
    """Saves by the checkpoint policy (the final step always); a preemption saves and stops the loop."""

    def __init__(self, preemption: Preemption, evals: PeriodicEval):
        self.preemption, self.evals = preemption, evals

    def __call__(self, run, step, state, batch, metrics) -> None:
        stop = self.preemption.signal is not None or run.checkpointer.reached_preemption(step)
        run.checkpointer.save(
            step, state, run.loader.state(), run.meta, metrics=self.evals.last, force=stop or step == run.steps
        )
        if stop and step != run.steps:
            run.stop = (
                f"preempted ({self.preemption.signal or 'preemption notice'}) at step {step}: checkpoint saved in "
                f"{run.checkpointer.directory}; rerun the same command to resume"
            )


def default_hooks(run, first_step: int, preemption: Preemption) -> list:
    evals = PeriodicEval(run)
    return [finite_check, LogMetrics(run, first_step), evals, Checkpoint(preemption, evals)]
