"""A realistic feedback log to try the file source on: conversational thumbs up/down and preferences.

    python scripts/make_feedback.py --kind binary --out data/feedback.jsonl       # KTO
    python scripts/make_feedback.py --kind preference --out data/prefs.jsonl      # DPO

Records are in TRL's conversational formats, the ones a chat product's logs export to:
unpaired preference (binary feedback)

    {"prompt": [{"role": "system", ...}, {"role": "user", ...}, ...],
     "completion": [{"role": "assistant", "content": ...}], "label": true}

and preference ``{"prompt": [...], "chosen": [...], "rejected": [...]}``. Prompts have a
system message about half the time and an earlier exchange (two to four turns) about 40% of
the time. Each task has an answer a program can check (``kto_jax.judges.exact.check_feedback``,
``config.eval.judge="feedback"``), so a judge can score a model's samples: sums, spelling a word
backwards, capital letters, and capitals of countries. Good replies are right; bad ones are
wrong, lazy refusals, or off-topic. With binary feedback a prompt gets one or two rated replies,
so some prompts have both kinds (``paired_from_unary`` pairs them for DPO) and most have one.
``malformed`` lines (a cut-off JSON line, a record without its completion, a label that is
neither true nor false) are what a real export holds and what
``config.data.skip_bad_records=True`` skips and counts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np

SYSTEMS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one sentence.",
    "You are a friendly tutor who helps students check their work.",
    "Answer the user's question accurately.",
)
WORDS = (
    "garden",
    "planet",
    "silver",
    "rocket",
    "window",
    "puzzle",
    "forest",
    "candle",
    "bridge",
    "marble",
    "violet",
    "harbor",
    "pepper",
    "tunnel",
    "meadow",
    "lantern",
    "thunder",
    "compass",
    "blossom",
    "glacier",
)
CAPITALS = (
    ("France", "Paris", "Lyon"),
    ("Japan", "Tokyo", "Osaka"),
    ("Canada", "Ottawa", "Toronto"),
    ("Australia", "Canberra", "Sydney"),
    ("Brazil", "Brasilia", "Rio de Janeiro"),
    ("Kenya", "Nairobi", "Mombasa"),
    ("Turkey", "Ankara", "Istanbul"),
    ("Switzerland", "Bern", "Zurich"),
    ("Morocco", "Rabat", "Casablanca"),
    ("Vietnam", "Hanoi", "Ho Chi Minh City"),
)
REFUSALS = ("I'm not able to help with that.", "You could look that up yourself.", "Sorry, I don't know.")
OFF_TOPIC = (
    "The weather is lovely today!",
    "Have you tried turning it off and on again?",
    "Let's talk about something else.",
)
GREETINGS = (
    ("Hi there!", "Hello! How can I help you today?"),
    ("Good morning.", "Good morning! What can I do for you?"),
    ("I have a quick question.", "Sure, go ahead."),
)


def _add(rng):
    a, b = (int(x) for x in rng.integers(2, 200, size=2))
    wrong = a + b + int(rng.choice([-10, -2, -1, 1, 2, 10]))
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", f"{a} + {b} = {wrong}."


def _backwards(rng):
    w = str(rng.choice(WORDS))
    wrong = w[::-1][:-1] + w[0] * 2 if rng.random() < 0.5 else w
    return (
        f"Spell the word '{w}' backwards.",
        f"'{w}' spelled backwards is '{w[::-1]}'.",
        f"'{w}' spelled backwards is '{wrong}'.",
    )


def _capital_letters(rng):
    w = str(rng.choice(WORDS))
    return f"Write the word '{w}' in capital letters.", w.upper(), w.capitalize()


def _country(rng):
    country, right, wrong = CAPITALS[int(rng.integers(len(CAPITALS)))]
    return (
        f"What is the capital of {country}?",
        f"The capital of {country} is {right}.",
        f"The capital of {country} is {wrong}.",
    )


TASKS: tuple[Callable, ...] = (_add, _backwards, _capital_letters, _country)


def _prompt(rng) -> tuple[list[dict], str, str]:
    """(messages, good reply, bad reply) of one random task, with its system message and history."""
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": str(rng.choice(SYSTEMS))})
    if rng.random() < 0.4:
        if rng.random() < 0.5:
            user, reply = GREETINGS[int(rng.integers(len(GREETINGS)))]
        else:
            user, reply, _ = TASKS[int(rng.integers(len(TASKS)))](rng)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    question, good, bad = TASKS[int(rng.integers(len(TASKS)))](rng)
    if rng.random() < 0.25:  # lazy or off-topic instead of wrong
        bad = str(rng.choice(REFUSALS if rng.random() < 0.5 else OFF_TOPIC))
    messages.append({"role": "user", "content": question})
    return messages, good, bad


def _reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def binary_feedback(n: int, *, seed: int = 0) -> list[dict]:
    """About ``n`` thumbs up/down records (one or two rated replies per prompt; roughly half up)."""
    rng = np.random.default_rng(seed)
    records: list[dict] = []
    while len(records) < n:
        messages, good, bad = _prompt(rng)
        both = rng.random() < 0.3
        labels = [True, False] if both else [bool(rng.random() < 0.5)]
        for label in labels[: n - len(records)]:
            records.append({"prompt": messages, "completion": _reply(good if label else bad), "label": label})
    return records


def preferences(n: int, *, seed: int = 0) -> list[dict]:
    """``n`` preference records: the right reply chosen over the wrong one."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        messages, good, bad = _prompt(rng)
        out.append({"prompt": messages, "chosen": _reply(good), "rejected": _reply(bad)})
    return out


def _malformed(kind: str, rng) -> list[str]:
    """Three bad lines: a cut-off JSON line, a record without its reply, an unknown label."""
    messages, good, _ = _prompt(rng)
    whole = json.dumps({"prompt": messages, "completion": _reply(good), "label": True})
    lines = [whole[: len(whole) // 2]]
    if kind == "binary":
        lines += [
            json.dumps({"prompt": messages, "label": False}),
            json.dumps({"prompt": messages, "completion": _reply(good), "label": "maybe"}),
        ]
    else:
        lines += [
            json.dumps({"prompt": messages, "chosen": _reply(good)}),
            json.dumps({"prompt": messages, "chosen": _reply(good), "rejected": 7}),
        ]
    return lines


def write_jsonl(path: str, kind: str, n: int, *, seed: int = 0, malformed: int = 0) -> dict:
    """Write ``n`` records of ``kind`` ("binary" or "preference") and ``malformed`` bad lines
    (at most 3, at random places) to ``path``; returns counts. Written to a temporary name and
    renamed, so a reader never sees half a file."""
    if kind not in ("binary", "preference"):
        raise ValueError(f"kind={kind!r}: use 'binary' (thumbs up/down, KTO) or 'preference' (chosen/rejected, DPO)")
    rng = np.random.default_rng(seed + 1)
    records = binary_feedback(n, seed=seed) if kind == "binary" else preferences(n, seed=seed)
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    bad = _malformed(kind, rng)[: max(0, malformed)]
    for line in bad:
        lines.insert(int(rng.integers(1, len(lines))), line)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    counts = {"records": len(records), "malformed": len(bad)}
    if kind == "binary":
        counts["desirable"] = sum(r["label"] for r in records)
    return counts
