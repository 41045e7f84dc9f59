"""Loss mixtures: several registered losses on one batch, trained on their weighted sum.

``config.loss.name = "dpo+sft"`` with ``config.loss.weights = (1.0, 1.0)`` and each term's
hyperparameters under its own name (``config.loss.dpo.beta``, ``config.loss.sft.reduction``):

    loss = sum_k weights_k * loss_k(inputs of term k)

This is TRL's ``DPOTrainer(loss_type=[...], loss_weights=[...])``. Presets (:data:`PRESETS`):
``rpo`` = ``dpo + sft`` (Pang et al. 2024, arXiv 2404.19733: DPO plus the NLL of the chosen reply,
TRL's ``rpo_alpha = 1``) and ``mpo`` = ``0.8 dpo + 0.2 bco_pair + 1.0 sft`` (Wang et al. 2024, arXiv
2411.10442, TRL's MPO recipe).

The step's feed computes the union of the terms' inputs once (one forward per sequence group), so a
"dpo+sft" step costs what a "dpo" step costs. What a feed serves:

  * the paired feed: paired terms, and ``sft`` on the chosen replies (``policy_logps`` is
    ``policy_chosen_logps``, ``token_counts`` is ``chosen_token_counts``);
  * the unary feed: unary terms, and ``sft`` on the desirable examples;
  * a unary and a paired term together: no feed serves both (refused).

Length-normalised terms (``ipo``, ``simpo``, ``orpo``) get their log-probs divided by the token
counts here, so one forward serves normalised and summed terms alike. Each term's metrics keep
their names under the term's prefix (``dpo/rewards/margins``, ``sft/loss``); a term's run state
(``bco_pair``'s running mean) is the mixture's, as ``<term>__<argument>``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from kto_jax.errors import InputError
from kto_jax.losses._common import Metrics
from kto_jax.losses.spec import LossSpec

SEPARATOR = "+"
STATE_SEPARATOR = "__"  # a term's run-state argument in the mixture: "<term>__<argument>"
# name: (terms, default weights, source)
PRESETS = {
    "rpo": (("dpo", "sft"), (1.0, 1.0), "Pang et al. 2024, arXiv 2404.19733 (TRL rpo_alpha)"),
    "mpo": (("dpo", "bco_pair", "sft"), (0.8, 0.2, 1.0), "Wang et al. 2024, arXiv 2411.10442 (TRL MPO)"),
}
# what an sft term reads from each feed: (its input, the feed's input)
SFT_VIEWS = {
    "paired": (("policy_logps", "policy_chosen_logps"), ("token_counts", "chosen_token_counts")),
    "unary": (("policy_logps", "policy_logps"), ("token_counts", "token_counts")),
}
# the token counts that length-normalise each summed log-prob input
COUNTS_OF = {
    "policy_chosen_logps": "chosen_token_counts",
    "reference_chosen_logps": "chosen_token_counts",
    "policy_rejected_logps": "rejected_token_counts",
    "reference_rejected_logps": "rejected_token_counts",
    "policy_logps": "token_counts",
    "reference_logps": "token_counts",
}


def is_mixture(name: str) -> bool:
    """``name`` names a mixture: terms joined by ``+`` or a preset (``rpo``, ``mpo``)."""
    return SEPARATOR in name or name in PRESETS


def term_names(name: str) -> tuple[str, ...]:
    """The terms of a mixture name: ``"dpo+sft"`` -> ("dpo", "sft"); a preset's terms."""
    if name in PRESETS:
        return PRESETS[name][0]
    return tuple(t.strip() for t in name.split(SEPARATOR))


def _feed_kind(name: str, terms: tuple[LossSpec, ...]) -> str:
    """The one sequence feed serving every term, or an InputError naming what cannot mix."""
    kinds = {t.kind for t in terms}
    for t in terms:
        if t.feed not in ("sft", "unary", "paired"):
            raise InputError(
                f"config.loss.name={name!r}: {t.name!r} takes per-token inputs (feed {t.feed!r}), which a mixture "
                "cannot share; mix losses of per-sequence log-probs"
            )
        if t.control_tokens:
            raise InputError(
                f"config.loss.name={name!r}: {t.name!r} conditions the data on control tokens, which the other "
                "terms would see too; train it alone"
            )
    if {"unary", "paired"} <= kinds:
        unary = [t.name for t in terms if t.kind == "unary"]
        paired = [t.name for t in terms if t.kind == "paired"]
        raise InputError(
            f"config.loss.name={name!r} mixes unary {unary} with paired {paired}: no feed serves both on one batch "
            "(a paired batch has no KL sequences or desirable flags, a unary one no pairs). Mix paired losses with "
            "paired losses and sft (on the chosen replies), or unary losses with unary losses and sft (on the "
            "desirable examples)"
        )
    if kinds == {"sft"}:
        raise InputError(f"config.loss.name={name!r}: a mixture of sft terms only is sft; use config.loss.name='sft'")
    return "paired" if "paired" in kinds else "unary"


