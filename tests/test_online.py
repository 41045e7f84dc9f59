"""Online rounds (kto_jax/online/rounds.py, phases.py): the round's prompts, HALOs-format feedback from
judgments, the feedback file read back by the files source, config errors; then the CLI end
to end (two rounds from a random init), and ``kill -9`` during sampling, labelling and
training, each rerun to the same samples, feedback files, evaluations and final weights as
the uninterrupted run.

    killed at            where                                       then on disk
    online.sample @3     round 2, its first chunk of samples written  round_1/sampling/part-00000.jsonl only
    online.label @1      round 1, its first chunk of labels written    round_0/labelling/part-00000.jsonl only
    checkpoint.save @3   round 2's training, its step-2 save under way round_1/train without eval.json
"""

from __future__ import annotations

import json
import os

import pytest

from kto_jax import checkpoint, faults, files
from kto_jax.data.builders import load_mixture
from kto_jax.errors import InputError
from kto_jax.launch import train_command
from kto_jax.online import phases, rounds
from kto_jax.stats import judged_rate
from kto_jax.sweeps import expand, load_config, load_sweep
from tests import ckpt_helpers as H
from tests.train_helpers import REPO, tail

ONLINE = os.path.join(REPO, "experiments", "online.py")
ARG = "rounds=2,prompts=16,samples=2,steps=4"
KILLED = -9


def config(arg: str = ARG, **online):
    c = load_config(f"{ONLINE}:{arg}")
    c.online.update(online)
    return c


def turns(word: str) -> tuple:
    return (("user", f"Shout {word}!"),)


def sample_rows(words_and_outputs) -> list[dict]:
    return [
        {"prompt_id": p, "sample_id": k, "prompt": phases.messages(turns(w)), "output": out, "type": "sample"}
        for p, (w, outs) in enumerate(words_and_outputs)
        for k, out in enumerate(outs)
    ]


# ---------------------------------------------------------------- pieces


def test_round_prompts_are_disjoint_seeded_slices_of_the_distinct_prompts():
    prompts = [turns(w) for w in "abcdefghij"] * 2  # every prompt twice (several completions each)
    got = rounds.round_prompts(prompts, 3, 3, seed=0)
    assert [len(r) for r in got] == [3, 3, 3]
    flat = [p for r in got for p in r]
    assert len(set(flat)) == 9 and set(flat) <= set(prompts)
    assert rounds.round_prompts(list(reversed(prompts)), 3, 3, seed=0) == got  # not the file's order
    assert rounds.round_prompts(prompts, 3, 3, seed=1) != got
    with pytest.raises(ValueError, match=r"3 rounds x 4 prompts_per_round = 12 prompts, but the split has 10 distinct"):
        rounds.round_prompts(prompts, 3, 4, seed=0)


def test_chunk_seeds_are_a_function_of_seed_round_and_chunk():
    seeds = {phases.chunk_seed(s, r, c) for s in (0, 1) for r in range(3) for c in range(4)}
    assert len(seeds) == 24 and phases.chunk_seed(0, 1, 2) == phases.chunk_seed(0, 1, 2)


def test_binary_feedback_from_an_exact_judge_takes_its_flags_as_labels():
    rows = sample_rows([("cat", [" CAT", " cat"]), ("dog", [" DOG", " DOG"])])
    judged = [{"reward": 1.0 if ok else 0.0, "desirable": ok} for ok in (True, False, True, True)]
    out, counts = phases.feedback(
        config(threshold="0.5"), 0, rows, judged
    )  # a unary judge's flag is the label, whatever threshold
    assert [r["label"] for r in out] == [1, 0, 1, 1]
    assert out[1] == {
        "prompt_id": 0,
        "prompt": [{"role": "user", "content": "Shout cat!"}],
        "output": " cat",
        "label": 0,
        "reward": 0.0,
        "type": "binary_feedback",
    }
    assert counts["desirable"] == 3 and counts["undesirable"] == 1 and counts["samples"] == 4
    assert counts["sampled"] == judged_rate([True, False, True, True])


