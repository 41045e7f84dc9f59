"""Feeds: one per data kind, each turning a microbatch into the inputs its losses take by name.

A loss names its inputs in its signature (``kto(policy_logps, reference_logps,
policy_kl_logps, reference_kl_logps, desirable, ...)``, ``dpo(policy_chosen_logps, ...)``;
``LossSpec.inputs``). A feed owns

  * the batch layout (``schema``: the one ``BatchSchema`` the loader fills and the AOT
    check, the benchmark and the FLOP count read), including the cached-reference fields;
  * how each input is computed from params and the microbatch (``loss_inputs``), computing
    only what the loss asks for: KTO's KL forward runs only when ``policy_kl_logps`` is an
    input, the reference forward only when a ``reference_*`` input is;
  * the reference log-probs to cache for ``reference.mode = "cached"`` (``reference_logps``);
  * its forward-pass count (``forward_equivalents``, for FLOPs and MFU);
  * params of its own beside the model's (``init_params``: offline PPO's value head,
    ``kto_jax.models.value_head``).

    sequence feeds ("sft", "unary", "paired"): per-sequence log-probs of sequence groups.
        Inputs with gradient are one policy forward over their groups concatenated; inputs
        without (KTO's KL sequences) a separate stop-gradient forward, so no backward pass is
        spent on them; reference inputs one forward over their groups, no gradient.
    "token": offline PPO's per-token log-probs and a value head on the final hidden states.

The feeds take the step's static description, :class:`StepSpec` (model, loss, hyperparameters,
microbatching, reference mode), defined here beside them; ``kto_jax.train.step`` runs it.

A new loss that takes a quantity a feed already computes touches its loss file and the
registry only; one that needs a new per-example field also adds it to a feed's entry here, to the
layout (``kto_jax.data.batch``), the loader and the records (7 files in all, measured); a new data
kind is a new feed here and its layout, loader, records and builder in ``kto_jax.data``
(docs/layout.md, "How far a change reaches").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from kto_jax.data.batch import BatchSchema, prefix
from kto_jax.logprobs import (
    chunked_token_logps,
    mean_logps,
    segment_sums,
    sum_and_count,
    unpack_tokens,
)
from kto_jax.losses import LossSpec
from kto_jax.models import Decoder, lm_head_kernel
from kto_jax.models.value_head import ValueHead


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about the step: model, loss, its hyperparameters, microbatching."""

    model: Decoder
    loss: LossSpec
    hparams: tuple[tuple[str, Any], ...]
    num_microbatches: int = 1
    reference_mode: str = "model"  # "model", "cached", "sync" (a moving reference in the state) or "none"
    chunk_size: int = 256
    skip_nonfinite: bool = False  # keep the old params when the loss or gradient norm is not finite
    packing: bool = False  # packed rows (``config.data.packing``; ``kto_jax.data.batch``)
    sync_every: int = 1  # reference_mode "sync": the reference moves after every sync_every-th step
    sync_alpha: float = 1.0  # ... to sync_alpha * policy + (1 - sync_alpha) * reference
    humanline: tuple[float, float] | None = None  # (log_epsilon_P, log_epsilon_R): per-token log-ratio clamp
    freeze: tuple[str, ...] = ()  # regexes of the frozen param paths (``kto_jax.train.trainable``)
    ld_alpha: float = 1.0  # LD-DPO: a paired completion's tokens past the pair's shared length count alpha (1: off)
    pair_weighting: bool = False  # WPO: each pair's loss weighted by the policy's probability of the pair

    @property
    def kwargs(self) -> dict:
        return dict(self.hparams)

    @property
    def feed(self):
        return get_feed(self.loss.feed)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The inputs the loss takes with these hyperparameters (``LossSpec.inputs``)."""
        return self.loss.inputs(self.kwargs)

    @property
    def schema(self) -> BatchSchema:
        """The arrays of a global batch of this step (the loader's, plus cached reference log-probs)."""
        return self.feed.schema(self.inputs, self.reference_mode, self.packing)


def hidden_states(spec: StepSpec, model_params, ids, presence):
    """Final hidden states of padded rows (``presence`` the attention mask) or, when the step packs
    (``spec.packing``), of packed rows (``presence`` the segment ids)."""
    if spec.packing:
        return spec.model.apply({"params": model_params}, ids, return_hidden=True, segment_ids=presence)
    return spec.model.apply({"params": model_params}, ids, presence, return_hidden=True)


def head_token_logps(spec: StepSpec, model_params, hidden, ids, loss_mask, collision: bool = False):
    """Per-token log-probs ``[B, T-1]`` of hidden states through the model's LM head (its kernel and
    final logit soft-cap), chunked over length (``kto_jax.logprobs.chunked_token_logps``); with
    ``collision``, also each position's log sum_v p_v^2 (no gradient)."""
    config = spec.model.config
    kernel = lm_head_kernel(config, model_params)
    return chunked_token_logps(
        hidden,
        kernel,
        ids,
        loss_mask,
        chunk_size=spec.chunk_size,
        softcap=config.final_logit_softcap,
        collision=collision,
    )


def sequence_logps(spec: StepSpec, model_params, ids, attention_mask, loss_mask):
    """Per-sequence completion log-probs (length-normalised if the loss wants it) and token counts."""
    hidden = hidden_states(spec, model_params, ids, attention_mask)
    sums, counts = sum_and_count(head_token_logps(spec, model_params, hidden, ids, loss_mask), loss_mask)
    return _normalized(spec, sums, counts), counts


def _normalized(spec: StepSpec, sums, counts):
    """Summed log-probs, or their per-token means when the loss is length-normalised."""
    return mean_logps(sums, counts) if spec.loss.length_normalized else sums


def _arrays(mb: dict, group: str, packed: bool = False):
    p = prefix(group)
    return mb[f"{p}input_ids"], mb[f"{p}segment_ids" if packed else f"{p}attention_mask"], mb[f"{p}loss_mask"]


def _forward(spec, model_params, mb, groups):
    """Log-probs and counts of several sequence groups in one forward: {group: (logps, counts)}.

    Padded: the groups' rows concatenated, one log-prob per row. Packed: the groups' packed rows
    concatenated, per-token log-probs summed per segment (``segment_sums``), ``[K]`` per group with
    K the microbatch's examples."""
    if not spec.packing:
        parts = [_arrays(mb, g) for g in groups]
        logps, counts = sequence_logps(spec, model_params, *(jnp.concatenate(xs) for xs in zip(*parts)))
        return dict(zip(groups, zip(jnp.split(logps, len(groups)), jnp.split(counts, len(groups)))))
    return {g: _group_sums(spec, mb, g, rows) for g, rows in _token_forward(spec, model_params, mb, groups).items()}


def _token_forward(spec, model_params, mb, groups, collision: bool = False) -> dict:
    """Per-token log-probs of several sequence groups in one forward: {group: ``[rows, T-1]``} (0
    where not scored), padded or packed rows; with ``collision``, {group: (log-probs, log sum_v p_v^2)}."""
    parts = [_arrays(mb, g, spec.packing) for g in groups]
    ids, presence, loss_mask = (jnp.concatenate(xs) for xs in zip(*parts))
    hidden = hidden_states(spec, model_params, ids, presence)
    per_token = head_token_logps(spec, model_params, hidden, ids, loss_mask, collision)
    if collision:
        return dict(zip(groups, zip(*(jnp.split(x, len(groups)) for x in per_token))))
    return dict(zip(groups, jnp.split(per_token, len(groups))))


def _raw_sums(spec, mb, group: str, per_token):
    """A group's per-token values summed per sequence, and its token counts: over each padded row
    or each packed segment (``segment_sums``)."""
    _, presence, mask = _arrays(mb, group, spec.packing)
    if spec.packing:
        return segment_sums(per_token, presence, mask, mb["example_index"].shape[0])
    return sum_and_count(per_token, mask)


def _group_sums(spec, mb, group: str, per_token):
    """:func:`_raw_sums`, the sums length-normalised if the loss wants it: (sums, token counts)."""
    sums, counts = _raw_sums(spec, mb, group, per_token)
    return _normalized(spec, sums, counts), counts


HUMANLINE_UNCLAMPED = "humanline/unclamped"  # a metric the feed adds (HALOs' rewards/*_unclamped)
PAIR_WEIGHTS = "wpo/weights"  # WPO's per-pair weights [B]: the step weights the loss with them, logs their mean
FEED_METRICS = (HUMANLINE_UNCLAMPED,)  # entries of loss_inputs' dict that are metrics, not loss inputs


def completion_positions(spec: StepSpec, mb, group: str):
    """``[rows, T-1]``: each scored token's 1-based position within its completion (0 elsewhere), the
    shifted layout of the per-token log-probs; counted per padded row or per packed segment."""
    _, presence, loss_mask = _arrays(mb, group, spec.packing)
    mask = loss_mask[:, 1:].astype(jnp.int32)
    upto = jnp.cumsum(mask, axis=1)
    if spec.packing:  # less the scored tokens of the earlier segments of the row
        segment = presence[:, 1:].reshape(-1) - 1
        before = (upto - mask).reshape(-1)
        num = mb["example_index"].shape[0]
        start = jax.ops.segment_min(jnp.where(segment >= 0, before, 0), jnp.where(segment >= 0, segment, num), num)
        upto = upto - start[jnp.clip(segment, 0, num - 1)].reshape(upto.shape)
    return upto * mask


def _per_token_of_examples(spec: StepSpec, mb, group: str, values):
    """``[K]`` per-example values -> ``[rows, T-1]``: each token gets its sequence's value (padded row
    b is example b; a packed token, its segment's)."""
    if not spec.packing:
        return jnp.broadcast_to(values[:, None], (values.shape[0], _arrays(mb, group)[0].shape[1] - 1))
    segment = _arrays(mb, group, True)[1][:, 1:] - 1
    return values[jnp.clip(segment, 0, values.shape[0] - 1)]


def desensitized_tokens(spec: StepSpec, mb, tokens: dict, alpha: float) -> dict:
    """LD-DPO's per-token log-probs (Liu et al. 2024, arXiv 2409.06411; TRL ``ld_alpha``): with
    l_p = min(|y_w|, |y_l|) the pair's shared length, token t of either completion counts 1 if its
    position within the completion is <= l_p, else alpha:

        log pi_ld(y) = sum_{t <= l_p} log pi(y_t | x, y_<t) + alpha * sum_{t > l_p} log pi(y_t | x, y_<t)

    ``tokens`` {"chosen": [rows, T-1], "rejected": ...} (policy's or reference's: both are weighted, as
    TRL main does)."""
    shared = jnp.minimum(*(_raw_sums(spec, mb, g, tokens[g])[1] for g in ("chosen", "rejected")))
    out = {}
    for group, per_token in tokens.items():
        tail = completion_positions(spec, mb, group) > _per_token_of_examples(spec, mb, group, shared)
        out[group] = jnp.where(tail, alpha * per_token, per_token)
    return out


def wpo_weights(spec: StepSpec, mb, tokens: dict, collisions: dict):
    """WPO's pair weights (Zhou et al. 2024, arXiv 2406.11827 eq. 2; TRL ``use_weighting``), no gradient:

        w(y) = exp( 1/|y| sum_t [log pi(y_t | x, y_<t) - log sum_v pi(v | x, y_<t)^2] )
        weight = w(y_w) * w(y_l)

    from the policy's own per-token log-probs (not LD-weighted) and collision log-probabilities."""
    logs = []
    for group in ("chosen", "rejected"):
        sums, counts = _raw_sums(spec, mb, group, tokens[group] - collisions[group])
        logs.append(sums / jnp.maximum(counts, 1).astype(jnp.float32))
    return jax.lax.stop_gradient(jnp.exp(logs[0] + logs[1]))


def humanline_clamp(policy_tokens, reference_tokens, log_epsilon_P: float, log_epsilon_R: float):
    """Humanline's per-token policy log-probs: ref_t + clip(log pi_t - log ref_t, log_epsilon_P, log_epsilon_R).

    Summed over a sequence and less the reference's sum, that is HALOs main's sequence reward
    sum_t clip(log pi_t / ref_t, P, R) (``get_sequence_rewards``, humanline=true); the gradient
    flows through the tokens whose log-ratio is inside (P, R). Unscored tokens (0 in both) stay 0,
    as P < 0 < R. The loss's ``policy - reference`` is then the clamped sum up to the float rounding
    of one addition (ulp of the reference's sum), where HALOs sums the clamped ratios directly: two
    sequences clamped at every token tie in HALOs and differ by that rounding here."""
    ratio = policy_tokens - reference_tokens
    return reference_tokens + jnp.clip(ratio, log_epsilon_P, log_epsilon_R)


def _unclamped_fraction(spec, mb, groups):
    """The share of scored tokens of the policy groups whose log-ratio is inside (P, R): the
    tokens humanline's clamp lets the gradient through (HALOs main logs it per chosen/rejected)."""
    low, high = spec.humanline
    inside = scored = 0
    for policy, reference, group in groups:
        mask = _arrays(mb, group, spec.packing)[2][:, 1:] > 0
        ratio = jax.lax.stop_gradient(policy - reference)
        inside += (mask & (ratio > low) & (ratio < high)).sum()
        scored += mask.sum()
    return inside / jnp.maximum(scored, 1)


@dataclasses.dataclass(frozen=True)
class SequenceFeed:
    """Per-sequence log-probs of sequence groups: ``(input name, group)`` pairs per kind of pass."""

    name: str
    policy: tuple[tuple[str, str], ...]  # with gradient, one forward
    policy_no_grad: tuple[tuple[str, str], ...] = ()  # stop-gradient, a separate forward
    reference: tuple[tuple[str, str], ...] = ()  # frozen reference, one forward
    counts: tuple[tuple[str, str], ...] = ()  # completion token counts of policy groups
    per_example: tuple[tuple[str, str], ...] = ()  # (name, dtype) read from the batch as is
    supports_cached: bool = True

    def _wanted(self, table, inputs):
        return tuple((n, g) for n, g in table if n in inputs)

    def groups(self, inputs) -> tuple[str, ...]:
        wanted = self.policy + self._wanted(self.policy_no_grad + self.reference, inputs)
        return tuple(dict.fromkeys(g for _, g in wanted))

    def schema(self, inputs, reference_mode: str, packing: bool = False) -> BatchSchema:
        """The batch layout for a loss taking ``inputs`` (cached reference fields in "cached" mode),
        padded or packed."""
        extra = self.per_example
        if reference_mode == "cached":
            extra += tuple((n, "float32") for n, _ in self._wanted(self.reference, inputs))
        return BatchSchema(self.groups(inputs), extra, packed=packing)

    def loss_inputs(self, spec: StepSpec, params, reference_params, mb: dict) -> dict:
        """{input name: [B] array} for every input the loss takes (``spec.inputs``)."""
        if spec.humanline is not None:
            return self._humanline_inputs(spec, params, reference_params, mb)
        if spec.ld_alpha != 1.0 or spec.pair_weighting:
            return self._paired_option_inputs(spec, params, reference_params, mb)
        inputs = spec.inputs
        model_params = params["model"]
        out = {}
        policy = _forward(spec, model_params, mb, [g for _, g in self.policy])
        out.update({n: policy[g][0] for n, g in self.policy})
        out.update({n: policy[g][1] for n, g in self.counts if n in inputs})
        no_grad = self._wanted(self.policy_no_grad, inputs)
        if no_grad:
            logps = _forward(spec, model_params, mb, [g for _, g in no_grad])
            out.update({n: jax.lax.stop_gradient(logps[g][0]) for n, g in no_grad})
        if self._wanted(self.reference, inputs):
            if spec.reference_mode == "cached":
                out.update({n: mb[n] for n, _ in self._wanted(self.reference, inputs)})
            else:
                out.update(self.reference_logps(spec, reference_params, mb))
        out.update({n: mb[n] for n, _ in self.per_example if n in inputs})
        return {n: out[n] for n in inputs}

    def _humanline_inputs(self, spec: StepSpec, params, reference_params, mb: dict) -> dict:
        """:meth:`loss_inputs` with humanline's clamp: per-token policy and reference log-probs of
        every group that has a reference input, the policy's clamped to the reference's within
        [log_epsilon_P, log_epsilon_R] per token (:func:`humanline_clamp`) before the per-sequence
        sums, so each loss's ``policy - reference`` is HALOs main's clamped sequence reward."""
        inputs, model_params = spec.inputs, params["model"]
        reference = self._wanted(self.reference, inputs)
        ref_tokens = jax.lax.stop_gradient(
            _token_forward(spec, jax.lax.stop_gradient(reference_params), mb, [g for _, g in reference])
        )
        policy = _token_forward(spec, model_params, mb, [g for _, g in self.policy])
        no_grad = self._wanted(self.policy_no_grad, inputs)
        if no_grad:
            policy.update(jax.lax.stop_gradient(_token_forward(spec, model_params, mb, [g for _, g in no_grad])))
        out = {n: _group_sums(spec, mb, g, ref_tokens[g])[0] for n, g in reference}
        out[HUMANLINE_UNCLAMPED] = _unclamped_fraction(
            spec, mb, [(policy[g], ref_tokens[g], g) for _, g in self.policy if g in ref_tokens]
        )
        for n, g in self.policy + no_grad:
            tokens = humanline_clamp(policy[g], ref_tokens[g], *spec.humanline) if g in ref_tokens else policy[g]
            out[n], counts = _group_sums(spec, mb, g, tokens)
            out.update({c: counts for c, cg in self.counts if cg == g and c in inputs})
        out.update({n: mb[n] for n, _ in self.per_example if n in inputs})
        return {n: out[n] for n in (*inputs, HUMANLINE_UNCLAMPED)}

    def _paired_option_inputs(self, spec: StepSpec, params, reference_params, mb: dict) -> dict:
        """:meth:`loss_inputs` of the paired feed with LD-DPO (``spec.ld_alpha``: the sequence log-probs,
        policy's and reference's, from :func:`desensitized_tokens`) and/or WPO (``spec.pair_weighting``:
        the pair weights of :func:`wpo_weights` under ``PAIR_WEIGHTS``, from the same policy forward)."""
        inputs, groups = spec.inputs, ("chosen", "rejected")
        policy = _token_forward(spec, params["model"], mb, list(groups), collision=spec.pair_weighting)
        out = {}
        if spec.pair_weighting:
            collisions = {g: policy[g][1] for g in groups}
            policy = {g: policy[g][0] for g in groups}
            out[PAIR_WEIGHTS] = wpo_weights(spec, mb, policy, collisions)
        tables = [(self.policy, policy)]
        reference = self._wanted(self.reference, inputs)
        if reference and spec.reference_mode == "cached":  # WPO alone: the plan refuses ld_alpha with a cache
            out.update({n: mb[n] for n, _ in reference})
        elif reference:
            ref = jax.lax.stop_gradient(_token_forward(spec, jax.lax.stop_gradient(reference_params), mb, list(groups)))
            tables.append((reference, ref))
        for table, tokens in tables:
            if spec.ld_alpha != 1.0:
                tokens = desensitized_tokens(spec, mb, tokens, spec.ld_alpha)
            for name, group in table:
                out[name], counts = _group_sums(spec, mb, group, tokens[group])
                out.update({c: counts for c, cg in self.counts if cg == group and c in inputs})
        return {n: out[n] for n in (*inputs, *([PAIR_WEIGHTS] if spec.pair_weighting else []))}

    def reference_inputs(self, inputs) -> tuple[str, ...]:
        """The loss inputs the frozen reference gives (what ``reference.mode = "cached"`` stores)."""
        return tuple(n for n, _ in self._wanted(self.reference, inputs))

    def reference_logps(self, spec: StepSpec, reference_params, mb: dict) -> dict:
        """{reference input name: [B] log-probs} of the frozen reference, one forward, no gradient."""
        wanted = self._wanted(self.reference, spec.inputs)
        logps = _forward(spec, jax.lax.stop_gradient(reference_params), mb, [g for _, g in wanted])
        return {n: jax.lax.stop_gradient(logps[g][0]) for n, g in wanted}

    def forward_equivalents(self, inputs, reference_mode: str, backward: int = 2) -> int:
        """Forward passes per example, a backward counting ``backward`` (2; 1 with a frozen base, which
        computes activation gradients only): 1 + backward per policy group, 1 per stop-gradient
        group, 1 per reference group unless cached."""
        reference = len(self._wanted(self.reference, inputs)) if reference_mode in ("model", "sync") else 0
        return (1 + backward) * len(self.policy) + len(self._wanted(self.policy_no_grad, inputs)) + reference

    def init_params(self, model_config, seed: int) -> dict:
        return {}


@dataclasses.dataclass(frozen=True)
class TokenFeed:
    """Per-token inputs of offline PPO: policy/reference log-probs ``[B, T-1]``, the value head's
    estimates on the policy's final hidden states (stop-gradient: the critic loss trains only the
    head, ``params["value_head"]``, replicated), the completion mask, the desirable flag."""

    name: str = "token"
    supports_cached: bool = False

    def schema(self, inputs, reference_mode: str, packing: bool = False) -> BatchSchema:
        return BatchSchema(("",), (("desirable", "bool"),), packed=packing, unpack=("",) if packing else ())

    def loss_inputs(self, spec: StepSpec, params, reference_params, mb: dict) -> dict:
        """Packed rows run the forwards packed and give the loss its per-example ``[K, L-1]`` layout
        back (``unpack_tokens``): GAE and the advantage statistics see what the padded path gives."""
        ids, presence, loss_mask = _arrays(mb, "", spec.packing)
        hidden = hidden_states(spec, params["model"], ids, presence)
        policy = head_token_logps(spec, params["model"], hidden, ids, loss_mask)
        values = ValueHead().apply({"params": params["value_head"]}, hidden)
        ref_params = jax.lax.stop_gradient(reference_params)
        ref_hidden = hidden_states(spec, ref_params, ids, presence)
        reference = head_token_logps(spec, ref_params, ref_hidden, ids, loss_mask)
        mask = loss_mask
        if spec.packing:  # per-token [R, L] -> [K, L]; the shifted [R, L-1] padded by a column first
            index = mb["unpack_index"]
            column = lambda x: jnp.pad(x, ((0, 0), (0, 1)))  # noqa: E731
            policy, reference = (unpack_tokens(column(x), index)[:, :-1] for x in (policy, reference))
            values, mask = unpack_tokens(values, index), unpack_tokens(loss_mask, index)
        return {
            "policy_logps": policy,
            "reference_logps": jax.lax.stop_gradient(reference),
            "values": values[:, :-1],
            "desirable": mb["desirable"],
            "mask": mask[:, 1:],
        }

    def forward_equivalents(self, inputs, reference_mode: str, backward: int = 2) -> int:
        return 1 + backward + 1  # policy forward + backward, reference forward (the value head, ~2H^2, left out)

    def init_params(self, model_config, seed: int) -> dict:
        head = ValueHead().init(jax.random.PRNGKey(seed), jnp.zeros((1, 1, model_config.hidden_size)))["params"]
        return {"value_head": head}


FEEDS = {
    "sft": SequenceFeed(
        "sft", policy=(("policy_logps", ""),), counts=(("token_counts", ""),), per_example=(("desirable", "bool"),)
    ),
    "unary": SequenceFeed(
        "unary",
        policy=(("policy_logps", ""),),
        policy_no_grad=(("policy_kl_logps", "kl"),),
        reference=(("reference_logps", ""), ("reference_kl_logps", "kl")),
        counts=(("token_counts", ""),),
        per_example=(("desirable", "bool"),),
    ),
    "paired": SequenceFeed(
        "paired",
        policy=(("policy_chosen_logps", "chosen"), ("policy_rejected_logps", "rejected")),
        reference=(("reference_chosen_logps", "chosen"), ("reference_rejected_logps", "rejected")),
        counts=(("chosen_token_counts", "chosen"), ("rejected_token_counts", "rejected")),
    ),
    "token": TokenFeed(),
}


def get_feed(name: str):
    if name not in FEEDS:
        raise ValueError(f"unknown feed {name!r}; known: {sorted(FEEDS)}")
    return FEEDS[name]
