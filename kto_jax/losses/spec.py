"""How the engine feeds one loss (:class:`LossSpec`): its data kind, inputs read from its signature,
hyperparameters with their defaults. The registry (``kto_jax.losses.registry``) holds one per name;
a mixture (``kto_jax.losses.mixture``) is one too."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from kto_jax.errors import InputError

# Keyword-only arguments that are data a feed computes when the loss asks for them
# (``kto_jax.train.feeds``), not hyperparameters.
OPTIONAL_INPUTS = frozenset({"chosen_token_counts"})
# Keyword arguments that are data or run state, not hyperparameters set in a config.
NOT_HYPERPARAMETERS = frozenset({"example_mask", "running_mean", "running_count"}) | OPTIONAL_INPUTS
KINDS = ("unary", "paired", "sft")
# Options of a feed, set in config.loss beside the loss's hyperparameters but read by the feed and the step
# (TRL's DPOConfig names): LD-DPO's ``ld_alpha`` (1.0 = off) and WPO's ``use_weighting``
# (``kto_jax.train.feeds.paired_options``).
FEED_OPTIONS: dict[str, dict[str, Any]] = {"paired": {"ld_alpha": 1.0, "use_weighting": False}}


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """How the engine feeds one loss.

    kind: the data it trains on: "unary" (one completion + desirable flag per example; KTO
      family, offline PPO), "paired" (chosen and rejected per prompt; DPO family) or "sft".
    feed: the feed that computes its inputs (``kto_jax.train.feeds.FEEDS``); ``kind`` unless
      set ("token" for offline PPO's per-token inputs and value head).
    length_normalized: log-probs are divided by the completion token count first.
    unused_inputs: hyperparameters -> inputs the loss ignores with them (passed as None, not
      computed): ``halo`` with ``reference_point="zero"`` needs no KL forward.
    control_tokens: tokens the data is conditioned on (CSFT's ``<|good|>``/``<|bad|>``).
    state_metrics: keyword arguments that are run state, each fed the named metric of the
      previous step (BCO's running reward mean).
    batch_coupled: one pair's loss depends on the other pairs of the batch (AOT's sorting, BCO's
      batch mean, ORPO's NLL over the batch's tokens), so the loss is not a mean of per-pair terms and takes no per-pair weights (WPO).

    A loss receives its inputs by name: its positional parameters (``policy_logps``,
    ``reference_chosen_logps``, ...) and the keyword-only ones in ``OPTIONAL_INPUTS``. So
    whether it needs a reference model or KL sequences is read from its signature.
    """

    name: str
    fn: Callable
    kind: str
    citation: str
    feed: str = ""
    length_normalized: bool = False
    unused_inputs: Callable[[Mapping[str, Any]], tuple[str, ...]] | None = None
    control_tokens: tuple[str, ...] = ()
    # run state carried between steps: (keyword argument, metric holding its next value)
    state_metrics: tuple[tuple[str, str], ...] = ()
    batch_coupled: bool = False

    def __post_init__(self):
        if not self.feed:
            object.__setattr__(self, "feed", self.kind)

    @property
    def defaults(self) -> dict[str, Any]:
        """Hyperparameter defaults, read from the function's keyword-only arguments."""
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name not in NOT_HYPERPARAMETERS}

    def inputs(self, hparams: Mapping[str, Any] | None = None) -> tuple[str, ...]:
        """The data the loss takes with ``hparams`` (defaults if None), by name, in signature order."""
        params = inspect.signature(self.fn).parameters.values()
        names = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD or p.name in OPTIONAL_INPUTS]
        unused = self.unused(hparams)
        return tuple(n for n in names if n not in unused)

    def unused(self, hparams: Mapping[str, Any] | None = None) -> tuple[str, ...]:
        """Inputs of the signature the loss ignores with ``hparams`` (passed as None)."""
        return tuple(self.unused_inputs(self.hyperparameters(hparams))) if self.unused_inputs else ()

    def needs_reference_with(self, hparams=None) -> bool:
        """Reference log-probs are among the inputs (a reference model or cached log-probs)."""
        return any(n.startswith("reference_") for n in self.inputs(hparams))

    def needs_kl_with(self, hparams=None) -> bool:
        """KTO's mismatched KL sequences are among the inputs."""
        return "policy_kl_logps" in self.inputs(hparams)

    @property
    def needs_reference(self) -> bool:
        return self.needs_reference_with()

    @property
    def needs_kl(self) -> bool:
        return self.needs_kl_with()

    @property
    def token_level(self) -> bool:
        """Inputs are per-token ``[B, T]`` arrays (offline PPO), not per-sequence."""
        return self.feed == "token"

    def config_values(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What ``config.loss`` holds besides the name: the hyperparameters (a mixture nests them per
        term), then the feed's options (``FEED_OPTIONS``)."""
        hparams, options = self.split_options(overrides)
        return {**self.config_hyperparameters(hparams), **self.options(options)}

    def config_hyperparameters(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The hyperparameters as ``config.loss`` holds them (flat; a mixture nests them)."""
        return self.hyperparameters(overrides)

    def split_options(self, values: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """``config.loss``'s values (less the name) -> (hyperparameters, the feed's options)."""
        names = FEED_OPTIONS.get(self.feed, {})
        values = dict(values or {})
        return {k: v for k, v in values.items() if k not in names}, {k: v for k, v in values.items() if k in names}

    def options(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The feed's options (``FEED_OPTIONS``: defaults updated with ``overrides``)."""
        return {**FEED_OPTIONS.get(self.feed, {}), **dict(overrides or {})}

    def hyperparameters(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults updated with ``overrides``; an unknown name is an error naming the valid ones."""
        hparams = self.defaults
        for key, val in (overrides or {}).items():
            if key not in hparams:
                raise InputError(
                    f"loss {self.name!r} has no hyperparameter {key!r}; "
                    f"its hyperparameters are {sorted(hparams)} (set them as config.loss.<name>)"
                )
            hparams[key] = val
        return hparams
