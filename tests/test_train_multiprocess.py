"""Two processes on 127.0.0.1 train like one process with the same devices and global batch.

Each process has 2 simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=2)
and joins through ``kto_jax.sharding.initialize_distributed`` (KTO_JAX_COORDINATOR,
KTO_JAX_NUM_PROCESSES, KTO_JAX_PROCESS_ID); CPU collectives across processes are JAX's
default gloo implementation (jax_cpu_collectives_implementation="gloo"), nothing to set.
Both processes share one workdir: process 0 writes config.json, metrics.jsonl and eval.json,
every process writes its shards of the final weights. The reference run is one process with
4 devices. All three processes run the CLI as shipped (``python -m kto_jax.train``) and start
at once; each has a timeout, so a hang in a collective fails the test instead of blocking CI.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.train_helpers import CLI_SMALL_FLAGS, finish, free_port, start, subprocess_env, tail, train_rows

TIMEOUT = 300
STEPS = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_data_dir):
    data_dir = synthetic_data_dir
    root = str(tmp_path_factory.mktemp("multiprocess"))

    def cli(workdir):
        return [
            "--config",
            f"experiments/tiny.py:loss=kto,steps={STEPS}",
            "--workdir",
            workdir,
            f"--config.data.data_dir={data_dir}",
            *CLI_SMALL_FLAGS,
        ]

    cli_module = ["-m", "kto_jax.train"]
    procs = {}
    workdir = os.path.join(root, "cli_2x2")
    port = free_port()
    procs["cli"] = (
        workdir,
        [
            start(
                [*cli_module, *cli(workdir)],
                subprocess_env(
                    devices=2,
                    KTO_JAX_COORDINATOR=f"127.0.0.1:{port}",
                    KTO_JAX_NUM_PROCESSES="2",
                    KTO_JAX_PROCESS_ID=str(i),
                ),
                os.path.join(root, f"cli_{i}.log"),
            )
            for i in range(2)
        ],
    )
    workdir = os.path.join(root, "single_1x4")
    procs["single"] = (
        workdir,
        [start([*cli_module, *cli(workdir)], subprocess_env(devices=4), os.path.join(root, "single.log"))],
    )
    results = {}
    for name, (workdir, started) in procs.items():
        results[name] = (workdir, [finish(p, TIMEOUT) for p in started])
    return results


def check_run(run):
    workdir, outcomes = run
    for i, (rc, log) in enumerate(outcomes):
        assert rc == 0, f"process {i} of {len(outcomes)} failed:\n{tail(log)}"
    for name in ("config.json", "metrics.jsonl", "eval.json"):
        assert os.path.exists(os.path.join(workdir, name)), name
    rows = train_rows(workdir)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1)), "process 0 alone writes one row per step"
    return rows


def assert_same_trajectory(rows, expected):
    losses = [row["loss"] for row in expected]
    assert len(set(losses)) > 1, f"the loss should move: {losses}"
    for row, ref in zip(rows, expected):
        for key, value in ref.items():
            if key not in ("step_time_s", "tokens_per_s"):
                np.testing.assert_allclose(row[key], value, rtol=0, atol=1e-5, err_msg=f"step {ref['step']} {key}")


def test_two_processes_match_one_process(runs):
    """python -m kto_jax.train as shipped: 2 processes x 2 devices give the loss trajectory (and
    every logged metric) of 1 process x 4 devices, each process feeding its slice of the batch."""
    single = check_run(runs["single"])
    multi = check_run(runs["cli"])
    assert_same_trajectory(multi, single)
    assert all(row["tokens"] == ref["tokens"] for row, ref in zip(multi, single)), (
        "each process feeds its slice of the same global batch"
    )
