"""Exact judges: a task's checker, a program that decides whether a completion is right, as a judge
(``ExactJudge``; pairwise from the two answers' flags).

    check_synthetic(prompt, completion)   # the synthetic task (kto_jax.data.synthetic): "Shout WORD!"
    check_feedback(turns, completion)     # the example feedback log's tasks (kto_jax.data.example_feedback)
"""

from __future__ import annotations

import re
from collections.abc import Callable

from kto_jax.data.example_feedback import CAPITALS
from kto_jax.errors import InputError
from kto_jax.judges.base import Turns, Verdict, verdict_from_flags

_PROMPT = re.compile(r"^Shout ([a-z]+)!$")  # the synthetic task's prompt (kto_jax.data.synthetic.make_prompt)


class ExactJudge:
    """A task's exact checker (``check(turns, completion) -> bool``) as a judge; pairwise from the two flags."""

    unary = True

    def __init__(self, name: str, check: Callable[[Turns, str], bool]):
        self.key, self._check = f"exact:{name}", check

    def desirable(self, items) -> list[bool]:
        return [bool(self._check(turns, completion)) for turns, completion in items]

    def compare(self, items) -> list[Verdict]:
        return [verdict_from_flags(*self.desirable([(t, a), (t, b)])) for t, a, b in items]


def check_synthetic(prompt: str, completion: str) -> bool:
    """The synthetic task's judge (``kto_jax.data.synthetic``): true iff ``completion``
    (leading/trailing whitespace ignored) is the prompt's word in capitals."""
    match = _PROMPT.match(prompt.strip())
    if match is None:
        raise InputError(
            f"not a synthetic-task prompt: {prompt!r} (expected 'Shout <lowercase word>!'): the 'synthetic' judge "
            "checks only that task; choose the judge for these prompts (config.eval.judge or config.online.judge)"
        )
    return completion.strip() == match.group(1).upper()


_QUESTIONS = (
    (
        re.compile(r"^What is (\d+) \+ (\d+)\?$"),
        lambda m: {f"{m[1]} + {m[2]} = {int(m[1]) + int(m[2])}.", str(int(m[1]) + int(m[2]))},
    ),
    (
        re.compile(r"^Spell the word '(\w+)' backwards\.$"),
        lambda m: {f"'{m[1]}' spelled backwards is '{m[1][::-1]}'.", m[1][::-1]},
    ),
    (re.compile(r"^Write the word '(\w+)' in capital letters\.$"), lambda m: {m[1].upper()}),
    (
        re.compile(r"^What is the capital of (.+)\?$"),
        lambda m: (
            {f"The capital of {m[1]} is {c}." for country, c, _ in CAPITALS if country == m[1]}
            | {c for country, c, _ in CAPITALS if country == m[1]}
        ),
    ),
)


def check_feedback(turns, completion: str) -> bool:
    """The example feedback log's judge (``kto_jax.data.example_feedback``): whether ``completion``
    answers the conversation's last user question right: exactly one of the accepted answers (the
    reply these records call good, or the bare answer), surrounding whitespace ignored. A
    conversation whose last user turn is not one of the tasks fails."""
    question = next((content for role, content in reversed(tuple(turns)) if role == "user"), None)
    for pattern, answers in _QUESTIONS:
        match = pattern.match((question or "").strip())
        if match:
            return completion.strip() in answers(match)
    raise InputError(
        f"not a question of kto_jax/data/example_feedback.py's tasks: {question!r}: the 'feedback' judge checks "
        "only those tasks; choose the judge for these prompts (config.eval.judge or config.online.judge)"
    )
