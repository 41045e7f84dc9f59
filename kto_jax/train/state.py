"""The train state and the optimizer, both plain pytrees built from the config.

``TrainState`` holds what changes during training: the policy's trainable params (all of
them unless ``config.train.freeze`` names some, ``kto_jax.train.trainable``), the optimizer
state over those, the step, the RNG, small loss state (BCO's running reward mean) and the count of
skipped non-finite updates. The frozen
reference params travel beside it as a separate argument of the step (never donated,
never saved twice); with ``config.reference.mode = "cached"`` there are none at all; with
``"sync"`` the reference moves, so it is part of the state (``reference``), saved and resumed.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from kto_jax import sharding
from kto_jax.errors import InputError
from kto_jax.models import abstract_params
from kto_jax.train import trainable

OPTIMIZERS = ("rmsprop", "adamw", "adam", "sgd")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # the trainable leaves of the policy params (frozen ones travel beside the state)
    opt_state: Any
    rng: jax.Array
    loss_state: dict
    nonfinite_skipped: jax.Array  # updates skipped for a non-finite loss or gradient norm
    reference: Any = None  # reference.mode "sync": the moving reference params (sharded and saved as the policy's)


SCHEDULES = ("constant", "cosine", "linear")


def warmup_schedule(lr: float, warmup_steps: int):
    """HALOs legacy's schedule: lr * min(1, (step + 1) / (warmup_steps + 1)), then constant."""
    return lambda count: lr * jnp.minimum(1.0, (count + 1.0) / (warmup_steps + 1.0))


def resolved_warmup_steps(cfg, total_steps: int = 0) -> int:
    """W: ``warmup_steps``, or ceil(warmup_ratio * total_steps) when ``warmup_ratio`` > 0 (HALOs main's
    ``num_training_steps * warmup``, launch.py:272; a fractional milestone switches at the next step)."""
    ratio = float(cfg.get("warmup_ratio", 0.0))
    if not ratio:
        return int(cfg.warmup_steps)
    if not (0 < ratio < 1 and total_steps > 0):
        raise InputError(
            f"config.train.optimizer.warmup_ratio={ratio} needs 0 < ratio < 1 and the run's total steps "
            f"(make_optimizer(..., total_steps=...); got {total_steps})"
        )
    return math.ceil(round(ratio * total_steps, 6))


def lr_schedule(cfg, total_steps: int = 0) -> optax.Schedule:
    """The learning rate at optimizer step s = 0, 1, ... from ``config.train.optimizer`` (W warmup steps,
    T = ``total_steps``), the one schedule the optimizer follows and the ``lr`` metric reports.

    warmup, s < W:    lr (s + 1) / (W + 1)         warmup_start_factor = 0 (HALOs legacy, trainers.py:342)
                      lr (f + (1 - f) s / W)       warmup_start_factor = f > 0 (HALOs main: torch LinearLR
                                                   with start_factor 0.1, launch.py:273)
    then, k = s - W, D = T - W:
      "constant"  lr                               (the default; with f = 0 today's schedule exactly)
      "cosine"    lr (1 + cos(pi min(k, D) / D)) / 2   (torch CosineAnnealingLR, eta_min 0, launch.py:276)
      "linear"    lr (1 - min(k, D) / D)
    """
    name, lr = cfg.get("schedule", "constant"), float(cfg.lr)
    if name not in SCHEDULES:  # for callers without a plan (the plan's rule is kto_jax/train/rules.py's)
        raise InputError(f"config.train.optimizer.schedule={name!r} is not known; use one of {SCHEDULES}")
    warmup = resolved_warmup_steps(cfg, total_steps)
    start = float(cfg.get("warmup_start_factor", 0.0))
    if start and warmup:
        warm = optax.linear_schedule(start * lr, lr, warmup)
    else:
        warm = warmup_schedule(lr, warmup)
    if name == "constant":
        after = optax.constant_schedule(lr)
    else:
        decay = total_steps - warmup
        if decay <= 0:
            raise InputError(
                f"config.train.optimizer.schedule={name!r} decays over the run's total steps after "
                f"warmup: pass make_optimizer(..., total_steps=T) with T > {warmup} (got {total_steps})"
            )
        after = {"cosine": optax.cosine_decay_schedule(lr, decay), "linear": optax.linear_schedule(lr, 0.0, decay)}[
            name
        ]
    return optax.join_schedules([warm, after], [warmup])


def _param_groups(params) -> dict:
    """Top-level param groups: offline PPO's "value_head", and "model" for the rest."""
    return {k: "value_head" if k == "value_head" else "model" for k in params}


def make_optimizer(cfg, total_steps: int = 0) -> optax.GradientTransformation:
    """Optax optimizer from ``config.train.optimizer``: gradient clipping, then the update rule with the
    learning rate of :func:`lr_schedule` (``total_steps``: the run's steps, for warmup_ratio and decay).

    Clipping is by global norm per group, as HALOs' PPOTrainer.clip_gradient (trainers.py:1355-1359):
    ``params["value_head"]`` (offline PPO's critic) to ``value_head_grad_clip`` (HALOs'
    v_head_max_grad_norm 0.1), everything else to ``grad_clip``; 0 = no clipping. The update rule is
    the same for both groups (HALOs: one torch optimizer over policy.parameters(), trainers.py:1211).
    rmsprop matches torch.optim.RMSprop (the paper's: decay 0.99, eps 1e-8 outside the
    square root); adamw uses (b1, b2, eps, weight_decay) from the config.
    """
    schedule = lr_schedule(cfg, total_steps)
    rules = {  # cfg.name is one of OPTIMIZERS (kto_jax/train/rules.py checks)
        "rmsprop": lambda: optax.rmsprop(schedule, decay=0.99, eps=1e-8, eps_in_sqrt=False),
        "adamw": lambda: optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
        "adam": lambda: optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        "sgd": lambda: optax.sgd(schedule),
    }
    assert set(rules) == set(OPTIMIZERS)
    rule = rules[cfg.name]()

    def clip(norm):
        return optax.clip_by_global_norm(norm) if norm else optax.identity()

    clips = optax.multi_transform(
        {"model": clip(cfg.grad_clip), "value_head": clip(cfg.get("value_head_grad_clip", 0.1))}, _param_groups
    )
    return optax.chain(clips, rule)


