"""Fault injection: a run killed by SIGKILL at each named point of kto_jax/faults.py, then the
same command rerun, ends exactly as an uninterrupted run (metrics rows and eval.json bitwise,
exported bytes equal); a full disk during a save, a damaged array_record file and a truncated
safetensors file are one-line errors naming the place and the fix, with nothing lost.

    point                   killed run                         rerun compared with
    checkpoint.save @3      step 12's async save under way     the 30-step reference run
    eval.generate @1        first batch of held-out samples    a finished copy evaluated once
    reference_cache.write   cache written, not yet renamed     an uninterrupted cached run
    data.prepare @50        50th record of a feedback file     an uninterrupted run on it
    export.write            folder written, not yet renamed    an uninterrupted export

The runs are tests/ckpt_helpers.py's tiny KTO run (sharing its compilation cache and the
session's reference run).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess

import pytest

from kto_jax import faults
from kto_jax.data.example_feedback import write_jsonl
from kto_jax.files import umask
from kto_jax.train import record
from tests import ckpt_helpers as H
from tests.train_helpers import tail

KILLED = -signal.SIGKILL
EVAL_FLAGS = (
    "--config.eval.judge=synthetic",
    "--config.eval.num_prompts=16",
    "--config.eval.batch_size=8",
    "--config.eval.max_new_tokens=4",
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_data_dir):
    return H.reference_run(tmp_path_factory, synthetic_data_dir)


def start(args: list[str], out: str, name: str, kill_at: str | None = None) -> H.Proc:
    env = H.proc_env()
    if kill_at:
        env[faults.ENV] = kill_at
    return H.Proc(args, out, name, env)


def killed(proc: H.Proc) -> None:
    result = proc.result()
    assert result["rc"] == KILLED, (
        f"{proc.name}: rc {result['rc']}, not killed at its fault point:\n{tail(result['stderr'])}"
    )


def finished(proc: H.Proc) -> dict:
    result = proc.result()
    assert result["rc"] == 0, f"{proc.name}: rc {result['rc']}:\n{tail(result['stderr'])}"
    return result


def eval_json(workdir: str) -> dict:
    with open(os.path.join(workdir, record.EVAL_FILE), encoding="utf-8") as f:
        return json.load(f)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def one_line_error(result: dict) -> str:
    assert result["rc"] == 2, f"rc {result['rc']}:\n{tail(result['stderr'])}"
    errors = [line for line in result["stderr"].splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result["stderr"], tail(result["stderr"])
    return errors[0]


def test_kill_during_a_checkpoint_save_resumes_to_the_uninterrupted_run(reference, tmp_path):
    workdir = str(tmp_path / "run")
    args = H.train_args(workdir, reference["data_dir"])
    killed(start(args, str(tmp_path), "killed", kill_at="checkpoint.save@3"))
    steps = record.checkpoint_steps(workdir)
    assert steps and max(steps) == 2 * H.EVERY, f"the save under way (step {3 * H.EVERY}) must not count: {steps}"
    finished(start(args, str(tmp_path), "rerun"))
    H.assert_same_rows(H.rows(workdir), reference["rows"], "killed in a checkpoint save, rerun")
    assert eval_json(workdir) == eval_json(reference["workdir"])


def test_kill_during_eval_generation_redoes_the_evaluation_only(reference, tmp_path):
    """On a finished run, a changed eval (allowed on resume) is killed mid-generation: no stale
    eval.json is left to pass for finished, and the rerun's eval equals one uninterrupted eval."""
    once, twice = (H.copy_run(reference["workdir"], str(tmp_path / name)) for name in ("once", "twice"))
    args = [a for a in H.train_args("{workdir}", reference["data_dir"]) if a != "--config.eval.judge="] + list(
        EVAL_FLAGS
    )

    def command(workdir):
        return [a.replace("{workdir}", workdir) for a in args]

    uninterrupted = start(command(once), str(tmp_path), "once")
    killed(start(command(twice), str(tmp_path), "killed", kill_at="eval.generate@1"))
    assert not os.path.exists(os.path.join(twice, record.EVAL_FILE)), "the old eval.json must not outlive the change"
    assert not os.path.exists(os.path.join(twice, "samples.jsonl"))
    finished(start(command(twice), str(tmp_path), "rerun"))
    finished(uninterrupted)
    assert eval_json(twice) == eval_json(once) and eval_json(once)["generation"]["n"] == 16
    assert read_bytes(os.path.join(twice, "samples.jsonl")) == read_bytes(os.path.join(once, "samples.jsonl"))
    H.assert_same_rows(H.rows(twice), H.rows(once), "killed in eval generation, rerun")
    changes = [json.loads(line) for line in open(os.path.join(twice, record.CHANGES_FILE), encoding="utf-8")]
    assert len(changes) == 1 and {c["field"] for c in changes[0]["changes"]} >= {"eval.judge", "eval.num_prompts"}


def test_kill_while_caching_reference_logprobs_recomputes_the_cache(reference, tmp_path):
    args = ["--config.reference.mode=cached"]
    arg = "loss=kto,steps=8"
    u, k = str(tmp_path / "uninterrupted"), str(tmp_path / "killed")
    uninterrupted = start(H.train_args(u, reference["data_dir"], arg, args), str(tmp_path), "uninterrupted")
    killed(
        start(
            H.train_args(k, reference["data_dir"], arg, args), str(tmp_path), "killed", kill_at="reference_cache.write"
        )
    )
    assert not glob.glob(os.path.join(k, "reference_cache-*.npz")), "a cache written in place, not renamed when whole"
    finished(start(H.train_args(k, reference["data_dir"], arg, args), str(tmp_path), "rerun"))
    finished(uninterrupted)
    H.assert_same_rows(H.rows(k), H.rows(u), "killed while caching, rerun")
    assert eval_json(k) == eval_json(u)


