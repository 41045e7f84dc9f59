"""The typed parts of a run's plan: what the data, the evaluators, the optimizer and the loop read.

    plan.data.sources, plan.data.tokenizer, plan.eval.num_prompts, plan.optimizer.lr, plan.loop.log_every

``kto_jax.train.plan.make_plan`` validates the config (every value rule is in
``kto_jax/train/rules.py``, the rules across fields and outside facts in plan.py) and then reads
each part here from it with ``*_plan(config)``: plain, frozen values, no ConfigDict, so setup, the
loader, the evaluators, the hooks and the loop take the plan and none of them checks again.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any


@dataclasses.dataclass(frozen=True)
class DataPlan:
    """``config.data`` (and the seed) as the loaders read it."""

    sources: str
    eval_sources: str  # "" = the eval split of ``sources``
    train_split: str
    eval_split: str
    data_dir: str
    manual_dir: str | None
    skip_bad_records: bool
    files: tuple[tuple[str, Any], ...]  # ``FilesOptions`` fields of every files: source
    sft_targets: str
    sft_examples: str
    one_y_per_x: bool
    desirable_fraction: float
    undesirable_fraction: float
    tokenizer: str  # "bytes", a Hugging Face folder, or "" (a preset's: none)
    chat_template: str
    max_length: int
    max_prompt_length: int
    truncation_mode: str
    bucket: int
    seed: int

    @property
    def tokenizer_folder(self) -> str | None:
        """The folder the tokenizer (and a ``chat_template="tokenizer"`` template) comes from; None for bytes."""
        return self.tokenizer if self.tokenizer and self.tokenizer != "bytes" else None


def data_plan(config, presets) -> DataPlan:
    """``config.data`` as a :class:`DataPlan`; ``presets``: the preset model names (whose tokenizer
    is the byte one only when ``config.data.tokenizer`` says so)."""
    d = config.data
    name = d.tokenizer or (config.model.name if config.model.name not in presets else "")
    return DataPlan(
        sources=d.sources,
        eval_sources=d.get("eval_sources", ""),
        train_split=d.train_split,
        eval_split=d.eval_split,
        data_dir=d.data_dir,
        manual_dir=d.manual_dir or None,
        skip_bad_records=bool(d.skip_bad_records),
        files=(
            ("test", d.eval_files),
            ("holdout_fraction", float(d.holdout_fraction)),
            ("schema", d.file_schema),
            ("columns", d.columns),
        ),
        sft_targets=d.sft_targets,
        sft_examples=d.sft_examples,
        one_y_per_x=bool(d.one_y_per_x),
        desirable_fraction=float(d.desirable_fraction),
        undesirable_fraction=float(d.undesirable_fraction),
        tokenizer=os.path.expanduser(name) if name and name != "bytes" else name,
        chat_template=d.chat_template,
        max_length=int(d.max_length),
        max_prompt_length=int(d.max_prompt_length),
        truncation_mode=d.truncation_mode,
        bucket=int(d.bucket),
        seed=int(config.seed),
    )


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """``config.eval`` (and the evaluation cadence of ``config.train``) as the evaluators read it.
    ``settings`` is ``config.eval`` itself, for the judges, which build from their own section
    (``config.eval.api``, ``config.eval.reward_model``; ``kto_jax.judges.make_judge``)."""

    evaluators: tuple[str, ...]
    only: bool
    judge: str
    baseline: str
    against: str
    order_seed: int
    num_prompts: int
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    batch_size: int
    every: int  # config.train.eval_every: held-out metrics every N steps (0: at the end)
    batches: int  # config.train.eval_batches
    settings: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)


def eval_plan(config, evaluators: tuple[str, ...]) -> EvalPlan:
    e = config.eval
    return EvalPlan(
        evaluators=evaluators,
        only=bool(e.only),
        judge=e.judge,
        baseline=e.baseline,
        against=e.against,
        order_seed=int(e.order_seed),
        num_prompts=int(e.num_prompts),
        max_new_tokens=int(e.max_new_tokens),
        temperature=float(e.temperature),
        top_p=float(e.top_p),
        top_k=int(e.top_k),
        batch_size=int(e.batch_size),
        every=int(config.train.eval_every),
        batches=int(config.train.eval_batches),
        settings=config,
    )


@dataclasses.dataclass(frozen=True)
class OptimizerPlan:
    """``config.train.optimizer``: the update rule, its schedule and clipping (``kto_jax.train.state``)."""

    name: str
    lr: float
    schedule: str
    warmup_steps: int
    warmup_ratio: float
    warmup_start_factor: float
    grad_clip: float
    value_head_grad_clip: float
    b1: float
    b2: float
    eps: float
    weight_decay: float

    def get(self, name: str, default=None):
        """Attribute access with a default, as a ConfigDict's (``make_optimizer`` takes either)."""
        return getattr(self, name, default)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def optimizer_plan(config) -> OptimizerPlan:
    o = config.train.optimizer
    return OptimizerPlan(
        name=o.name,
        lr=float(o.lr),
        schedule=o.get("schedule", "constant"),
        warmup_steps=int(o.warmup_steps),
        warmup_ratio=float(o.get("warmup_ratio", 0.0)),
        warmup_start_factor=float(o.get("warmup_start_factor", 0.0)),
        grad_clip=float(o.grad_clip),
        value_head_grad_clip=float(o.get("value_head_grad_clip", 0.1)),
        b1=float(o.b1),
        b2=float(o.b2),
        eps=float(o.eps),
        weight_decay=float(o.weight_decay),
    )


@dataclasses.dataclass(frozen=True)
class LoopPlan:
    """What the loop and its hooks read: logging cadence, checkpoints, the reference cache's folder."""

    log_every: int
    every_steps: int  # config.checkpoint.*
    every_minutes: float
    keep_last: int
    best_metric: str
    best_mode: str
    reference_cache_dir: str  # config.reference.cache_dir ("" = the workdir)


def loop_plan(config) -> LoopPlan:
    c = config.checkpoint
    return LoopPlan(
        log_every=int(config.train.log_every),
        every_steps=int(c.every_steps),
        every_minutes=float(c.every_minutes),
        keep_last=int(c.keep_last),
        best_metric=c.best_metric,
        best_mode=c.best_mode,
        reference_cache_dir=config.reference.get("cache_dir", ""),
    )