def schedule_count(opt_state) -> jax.Array:
    """The optimizer's own update count, where its learning-rate schedule stands: the step for a
    fresh optimizer, ahead of it for one carried over from an earlier run (``config.init.optimizer``),
    behind it after skipped non-finite updates (``train.skip_nonfinite`` keeps the old state)."""
    found = [
        x
        for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
        if isinstance(x, optax.ScaleByScheduleState)
    ]
    if len(found) != 1:
        raise ValueError(f"the optimizer state holds {len(found)} learning-rate schedules; make_optimizer builds one")
    return found[0].count


def learning_rate(cfg, step, total_steps: int = 0) -> jax.Array:
    """The learning rate of optimizer step ``step``: :func:`lr_schedule`, the optimizer's own."""
    return lr_schedule(cfg, total_steps)(step)


def policy_params(spec, model_params, seed: int) -> dict:
    """The policy params at step 0: ``{"model": model_params}`` plus the feed's own (offline PPO's
    ``value_head``, initialised from ``seed``)."""
    return {"model": model_params, **spec.feed.init_params(spec.model.config, seed)}


def init_state(spec, optimizer: optax.GradientTransformation, model_params, seed: int) -> TrainState:
    """The state at step 0 (a pure function of the model params): the trainable leaves of the policy
    params (:func:`policy_params` less what ``spec.freeze`` matches), the optimizer's initial state over
    them, RNG ``PRNGKey(seed)``, zero loss state and skip count.

    Run under ``jax.eval_shape`` on the logically boxed param shapes it gives the abstract
    state and, through the boxes optax keeps on the moments, every leaf's logical axes
    (:func:`state_shardings`); jitted on real params with those shardings it gives the state
    on the mesh (:func:`create_state`). The loop, the AOT check, the benchmark and the tests
    all build their state here.
    """
    params, _ = trainable.split(policy_params(spec, model_params, seed), spec.freeze)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(seed),
        loss_state={arg: jnp.zeros((), jnp.float32) for arg, _ in spec.loss.state_metrics},
        nonfinite_skipped=jnp.zeros((), jnp.int32),
        # a copy: a buffer of its own, so donating the state never frees the policy's twice
        reference=jax.tree_util.tree_map(lambda x: x + jnp.zeros((), x.dtype), model_params)
        if spec.reference_mode == "sync"
        else None,
    )


def _boxed_state(spec, optimizer):
    return jax.eval_shape(lambda p: init_state(spec, optimizer, p, 0), abstract_params(spec.model.config))


def abstract_policy(spec, mesh) -> dict:
    """The policy params (:func:`policy_params`) as ``jax.ShapeDtypeStruct`` leaves with their shardings
    on ``mesh``: what the AOT check lowers the reference and the frozen params with."""
    boxed = jax.eval_shape(lambda p: policy_params(spec, p, 0), abstract_params(spec.model.config))
    shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings
    )


def state_shardings(spec, optimizer: optax.GradientTransformation, mesh) -> TrainState:
    """NamedShardings of every leaf of the state on ``mesh``, from the logical axes of the
    params (moments follow the params they track; scalars, RNG and the value head are replicated)."""
    return sharding.logical_to_sharding(nn.get_partition_spec(_boxed_state(spec, optimizer)), mesh)


def abstract_state(spec, optimizer: optax.GradientTransformation, mesh) -> TrainState:
    """The state as ``jax.ShapeDtypeStruct`` leaves carrying their shardings (nothing allocated)."""
    shapes = nn.unbox(_boxed_state(spec, optimizer))
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, state_shardings(spec, optimizer, mesh)
    )


def create_state(spec, optimizer: optax.GradientTransformation, model_params, seed: int, mesh) -> TrainState:
    """:func:`init_state` on real params, each leaf created on its sharding. The state owns new
    buffers, so ``model_params`` stay valid (they serve as the frozen reference)."""
    init = functools.partial(init_state, spec, optimizer, seed=seed)
    return jax.jit(init, out_shardings=state_shardings(spec, optimizer, mesh))(model_params)


def frozen_leaves(spec, policy: dict) -> dict:
    """The frozen leaves of the policy params ``policy`` (``spec.freeze``; ``{}`` when nothing is frozen),
    the step's ``frozen_params`` argument: ``policy``'s own buffers (no copy), less those the step reads
    from the reference params in reference mode "model" (the same initial weights, passed once)."""
    if not spec.freeze:
        return {}
    _, frozen = trainable.split(policy, spec.freeze)
    if spec.reference_mode == "model":
        frozen = {k: v for k, v in frozen.items() if k != "model"}
    return frozen