def test_empty_samples_are_judged_but_left_out_of_the_feedback_and_counted():
    rows = sample_rows([("cat", [" CAT", "  "]), ("dog", ["", " DOG"])])
    judged = [{"reward": 1.0 if ok else 0.0, "desirable": ok} for ok in (True, False, False, True)]
    out, counts = phases.feedback(config(), 0, rows, judged)
    assert [(r["prompt_id"], r["output"]) for r in out] == [(0, " CAT"), (1, " DOG")]
    assert counts["empty_dropped"] == 2 and counts["sampled"]["n"] == 4 and counts["desirable"] == 2
    with pytest.raises(ValueError, match=r"round 1: all 2 samples are empty"):
        phases.feedback(config(), 0, rows[1:3], judged[1:3])


def test_binary_feedback_from_scores_thresholds_them_as_halos():
    rows = sample_rows([("cat", ["a", "b"]), ("dog", ["c", "d"])])
    judged = [{"reward": r} for r in (0.1, 0.5, 0.9, 0.3)]
    out, counts = phases.feedback(config(threshold="median"), 0, rows, judged)  # median 0.4
    assert [r["label"] for r in out] == [0, 1, 1, 0] and counts["threshold"] == pytest.approx(0.4)
    out, _ = phases.feedback(config(threshold="0.3"), 0, rows, judged)  # reward >= t
    assert [r["label"] for r in out] == [0, 1, 1, 1]
    assert "sampled" not in counts  # a score is no judged rate


def test_pairwise_feedback_pairs_each_prompts_best_and_worst():
    rows = sample_rows([("cat", ["a", "b", "c"]), ("dog", ["d", "e", "f"]), ("eel", ["g", "h", "i"])])
    rewards = [0.2, 0.9, 0.5, 0.1, 0.3, 0.7, 0.4, 0.4, 0.4]  # eel: all alike, no pair
    out, counts = phases.feedback(
        config(feedback="pairwise", pair_mode="max"), 0, rows, [{"reward": r} for r in rewards]
    )
    assert [(r["output_A"], r["output_B"], r["label"]) for r in out] == [("b", "a", 1), ("f", "d", 1)]
    assert out[0]["reward_A"] == 0.9 and out[0]["reward_B"] == 0.2 and out[0]["reward_difference"] == pytest.approx(0.7)
    assert out[0]["type"] == "pairwise_feedback" and out[1]["prompt"] == phases.messages(turns("dog"))
    assert counts["pairs"] == 2 and counts["prompts_paired"] == 2 and counts["prompts"] == 3
    with pytest.raises(
        ValueError,
        match=r"round 1: no two samples of one prompt differ in reward by more than config.online.pair_gap=0.8",
    ):
        phases.feedback(config(feedback="pairwise", pair_gap=0.8), 0, rows, [{"reward": r} for r in rewards])


