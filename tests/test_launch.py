"""Launchers: dry-run output of the SLURM and TPU launchers, local skip/resume, and a real
sweep (two training runs and an online run) on a one-node SLURM (Debian's slurm-wlm and munge, started by .ci/slurm_up.sh)."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from kto_jax import launch
from kto_jax.sweeps import expand, product

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def runs(tmp_path, **overrides):
    return expand(product("experiments/tiny.py", overrides, loss=["kto", "dpo"], steps=["3"]), str(tmp_path))


def test_slurm_dry_run_prints_the_array_script(tmp_path, capsys):
    rs = runs(tmp_path)
    script = launch.slurm(
        rs, str(tmp_path), dry_run=True, nodes=2, gpus_per_node=8, partition="a100", time_limit="1:00:00"
    )
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-1" in script and "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script
    assert (
        "#SBATCH --gpus-per-node=8" in script
        and "#SBATCH --partition=a100" in script
        and "#SBATCH --time=1:00:00" in script
    )
    assert "srun --kill-on-bad-exit=1" in script and "SLURM_ARRAY_TASK_ID" in script
    assert f"would run: sbatch {tmp_path}/sweep.sbatch" in out
    assert "--config=experiments/tiny.py:loss=kto,steps=3" in out
    assert not os.path.exists(tmp_path / "sweep.sbatch")  # a dry run writes nothing


def test_tpu_commands(tmp_path):
    cmds = launch.tpu_commands(runs(tmp_path), "my-v5p", "us-east5-a", project="proj")
    assert len(cmds) == 2
    assert cmds[0][:8] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "--project=proj",
        "my-v5p",
        "--zone=us-east5-a",
    ]
    assert "--worker=all" in cmds[0]
    assert cmds[0][-1].startswith("--command=cd ~/kto-jax && ") and "kto_jax.train" in cmds[0][-1]


@pytest.mark.parametrize("flag", ["--dry-run", "--dry_run"])
def test_sweep_script_dry_run_local_skips_finished_runs(tmp_path, flag):
    sweep = tmp_path / "sweep.py"
    sweep.write_text(
        "from kto_jax.sweeps import product\n"
        "def get_sweep():\n    return product('experiments/tiny.py', loss=['kto', 'dpo'], steps=['3'])\n"
    )
    (tmp_path / "runs" / "kto_3").mkdir(parents=True)
    (tmp_path / "runs" / "kto_3" / "eval.json").write_text("{}")
    proc = subprocess.run(
        [sys.executable, "scripts/sweep.py", str(sweep), "--launcher=local", flag, f"--root={tmp_path}/runs"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skip (finished): kto_3" in proc.stdout
    assert "would run:" in proc.stdout and "dpo_3" in proc.stdout and "kto_3 --" not in proc.stdout


def _slurm_ready() -> bool:
    if shutil.which("sinfo") and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0:
        return True
    if os.geteuid() != 0:
        return False
    return subprocess.run(["bash", os.path.join(ROOT, ".ci", "slurm_up.sh")], capture_output=True).returncode == 0


def test_slurm_launcher_runs_a_sweep_of_two_configs_and_an_online_run(tmp_path, synthetic_data_dir):
    if not _slurm_ready():
        if os.environ.get("CI"):
            pytest.fail("CI must run the SLURM test: .ci/slurm_up.sh could not start a one-node SLURM")
        pytest.skip("no SLURM and not root to start one (.ci/slurm_up.sh)")
    overrides = {"data.data_dir": synthetic_data_dir, "eval.judge": "", "train.eval_batches": 1, "train.log_every": 1}
    rs = runs(tmp_path, **overrides)
    online = {**overrides, "online.max_new_tokens": 4, "online.chunk_prompts": 8, "train.global_batch_size": 8}
    rs += expand(
        product(
            "experiments/online.py",
            online,
            module="kto_jax.online",
            rounds=["1"],
            prompts=["8"],
            samples=["2"],
            steps=["3"],
        ),
        str(tmp_path),
    )  # an online run, launched like any other
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        job = launch.slurm(rs, str(tmp_path), dry_run=False)
    finally:
        os.chdir(cwd)
    assert job
    deadline = time.time() + 600
    while time.time() < deadline:
        if not subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
            break
        time.sleep(2)
    logs = "".join(open(os.path.join(tmp_path, "slurm_logs", f)).read() for f in os.listdir(tmp_path / "slurm_logs"))
    for r in rs:
        assert os.path.exists(os.path.join(r["workdir"], "eval.json")), logs[-3000:]
        train = os.path.join(r["workdir"], "round_0", "train") if r["module"] == "kto_jax.online" else r["workdir"]
        rows = [json.loads(line) for line in open(os.path.join(train, "metrics.jsonl"))]
        assert rows[-1]["step"] == 3 and "eval/loss" in rows[-1]
    # resubmitting skips both finished runs
    assert launch.slurm(rs, str(tmp_path), dry_run=False) == ""
