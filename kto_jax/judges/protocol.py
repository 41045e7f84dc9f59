"""The paper's win rate: each sample against a baseline answer, judged pairwise, order randomized.

HALOs legacy compare.py (the KTO paper's numbers): GPT-4 is shown the conversation and two
answers, the model's sample and the dataset's SFT target, in an order shuffled per prompt, and
picks one. An answer it does not pick, a reply that names neither (unparseable) and a tie are
all non-wins:

    win rate = wins / total,    90% interval = Clopper-Pearson(wins, total)

``pairwise_winrate`` does exactly that with any judge (kto_jax/judges/__init__.py), keeping
every verdict in the judgments file (store.py) as it arrives: a rerun judges only what is
missing, a crash or an unreachable server loses nothing judged so far.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence

from tqdm import tqdm

from kto_jax.judges.base import Turns
from kto_jax.judges.store import JudgmentStore, judgment_key
from kto_jax.stats import clopper_pearson_interval

CHUNK = 32  # verdicts asked for (and saved) together, unless the judge says (``judge.chunk``)


def candidate_first(turns: Turns, seed: int) -> bool:
    """Whether the candidate is shown first for this prompt: one bit of sha256(seed, prompt), so the
    order is random across prompts, fixed for a prompt (reruns and other runs see the same order)."""
    digest = hashlib.sha256(json.dumps([int(seed), [list(t) for t in turns]]).encode("utf-8")).digest()
    return bool(digest[0] & 1)


def pairwise_winrate(
    judge,
    items: Sequence[tuple[Turns, str, str]],
    store: JudgmentStore,
    *,
    seed: int = 0,
    against: str = "sft_target",
    progress: bool = True,
    level: float = 0.9,
) -> dict:
    """``items`` = (turns, candidate, baseline) per prompt -> the paper's win rate of the candidate.

    Returns wins (candidate picked), baseline_wins, ties, unparseable, n, ``winrate`` = wins / n
    with its exact ``ci90``, ``candidate_first`` (how many prompts showed the candidate first),
    ``cached`` (verdicts read from the judgments file, not asked again) and the judge's key.
    """
    rows = []
    for turns, candidate, baseline in items:
        first = candidate_first(turns, seed)
        a, b = (candidate, baseline) if first else (baseline, candidate)
        rows.append(
            {
                "key": judgment_key(judge.key, turns, a, b),
                "judge": judge.key,
                "turns": [list(t) for t in turns],
                "first": a,
                "second": b,
                "candidate": "first" if first else "second",
            }
        )
    verdicts = {r["key"]: store.get(r["key"]) for r in rows}
    todo = list({r["key"]: r for r in rows if verdicts[r["key"]] is None}.values())
    cached = len(rows) - sum(verdicts[r["key"]] is None for r in rows)
    with tqdm(total=len(todo), desc=f"judging ({judge.key})", disable=not progress or not todo, file=sys.stderr) as bar:
        size = int(getattr(judge, "chunk", CHUNK))
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            answers = judge.compare([(r["turns"], r["first"], r["second"]) for r in chunk])
            store.put_many(
                [{**r, "winner": v.winner, "raw": v.raw, "p_first": v.p_first} for r, v in zip(chunk, answers)]
            )
            for r, v in zip(chunk, answers):
                verdicts[r["key"]] = v
            bar.update(len(chunk))
    counts = {"wins": 0, "baseline_wins": 0, "ties": 0, "unparseable": 0}
    for r in rows:
        winner = verdicts[r["key"]].winner
        if winner is None:
            counts["unparseable"] += 1
        elif winner == "tie":
            counts["ties"] += 1
        else:
            counts["wins" if winner == r["candidate"] else "baseline_wins"] += 1
    n = len(rows)
    return {
        **counts,
        "n": n,
        "winrate": counts["wins"] / n if n else 0.0,
        "ci90": list(clopper_pearson_interval(counts["wins"], n, level)),
        "candidate_first": sum(r["candidate"] == "first" for r in rows),
        "cached": cached,
        "judge": judge.key,
        "against": against,
        "order_seed": int(seed),
    }