def test_the_feedback_files_read_back_through_the_files_source(tmp_path):
    rows = sample_rows([("cat", [" CAT", " cat"]), ("dog", [" DOG", " DOGE"])])
    judged = [{"reward": float(ok), "desirable": ok} for ok in (True, False, True, False)]
    binary, _ = phases.feedback(config(), 0, rows, judged)
    files.write_json(str(tmp_path / "binary.json"), binary, indent=None)
    examples, stats = load_mixture(f"files:{tmp_path}/binary.json", "train", str(tmp_path / "tfds"))
    assert sorted((e.prompt, e.completion, e.desirable) for e in examples) == [  # (tfds shuffles the records)
        (turns("cat"), " CAT", True),
        (turns("cat"), " cat", False),
        (turns("dog"), " DOG", True),
        (turns("dog"), " DOGE", False),
    ]
    assert [s["files"]["schema"] for s in stats["sources"].values()] == ["halos_binary_feedback"]
    pairs, _ = phases.feedback(config(feedback="pairwise"), 0, rows, judged)
    files.write_json(str(tmp_path / "pairs.json"), pairs, indent=None)
    examples, _ = load_mixture(f"files:{tmp_path}/pairs.json", "train", str(tmp_path / "tfds"))
    assert sorted((e.prompt, e.chosen, e.rejected) for e in examples) == [
        (turns("cat"), " CAT", " cat"),
        (turns("dog"), " DOG", " DOGE"),
    ]


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("feedback", "scalar", r"config.online.feedback='scalar': use one of \('binary', 'pairwise'\)"),
        ("rounds", 0, r"config.online.rounds=0: must be >= 1"),
        ("pair_mode", "best", r"config.online.pair_mode='best': use one of"),
        ("threshold", "mode", r"config.online.threshold: binary threshold 'mode': use a number, 'mean' or 'median'"),
        ("judge", "gpt", r"unknown judge 'gpt' \(config.online.judge\); known:"),
        ("judge", "api", r"config.online.judge='api' only compares two answers"),
    ],
)
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        rounds.check_config(config(**{field: value}))


def test_pairwise_feedback_needs_two_samples_per_prompt():
    with pytest.raises(ValueError, match=r"config.online.samples_per_prompt=1: pairwise feedback .* needs >= 2"):
        rounds.check_config(config(feedback="pairwise", samples_per_prompt=1))


def test_each_round_trains_on_its_feedback_from_the_last_rounds_weights(tmp_path):
    c = config("init=orbax:/runs/sft," + ARG)
    first, second = rounds.round_config(c, str(tmp_path), 0), rounds.round_config(c, str(tmp_path), 1)
    assert "online" not in first and first.init.source == "orbax:/runs/sft"
    assert (
        second.init.source == second.init.optimizer == f"orbax:{tmp_path}/round_0/train"
    )  # HALOs' load_from, from_checkpoint
    assert (
        first.init.optimizer == ""
        and rounds.round_config(config(carry_optimizer=False), str(tmp_path), 1).init.optimizer == ""
    )
    assert second.data.sources == f"files:{tmp_path}/round_1/feedback.json"
    assert (
        second.data.eval_sources == "synthetic" and second.data.eval_split == "test"
    )  # judged on the task's held-out prompts
    assert rounds.initial_config(c).eval.only and rounds.initial_config(c).init.source == "orbax:/runs/sft"


def test_a_workdir_of_another_online_config_is_an_error(tmp_path):
    rounds.check_workdir(config(), str(tmp_path))
    rounds.check_workdir(config(), str(tmp_path))  # the same config: fine
    with pytest.raises(
        InputError,
        match=r"holds an online run with another config \(config.online.samples_per_prompt: 2 \(saved\) -> 3",
    ):
        rounds.check_workdir(config(samples_per_prompt=3), str(tmp_path))


def test_the_online_sweep_launches_the_online_module():
    runs = expand(load_sweep(os.path.join(REPO, "experiments", "sweeps", "online.py")), "runs")
    assert [r["name"] for r in runs] == ["online_kto", "online_dpo"]
    cmd = train_command(runs[1])
    assert (
        cmd[1:3] == ["-m", "kto_jax.online"]
        and "--config=experiments/online.py:loss=dpo,feedback=pairwise,init=orbax:runs/sft" in cmd
    )
    for r in runs:  # the configs build and check
        rounds.check_config(load_config(os.path.join(REPO, r["config"])))


# ---------------------------------------------------------------- the CLI, killed and resumed


def online_args(workdir: str, data_dir: str, arg: str = ARG) -> list[str]:
    return [
        "-m",
        "kto_jax.online",
        "--config",
        f"{ONLINE}:{arg}",
        "--workdir",
        workdir,
        f"--config.data.data_dir={data_dir}",
        "--config.online.chunk_prompts=8",
        "--config.online.batch_size=16",
        "--config.online.max_new_tokens=4",
        "--config.eval.num_prompts=16",
        "--config.eval.batch_size=16",
        "--config.eval.max_new_tokens=4",
        "--config.train.global_batch_size=8",
        "--config.train.eval_batches=1",
        "--config.train.log_every=1",
        "--config.checkpoint.every_steps=2",
        "--config.data.eval_split=validation",
    ]


