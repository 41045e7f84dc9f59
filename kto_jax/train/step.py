"""Pure train and eval steps for every data kind, jit-compiled once with shardings.

    train_step(state, batch, reference_params) -> (state, metrics)

The global batch [G, ...] is split into M strided microbatches (microbatch m = rows m,
m + M, ...; see ``kto_jax.data.loader``) scanned with gradient accumulation; each
microbatch's loss is a registry loss on sequence log-probs. KTO's KL estimate z0 is
therefore per microbatch, as in HALOs and TRL.

Per data kind (``LossSpec.kind``):
  unary   policy forward on the completions (with gradient) and, for KL-estimating losses,
          on the mismatched KL sequences (stop-gradient, a separate forward so no backward
          pass is spent on them); reference forward on both, concatenated, no gradient
  paired  chosen and rejected concatenated in one forward (policy and reference)
  sft     policy forward only (CSFT: the loader adds the control tokens)
  offline PPO: per-token log-probs and a value head on the final hidden states.
Reference log-probs come from frozen ``reference_params`` (mode "model") or from the batch
itself (mode "cached": ``reference_logps`` / ``reference_kl_logps`` / ``reference_chosen_logps`` /
``reference_rejected_logps`` arrays); both give the same losses.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from kto_jax.logprobs import chunked_sequence_logps, chunked_token_logps, mean_logps
from kto_jax.losses import LossSpec
from kto_jax.models import Decoder, lm_head_kernel
from kto_jax.train.state import TrainState

SUMMED_METRICS = ("num_desirable", "num_undesirable", "tokens")


class ValueHead(nn.Module):
    """Offline PPO's critic: a scalar per token from the final hidden states."""

    @nn.compact
    def __call__(self, hidden):
        return nn.Dense(1, kernel_init=nn.initializers.zeros_init(), name="value")(hidden.astype(jnp.float32))[..., 0]


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about the step: model, loss, its hyperparameters, microbatching."""

    model: Decoder
    loss: LossSpec
    hparams: tuple[tuple[str, Any], ...]
    num_microbatches: int = 1
    reference_mode: str = "model"  # "model", "cached" or "none"
    chunk_size: int = 256
    skip_nonfinite: bool = False  # keep the old params when the loss or gradient norm is not finite

    @property
    def kwargs(self) -> dict:
        return dict(self.hparams)


def _hidden(spec: StepSpec, model_params, ids, attention_mask):
    return spec.model.apply({"params": model_params}, ids, attention_mask, return_hidden=True)


def sequence_logps(spec: StepSpec, model_params, ids, attention_mask, loss_mask):
    """Per-sequence completion log-probs (length-normalised if the loss wants it) and counts."""
    hidden = _hidden(spec, model_params, ids, attention_mask)
    kernel = lm_head_kernel(spec.model.config, model_params)
    sums, counts = chunked_sequence_logps(hidden, kernel, ids, loss_mask, chunk_size=spec.chunk_size)
    return (mean_logps(sums, counts) if spec.loss.length_normalized else sums), counts


def _reference(spec: StepSpec, reference_params, *triples):
    """Reference log-probs of several (ids, attention, loss_mask) groups in one forward, no gradient."""
    ids = jnp.concatenate([t[0] for t in triples])
    attention = jnp.concatenate([t[1] for t in triples])
    mask = jnp.concatenate([t[2] for t in triples])
    logps, _ = sequence_logps(spec, jax.lax.stop_gradient(reference_params), ids, attention, mask)
    return jnp.split(jax.lax.stop_gradient(logps), len(triples))


def _group(mb, prefix=""):
    return mb[f"{prefix}input_ids"], mb[f"{prefix}attention_mask"], mb[f"{prefix}loss_mask"]


def microbatch_loss(spec: StepSpec, params, reference_params, mb: dict, loss_state: dict):
    """(loss, (metrics, loss_state)) of one microbatch."""
    loss_spec = spec.loss
    kwargs = spec.kwargs
    kwargs.update(loss_state)
    model_params = params["model"]
    cached = spec.reference_mode == "cached"
    if loss_spec.token_level:
        return _ppo_loss(spec, params, reference_params, mb, kwargs)
    if loss_spec.kind == "sft":
        logps, counts = sequence_logps(spec, model_params, *_group(mb))
        loss, metrics = loss_spec.fn(logps, counts, **kwargs)
    elif loss_spec.kind == "unary":
        main = _group(mb)
        policy, _ = sequence_logps(spec, model_params, *main)
        args = [policy]
        if loss_spec.needs_kl:
            kl = _group(mb, "kl_")
            policy_kl = jax.lax.stop_gradient(sequence_logps(spec, model_params, *kl)[0])
            if cached:
                ref, ref_kl = mb["reference_logps"], mb["reference_kl_logps"]
            else:
                ref, ref_kl = _reference(spec, reference_params, main, kl)
            args += [ref, policy_kl, ref_kl]
        else:
            args.append(mb["reference_logps"] if cached else _reference(spec, reference_params, main)[0])
        loss, metrics = loss_spec.fn(*args, mb["desirable"], **kwargs)
    else:  # paired
        chosen, rejected = _group(mb, "chosen_"), _group(mb, "rejected_")
        both = [jnp.concatenate([c, r]) for c, r in zip(chosen, rejected)]
        logps, counts = sequence_logps(spec, model_params, *both)
        pc, pr = jnp.split(logps, 2)
        args = [pc, pr]
        if loss_spec.needs_reference:
            if cached:
                args += [mb["reference_chosen_logps"], mb["reference_rejected_logps"]]
            else:
                args += _reference(spec, reference_params, chosen, rejected)
        if loss_spec.name == "orpo":
            kwargs["chosen_token_counts"] = jnp.split(counts, 2)[0]
        loss, metrics = loss_spec.fn(*args, **kwargs)
    new_state = {arg: metrics[name] for arg, name in loss_spec.state_metrics}
    return loss, (metrics, new_state)


def _ppo_loss(spec: StepSpec, params, reference_params, mb, kwargs):
    ids, attention, loss_mask = _group(mb)
    hidden = _hidden(spec, params["model"], ids, attention)
    kernel = lm_head_kernel(spec.model.config, params["model"])
    policy = chunked_token_logps(hidden, kernel, ids, loss_mask, chunk_size=spec.chunk_size)
    values = ValueHead().apply({"params": params["value_head"]}, hidden)[:, :-1]
    ref_params = jax.lax.stop_gradient(reference_params)
    ref_hidden = _hidden(spec, ref_params, ids, attention)
    reference = jax.lax.stop_gradient(
        chunked_token_logps(ref_hidden, lm_head_kernel(spec.model.config, ref_params), ids, loss_mask, chunk_size=spec.chunk_size)
    )
    loss, metrics = spec.loss.fn(policy, reference, values, mb["desirable"], loss_mask[:, 1:], **kwargs)
    return loss, (metrics, {})


def split_microbatches(batch: dict, num_microbatches: int) -> dict:
    """[G, ...] -> [M, G/M, ...] with microbatch m = rows m, m + M, m + 2M, ..."""
    def split(x):
        return x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree_util.tree_map(split, batch)


def _aggregate(metrics: dict) -> dict:
    """Per-microbatch metrics [M] -> one value: sums for counts, means otherwise."""
    return {k: (v.sum() if k in SUMMED_METRICS else v.mean()) for k, v in metrics.items()}


def train_step(spec: StepSpec, optimizer: optax.GradientTransformation, lr_fn, state: TrainState, batch, reference_params):
    """One optimizer step over the global batch with gradient accumulation over microbatches."""
    grad_fn = jax.value_and_grad(lambda p, mb, ls: microbatch_loss(spec, p, reference_params, mb, ls), has_aux=True)

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
    metrics.update(loss=losses.mean(), grad_norm=grad_norm, lr=lr_fn(state.step), tokens=training_tokens(batch), finite=finite)
    if spec.skip_nonfinite:  # the step still counts; the update is dropped
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        params, opt_state, loss_state = keep(params, state.params), keep(opt_state, state.opt_state), keep(loss_state, state.loss_state)
    skipped = state.nonfinite_skipped + (~finite).astype(jnp.int32) if spec.skip_nonfinite else state.nonfinite_skipped
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, loss_state=loss_state,
                              nonfinite_skipped=skipped)
    return new_state, metrics


def training_tokens(batch: dict) -> jax.Array:
    """Tokens of the training sequences (not the KL ones), as TRL counts them."""
    keys = ["attention_mask"] if "attention_mask" in batch else ["chosen_attention_mask", "rejected_attention_mask"]
    return sum(batch[k].sum() for k in keys)


def reference_logps(spec: StepSpec, reference_params, batch: dict) -> dict:
    """The reference log-probs a batch needs, for ``reference.mode = "cached"``: ``[G]`` arrays named
    as the step reads them from the batch, computed microbatch by microbatch."""
    def body(_, mb):
        if spec.loss.kind == "paired":
            rc, rr = _reference(spec, reference_params, _group(mb, "chosen_"), _group(mb, "rejected_"))
            return None, {"reference_chosen_logps": rc, "reference_rejected_logps": rr}
        if spec.loss.needs_kl:
            r, rkl = _reference(spec, reference_params, _group(mb), _group(mb, "kl_"))
            return None, {"reference_logps": r, "reference_kl_logps": rkl}
        return None, {"reference_logps": _reference(spec, reference_params, _group(mb))[0]}

    m = spec.num_microbatches
    _, out = jax.lax.scan(body, None, split_microbatches(batch, m))
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
