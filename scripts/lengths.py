"""Length-realistic feedback for benchmarks: prompt and completion lengths drawn from the
histograms in scripts/length_histograms.json (numpy only, so the TRL anchor shares it).

    lengths = sample_lengths("mix", 64, np.random.default_rng(0))     # [64, 2] token counts
    rows = example_texts("unary", "mix", 64, seed=0)                   # prompt/completion texts

Texts are random letters: with a character-level tokenizer (kto-jax's "bytes", the anchors'
WordLevel one) a text of k characters is k tokens, so the drawn lengths are the token lengths.
"""

from __future__ import annotations

import json
import os

import numpy as np

HISTOGRAMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "length_histograms.json")
CHARS = np.array(list("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,"))


def sources() -> dict:
    with open(HISTOGRAMS, encoding="utf-8") as f:
        return json.load(f)["sources"]


def sample_lengths(source: str, n: int, rng) -> np.ndarray:
    """``[n, 2]`` (prompt, completion) token lengths: a bin of each histogram by its probability,
    then a length uniform in ``[edges[b], edges[b + 1])``; at least 1."""
    table = sources()
    if source not in table:
        raise ValueError(f"length source {source!r} is not in {HISTOGRAMS} (sources: {', '.join(sorted(table))})")
    out = []
    for part in ("prompt_tokens", "completion_tokens"):
        edges, probs = np.asarray(table[source][part]["edges"]), np.asarray(table[source][part]["probs"], float)
        bins = rng.choice(len(probs), size=n, p=probs / probs.sum())
        out.append(rng.integers(edges[bins], edges[bins + 1]))
    return np.maximum(np.stack(out, axis=1), 1)


def example_texts(kind: str, source: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` examples of random letters at drawn lengths: unary ``{prompt, completion, label}``
    (label alternating) or paired ``{prompt, chosen, rejected}`` (the rejected 0.5-1.5x the chosen)."""
    rng = np.random.default_rng(seed)
    lengths = sample_lengths(source, n, rng)
    text = lambda k: "".join(rng.choice(CHARS, int(k)))  # noqa: E731
    if kind == "paired":
        return [
            {"prompt": text(p), "chosen": text(c), "rejected": text(max(1, round(c * rng.uniform(0.5, 1.5))))}
            for p, c in lengths
        ]
    return [{"prompt": text(p), "completion": text(c), "label": bool(i % 2)} for i, (p, c) in enumerate(lengths)]