def start(workdir: str, data_dir: str, out: str, name: str, kill_at: str = "") -> H.Proc:
    env = H.proc_env()
    if kill_at:
        env[faults.ENV] = kill_at
    return H.Proc(online_args(workdir, data_dir), out, name, env)


def outcome(workdir: str) -> dict:
    """What an online run leaves: every round's samples and feedback bytes, the evaluations, the
    final weights (the workdir's own path, which samples.json and eval.json name, as WORKDIR)."""

    def read(path):
        with open(os.path.join(workdir, path), "rb") as f:
            return f.read().replace(workdir.encode(), b"WORKDIR")

    results = json.loads(read("eval.json"))
    weights = checkpoint.fingerprint(
        checkpoint.load_params(os.path.join(workdir, "round_1", "train"), H.random_init("tiny-1m")[1])[0]
    )
    return {
        "files": {
            p: read(p)
            for p in (
                "round_0/samples.json",
                "round_0/feedback.json",
                "round_1/samples.json",
                "round_1/feedback.json",
                "round_1/labels.json",
            )
        },
        "eval": results,
        "weights": weights,
        "metrics": [H.comparable(H.rows(os.path.join(workdir, f"round_{r}", "train"))) for r in (0, 1)],
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic_data_dir):
    root = str(tmp_path_factory.mktemp("online"))
    workdir = os.path.join(root, "run")
    result = start(workdir, synthetic_data_dir, root, "uninterrupted").result()
    assert result["rc"] == 0, tail(result["stderr"])
    return {"workdir": workdir, "stderr": result["stderr"], "outcome": outcome(workdir), "data": synthetic_data_dir}