@dataclasses.dataclass(frozen=True)
class MixtureSpec(LossSpec):
    """A :class:`LossSpec` whose loss is the weighted sum of its ``terms`` on one feed.

    Its hyperparameters, flat (what the step passes): ``weights`` (a tuple, one per term) and
    ``<term>.<hyperparameter>``; in the config they are nested, ``config.loss.<term>.<name>``
    (:meth:`config_hyperparameters`)."""

    terms: tuple[LossSpec, ...] = ()
    default_weights: tuple[float, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "fn", functools.partial(_mixture_loss, self))
        states = tuple(
            (f"{t.name}{STATE_SEPARATOR}{arg}", f"{t.name}/{metric}")
            for t in self.terms
            for arg, metric in t.state_metrics
        )
        object.__setattr__(self, "state_metrics", states)

    # hyperparameters
    @property
    def defaults(self) -> dict[str, Any]:
        out: dict[str, Any] = {"weights": self.default_weights}
        for t in self.terms:
            out.update({f"{t.name}.{k}": v for k, v in t.defaults.items()})
        return out

    def config_hyperparameters(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The hyperparameters as ``config.loss`` holds them: ``weights`` and one dict per term."""
        flat = self.hyperparameters(overrides)
        out: dict[str, Any] = {"weights": tuple(flat["weights"])}
        for t in self.terms:
            out[t.name] = {k: flat[f"{t.name}.{k}"] for k in t.defaults}
        return out

    def hyperparameters(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults updated with ``overrides`` (nested as in the config, or flat): the flat dict."""
        flat = self.defaults
        names = [t.name for t in self.terms]
        for key, val in (overrides or {}).items():
            if key == "weights":
                flat["weights"] = self._weights(val)
            elif key in names:
                term = self.terms[names.index(key)]
                for sub, v in dict(val).items():
                    self._check_term_key(term, sub)
                    flat[f"{key}.{sub}"] = v
            elif "." in key and key.split(".", 1)[0] in names:
                term = self.terms[names.index(key.split(".", 1)[0])]
                self._check_term_key(term, key.split(".", 1)[1])
                flat[key] = val
            else:
                owners = [t.name for t in self.terms if key in t.defaults]
                where = f"config.loss.{owners[0]}.{key}" if owners else f"config.loss.<term>.{key}"
                raise InputError(
                    f"config.loss.{key}: loss {self.name!r} is a mixture; its hyperparameters are config.loss.weights "
                    f"and each term's under its name ({', '.join(names)}): set {where}"
                )
        return flat

    def _check_term_key(self, term: LossSpec, key: str) -> None:
        if key in term.defaults:
            return
        owners = [t.name for t in self.terms if key in t.defaults]
        hint = f"; it is a hyperparameter of {owners[0]!r}: config.loss.{owners[0]}.{key}" if owners else ""
        raise InputError(
            f"config.loss.{term.name}.{key}: loss {term.name!r} has no hyperparameter {key!r} (its hyperparameters: "
            f"{sorted(term.defaults)}){hint}"
        )

    def _weights(self, value) -> tuple[float, ...]:
        try:
            weights = tuple(float(w) for w in value)
        except (TypeError, ValueError):
            raise InputError(
                f"config.loss.weights={value!r}: must be a list of {len(self.terms)} numbers, one per term "
                f"({', '.join(t.name for t in self.terms)})"
            ) from None
        if len(weights) != len(self.terms):
            raise InputError(
                f"config.loss.weights={list(weights)}: {len(weights)} weights for {len(self.terms)} terms "
                f"({', '.join(t.name for t in self.terms)}); give one per term"
            )
        if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise InputError(f"config.loss.weights={list(weights)}: must be finite, >= 0 and not all 0")
        return weights

    def term_hparams(self, hparams: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        """{term: its hyperparameters} of flat ``hparams`` (defaults where None)."""
        flat = self.defaults if hparams is None else {**self.defaults, **hparams}
        return {t.name: {k: flat[f"{t.name}.{k}"] for k in t.defaults} for t in self.terms}

    # inputs
    def _term_sources(self, term: LossSpec, hparams) -> dict[str, str]:
        """{term input: the feed's input} for one term."""
        if term.kind == "sft":
            return dict(SFT_VIEWS[self.feed])
        sources = {n: n for n in term.inputs(hparams)}
        if term.length_normalized:
            sources.update({COUNTS_OF[n]: COUNTS_OF[n] for n in list(sources) if n in COUNTS_OF})
        return sources

    def inputs(self, hparams: Mapping[str, Any] | None = None) -> tuple[str, ...]:
        """The union of the terms' inputs (the feed computes each once), in term order; plus ``desirable``
        where an sft term on the unary feed selects the desirable examples."""
        per_term = self.term_hparams(hparams)
        names: list[str] = []
        for t in self.terms:
            names.extend(self._term_sources(t, per_term[t.name]).values())
            if t.kind == "sft" and self.feed == "unary":
                names.append("desirable")
        return tuple(dict.fromkeys(names))

    def unused(self, hparams: Mapping[str, Any] | None = None) -> tuple[str, ...]:
        return ()  # each term's unused inputs are passed as None in :meth:`loss`

    # the loss
    def loss(self, *, example_mask=None, **kwargs) -> tuple[Any, Metrics]:
        """sum_k weights_k * loss_k, each term called with its inputs by name; metrics prefixed.

        ``kwargs``: the feed's inputs, the flat hyperparameters and the run state by name (what the
        step passes to ``fn``)."""
        hparams = {k: v for k, v in kwargs.items() if k == "weights" or "." in k}
        state = {k: v for k, v in kwargs.items() if STATE_SEPARATOR in k}
        data = {k: v for k, v in kwargs.items() if k not in hparams and k not in state}
        weights = hparams.get("weights", self.default_weights)
        per_term = self.term_hparams(hparams)
        total, metrics = 0.0, {}
        for weight, term in zip(weights, self.terms):
            sources = self._term_sources(term, per_term[term.name])
            args = {n: data[src] for n, src in sources.items() if n in term.inputs(per_term[term.name])}
            if term.length_normalized:
                args = {n: _mean(v, data[COUNTS_OF[n]]) if n in COUNTS_OF else v for n, v in args.items()}
            args.update({n: None for n in term.unused(per_term[term.name])})
            mask = example_mask
            if term.kind == "sft" and self.feed == "unary":  # sft on the desirable examples
                desirable = jnp.asarray(data["desirable"], jnp.float32)
                mask = desirable if example_mask is None else jnp.asarray(example_mask, jnp.float32) * desirable
            own_state = {
                k.split(STATE_SEPARATOR, 1)[1]: v for k, v in state.items() if k.startswith(term.name + STATE_SEPARATOR)
            }
            loss, term_metrics = term.fn(**args, **per_term[term.name], **own_state, example_mask=mask)
            total = total + weight * loss
            metrics[f"{term.name}/loss"] = loss
            metrics.update({f"{term.name}/{k}": v for k, v in term_metrics.items()})
        return total, metrics


def _mixture_loss(spec: MixtureSpec, **kwargs):
    """``MixtureSpec.fn``: :meth:`MixtureSpec.loss` (a partial, so the spec's hash does not recurse)."""
    return spec.loss(**kwargs)


def _mean(sums, counts):
    """Per-token mean log-prob: sums / max(counts, 1) (``kto_jax.logprobs.mean_logps``)."""
    return jnp.asarray(sums, jnp.float32) / jnp.maximum(jnp.asarray(counts, jnp.float32), 1.0)


def get_mixture(name: str, lookup) -> MixtureSpec:
    """The mixture ``name`` (``"dpo+sft"`` or a preset) with its terms looked up by ``lookup``."""
    names = term_names(name)
    if any(not n for n in names):
        raise InputError(f"config.loss.name={name!r}: an empty term; join loss names with '+', e.g. 'dpo+sft'")
    if len(set(names)) != len(names):
        raise InputError(f"config.loss.name={name!r}: a term appears twice; give each loss once with its weight")
    for n in names:
        if is_mixture(n):
            raise InputError(f"config.loss.name={name!r}: term {n!r} is itself a mixture; list its terms instead")
    terms = tuple(lookup(n) for n in names)
    kind = _feed_kind(name, terms)
    weights, citation = (PRESETS[name][1], PRESETS[name][2]) if name in PRESETS else ((1.0,) * len(terms), "mixture")
    return MixtureSpec(name, _mixture_loss, kind, citation, terms=terms, default_weights=weights)
