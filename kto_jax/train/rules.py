"""Every config value's rule, in one table, and what may change when a run resumes.

    check_values(config)                      # raises InputError naming each bad field, its value and the fix
    config_diff(saved, new)                   # [(field, old, new)] between two configs' JSON
    disallowed_on_resume(diff)                # the changes RESUMABLE does not allow

A rule is ``Rule(field, ok, want, fix)``: ``config.<field>`` must satisfy ``ok`` ("must be
<want>"); a ``loss.*`` rule applies when the chosen loss has that hyperparameter. Rules that
need several fields (``CROSS_RULES``) or outside facts (files, the loss registry, the device
count) are in kto_jax/train/plan.py, which calls :func:`check_values` first.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable
from typing import Any

from kto_jax.errors import InputError
from kto_jax.losses.fdpo import DIVERGENCES
from kto_jax.losses.halo import VALUE_FUNCTIONS
from kto_jax.losses.mixture import is_mixture, term_names
from kto_jax.models.config import REMAT_POLICIES
from kto_jax.train.state import OPTIMIZERS, SCHEDULES

DTYPES = ("float32", "bfloat16", "float16", "float64")
REFERENCE_MODES = ("model", "cached", "sync")


@dataclasses.dataclass(frozen=True)
class Rule:
    field: str  # dotted path under config
    ok: Callable[[Any], bool]
    want: str  # "must be <want>"
    fix: str  # what to set instead
    losses: tuple[str, ...] = ()  # the rule holds for these losses only (config.loss.name); () = every loss
    other_losses: bool = False  # True: for every loss except ``losses``


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def positive(v) -> bool:
    return _number(v) and v > 0


def non_negative(v) -> bool:
    return _number(v) and v >= 0


def count(minimum: int) -> Callable[[Any], bool]:
    return lambda v: _integer(v) and v >= minimum


def fraction(low_open: bool, high_open: bool, low: float = 0.0, high: float = 1.0) -> Callable[[Any], bool]:
    return lambda v: _number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)


def one_of(*values) -> Callable[[Any], bool]:
    return lambda v: v in values


def _names(values) -> str:
    return ", ".join(repr(v) for v in values)


def _remat_policies() -> tuple[str, ...]:
    return tuple(REMAT_POLICIES)


def _value_functions() -> tuple[str, ...]:
    return tuple(VALUE_FUNCTIONS)


def _optimizers() -> tuple[str, ...]:
    return OPTIMIZERS, SCHEDULES


def _table() -> tuple[Rule, ...]:
    optimizers, schedules = _optimizers()
    remat, values = _remat_policies(), _value_functions()
    mesh_axis = lambda v: _integer(v) and (v == -1 or v >= 1)  # noqa: E731
    return (
        Rule("seed", count(0), "an integer >= 0", "a seed such as 0 or 1"),
        # model
        Rule(
            "model.compute_dtype",
            one_of(*DTYPES),
            f"one of {_names(DTYPES)}",
            "'float32' on CPU, 'bfloat16' on accelerators",
        ),
        Rule(
            "model.param_dtype",
            one_of(*DTYPES),
            f"one of {_names(DTYPES)}",
            "'float32' (the default) or 'bfloat16' (HALOs)",
        ),
        Rule(
            "model.remat_policy",
            one_of(*remat),
            f"one of {_names(remat)}",
            "'none' for small models, 'full' to save memory",
        ),
        Rule(
            "model.attention_impl",
            one_of("", "xla", "cudnn", "splash", "blocked"),
            "one of '', 'xla', 'cudnn', 'splash', 'blocked'",
            "'' (the default: 'blocked' on CPU), 'cudnn' on GPU, 'splash' on TPU",
        ),
        Rule(
            "reference.mode",
            one_of(*REFERENCE_MODES),
            f"one of {_names(REFERENCE_MODES)}",
            "'model' (a frozen reference in the step)",
        ),
        Rule(
            "reference.sync_every", count(1), "an integer >= 1", "1 (every step, humanline) or TR-DPO's tau such as 64"
        ),
        Rule(
            "reference.sync_alpha",
            fraction(True, False),
            "in (0, 1]",
            "1.0 (hard update) or TR-DPO's alpha such as 0.6",
        ),
        Rule(
            "reference.humanline",
            lambda v: isinstance(v, bool),
            "true or false",
            "false (the default) or true (humanline)",
        ),
        Rule("reference.log_epsilon_P", lambda v: _number(v) and v < 0, "< 0", "-1.0 (HALOs main)"),
        Rule("reference.log_epsilon_R", lambda v: _number(v) and v > 0, "> 0", "1.5 (HALOs main)"),
        # data
        Rule("data.max_length", count(2), "an integer >= 2", "the longest prompt + completion in tokens, e.g. 2048"),
        Rule("data.max_prompt_length", count(1), "an integer >= 1", "a positive prompt length below data.max_length"),
        Rule("data.bucket", count(1), "an integer >= 1", "a length granularity such as 64"),
        Rule("data.pack_length", count(0), "an integer >= 0", "0 (data.max_length) or a row length such as 4096"),
        Rule(
            "data.truncation_mode",
            one_of("keep_end", "keep_start"),
            "one of 'keep_end', 'keep_start'",
            "'keep_end' (HALOs)",
        ),
        Rule("data.holdout_fraction", fraction(False, True), "in [0, 1)", "0 (none) or a fraction such as 0.1"),
        Rule(
            "data.desirable_fraction", fraction(True, False), "in (0, 1]", "1.0 (all desirable examples) or a fraction"
        ),
        Rule(
            "data.undesirable_fraction",
            fraction(True, False),
            "in (0, 1]",
            "1.0 (all undesirable examples) or a fraction",
        ),
        Rule("data.sft_examples", one_of("desirable", "all"), "one of 'desirable', 'all'", "'desirable' (the default)"),
        Rule(
            "data.sft_targets",
            one_of("all", "per_prompt"),
            "one of 'all', 'per_prompt'",
            "'all' or 'per_prompt' (HALOs' SFT)",
        ),
        # train
        Rule("train.global_batch_size", count(1), "an integer >= 1", "the examples per step, e.g. 32"),
        Rule("train.num_microbatches", count(1), "an integer >= 1", "1, or more to accumulate gradients"),
        Rule("train.steps", count(0), "an integer >= 0", "0 (one epoch) or the number of steps"),
        Rule("train.log_every", count(1), "an integer >= 1", "a logging interval such as 10"),
        Rule("train.eval_every", count(0), "an integer >= 0", "0 (evaluate at the end only) or an interval"),
        Rule("train.eval_batches", count(0), "an integer >= 0", "the held-out batches per evaluation, e.g. 4"),
        Rule("train.chunk_size", count(1), "an integer >= 1", "tokens per log-prob chunk, e.g. 256"),
        Rule(
            "train.optimizer.name",
            one_of(*optimizers),
            f"one of {_names(optimizers)}",
            "'rmsprop' (HALOs legacy) or 'adamw'",
        ),
        Rule("train.optimizer.lr", positive, "> 0", "a learning rate such as 5e-7 (the paper) or 1e-4 (tiny models)"),
        Rule("train.optimizer.warmup_steps", count(0), "an integer >= 0", "0 or the warmup length in steps"),
        Rule(
            "train.optimizer.grad_clip", non_negative, ">= 0", "a global-norm clip such as 10.0 (HALOs), or 0 for none"
        ),
        Rule("train.optimizer.b1", fraction(False, True), "in [0, 1)", "0.9"),
        Rule("train.optimizer.b2", fraction(False, True), "in [0, 1)", "0.999"),
        Rule("train.optimizer.eps", positive, "> 0", "1e-8"),
        Rule("train.optimizer.weight_decay", non_negative, ">= 0", "0.0 or a decay such as 0.01"),
        Rule("train.optimizer.schedule", one_of(*schedules), f"one of {_names(schedules)}", "'constant' (the default)"),
        Rule(
            "train.optimizer.warmup_ratio",
            fraction(False, True),
            "in [0, 1)",
            "0 (use warmup_steps) or a fraction such as 0.1",
        ),
        Rule(
            "train.optimizer.warmup_start_factor",
            fraction(False, False),
            "in [0, 1]",
            "0 (HALOs legacy) or 0.1 (HALOs main)",
        ),
        Rule("train.optimizer.value_head_grad_clip", non_negative, ">= 0", "0.1 (HALOs' v_head_max_grad_norm)"),
        # checkpoints, mesh
        Rule("checkpoint.every_steps", count(0), "an integer >= 0", "0 (at the end and on preemption) or an interval"),
        Rule("checkpoint.every_minutes", non_negative, ">= 0", "0 or an interval in minutes"),
        Rule(
            "checkpoint.keep_last",
            count(1),
            "an integer >= 1",
            "2 (the default): the final checkpoint is the run's output",
        ),
        Rule("checkpoint.best_mode", one_of("min", "max"), "one of 'min', 'max'", "'min' for a loss, 'max' for a rate"),
        Rule("mesh.data", mesh_axis, "-1 (the remaining devices) or an integer >= 1", "-1"),
        Rule("mesh.fsdp", mesh_axis, "-1 or an integer >= 1", "1"),
        Rule("mesh.tensor", mesh_axis, "-1 or an integer >= 1", "1"),
        # eval
        Rule("eval.num_prompts", count(1), "an integer >= 1", "the held-out prompts to sample, e.g. 256"),
        Rule("eval.batch_size", count(1), "an integer >= 1", "the prompts per generation batch, e.g. 64"),
        Rule("eval.max_new_tokens", count(1), "an integer >= 1", "the sample length, e.g. 16"),
        Rule("eval.temperature", non_negative, ">= 0", "1.0 (HALOs) or 0 (greedy)"),
        Rule("eval.top_p", fraction(True, False), "in (0, 1]", "1.0 (off) or 0.95 (HALOs)"),
        Rule("eval.top_k", count(0), "an integer >= 0", "0 (off) or 50 (HALOs)"),
        Rule("eval.order_seed", count(0), "an integer >= 0", "0"),
        Rule("eval.api.concurrency", count(1), "an integer >= 1", "the requests in flight, e.g. 8"),
        Rule("eval.api.timeout_s", positive, "> 0", "seconds per request, e.g. 60"),
        Rule("eval.api.retries", count(0), "an integer >= 0", "4"),
        Rule("eval.api.backoff_s", non_negative, ">= 0", "1.0"),
        Rule("eval.api.max_tokens", count(1), "an integer >= 1", "10 (compare.py)"),
        Rule("eval.api.temperature", non_negative, ">= 0", "0 (compare.py)"),
        Rule("eval.reward_model.batch_size", count(1), "an integer >= 1", "16"),
        Rule("eval.reward_model.max_length", count(2), "an integer >= 2", "512"),
        # logging (kto_jax/train/tracking.py)
        Rule("logging.wandb.enabled", lambda v: isinstance(v, bool), "true or false", "false (the default) or true"),
        Rule(
            "logging.wandb.mode",
            one_of("", "online", "offline"),
            "one of '', 'online', 'offline'",
            "'' (wandb's own: WANDB_MODE, else online) or 'offline'",
        ),
        Rule(
            "logging.wandb.project",
            lambda v: isinstance(v, str) and v.strip() != "",
            "a non-empty project name",
            "a wandb project such as 'kto-jax'",
        ),
        # loss hyperparameters (when the chosen loss has them)
        Rule("loss.beta", positive, "> 0", "the loss's default (0.1 for kto and dpo)"),
        Rule("loss.desirable_weight", positive, "> 0", "1.0, or the KTO paper's rule (the run warns with the range)"),
        Rule("loss.undesirable_weight", positive, "> 0", "1.0, or the KTO paper's rule (the run warns with the range)"),
        Rule(
            "loss.label_smoothing",
            fraction(False, True, high=0.5),
            "in [0, 0.5)",
            "0 (DPO) or 0.2 (cDPO)",
            ("exo_pair",),
            other_losses=True,
        ),
        Rule(
            "loss.label_smoothing",
            fraction(True, True),
            "in (0, 1) for exo_pair (its log(1 - eps) and log(eps))",
            "1e-3 (EXO's default)",
            ("exo_pair",),
        ),
        Rule("loss.tau", fraction(True, False), "in (0, 1]", "0.05 (discopop's default)"),
        Rule("loss.lambda_coef", non_negative, ">= 0", "the loss's default"),
        Rule("loss.cliprange", fraction(True, True), "in (0, 1)", "0.5 (HALOs' offline PPO)"),
        Rule("loss.critic_coef", non_negative, ">= 0", "0.01"),
        Rule("loss.kl_coef", non_negative, ">= 0", "0.1"),
        Rule("loss.gamma", fraction(False, False), "in [0, 1]", "the loss's default"),
        Rule("loss.lam", fraction(False, False), "in [0, 1]", "0.95"),
        Rule(
            "loss.reduction",
            one_of("token", "sequence"),
            "one of 'token', 'sequence'",
            "'token', or 'sequence' (HALOs' SFT)",
        ),
        Rule("loss.reference_point", one_of("kl", "zero"), "one of 'kl', 'zero'", "'kl' (KTO's z0)"),
        Rule("loss.value", one_of(*values), f"one of {_names(values)}", "'sigmoid' (KTO)"),
        Rule("loss.divergence", one_of(*DIVERGENCES), f"one of {_names(DIVERGENCES)}", "'reverse_kl' (fdpo = DPO)"),
        Rule("loss.alpha", fraction(True, True), "in (0, 1) (the alpha-divergence)", "0.5 (fdpo's default)"),
        Rule(
            "loss.ld_alpha",
            fraction(False, False),
            "in [0, 1] (LD-DPO)",
            "1.0 (off), or below 1 to discount the longer reply's extra tokens",
        ),
        Rule("loss.use_weighting", lambda v: isinstance(v, bool), "true or false (WPO)", "false (the default) or true"),
    )


def _get(config, field: str):
    node = config
    for part in field.split("."):
        if part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def problems(config) -> list[str]:
    """One ``config.<field>=<value>: must be <want>; <fix>`` line per value that breaks its rule; a
    mixture's terms (``config.loss.dpo.beta``) each by the rules of the loss they name."""
    out = []
    loss = _get(config, "loss.name")
    for rule in _table():
        if rule.losses and (loss in rule.losses) == rule.other_losses:
            continue
        value = _get(config, rule.field)
        if value is not _MISSING and not rule.ok(value):
            out.append(f"config.{rule.field}={value!r}: must be {rule.want}; set {rule.fix}")
    if isinstance(loss, str) and is_mixture(loss):
        for term in term_names(loss):
            values = _get(config, f"loss.{term}")
            if values is not _MISSING and hasattr(values, "items"):
                view = {"loss": {"name": term, **dict(values.items())}}
                out += [line.replace("config.loss.", f"config.loss.{term}.", 1) for line in problems(view)]
    return out


