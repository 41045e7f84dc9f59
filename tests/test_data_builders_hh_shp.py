"""HH-RLHF and SHP builders, prepared from the hand-made fixtures (no network).

tests/fixtures/hh/{subset}/{split}.jsonl.gz and tests/fixtures/shp/{domain}/{split}.json are
written by the make_fixtures.py next to them; the expected records below are read off those
scripts by hand.
"""

import gzip
import json
import os
import shutil

import pytest
import tensorflow_datasets as tfds

from kto_jax.data.builders import base, load_examples, load_records, prepare
from kto_jax.data.builders.hh import SUBSETS, dialogue_turns, split_pair
from kto_jax.data.builders.shp import DOMAINS, cap_per_post
from kto_jax.data.feedback import Paired
from kto_jax.data.schemas import BadRecord

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
HH_DIR = os.path.join(FIXTURES, "hh")
SHP_DIR = os.path.join(FIXTURES, "shp")


def by_id(records):
    return {r["id"]: r for r in records}


def user(*contents):
    """Alternating user/assistant turns starting with the user, in the record layout."""
    return {
        "role": ["user", "assistant"] * (len(contents) // 2) + ["user"] * (len(contents) % 2),
        "content": list(contents),
    }


# --- hh -------------------------------------------------------------------------------------------


def test_hh_records_and_counts(tmp_path):
    builder = prepare("hh", str(tmp_path), HH_DIR)
    train = by_id(load_records("hh", "train", str(tmp_path)))
    assert sorted(train) == [
        "hh/harmless-base/train/0",
        "hh/helpful-base/train/0",
        "hh/helpful-base/train/1",
        "hh/helpful-base/train/2",
        "hh/helpful-base/train/5",
        "hh/helpful-online/train/1",
        "hh/helpful-rejection-sampled/train/0",
    ]
    # multi-turn: the earlier turns are the prompt, the last (empty) assistant marker is not a turn
    assert train["hh/helpful-base/train/0"] == {
        "id": "hh/helpful-base/train/0",
        "prompt": user(
            "What's a good way to learn French?",
            "Practice a little every day, for example with a tutor or an app.",
            "Which app would you suggest?",
        ),
        "chosen": "Duolingo is free and good for daily practice.",
        "rejected": "I don't know any apps.",
        "subset": "helpful-base",
        "sft_target": "Duolingo is free and good for daily practice.",  # the prompt's only pair's chosen
    }
    # the common prefix runs into the completions; the cut is still at the last shared marker
    long_prefix = train["hh/helpful-base/train/1"]
    assert long_prefix["prompt"] == user("What is the capital of Australia?")
    assert (
        long_prefix["chosen"]
        == "The capital of Australia is Canberra, a planned city chosen as a compromise between Sydney and Melbourne."
    )
    assert long_prefix["rejected"] == "The capital of Australia is Sydney."
    emoji = train["hh/helpful-base/train/2"]
    assert emoji["prompt"] == user("Wie sagt man „danke“ auf Japanisch? 🙏")
    assert (emoji["chosen"], emoji["rejected"]) == ("Man sagt ありがとう (arigatō) 😊", "Keine Ahnung.")
    # whitespace around turns stripped, leading whitespace of completions stripped
    egg = train["hh/helpful-base/train/5"]
    assert egg["prompt"] == user("How do I boil an egg?")
    assert (egg["chosen"], egg["rejected"]) == ("Put it in boiling water for about nine minutes.", "Microwave it.")
    assert train["hh/harmless-base/train/0"]["subset"] == "harmless-base"

    counts = builder.counts["hh/train"]
    assert (counts.read, counts.kept, counts.bad) == (10, 7, 0)
    assert counts.filtered == {"identical": 1, "prompt_differs": 1, "empty_completion": 1}
    test = by_id(load_records("hh", "test", str(tmp_path)))
    assert len(test) == 5 and builder.counts["hh/test"].filtered == {}
    assert test["hh/helpful-base/test/1"]["chosen"] == "Red."


def test_hh_subset_configs(tmp_path):
    builder = prepare("hh/helpful-base", str(tmp_path), HH_DIR)
    train = load_records("hh/helpful-base", "train", str(tmp_path), HH_DIR)
    assert sorted(r["id"] for r in train) == [f"hh/helpful-base/train/{i}" for i in (0, 1, 2, 5)]
    assert {r["subset"] for r in train} == {"helpful-base"}
    assert builder.counts["hh/train"].filtered == {"identical": 1, "prompt_differs": 1}
    harmless = load_records("hh/harmless-base", "test", str(tmp_path), HH_DIR)
    assert [r["id"] for r in harmless] == ["hh/harmless-base/test/0"]
    assert harmless[0]["chosen"] == "I'd rather help you talk to them about what's bothering you."
    online = load_records("hh/helpful-online", "train", str(tmp_path), HH_DIR)
    assert [r["id"] for r in online] == ["hh/helpful-online/train/1"]  # line 0 has an empty completion
    assert len(load_records("hh/helpful-rejection-sampled", "test", str(tmp_path), HH_DIR)) == 1
    with pytest.raises(ValueError, match="dataset 'hh' has no config 'helpful_base'.*helpful-base"):
        load_records("hh/helpful_base", "train", str(tmp_path), HH_DIR)


def test_hh_prompt_rule():
    H, A = "\n\nHuman:", "\n\nAssistant:"
    prompt, chosen, rejected = split_pair(f"{H} hi{A} hello there", f"{H} hi{A} hello")[0]
    assert (prompt, chosen, rejected) == (f"{H} hi{A}", "hello there", "hello")
    # dialogues that differ before the final assistant turn have no shared prompt
    assert split_pair(f"{H} a{A} b{H} c{A} d", f"{H} a{A} x{H} c{A} d") == (None, "prompt_differs")
    assert split_pair(f"{H} a{A} b", f"{H} a{A} b{H} more{A} e") == (None, "prompt_differs")
    assert split_pair(f"{H} a{A} b", f"{H} z{A} b") == (None, "prompt_differs")
    assert split_pair(f"{H} a{A}  ", f"{H} a{A} b") == (None, "empty_completion")
    assert split_pair(f"{H} a{A} b", f"{H} a{A}  b") == (None, "identical")
    assert dialogue_turns(f"{H} a {A} b{H}c{A}") == user("a", "b", "c")
    with pytest.raises(BadRecord, match="does not start with"):
        dialogue_turns(f"preamble{H} a{A}")
    with pytest.raises(BadRecord, match="no '\\\\n\\\\nHuman:' turn"):
        dialogue_turns(A)


# --- shp ------------------------------------------------------------------------------------------

P7_KEPT = ["shp/p7cul/c1/c2", "shp/p7cul/c1/c3", "shp/p7cul/c2/c3", "shp/p7cul/c2/c4", "shp/p7cul/c5/c6"]


def test_shp_records_filters_and_counts(tmp_path):
    builder = prepare("shp", str(tmp_path), SHP_DIR)
    train = by_id(load_records("shp", "train", str(tmp_path)))
    # score ratio >= 2 (2.0 exactly is kept), then at most 5 pairs per post (p7cul had 7)
    assert sorted(train) == P7_KEPT + ["shp/q2cul/d1/d2", "shp/q2cul/d3/d1", "shp/r3law/e1/e2"]
    assert train["shp/q2cul/d3/d1"] == {  # labels 0: B preferred
        "id": "shp/q2cul/d3/d1",
        "prompt": user("Why does my bread come out dense? 🍞 I knead it for ten minutes."),
        "chosen": "Your dough is too dry; add water.",
        "rejected": "Use bread flour.",
        "domain": "askculinary",
        "score_chosen": 30.0,
        "score_rejected": 12.0,
        "sft_target": "Your dough is too dry; add water.",  # human_ref_A of the post's first pair (d1/d2)
    }
    law = train["shp/r3law/e1/e2"]
    assert law["prompt"] == user("My landlord kept my whole deposit (€800) — what can I do?")
    assert (law["chosen"], law["rejected"], law["domain"]) == (
        "Send a demand letter citing your state's deposit law, then small claims.",
        "Just let it go.",
        "legaladvice",
    )
    assert (law["score_chosen"], law["score_rejected"]) == (50.0, 5.0)
    assert all(r["score_chosen"] > r["score_rejected"] for r in train.values())
    counts = builder.counts["shp/train"]
    assert (counts.read, counts.kept, counts.bad) == (14, 8, 0)
    assert counts.filtered == {"score_ratio<2": 4, "more_than_5_per_post": 2}

    # validation and test are the full upstream splits: no score-ratio filter, no cap
    validation = by_id(load_records("shp", "validation", str(tmp_path)))
    assert sorted(validation) == ["shp/v1cul/f1/f2", "shp/v2law/h1/h2"]  # v1cul has ratio 1.5
    test = by_id(load_records("shp", "test", str(tmp_path)))
    assert len(test) == 7 and sum(i.startswith("shp/t2law/") for i in test) == 6
    assert test["shp/t1cul/g1/g2"]["chosen"] == "A year." and test["shp/t1cul/g1/g2"]["score_chosen"] == 32.0
    assert builder.counts["shp/test"].filtered == {} and builder.counts["shp/validation"].filtered == {}


def test_shp_cap_is_deterministic():
    ids = [f"shp/p/{i}/{j}" for i in range(4) for j in range(3)]
    kept = cap_per_post("p", ids)
    assert len(kept) == 5 and kept <= set(ids)
    assert cap_per_post("p", list(reversed(ids))) == kept  # independent of file order
    assert cap_per_post("p", ids[:5]) == set(ids[:5])
    assert any(cap_per_post(f"post{k}", ids) != kept for k in range(5))  # seeded by post_id


def test_shp_uses_present_domains_only_and_fails_on_none(tmp_path):
    manual = tmp_path / "manual"
    shutil.copytree(os.path.join(SHP_DIR, "legaladvice"), manual / "legaladvice")
    train = load_records("shp", "train", str(tmp_path / "data"), str(manual))
    assert sorted(r["id"] for r in train) == ["shp/r3law/e1/e2"]
    with pytest.raises(FileNotFoundError, match="holds no SHP file"):
        prepare("shp", str(tmp_path / "data2"), HH_DIR)  # non-empty, but no SHP domain
    os.remove(manual / "legaladvice" / "test.json")
    with pytest.raises(FileNotFoundError, match=r"legaladvice/test\.json is missing"):
        prepare("shp", str(tmp_path / "data3"), str(manual))


# --- both -----------------------------------------------------------------------------------------


def test_hh_plus_shp_mixture(tmp_path):
    manual = tmp_path / "manual"  # one manual_dir serves both sources: their folder names differ
    shutil.copytree(HH_DIR, manual, dirs_exist_ok=True)
    shutil.copytree(SHP_DIR, manual, dirs_exist_ok=True)
    examples = load_examples("hh+shp", "train", data_dir=str(tmp_path / "data"), manual_dir=str(manual))
    assert all(isinstance(e, Paired) for e in examples)
    assert len(examples) == 7 + 8
    assert sum(e.id.startswith("hh/") for e in examples) == 7
    capital = next(e for e in examples if e.id == "hh/helpful-base/train/1")
    assert capital.prompt == (("user", "What is the capital of Australia?"),)
    bread = next(e for e in examples if e.id == "shp/q2cul/d1/d2")
    assert bread.prompt == (("user", "Why does my bread come out dense? 🍞 I knead it for ten minutes."),)
    assert (bread.chosen, bread.rejected) == ("Your dough is too dry; add water.", "Knead longer.")


def test_without_manual_dir_every_upstream_file_is_downloaded(tmp_path, monkeypatch):
    """The download branch, offline: the download manager is faked to serve fixture copies."""
    requested = []

    def fake_download(self, urls):
        requested.extend(urls.values())
        out = {}
        for name, url in urls.items():
            if url.startswith("https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/"):
                out[name] = os.path.join(HH_DIR, name)
            else:  # SHP: every domain gets a copy of askculinary's file, post ids made unique
                domain, split = name.split("/")
                lines = _read_lines(os.path.join(SHP_DIR, "askculinary", split))
                out[name] = str(tmp_path / f"{domain}-{split}")
                _write_lines(out[name], [line.replace('"post_id": "', f'"post_id": "{domain}-') for line in lines])
        return out

    monkeypatch.setattr(tfds.download.DownloadManager, "download", fake_download)
    monkeypatch.setattr(base, "reachable", lambda host: True)
    assert len(load_records("hh", "train", str(tmp_path / "data"))) == 7
    hh_url = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/{}/{}.jsonl.gz"
    assert sorted(requested) == sorted(hh_url.format(s, p) for s in SUBSETS for p in ("train", "test"))
    requested.clear()
    train = load_records("shp", "train", str(tmp_path / "data"))
    shp_url = "https://huggingface.co/datasets/stanfordnlp/SHP/resolve/main/{}/{}.json"
    assert sorted(requested) == sorted(shp_url.format(d, p) for d in DOMAINS for p in ("train", "validation", "test"))
    assert len(DOMAINS) == 18 and len(train) == 18 * 7  # askculinary's 12 pairs -> 5 + 2 per domain
    assert {r["domain"] for r in train} == set(DOMAINS)


# --- bad input ------------------------------------------------------------------------------------


def _read_lines(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def _write_lines(path, lines):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def _drop_field(field):
    def mutate(line):
        obj = json.loads(line)
        del obj[field]
        return json.dumps(obj, ensure_ascii=False)

    return mutate


def _set_field(field, value):
    def mutate(line):
        obj = json.loads(line)
        obj[field] = value
        return json.dumps(obj, ensure_ascii=False)

    return mutate


BAD_CASES = {
    # name: (source, file, line to break (1-based), mutation, split, error, records left when skipped)
    "hh_missing_field": (
        "hh",
        "helpful-base/train.jsonl.gz",
        2,
        _drop_field("rejected"),
        "train",
        r"helpful-base/train\.jsonl\.gz, line 2: missing field 'rejected'",
        6,
    ),
    "hh_wrong_type": (
        "hh",
        "harmless-base/test.jsonl.gz",
        1,
        _set_field("chosen", ["not", "text"]),
        "test",
        r"harmless-base/test\.jsonl\.gz, line 1: field 'chosen' should be str, got list",
        4,
    ),
    "shp_wrong_type": (
        "shp",
        "askculinary/train.json",
        1,
        _set_field("score_A", "100"),
        "train",
        r"askculinary/train\.json, line 1: field 'score_A' should be int/float, got str",
        8,
    ),
    "shp_missing_field": (
        "shp",
        "legaladvice/test.json",
        3,
        _drop_field("human_ref_B"),
        "test",
        r"legaladvice/test\.json, line 3: missing field 'human_ref_B'",
        6,
    ),
    "shp_bad_label": (
        "shp",
        "legaladvice/validation.json",
        1,
        _set_field("labels", 2),
        "validation",
        r"legaladvice/validation\.json, line 1: field 'labels' should be 0 or 1",
        1,
    ),
    "shp_malformed_json": (
        "shp",
        "legaladvice/train.json",
        2,
        lambda line: line[:40],
        "train",
        r"legaladvice/train\.json, line 2: malformed JSON",
        8,
    ),
    "hh_malformed_json": (
        "hh",
        "helpful-online/test.jsonl.gz",
        1,
        lambda line: line + "}",
        "test",
        r"helpful-online/test\.jsonl\.gz, line 1: malformed JSON",
        4,
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_fails_with_file_line_field_or_is_counted(tmp_path, case):
    source, name, line_no, mutate, split, error, left = BAD_CASES[case]
    manual = tmp_path / "manual"
    shutil.copytree(HH_DIR if source == "hh" else SHP_DIR, manual)
    path = str(manual / name)
    lines = _read_lines(path)
    lines[line_no - 1] = mutate(lines[line_no - 1])
    _write_lines(path, lines)

    with pytest.raises(BadRecord, match=error):
        prepare(source, str(tmp_path / "strict"), str(manual))
    builder = prepare(source, str(tmp_path / "lenient"), str(manual), skip_bad_records=True)
    assert builder.counts[f"{source}/{split}"].bad == 1
    records = load_records(source, split, str(tmp_path / "lenient"))
    assert len(records) == left
    if case == "hh_missing_field":  # ids keep their line index past a skipped line
        assert "hh/helpful-base/train/5" in {r["id"] for r in records}


@pytest.mark.parametrize(
    "source,name",
    [
        ("hh", "helpful-base/train.jsonl.gz"),
        ("hh", "harmless-base/test.jsonl.gz"),
        ("shp", "legaladvice/validation.json"),
    ],
)
def test_empty_split_file_fails(tmp_path, source, name):
    # helpful-base is read first in its split, harmless-base last: both are caught
    manual = tmp_path / "manual"
    shutil.copytree(HH_DIR if source == "hh" else SHP_DIR, manual)
    _write_lines(str(manual / name), [])
    for skip in (False, True):  # an empty file is not a bad record to skip
        with pytest.raises(BadRecord, match=rf"{name.replace('.', '[.]')}: no records \(empty file\)"):
            prepare(source, str(tmp_path / f"data{skip}"), str(manual), skip_bad_records=skip)
