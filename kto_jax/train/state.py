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


def init_state(spec, optimizer: optax.GradientTransformation, model_params, seed: int) -> TrainState:
    """The state at step 0 (a pure function of the model params): the policy params (the
    model's, plus any of the feed's own, e.g. offline PPO's value head), the optimizer's
    initial state, RNG ``PRNGKey(seed)``, zero loss state and skip count.

    Run under ``jax.eval_shape`` on the logically boxed param shapes it gives the abstract
    state and, through the boxes optax keeps on the moments, every leaf's logical axes
    (:func:`state_shardings`); jitted on real params with those shardings it gives the state
    on the mesh (:func:`create_state`). The loop, the AOT check, the benchmark and the tests
    all build their state here.
    """
    params = {"model": model_params, **spec.feed.init_params(spec.model.config, seed)}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(seed),
        loss_state={arg: jnp.zeros((), jnp.float32) for arg, _ in spec.loss.state_metrics},
        nonfinite_skipped=jnp.zeros((), jnp.int32),
    )


def _boxed_state(spec, optimizer):
    from kto_jax.models import abstract_params

    return jax.eval_shape(lambda p: init_state(spec, optimizer, p, 0), abstract_params(spec.model.config))


def state_shardings(spec, optimizer: optax.GradientTransformation, mesh) -> TrainState:
    """NamedShardings of every leaf of the state on ``mesh``, from the logical axes of the
    params (moments follow the params they track; scalars, RNG and the value head are replicated)."""
    import flax.linen as nn

    from kto_jax import sharding

    return sharding.logical_to_sharding(nn.get_partition_spec(_boxed_state(spec, optimizer)), mesh)


def abstract_state(spec, optimizer: optax.GradientTransformation, mesh) -> TrainState:
    """The state as ``jax.ShapeDtypeStruct`` leaves carrying their shardings (nothing allocated)."""
    import flax.linen as nn

    shapes = nn.unbox(_boxed_state(spec, optimizer))
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                                  state_shardings(spec, optimizer, mesh))


def create_state(spec, optimizer: optax.GradientTransformation, model_params, seed: int, mesh) -> TrainState:
    """:func:`init_state` on real params, each leaf created on its sharding. The state owns new
    buffers, so ``model_params`` stay valid (they serve as the frozen reference)."""
    import functools

    init = functools.partial(init_state, spec, optimizer, seed=seed)
    return jax.jit(init, out_shardings=state_shardings(spec, optimizer, mesh))(model_params)
