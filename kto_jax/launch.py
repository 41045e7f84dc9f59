"""Launchers for sweeps: local (one run after another), SLURM (an sbatch array), TPU VM slices.

Each run of a sweep has a workdir named from its arguments. A run whose workdir holds an
``eval.json`` is finished and skipped; any other is (re)started with the same command,
which resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

TRAIN = [sys.executable, "-m", "kto_jax.train"]


def is_finished(workdir: str) -> bool:
    return os.path.exists(os.path.join(workdir, "eval.json"))


def train_command(run: dict, python: str = sys.executable) -> list[str]:
    """The CLI command of one run: config, workdir and --config.key=value overrides; the module is
    the run's ``"module"`` (``kto_jax.online`` for online rounds), default ``kto_jax.train``."""
    cmd = [python, "-m", run.get("module", "kto_jax.train"), f"--config={run['config']}", f"--workdir={run['workdir']}"]
    cmd += [f"--config.{k}={v}" for k, v in sorted(run["overrides"].items())]
    return cmd


def local(runs: list[dict], dry_run: bool = False) -> list[str]:
    """Run unfinished runs one after another in this process's environment."""
    done = []
    for run in runs:
        cmd = train_command(run)
        if is_finished(run["workdir"]):
            print(f"skip (finished): {run['name']}")
            continue
        print(("would run: " if dry_run else "run: ") + shlex.join(cmd), flush=True)
        if not dry_run:
            subprocess.run(cmd, check=True)
        done.append(run["name"])
    return done


def sbatch_script(
    runs: list[dict],
    runs_file: str,
    *,
    nodes: int = 1,
    partition: str = "",
    gpus_per_node: int = 0,
    time_limit: str = "",
    log_dir: str = "runs/slurm",
    python: str = sys.executable,
    extra: tuple[str, ...] = (),
) -> str:
    """An sbatch array script: task i trains run i of ``runs_file`` on ``nodes`` hosts, one
    process per host; jax.distributed initialises from the SLURM environment."""
    lines = [
        "#!/bin/bash",
        "#SBATCH --job-name=kto_jax_sweep",
        f"#SBATCH --array=0-{len(runs) - 1}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --output={log_dir}/%A_%a.out",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if time_limit:
        lines.append(f"#SBATCH --time={time_limit}")
    lines += [f"#SBATCH {x}" for x in extra]
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        # the task's command line, read from the runs file by array index
        f'CMD=$({shlex.quote(python)} -c \'import json,os,shlex,sys; r=json.load(open(sys.argv[1]))[int(os.environ["SLURM_ARRAY_TASK_ID"])]; '
        'print("SKIP" if os.path.exists(os.path.join(r["workdir"], "eval.json")) else shlex.join(r["command"]))\' '
        f"{shlex.quote(runs_file)})",
        'if [ "$CMD" = SKIP ]; then echo "finished already"; exit 0; fi',
        'echo "$CMD"',
        'srun --kill-on-bad-exit=1 bash -c "$CMD"',
    ]
    return "\n".join(lines) + "\n"


def slurm(runs: list[dict], root: str, dry_run: bool = False, **kwargs) -> str:
    """Write ``root/sweep.sbatch`` and ``root/sweep_runs.json`` and submit them (unless dry_run)."""
    os.makedirs(root, exist_ok=True)
    todo = [r for r in runs if not is_finished(r["workdir"])]
    for r in runs:
        if r not in todo:
            print(f"skip (finished): {r['name']}")
    if not todo:
        return ""
    runs_file = os.path.abspath(os.path.join(root, "sweep_runs.json"))
    log_dir = os.path.abspath(os.path.join(root, "slurm_logs"))
    script = sbatch_script(todo, runs_file, log_dir=log_dir, **kwargs)
    script_file = os.path.join(root, "sweep.sbatch")
    payload = [
        {
            **r,
            "workdir": os.path.abspath(r["workdir"]),
            "command": train_command(
                {**r, "workdir": os.path.abspath(r["workdir"])}, kwargs.get("python", sys.executable)
            ),
        }
        for r in todo
    ]
    if dry_run:
        print(
            f"# would write {runs_file}:\n{json.dumps(payload, indent=2)}\n# would write {script_file}:\n{script}# would run: sbatch {script_file}"
        )
        return script
    os.makedirs(log_dir, exist_ok=True)
    with open(runs_file, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    with open(script_file, "w", encoding="utf-8") as f:
        f.write(script)
    out = subprocess.run(
        ["sbatch", "--parsable", script_file], check=True, capture_output=True, text=True
    ).stdout.strip()
    print(f"submitted array job {out} ({len(todo)} runs); logs in {log_dir}")
    return out


def tpu_commands(
    runs: list[dict], tpu_name: str, zone: str, project: str = "", repo_dir: str = "~/kto-jax", python: str = "python3"
) -> list[list[str]]:
    """One ``gcloud compute tpus tpu-vm ssh --worker=all`` command per unfinished run: every host of
    the slice runs the same CLI; jax.distributed initialises from the TPU environment."""
    cmds = []
    for run in runs:
        if is_finished(run["workdir"]):
            continue
        remote = f"cd {repo_dir} && " + shlex.join(train_command(run, python))
        cmd = [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "ssh",
            tpu_name,
            f"--zone={zone}",
            "--worker=all",
            f"--command={remote}",
        ]
        if project:
            cmd.insert(5, f"--project={project}")
        cmds.append(cmd)
    return cmds
