"""The embedded synthetic feedback task: "Shout WORD!" -> " WORD" in capitals.

A prompt asks to shout a random lowercase word; the desirable completion is the word in
capitals. Undesirable completions are the two mistakes a model can make: not shouting
(the word unchanged, lowercase) or shouting with one wrong letter. A program decides
desirability exactly (``kto_jax.judges.exact.check_synthetic``), for the dataset's completions
and for any text a model generates.

The mixture is half desirable, half undesirable (a quarter each mistake), so a model
trained by SFT on all of it writes both kinds about half the time; alignment only has to
learn to pick capitals and copy the letters faithfully, which generalises to unseen words.
Everything is a pure function of (split, index): no files, no downloads.
"""

from __future__ import annotations

import string

import numpy as np

SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}
MIN_LETTERS, MAX_LETTERS = 3, 6


def make_prompt(word: str) -> str:
    return f"Shout {word}!"


def desirable_completion(word: str) -> str:
    return " " + word.upper()


def _rng(split: str, index: int) -> np.random.Generator:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown synthetic split {split!r}; splits: {sorted(SPLIT_SEEDS)}")
    return np.random.default_rng([SPLIT_SEEDS[split], index])


def _word(rng: np.random.Generator) -> str:
    n = int(rng.integers(MIN_LETTERS, MAX_LETTERS + 1))
    return "".join(rng.choice(list(string.ascii_lowercase), n))


def _mistake(word: str, rng: np.random.Generator) -> str:
    """An undesirable completion: the word not shouted, or shouted with one wrong letter."""
    if rng.random() < 0.5:
        return " " + word
    letters = list(word.upper())
    i = int(rng.integers(len(letters)))
    letters[i] = rng.choice([c for c in string.ascii_uppercase if c != letters[i]])
    return " " + "".join(letters)


def paired_example(split: str, index: int) -> dict:
    """One prompt with a desirable (chosen) and an undesirable (rejected) completion."""
    rng = _rng(split, index)
    word = _word(rng)
    return {
        "id": f"synthetic-{split}-{index}",
        "prompt": make_prompt(word),
        "chosen": desirable_completion(word),
        "rejected": _mistake(word, rng),
    }


def unary_example(split: str, index: int) -> dict:
    """One prompt with one completion, desirable with probability 1/2 (naturally unary feedback)."""
    rng = _rng(split, index)
    word = _word(rng)
    desirable = bool(rng.random() < 0.5)
    completion = desirable_completion(word) if desirable else _mistake(word, rng)
    return {
        "id": f"synthetic-{split}-{index}",
        "prompt": make_prompt(word),
        "completion": completion,
        "desirable": desirable,
    }