def test_the_online_cli_runs_every_round(uninterrupted):
    workdir, results = uninterrupted["workdir"], uninterrupted["outcome"]["eval"]
    with open(os.path.join(workdir, "round_1", "samples.json"), encoding="utf-8") as f:
        samples = json.load(f)
    assert len(samples) == 32 and [(s["prompt_id"], s["sample_id"]) for s in samples[:3]] == [(16, 0), (16, 1), (17, 0)]
    assert samples[0]["type"] == "sample" and samples[0]["generator"] == f"orbax:{workdir}/round_0/train"
    with open(os.path.join(workdir, "round_0", "samples.json"), encoding="utf-8") as f:
        first = json.load(f)
    assert not {json.dumps(s["prompt"]) for s in first} & {
        json.dumps(s["prompt"]) for s in samples
    }  # new prompts each round
    with open(os.path.join(workdir, "round_1", "train", "data_stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    assert stats["train"]["source_examples"] == 32  # the round trained on its own 16 x 2 judged samples
    assert [r["round"] for r in results["rounds"]] == [1, 2] and results["generation"] == results["rounds"][-1][
        "generation"
    ]
    assert results["initial"]["generation"]["n"] == 16 and results["rounds"][0]["labels"]["samples"] == 32
    assert "round 2/2: judged desirable" in uninterrupted["stderr"] and "Traceback" not in uninterrupted["stderr"]


@pytest.mark.parametrize(
    "kill_at,partial",
    [
        ("online.sample@3", "round_1/sampling/part-00000.jsonl"),
        ("online.label@1", "round_0/labelling/part-00000.jsonl"),
        ("checkpoint.save@3", "round_1/train/metrics.jsonl"),
    ],
)
def test_a_run_killed_mid_round_resumes_to_the_uninterrupted_outcome(uninterrupted, tmp_path, kill_at, partial):
    workdir = str(tmp_path / "run")
    result = start(workdir, uninterrupted["data"], str(tmp_path), "killed", kill_at).result()
    assert result["rc"] == KILLED, f"rc {result['rc']}, not killed at {kill_at}:\n{tail(result['stderr'])}"
    assert os.path.exists(os.path.join(workdir, partial)) and not os.path.exists(os.path.join(workdir, "eval.json"))
    result = start(workdir, uninterrupted["data"], str(tmp_path), "resumed").result()
    assert result["rc"] == 0, tail(result["stderr"])
    got, expected = outcome(workdir), uninterrupted["outcome"]
    for path in expected["files"]:
        assert got["files"][path] == expected["files"][path], f"{path} differs from the uninterrupted run's"
    assert got["weights"] == expected["weights"] and got["eval"] == expected["eval"]
    assert got["metrics"] == expected["metrics"]
    if kill_at.startswith("online.sample"):
        assert (
            "round 2: sampling 16 prompts x 2 from" in result["stderr"]
            and "(1 of 2 chunks on disk)" in result["stderr"]
        )


def test_a_finished_online_run_rerun_does_nothing(uninterrupted, tmp_path):
    workdir = H.copy_run(uninterrupted["workdir"], str(tmp_path / "run"))
    before = H.snapshot(workdir)
    result = start(workdir, uninterrupted["data"], str(tmp_path), "again").result()
    assert result["rc"] == 0 and "this online run already finished" in result["stderr"], tail(result["stderr"])
    assert H.snapshot(workdir) == before


def test_the_online_cli_rejects_a_config_without_an_online_section(tmp_path):
    proc = H.Proc(
        [
            "-m",
            "kto_jax.online",
            "--config",
            os.path.join(REPO, "experiments", "tiny.py"),
            "--workdir",
            str(tmp_path / "w"),
        ],
        str(tmp_path),
        "no_online",
    )
    result = proc.result()
    assert result["rc"] == 2 and "error: --config: this config has no 'online' section" in result["stderr"], tail(
        result["stderr"]
    )
    assert not os.path.exists(tmp_path / "w")


def test_two_processes_run_the_rounds_as_one_process(tmp_path, synthetic_data_dir):
    """The online CLI on 2 processes x 2 devices (gloo on 127.0.0.1) writes the samples and feedback
    of 1 process x 4 devices and trains the same steps: generation's rows are gathered on every
    host, process 0 alone writes the files, and the phases wait for each other."""
    from tests.train_helpers import finish, free_port, subprocess_env, train_rows
    from tests.train_helpers import start as start_cli

    def cli(workdir):
        return online_args(workdir, synthetic_data_dir, "rounds=2,prompts=8,samples=2,steps=2")

    port, multi, single = free_port(), str(tmp_path / "multi"), str(tmp_path / "single")
    procs = [
        start_cli(
            cli(multi),
            subprocess_env(
                devices=2, KTO_JAX_COORDINATOR=f"127.0.0.1:{port}", KTO_JAX_NUM_PROCESSES="2", KTO_JAX_PROCESS_ID=str(i)
            ),
            str(tmp_path / f"multi_{i}.log"),
        )
        for i in range(2)
    ]
    procs.append(start_cli(cli(single), subprocess_env(devices=4), str(tmp_path / "single.log")))
    for proc in procs:
        rc, log = finish(proc, H.TIMEOUT)
        assert rc == 0, tail(log)
    for path in ("round_0/samples.json", "round_0/feedback.json", "round_1/samples.json", "round_1/feedback.json"):
        with open(os.path.join(multi, path), "rb") as a, open(os.path.join(single, path), "rb") as b:
            assert a.read().replace(multi.encode(), b"W") == b.read().replace(single.encode(), b"W"), path
    for r in (0, 1):
        got, expected = (train_rows(os.path.join(w, f"round_{r}", "train")) for w in (multi, single))
        assert [row["step"] for row in got] == [1, 2]
        for row, ref in zip(got, expected):
            assert row["loss"] == pytest.approx(ref["loss"], abs=1e-5) and row["tokens"] == ref["tokens"]
