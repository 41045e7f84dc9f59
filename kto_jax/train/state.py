"""The train state and the optimizer, both plain pytrees built from the config.

``TrainState`` holds what changes during training: the policy params, the optimizer
state, the step, the RNG, small loss state (BCO's running reward mean) and the count of
skipped non-finite updates. The frozen
reference params travel beside it as a separate argument of the step (never donated,
never saved twice); with ``config.reference.mode = "cached"`` there are none at all.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("rmsprop", "adamw", "adam", "sgd")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    loss_state: dict
    nonfinite_skipped: jax.Array  # updates skipped for a non-finite loss or gradient norm


def warmup_schedule(lr: float, warmup_steps: int):
    """HALOs' schedule: lr * min(1, (step + 1) / (warmup_steps + 1)), then constant."""
    return lambda count: lr * jnp.minimum(1.0, (count + 1.0) / (warmup_steps + 1.0))


def make_optimizer(cfg) -> optax.GradientTransformation:
    """Optax optimizer from ``config.train.optimizer``: global-norm clipping, then the update rule.

    rmsprop matches torch.optim.RMSprop (the paper's: decay 0.99, eps 1e-8 outside the
    square root); adamw uses (b1, b2, eps, weight_decay) from the config.
    """
    name = cfg.name
    if name not in OPTIMIZERS:
        raise ValueError(f"config.train.optimizer.name={name!r} is not known; use one of {OPTIMIZERS}")
    schedule = warmup_schedule(cfg.lr, cfg.warmup_steps)
    if name == "rmsprop":
        rule = optax.rmsprop(schedule, decay=0.99, eps=1e-8, eps_in_sqrt=False)
    elif name == "adamw":
        rule = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif name == "adam":
        rule = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    else:
        rule = optax.sgd(schedule)
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity()
    return optax.chain(clip, rule)


def learning_rate(cfg, step) -> jax.Array:
    return warmup_schedule(cfg.lr, cfg.warmup_steps)(step)


def opt_state_shardings(optimizer: optax.GradientTransformation, boxed_policy, mesh):
    """NamedShardings of the optimizer state: moments sharded like the params they track,
    scalars (step counts) replicated. ``boxed_policy`` is the policy param tree with its
    logical-axis boxes (``kto_jax.models.abstract_params``); optax keeps the boxes on the
    moments, so their logical axes come through ``eval_shape``."""
    import flax.linen as nn

    from kto_jax import sharding

    specs = nn.get_partition_spec(jax.eval_shape(optimizer.init, boxed_policy))
    return sharding.logical_to_sharding(specs, mesh)
