"""The judgments file: every verdict on disk, keyed, so a rerun costs nothing and a crash resumes.

One JSON object per line (``judgments.jsonl`` in the run's workdir):

    {"key": sha256(judge.key, turns, first, second), "judge": judge.key, "turns": [[role, content], ...],
     "first": ..., "second": ..., "candidate": "first" | "second", "winner": "first" | "second" | "tie" | null,
     "raw": the judge's answer, "p_first": P(first preferred) or null}

The key holds the two answers in the order the judge saw them (a judge may prefer a position,
so the same pair in the other order is another judgment). Lines are appended and fsynced in
batches as verdicts arrive; a line torn by a kill mid-write is dropped (and counted) when the
file is opened again, the file rewritten to its whole lines first through a temporary file.
"""

from __future__ import annotations

import hashlib
import json
import os

from kto_jax import files
from kto_jax.errors import InputError
from kto_jax.judges.base import Turns, Verdict


def judgment_key(judge_key: str, turns: Turns, first: str, second: str) -> str:
    """sha256 of (judge, conversation, first answer, second answer) in that order."""
    payload = json.dumps([judge_key, [list(t) for t in turns], first, second], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgmentStore:
    """Verdicts read from and appended to ``path``; ``torn`` counts the partial lines dropped on open."""

    def __init__(self, path: str):
        self.path, self.rows, self.torn = path, {}, 0
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
        good = []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                ok = line.endswith("\n") and isinstance(row, dict) and "key" in row and "winner" in row
            except ValueError:
                ok = False
            if ok:
                self.rows[row["key"]] = row
                good.append(line)
            elif number == len(lines):  # the last line, cut by a kill mid-write
                self.torn += 1
            else:
                raise InputError(
                    f"{path}:{number}: not a judgment line ({line[:80]!r}); move the file away to judge afresh"
                )
        if self.torn:
            files.write_atomic(path, "".join(good))

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, key: str) -> Verdict | None:
        row = self.rows.get(key)
        return None if row is None else Verdict(row["winner"], row.get("raw", ""), row.get("p_first"))

    def put_many(self, rows: list[dict]) -> None:
        """Append whole lines and fsync; each row has the fields of the module docstring."""
        if not rows:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            f.flush()
            os.fsync(f.fileno())
        for row in rows:
            self.rows[row["key"]] = row
