"""Pure train and eval steps for every data kind, jit-compiled once with shardings.

    train_step(state, batch, reference_params, frozen_params) -> (state, metrics)

The global batch [G, ...] is split into M strided microbatches (microbatch m = rows m,
m + M, ...; see ``kto_jax.data.loader``) scanned with gradient accumulation; each
microbatch's loss is a registry loss called with the inputs it names, computed by the feed
of its data kind (``kto_jax.train.feeds``). KTO's KL estimate z0 is therefore per
microbatch, as in HALOs and TRL. Reference log-probs come from frozen ``reference_params``
(mode "model") or from the batch itself (mode "cached": arrays named like the inputs,
``reference_logps``, ``reference_chosen_logps``, ...); both give the same losses. Mode "sync"
keeps a moving reference in the state (``state.reference``, :func:`sync_reference`).

The state holds the policy's trainable leaves; the frozen ones (``config.train.freeze``) arrive
in ``frozen_params``, never donated, and :func:`policy_params` puts the two together before the
feed runs. Gradients, accumulators and updates cover the trainable leaves only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kto_jax.train import trainable
from kto_jax.train.feeds import FEED_METRICS, PAIR_WEIGHTS, StepSpec
from kto_jax.train.state import TrainState, schedule_count

SUMMED_METRICS = ("num_desirable", "num_undesirable", "tokens")


def weighted_pair_loss(fn, inputs: dict, weights, kwargs: dict):
    """WPO's loss mean_i(w_i * l_i) over the microbatch's B pairs, for a loss that is a masked mean of
    per-pair terms l_i (``LossSpec.batch_coupled`` False): the loss with weights w as its example mask
    is sum_i w_i l_i / sum_i w_i, so

        mean_i(w_i l_i) = fn(example_mask=w) * sum_i w_i / B.

    The metrics are the unweighted call's (TRL logs unweighted rewards), plus the weights' mean."""
    loss, _ = fn(**inputs, **kwargs, example_mask=weights)
    _, metrics = fn(**inputs, **kwargs)
    return loss * weights.sum() / weights.shape[0], {**metrics, PAIR_WEIGHTS: weights.mean()}


def microbatch_loss(spec: StepSpec, params, reference_params, mb: dict, loss_state: dict):
    """(loss, (metrics, loss_state)) of one microbatch: the loss called with its inputs by name (with
    WPO's pair weights, :func:`weighted_pair_loss`)."""
    inputs = spec.feed.loss_inputs(spec, params, reference_params, mb)
    feed_metrics = {k: inputs.pop(k) for k in FEED_METRICS if k in inputs}  # the feed's own (humanline/unclamped)
    weights = inputs.pop(PAIR_WEIGHTS, None)
    inputs.update({n: None for n in spec.loss.unused(spec.kwargs)})  # e.g. halo's KL inputs around z = 0
    if weights is None:
        loss, metrics = spec.loss.fn(**inputs, **spec.kwargs, **loss_state)
    else:  # never with run state: the plan refuses WPO for batch-coupled losses
        loss, metrics = weighted_pair_loss(spec.loss.fn, inputs, weights, spec.kwargs)
    metrics = {**metrics, **feed_metrics}
    new_state = {arg: metrics[name] for arg, name in spec.loss.state_metrics}
    return loss, (metrics, new_state)


def split_microbatches(batch: dict, num_microbatches: int) -> dict:
    """[G, ...] -> [M, G/M, ...] with microbatch m = rows m, m + M, m + 2M, ..."""

    def split(x):
        return x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree_util.tree_map(split, batch)


def _aggregate(metrics: dict) -> dict:
    """Per-microbatch metrics [M] -> one value: sums for counts (a mixture's ``kto/num_desirable`` too),
    means otherwise."""
    return {k: (v.sum() if k.rsplit("/", 1)[-1] in SUMMED_METRICS else v.mean()) for k, v in metrics.items()}


def step_reference(spec: StepSpec, state: TrainState, reference_params):
    """The reference params a step scores with: the state's moving one (mode "sync"), else the argument."""
    return state.reference if spec.reference_mode == "sync" else reference_params


def policy_params(spec: StepSpec, params, reference_params, frozen_params):
    """The whole policy: the trainable ``params`` over the frozen leaves. Those are ``frozen_params``
    and, in reference mode "model", the reference's own leaves at the same paths (the frozen copy of
    the initial weights is what a frozen leaf holds, so it is passed once). ``params`` itself when
    nothing is frozen."""
    if not spec.freeze:
        return params
    base = frozen_params or {}
    if spec.reference_mode == "model":
        base = trainable.merge({"model": reference_params}, base)
    return trainable.merge(base, params)


def sync_reference(spec: StepSpec, state: TrainState, policy_model):
    """The moving reference after optimizer step s = ``state.step`` (mode "sync"):

        ref_{s+1} = alpha * theta_s + (1 - alpha) * ref_s   if (s + 1) % sync_every == 0, else ref_s

    with theta_s = ``policy_model`` the policy that step s computed its loss with (before its update), as HALOs main
    syncs before ``optimizer.step()``; alpha = ``sync_alpha`` (TR-DPO's soft update, alpha < 1,
    and hard update, alpha = 1, every tau = ``sync_every`` steps). Mixed in float32."""
    sync = (state.step + 1) % spec.sync_every == 0
    alpha = spec.sync_alpha

    def mix(ref, policy):
        new = policy if alpha == 1.0 else (alpha * policy.astype(jnp.float32) + (1 - alpha) * ref.astype(jnp.float32))
        return jnp.where(sync, new.astype(ref.dtype), ref)

    return jax.tree_util.tree_map(mix, state.reference, policy_model)


def train_step(
    spec: StepSpec,
    optimizer: optax.GradientTransformation,
    lr_fn,
    state: TrainState,
    batch,
    reference_params,
    frozen_params=None,
):
    """One optimizer step over the global batch with gradient accumulation over microbatches; the
    gradient is taken with respect to the trainable leaves (``state.params``) only."""
    whole = functools.partial(policy_params, spec, reference_params=reference_params, frozen_params=frozen_params)
    reference_params = step_reference(spec, state, reference_params)
    grad_fn = jax.value_and_grad(
        lambda p, mb, ls: microbatch_loss(spec, whole(p), reference_params, mb, ls), has_aux=True
    )

    def body(carry, mb):
        grads, loss_state = carry
        (loss, (metrics, loss_state)), g = grad_fn(state.params, mb, loss_state)
        return (jax.tree_util.tree_map(jnp.add, grads, g), loss_state), (loss, metrics)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    mbs = split_microbatches(batch, spec.num_microbatches)
    (grads, loss_state), (losses, metrics) = jax.lax.scan(body, (zeros, state.loss_state), mbs)
    grads = jax.tree_util.tree_map(lambda g: g / spec.num_microbatches, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = _aggregate(metrics)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(losses.mean()) & jnp.isfinite(grad_norm)
    metrics.update(
        loss=losses.mean(),
        grad_norm=grad_norm,
        lr=lr_fn(schedule_count(state.opt_state)),
        tokens=spec.schema.training_tokens(batch),
        finite=finite,
    )
    if spec.skip_nonfinite:  # the step still counts; the update is dropped
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        params, opt_state, loss_state = (
            keep(params, state.params),
            keep(opt_state, state.opt_state),
            keep(loss_state, state.loss_state),
        )
    skipped = state.nonfinite_skipped + (~finite).astype(jnp.int32) if spec.skip_nonfinite else state.nonfinite_skipped
    reference = (
        sync_reference(spec, state, whole(state.params)["model"]) if spec.reference_mode == "sync" else state.reference
    )
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        loss_state=loss_state,
        nonfinite_skipped=skipped,
        reference=reference,
    )
    return new_state, metrics


def reference_logps(spec: StepSpec, reference_params, batch: dict) -> dict:
    """The reference log-probs a batch needs, for ``reference.mode = "cached"``: ``[G]`` arrays named
    as the loss's inputs (and the batch fields the step reads), computed microbatch by microbatch."""

    def body(_, mb):
        return None, spec.feed.reference_logps(spec, reference_params, mb)

    _, out = jax.lax.scan(body, None, split_microbatches(batch, spec.num_microbatches))
    # [M, G/M] -> [G] in the original row order (row i belongs to microbatch i % M)
    return jax.tree_util.tree_map(lambda x: x.swapaxes(0, 1).reshape(-1), out)


def eval_step(spec: StepSpec, params, batch, reference_params, loss_state):
    """Loss and metrics of a batch without an update (microbatched like training)."""

    def body(_, mb):
        loss, (metrics, _) = microbatch_loss(spec, params, reference_params, mb, loss_state)
        return None, (loss, metrics)

    _, (losses, metrics) = jax.lax.scan(body, None, split_microbatches(batch, spec.num_microbatches))
    metrics = _aggregate(metrics)
    metrics["loss"] = losses.mean()
    return metrics


@dataclasses.dataclass(frozen=True)
class TrainFn:
    """The compiled train step, called (or lowered) as ``(state, batch, reference_params,
    frozen_params=None)``: ``frozen_params`` may be left out when nothing is frozen."""

    jitted: Any

    def __call__(self, state, batch, reference_params, frozen_params=None):
        return self.jitted(state, batch, reference_params, frozen_params)

    def lower(self, state, batch, reference_params, frozen_params=None):
        return self.jitted.lower(state, batch, reference_params, frozen_params)


def jit_train_step(spec: StepSpec, optimizer: optax.GradientTransformation, lr_fn, state_shardings) -> TrainFn:
    """The one compiled train step ``(state, batch, reference_params, frozen_params)``: the state in and
    out on ``state_shardings`` and donated; the batch, the reference params and the frozen params keep
    the shardings they arrive with and are not donated. The loop runs it and the AOT check lowers it,
    so both see the same program."""
    return TrainFn(
        jax.jit(
            functools.partial(train_step, spec, optimizer, lr_fn),
            in_shardings=(state_shardings, None, None, None),
            out_shardings=(state_shardings, None),
            donate_argnums=(0,),
        )
    )