def test_kill_during_dataset_preparation_prepares_it_again(tmp_path):
    data = str(tmp_path / "feedback.jsonl")
    write_jsonl(data, "binary", 200, seed=0)

    def args(name):
        return [
            "-m",
            "kto_jax.train",
            "--config",
            f"{H.TINY}:loss=kto,steps=4",
            "--workdir",
            str(tmp_path / name),
            f"--config.data.sources=files:{data}",
            "--config.data.holdout_fraction=0.2",
            "--config.eval.judge=",
            f"--config.data.data_dir={tmp_path / name}-tfds",
            "--config.train.global_batch_size=8",
            "--config.train.log_every=1",
            "--config.train.eval_batches=1",
        ]

    uninterrupted = start(args("uninterrupted"), str(tmp_path), "uninterrupted")
    killed(start(args("killed"), str(tmp_path), "killed", kill_at="data.prepare@50"))
    assert not os.path.exists(tmp_path / "killed"), "nothing is written to the workdir before the data is ready"
    finished(start(args("killed"), str(tmp_path), "rerun"))
    finished(uninterrupted)
    H.assert_same_rows(
        H.rows(str(tmp_path / "killed")), H.rows(str(tmp_path / "uninterrupted")), "killed in preparation"
    )
    stats = [
        json.load(open(tmp_path / name / "data_stats.json", encoding="utf-8")) for name in ("killed", "uninterrupted")
    ]
    assert stats[0] == stats[1] and stats[0]["train"]["source_examples"] > 0


def export(workdir: str, out: str, tmp: str, name: str, *extra: str, kill_at: str | None = None) -> H.Proc:
    return start(["scripts/export_hf.py", "--workdir", workdir, "--out", out, *extra], tmp, name, kill_at)


def test_kill_during_export_keeps_the_earlier_export_and_the_rerun_equals_an_uninterrupted_one(reference, tmp_path):
    whole, out = str(tmp_path / "whole"), str(tmp_path / "out")
    uninterrupted = export(reference["workdir"], whole, str(tmp_path), "whole")
    finished(export(reference["workdir"], out, str(tmp_path), "earlier", f"--step={H.STEPS - 2}"))
    earlier = H.snapshot(out)
    killed(export(reference["workdir"], out, str(tmp_path), "killed", kill_at="export.write"))
    assert H.snapshot(out) == earlier, "a killed export must leave the earlier one as it was"
    finished(export(reference["workdir"], out, str(tmp_path), "rerun"))
    finished(uninterrupted)
    assert H.snapshot(out) == H.snapshot(whole) != earlier
    assert not glob.glob(str(tmp_path / ".out.*")), "the killed export's staging folder is removed by the rerun"
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask(), "an export is a folder others can read"

    # a truncated safetensors file as init source: one line naming the file, nothing created
    damaged = str(tmp_path / "damaged")
    shutil.copytree(whole, damaged)
    weights = sorted(glob.glob(os.path.join(damaged, "*.safetensors")))[0]
    os.truncate(weights, os.path.getsize(weights) // 2)
    workdir = str(tmp_path / "from-damaged")
    result = start(
        H.train_args(workdir, reference["data_dir"], "loss=kto,steps=2", (f"--config.init.source=hf:{damaged}",)),
        str(tmp_path),
        "damaged",
    ).result()
    assert weights in one_line_error(result) and "truncated" in result["stderr"]
    assert not os.path.exists(workdir)


def test_a_damaged_array_record_file_is_an_error_naming_it(synthetic_data_dir, tmp_path):
    data = shutil.copytree(synthetic_data_dir, str(tmp_path / "tfds"))
    (target,) = glob.glob(os.path.join(data, "synthetic", "paired", "*", "synthetic-validation.array_record-*"))
    damaged = bytearray(read_bytes(target))
    middle = len(damaged) // 3
    damaged[middle : middle + 256] = bytes(256)
    with open(target, "wb") as f:
        f.write(damaged)
    workdir = str(tmp_path / "run")
    result = start(H.train_args(workdir, data, "loss=kto,steps=2"), str(tmp_path), "damaged").result()
    line = one_line_error(result)
    assert target in line and "delete" in line and "prepare it again" in line, line
    assert not os.path.exists(workdir)


def test_a_full_disk_during_a_save_is_a_clear_error_and_the_previous_checkpoint_resumes(reference, tmp_path):
    """The workdir on a 14 MiB tmpfs: the first checkpoint (~9.3 MiB) fits, the second does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=14m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {mount.stderr.strip() or mount.returncode}")
    try:
        workdir = str(disk / "run")
        result = start(H.train_args(workdir, reference["data_dir"]), str(tmp_path), "full").result()
        assert result["rc"] == 2, tail(result["stderr"])  # orbax logs its background thread's error too
        (line,) = [line for line in result["stderr"].splitlines() if line.startswith("error: ")]
        assert "no space left on device" in line and f"resumes from step {H.EVERY}" in line, line
        assert record.checkpoint_steps(workdir) == [H.EVERY]
        assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in n], (
            "the partial save is removed"
        )
        moved = shutil.copytree(workdir, str(tmp_path / "moved"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    finished(start(H.train_args(moved, reference["data_dir"]), str(tmp_path), "moved"))
    H.assert_same_rows(H.rows(moved), reference["rows"], "resumed after a full disk")
    assert eval_json(moved) == eval_json(reference["workdir"])
