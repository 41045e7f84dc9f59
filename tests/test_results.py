"""Scale-curve tooling reproduces the KTO paper's numbers from the authors' judgment log."""

import json
import os
import subprocess
import sys

import pytest

from kto_jax.results import imbalance_table, markdown_table, read_judgments, read_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JUDGMENTS = os.path.join(ROOT, "tests", "fixtures", "reference", "archangel_gpt4_judgments.jsonl")


@pytest.fixture(scope="module")
def paper():
    return {(r.method, r.model): r for r in read_judgments(JUDGMENTS)}


@pytest.mark.parametrize(
    "method, model, winrate",
    [
        ("kto", "llama30b", 0.664),
        ("sft+dpo", "llama13b", 0.498),
        ("unaligned", "pythia1-4b", 0.027),
        ("sft+kto", "llama30b", 0.652),
        ("dpo", "llama30b", 0.535),
        ("sft", "pythia12-0b", 0.189),
    ],
)
def test_paper_win_rates(paper, method, model, winrate):
    assert round(paper[(method, model)].winrate, 3) == winrate


def test_every_scale_cell_is_present_and_sized(paper):
    methods = [
        "unaligned",
        "sft",
        "dpo",
        "kto",
        "ppo",
        "slic",
        "csft",
        "sft+dpo",
        "sft+kto",
        "sft+ppo",
        "sft+slic",
        "sft+csft",
    ]
    models = ["pythia1-4b", "pythia2-8b", "pythia6-9b", "pythia12-0b", "llama7b", "llama13b", "llama30b"]
    for method in methods:
        for model in models:
            r = paper[(method, model)]
            assert r.total == 512 and r.params > 1e9
    assert paper[("kto", "llama30b")].params == 32_528_943_616
    assert paper[("kto", "llama30b")].sft_first is False and paper[("sft+kto", "llama30b")].base_method == "kto"
    lo, hi = paper[("kto", "llama30b")].ci90
    assert lo < 0.664 < hi and hi - lo < 0.08


def test_imbalance_table_matches_the_paper():
    table = imbalance_table(read_judgments(JUDGMENTS))
    rows = [line for line in table.splitlines()[2:]]
    assert len(rows) == 11
    assert "| llama7b | 0.1 | 1.0 | 13.33 | 1.0 | 0.328" in table  # 90% of desirable data dropped
    assert "| llama7b | 1.0 | 0.01 | 1.0 | 75.18 | 0.262" in table


def test_markdown_table_orders_models_by_size(paper):
    table = markdown_table([paper[("kto", m)] for m in ("llama30b", "pythia1-4b", "llama7b")])
    header = table.splitlines()[0]
    assert header.index("pythia1-4b") < header.index("llama7b") < header.index("llama30b")
    assert "0.664 [" in table


def test_read_runs_marks_sft_first_and_needs_a_baseline(tmp_path):
    sft, kto = tmp_path / "sft", tmp_path / "kto"
    for d, loss, init in ((sft, "sft", ""), (kto, "kto", f"orbax:{sft}")):
        d.mkdir()
        (d / "config.json").write_text(
            json.dumps({"loss": {"name": loss}, "model": {"name": "tiny-1m"}, "init": {"source": init}})
        )
    (sft / "eval.json").write_text(json.dumps({"generation": {}}))
    (kto / "eval.json").write_text(json.dumps({"winrate": {"wins": 300, "ties": 100, "losses": 112, "n": 512}}))
    (row,) = read_runs([str(kto)])
    assert row.method == "sft+kto" and row.winrate == pytest.approx(350 / 512)
    with pytest.raises(ValueError, match="no win rate"):
        read_runs([str(sft)])


def test_plot_scale_script_writes_png_and_table(tmp_path):
    out, table = tmp_path / "curves.png", tmp_path / "table.md"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "plot_scale.py"),
            f"--reference={JUDGMENTS}",
            f"--out={out}",
            f"--table={table}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "0.664" in table.read_text() and "Data imbalance" in proc.stdout


