"""The pairwise evaluator in a real (tiny) run and scripts/judge.py on its samples: the paper's
protocol against the dataset's SFT target, consistent with the unary view, cached on rerun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.train_helpers import REPO, read, subprocess_env, tail

TIMEOUT = 900


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic_data_dir):
    workdir = tmp_path_factory.mktemp("pairwise") / "run"
    command = [
        sys.executable,
        "-m",
        "kto_jax.train",
        "--config",
        "experiments/tiny.py:loss=kto,steps=1",
        "--workdir",
        str(workdir),
        f"--config.data.data_dir={synthetic_data_dir}",
        "--config.train.global_batch_size=8",
        "--config.data.train_split=validation",
        "--config.data.eval_split=validation",
        "--config.train.eval_batches=1",
        "--config.eval.evaluators=held_out,judged,pairwise",
        "--config.eval.num_prompts=24",
        "--config.eval.batch_size=24",
        "--config.eval.max_new_tokens=4",
    ]
    proc = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, tail(proc.stderr)
    assert "pairwise win rate" in proc.stderr
    return str(workdir)


def _lines(path):
    return [json.loads(line) for line in read(path).splitlines()]


def test_the_run_judges_each_sample_against_its_sft_target(run):
    samples = _lines(os.path.join(run, "samples.jsonl"))
    evaluation = json.loads(read(os.path.join(run, "eval.json")))
    p, unary = evaluation["pairwise"], evaluation["generation"]
    assert len(samples) == 24 and all(s["sft_target"] and s["turns"][-1][0] == "user" for s in samples)
    # the synthetic targets are the right answers: under the exact judge a sample ties when it is
    # right and loses when it is wrong, never wins; the two views agree prompt by prompt
    desirable = sum(s["desirable"] for s in samples)
    assert (p["wins"], p["ties"], p["baseline_wins"], p["unparseable"], p["n"]) == (0, desirable, 24 - desirable, 0, 24)
    assert unary["desirable_rate"] == desirable / 24 and p["winrate"] == 0.0 and p["against"] == "sft_target"
    judgments = _lines(os.path.join(run, "judgments.jsonl"))
    assert len(judgments) == 24 and p["candidate_first"] == sum(j["candidate"] == "first" for j in judgments)
    assert 0 < p["candidate_first"] < 24
    for s in samples:
        (j,) = [j for j in judgments if j["turns"] == s["turns"]]
        assert {j["first"], j["second"]} == {s["completion"], s["sft_target"]} or s["completion"] == s["sft_target"]


def _judge(run, *flags):
    command = [sys.executable, os.path.join(REPO, "scripts", "judge.py"), f"--workdir={run}", *flags]
    return subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT)


def test_scripts_judge_reuses_every_verdict_and_judges_against_another_run(run):
    before = json.loads(read(os.path.join(run, "eval.json")))["pairwise"]
    proc = _judge(run, "--config.eval.judge=synthetic")
    assert proc.returncode == 0, tail(proc.stderr)
    after = json.loads(read(os.path.join(run, "eval.json")))["pairwise"]
    assert after["cached"] == 24 and {k: v for k, v in after.items() if k != "cached"} == {
        k: v for k, v in before.items() if k not in ("cached",)
    }
    assert "(24 verdicts from judgments.jsonl)" in proc.stdout
    proc = _judge(run, "--config.eval.judge=synthetic", f"--config.eval.against={run}")  # a run against itself
    assert proc.returncode == 0, tail(proc.stderr)
    p = json.loads(read(os.path.join(run, "eval.json")))["pairwise"]
    assert (p["ties"], p["n"], p["against"]) == (24, 24, run)


def test_scripts_judge_errors_are_one_line(run, tmp_path):
    proc = _judge(str(tmp_path), "--config.eval.judge=synthetic")
    assert proc.returncode == 2 and "samples.jsonl not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = _judge(
        run,
        "--config.eval.judge=api",
        "--config.eval.api.model=m",
        "--config.eval.api.base_url=http://127.0.0.1:9/v1",
        "--config.eval.api.retries=0",
    )
    assert proc.returncode == 3 and "gave no answer in 1 tries" in proc.stderr and "rerun to resume" in proc.stderr
