"""Judges and the paper's pairwise protocol: win rate = wins / total (ties and unparseable are not
wins), the order randomized per prompt and recorded, every verdict kept in the judgments file."""

from __future__ import annotations

import json

import pytest
from scipy import stats

from kto_jax.config import base_config
from kto_jax.judges import JUDGES, make_judge
from kto_jax.judges.base import Verdict
from kto_jax.judges.exact import ExactJudge
from kto_jax.judges.protocol import candidate_first, pairwise_winrate
from kto_jax.judges.store import JudgmentStore, judgment_key


class Scripted:
    """A judge whose verdict depends on the answers' text, counting what it is asked."""

    unary, key = False, "scripted"

    def __init__(self):
        self.asked = []

    def compare(self, items):
        self.asked += items
        out = []
        for _, first, second in items:
            if "?" in first + second:
                out.append(Verdict(None, "I cannot decide"))
            elif first == second:
                out.append(Verdict("tie"))
            else:
                out.append(Verdict("first" if len(first) > len(second) else "second"))
        return out


def _items(n):
    # candidate longer (a win) for i % 4 == 0, 1; equal (tie) for 2; unparseable for 3
    answers = {0: ("a long answer", "short"), 1: ("longer one", "tiny"), 2: ("same", "same"), 3: ("what?", "no")}
    return [((("user", f"question {i}"),), *answers[i % 4]) for i in range(n)]


def test_winrate_is_wins_over_total_with_the_exact_interval(tmp_path):
    result = pairwise_winrate(Scripted(), _items(40), JudgmentStore(str(tmp_path / "j.jsonl")), progress=False)
    assert (result["wins"], result["baseline_wins"], result["ties"], result["unparseable"], result["n"]) == (
        20,
        0,
        10,
        10,
        40,
    )
    assert result["winrate"] == 0.5  # ties and unparseable replies count as non-wins (compare.py)
    ci = stats.binomtest(20, 40).proportion_ci(0.9, method="exact")
    assert result["ci90"] == [pytest.approx(ci.low, abs=1e-9), pytest.approx(ci.high, abs=1e-9)]


def test_the_order_is_random_per_prompt_fixed_per_prompt_and_recorded(tmp_path):
    prompts = [(("user", f"q{i}"),) for i in range(400)]
    first = [candidate_first(p, 0) for p in prompts]
    assert 160 < sum(first) < 240  # about half
    assert first == [candidate_first(p, 0) for p in prompts]
    assert first != [candidate_first(p, 1) for p in prompts]  # the seed changes it
    store = JudgmentStore(str(tmp_path / "j.jsonl"))
    result = pairwise_winrate(Scripted(), _items(40), store, progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "j.jsonl")]
    assert len(rows) == 40 and result["candidate_first"] == sum(r["candidate"] == "first" for r in rows)
    for (turns, candidate, baseline), row in zip(_items(40), rows):
        shown_first = candidate_first(turns, 0)
        assert (row["first"], row["second"]) == ((candidate, baseline) if shown_first else (baseline, candidate))
        assert row["key"] == judgment_key("scripted", turns, row["first"], row["second"])


def test_a_rerun_asks_nothing_and_a_torn_line_is_dropped_and_asked_again(tmp_path):
    path = tmp_path / "j.jsonl"
    judge = Scripted()
    first = pairwise_winrate(judge, _items(12), JudgmentStore(str(path)), progress=False)
    assert len(judge.asked) == 12
    again = Scripted()
    second = pairwise_winrate(again, _items(12), JudgmentStore(str(path)), progress=False)
    assert again.asked == [] and second["cached"] == 12
    assert {k: v for k, v in second.items() if k != "cached"} == {k: v for k, v in first.items() if k != "cached"}
    text = path.read_text()
    path.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 1] + text.splitlines()[-1][:30])  # killed mid-line
    store = JudgmentStore(str(path))
    assert store.torn == 1 and len(store) == 11 and path.read_text().endswith("\n")
    third = Scripted()
    assert pairwise_winrate(third, _items(12), store, progress=False)["winrate"] == first["winrate"]
    assert len(third.asked) == 1


def test_a_bad_line_inside_the_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text('{"key": "a", "winner": "first"}\nnot json\n{"key": "b", "winner": null}\n')
    with pytest.raises(ValueError, match=r"j.jsonl:2: not a judgment line"):
        JudgmentStore(str(path))


def test_exact_judges_compare_by_their_flags():
    judge = make_judge(_config("synthetic"))
    turns = (("user", "Shout cat!"),)
    assert judge.desirable([(turns, " CAT"), (turns, " dog")]) == [True, False]
    assert [
        v.winner
        for v in judge.compare(
            [(turns, " CAT", " dog"), (turns, " dog", " CAT"), (turns, " CAT", " CAT"), (turns, " x", " y")]
        )
    ] == ["first", "second", "tie", "tie"]
    assert isinstance(judge, ExactJudge) and judge.key == "exact:synthetic"
    with pytest.raises(
        ValueError, match=r"unknown judge 'gpt5'.*known: \['api', 'feedback', 'reward_model', 'synthetic'\]"
    ):
        make_judge(_config("gpt5"))
    assert sorted(JUDGES) == ["api", "feedback", "reward_model", "synthetic"]


def test_a_verdict_must_name_a_position():
    with pytest.raises(ValueError, match="winner"):
        Verdict("candidate")


def _config(judge):
    c = base_config()
    c.eval.judge = judge
    return c
