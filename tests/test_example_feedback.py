"""The example feedback log (kto_jax/data/example_feedback.py): realistic shape, exact judge."""

from __future__ import annotations

import json

import pytest

from kto_jax.data.example_feedback import binary_feedback, preferences, write_jsonl
from kto_jax.judges import JUDGES
from kto_jax.judges.exact import check_feedback as judge


def _turns(record):
    return tuple((m["role"], m["content"]) for m in record["prompt"])


def test_binary_feedback_has_system_prompts_history_and_both_labels():
    records = binary_feedback(400, seed=0)
    assert len(records) == 400
    assert 0.3 < sum(r["label"] for r in records) / 400 < 0.7
    assert any(r["prompt"][0]["role"] == "system" for r in records)
    assert any(len(r["prompt"]) >= 3 for r in records)  # an earlier exchange
    prompts = [json.dumps(r["prompt"]) for r in records]
    assert len(set(prompts)) < len(prompts)  # some prompts rated twice (pairable for DPO)


def test_the_judge_accepts_exactly_the_good_replies():
    for r in binary_feedback(300, seed=1):
        assert judge(_turns(r), r["completion"][0]["content"]) == r["label"]
    for r in preferences(100, seed=2):
        assert judge(_turns(r), r["chosen"][0]["content"]) and not judge(_turns(r), r["rejected"][0]["content"])
    assert judge((("user", "What is 2 + 3?"),), " 5 ")
    assert JUDGES["feedback"](None).desirable(
        [((("system", "Be brief."), ("user", "What is the capital of Kenya?")), "Nairobi")]
    ) == [True]
    with pytest.raises(ValueError, match="not a question"):
        judge((("user", "Tell me a joke."),), "No.")


def test_write_jsonl_mixes_in_the_bad_lines_it_counts(tmp_path):
    path = str(tmp_path / "fb.jsonl")
    counts = write_jsonl(path, "binary", 50, seed=0, malformed=3)
    lines = open(path, encoding="utf-8").read().splitlines()
    assert counts["records"] == 50 and counts["malformed"] == 3 and len(lines) == 53
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    assert len(parsed) == 52  # one cut-off line
    assert sum(1 for r in parsed if "completion" not in r or r.get("label") not in (True, False)) == 2
    with pytest.raises(ValueError, match="kind="):
        write_jsonl(path, "scalar", 5)
