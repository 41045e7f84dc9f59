"""The engine of a run: its step spec, optimizer, state shardings and the compiled steps, built once.

    engine = build_engine(plan.step_spec(model), plan.optimizer, mesh)
    state = engine.create_state(model_params)           # the loop, the benchmark, the tests
    frozen = engine.frozen_params(model_params)          # config.train.freeze's leaves ({} if none)
    abstract = engine.abstract_state()                   # the AOT check: shapes + shardings only
    state, metrics = engine.train_fn(state, batch, reference_params, frozen)

The loop runs ``train_fn`` on real arrays and the AOT check lowers the same ``train_fn`` on
abstract ones carrying the same shardings, so the fit report describes the program the loop
runs (tests/test_aot.py compares the two lowered programs).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from kto_jax import sharding
from kto_jax.models import lora
from kto_jax.train.feeds import StepSpec
from kto_jax.train.state import (
    TrainState,
    abstract_policy,
    abstract_state,
    create_state,
    frozen_leaves,
    learning_rate,
    make_optimizer,
    policy_params,
    state_shardings,
)
from kto_jax.train.step import eval_step, jit_train_step, reference_logps


@dataclasses.dataclass(frozen=True)
class Engine:
    spec: StepSpec
    optimizer: optax.GradientTransformation
    lr_fn: Callable
    mesh: Mesh
    seed: int
    state_shardings: Any
    train_fn: Callable  # (state, batch, reference_params, frozen_params) -> (state, metrics); the state is donated
    eval_fn: Callable  # (params, batch, reference_params, loss_state) -> metrics
    reference_fn: Callable  # (reference_params, batch) -> cached reference log-probs

    def create_state(self, model_params) -> TrainState:
        return create_state(self.spec, self.optimizer, model_params, self.seed, self.mesh)

    def frozen_params(self, model_params) -> dict:
        """The step's ``frozen_params`` argument: the frozen leaves of the policy (their own buffers;
        ``{}`` when ``config.train.freeze`` is empty)."""
        if not self.spec.freeze:
            return {}
        return frozen_leaves(self.spec, policy_params(self.spec, model_params, self.seed))

    def abstract_state(self) -> TrainState:
        return abstract_state(self.spec, self.optimizer, self.mesh)

    def abstract_batch(self, batch_size: int, length: int, rows: int | None = None) -> dict:
        """A global batch of the step's schema, abstract, sharded over the data axes (packed
        sequences in ``rows`` rows; default one example per row)."""
        return {
            name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(self.mesh, len(shape)))
            for name, (shape, dtype) in self.spec.schema.shapes(batch_size, length, rows).items()
        }

    def lower(self, batch_size: int, length: int, rows: int | None = None):
        """The train step lowered on abstract arguments (nothing is allocated): the state, in reference
        mode "model" the frozen reference params, and the frozen params (all sharded like the policy's)."""
        state, policy = self.abstract_state(), abstract_policy(self.spec, self.mesh)
        # the reference is the initial model; a LoRA run's is its base (the same leaves less the adapters)
        reference = lora.split_adapters(policy["model"])[0] if self.spec.reference_mode == "model" else None
        batch = self.abstract_batch(batch_size, length, rows)
        with sharding.activation_rules(self.mesh):
            return self.train_fn.lower(state, batch, reference, frozen_leaves(self.spec, policy))


def build_engine(spec: StepSpec, optimizer_config, mesh: Mesh, seed: int = 0, total_steps: int = 0) -> Engine:
    """Everything compiled about a run, from its step spec and ``config.train.optimizer``;
    ``total_steps`` (the run's resolved steps) sizes decaying schedules and ``warmup_ratio``."""
    optimizer = make_optimizer(optimizer_config, total_steps)
    lr_fn = functools.partial(learning_rate, optimizer_config, total_steps=total_steps)
    shardings = state_shardings(spec, optimizer, mesh)
    return Engine(
        spec=spec,
        optimizer=optimizer,
        lr_fn=lr_fn,
        mesh=mesh,
        seed=seed,
        state_shardings=shardings,
        train_fn=jit_train_step(spec, optimizer, lr_fn, shardings),
        eval_fn=jax.jit(functools.partial(eval_step, spec)),
        reference_fn=jax.jit(functools.partial(reference_logps, spec)),
    )
