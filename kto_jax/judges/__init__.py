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

A new judge is a class with ``key``, ``unary``, ``compare`` (and ``desirable`` when unary) and one
line in ``JUDGES``; its settings live in ``config.eval.<name>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

Turns = Sequence[tuple[str, str]]
WINNERS = ("first", "second", "tie")


@dataclasses.dataclass(frozen=True)
class Verdict:
    winner: str | None  # "first" | "second" | "tie" | None (unparseable)
    raw: str = ""  # the judge's own answer (API text, reward scores)
    p_first: float | None = None  # P(first preferred) where the judge has one (reward model: Bradley-Terry)

    def __post_init__(self):
        if self.winner is not None and self.winner not in WINNERS:
            raise ValueError(f"Verdict.winner must be one of {WINNERS} or None; got {self.winner!r}")


def verdict_from_flags(first_ok: bool, second_ok: bool) -> Verdict:
    """A pairwise verdict from two unary ones: the desirable answer wins, equal flags tie."""
    if first_ok == second_ok:
        return Verdict("tie", f"first={first_ok} second={second_ok}")
    return Verdict("first" if first_ok else "second", f"first={first_ok} second={second_ok}")


class ExactJudge:
    """A task's exact checker (``check(turns, completion) -> bool``) as a judge; pairwise from the two flags."""

    unary = True

    def __init__(self, name: str, check: Callable[[Turns, str], bool]):
        self.key, self._check = f"exact:{name}", check

    def desirable(self, items) -> list[bool]:
        return [bool(self._check(turns, completion)) for turns, completion in items]

    def compare(self, items) -> list[Verdict]:
        return [verdict_from_flags(*self.desirable([(t, a), (t, b)])) for t, a, b in items]


def _synthetic(config):
    from kto_jax.data import synthetic

    return ExactJudge("synthetic", lambda turns, completion: synthetic.judge(turns[-1][1], completion))


def _feedback(config):
    from kto_jax.data.example_feedback import judge

    return ExactJudge("feedback", judge)


def _api(config):
    from kto_jax.judges.api import ApiJudge

    return ApiJudge.from_config(config.eval.api)


def _reward_model(config):
    from kto_jax.judges.reward_model import RewardModelJudge

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
        raise ValueError(f"unknown judge {name!r} ({field}); known: {sorted(JUDGES)}")
    return JUDGES[name](config)
