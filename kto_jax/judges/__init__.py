"""Judges by name (``config.eval.judge``): exact checkers, an OpenAI-compatible API judge, a reward model.

A judge is built from the run's config by :func:`make_judge` and answers in batches:

    judge = make_judge(config)               # config.eval.judge = "synthetic" | "feedback" | "api" | "reward_model"
    judge.desirable([(turns, completion)])   # -> [bool]; unary, only where judge.unary is True
    judge.compare([(turns, first, second)])  # -> [Verdict]; pairwise, every judge

``turns`` is the whole conversation before the answer, ``((role, content), ...)`` with system
and earlier turns. ``Verdict.winner`` is ``"first"``, ``"second"``, ``"tie"`` or ``None`` when
the judge's answer could not be read (counted as unparseable, never as a win). ``judge.key``
names the judge and every setting that changes its verdicts; the judgments file
(kto_jax/judges/store.py) keys each verdict by (prompt, both answers in order, judge.key).

A new judge is a class with ``key``, ``unary``, ``compare`` (and ``desirable`` when unary), a
factory and its line in ``JUDGES``; its settings are ``config.eval.<name>`` (a default in
kto_jax/config.py, rules in train/rules.py, plan-time checks in train/plan.py where they can fail),
and the online rounds list a pairwise-only judge in ``PAIRWISE_ONLY_JUDGES``. ``Turns`` and ``Verdict`` are in
kto_jax/judges/base.py, the exact checkers in kto_jax/judges/exact.py.
"""

from __future__ import annotations

from collections.abc import Callable

from kto_jax.errors import InputError
from kto_jax.judges.api import ApiJudge
from kto_jax.judges.exact import ExactJudge, check_feedback, check_synthetic
from kto_jax.judges.reward_model import RewardModelJudge


def _synthetic(config):
    return ExactJudge("synthetic", lambda turns, completion: check_synthetic(turns[-1][1], completion))


def _feedback(config):
    return ExactJudge("feedback", check_feedback)


def _api(config):
    return ApiJudge.from_config(config.eval.api)


def _reward_model(config):
    return RewardModelJudge.from_config(config.eval.reward_model)


# name -> factory(config) -> judge
JUDGES: dict[str, Callable] = {
    "synthetic": _synthetic,
    "feedback": _feedback,
    "api": _api,
    "reward_model": _reward_model,
}


def make_judge(config, name: str = "", field: str = "config.eval.judge"):
    """The judge ``name`` (default ``config.eval.judge``), built from its ``config.eval.<name>``
    settings; ``field`` is the config field an unknown name is reported under."""
    name = name or config.eval.judge
    if name not in JUDGES:
        raise InputError(f"unknown judge {name!r} ({field}); known: {sorted(JUDGES)}")
    return JUDGES[name](config)