def test_plot_scale_draws_only_the_panels_it_has_runs_for(tmp_path):
    """The tiny_scale sweep aligns after SFT only: one panel (width 6 in x 120 dpi), not an empty second."""
    sft = tmp_path / "sft_tiny-1m"
    sft.mkdir()
    (sft / "config.json").write_text(
        json.dumps({"loss": {"name": "sft"}, "model": {"name": "tiny-1m"}, "init": {"source": ""}})
    )
    runs = []
    for model in ("tiny-1m", "tiny-5m"):
        d = tmp_path / f"{model}_kto"
        d.mkdir()
        (d / "config.json").write_text(
            json.dumps({"loss": {"name": "kto"}, "model": {"name": model}, "init": {"source": f"orbax:{sft}"}})
        )
        (d / "eval.json").write_text(json.dumps({"winrate": {"wins": 400, "ties": 0, "losses": 112, "n": 512}}))
        runs.append(str(d))
    out = tmp_path / "tiny.png"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "plot_scale.py"), str(sft), *runs, f"--out={out}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int.from_bytes(out.read_bytes()[16:20], "big") == 720  # PNG IHDR width
    assert "| sft+kto [unary-run] | 0.781 [" in proc.stdout  # a unary win rate against a run: labelled, dotted
    assert "2 run(s) not judged by the paper's protocol" in proc.stderr
    assert f"skipped 1 run(s) with no win rate in eval.json: {sft}" in proc.stderr


def test_a_run_judged_pairwise_against_the_sft_target_is_on_the_paper_s_scale(paper, tmp_path):
    """The same wins of the same total give the paper's number and interval, in the same table cell."""
    ref = paper[("kto", "llama30b")]
    runs = {}
    for name, against in (("paper", "sft_target"), ("vs_run", str(tmp_path / "other"))):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(
            json.dumps({"loss": {"name": "kto"}, "model": {"name": "llama-30b"}, "init": {"source": ""}})
        )
        (d / "eval.json").write_text(
            json.dumps(
                {
                    "winrate": {
                        "wins": 1,
                        "ties": 0,
                        "losses": 0,
                        "n": 1,
                    },  # the unary view does not replace the pairwise one
                    "pairwise": {
                        "wins": int(ref.wins),
                        "baseline_wins": 150,
                        "ties": 2,
                        "unparseable": 20,
                        "n": ref.total,
                        "against": against,
                    },
                }
            )
        )
        (runs[name],) = read_runs([str(d)])
    assert (runs["paper"].protocol, runs["vs_run"].protocol) == ("paper", "pairwise-run")
    assert runs["paper"].winrate == ref.winrate and runs["paper"].ci90 == ref.ci90 and round(ref.winrate, 3) == 0.664
    table = markdown_table([runs["paper"], runs["vs_run"]])
    assert "| kto | 0.664 [" in table and "| kto [pairwise-run] | 0.664 [" in table


def test_a_run_from_a_weights_folder_is_named_and_sized_by_the_folder(tmp_path):
    """A run whose config.model.name is a Hugging Face folder (experiments/qwen3_scale.py's weights=):
    the folder's name, lower-cased, and the parameter count of its config.json, as transformers counts."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from kto_jax.results import run_model

    hf = Qwen3Config(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    folder = tmp_path / "Qwen3-Tiny-Base"
    folder.mkdir()
    (folder / "config.json").write_text(hf.to_json_string())
    with torch.device("meta"):
        expected = sum(p.numel() for p in AutoModelForCausalLM.from_config(hf).parameters())
    assert run_model(str(folder) + "/") == ("qwen3-tiny-base", expected)
    assert run_model("qwen3-8b")[1] > 8e9
    assert run_model(str(tmp_path / "gone")) == ("gone", 0)  # not on this machine: no size
