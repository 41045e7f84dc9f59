"""What every judge shares: the conversation a judge reads (``Turns``) and its pairwise answer
(``Verdict``); the judges by name are in ``kto_jax.judges``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

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