def check_values(config) -> None:
    """Raise :class:`InputError` listing every value that breaks its rule (one line each)."""
    found = problems(config)
    if found:
        raise InputError("\n".join(found))


# Fields that may differ when a run resumes: they do not change what the saved weights are or how
# the next steps train them. Anything else needs a new --workdir or --resume_with_changes.
RESUMABLE = (
    "checkpoint.*",  # save cadence and retention
    "logging.*",  # where the same metrics are also sent (a resumed run continues its wandb run)
    "train.steps",  # extend a finished run (not below its checkpoint's step)
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "eval.*",  # evaluation reads the weights, never writes them
    "reference.cache_dir",  # where cached reference log-probs are looked up (checked by content)
    "mesh.*",
    "target.*",  # how the same arrays are laid out, the slice an AOT check targets
    "data.data_dir",
    "data.manual_dir",  # where the same data lives
)


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


ABSENT = "(absent)"


def config_diff(saved: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """``[(field, saved value, new value)]`` for every leaf that differs (``ABSENT`` where one lacks it)."""
    a, b = flatten(saved), flatten(new)
    return [
        (k, a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(set(a) | set(b)) if a.get(k, ABSENT) != b.get(k, ABSENT)
    ]


def resumable(field: str) -> bool:
    return any(fnmatch.fnmatchcase(field, pattern) for pattern in RESUMABLE)


def disallowed_on_resume(diff) -> list[tuple[str, Any, Any]]:
    return [change for change in diff if not resumable(change[0])]
