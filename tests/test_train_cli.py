"""Every registered loss trains a step through the training loop; bad input fails at the CLI.

Runs (all started together when the module starts, so they share the CPUs with the tests of
bad input, which each run the CLI too):
* ``python -m kto_jax.train --config experiments/tiny.py:loss=NAME,steps=1`` for CLI_LOSSES;
* ``kto_jax.train.loop.run(small config, workdir)`` for every other loss, in two worker
  processes (tests/train_worker.py losses), one step each on a 2-layer tiny-1m.
All use global batches of 8 from the synthetic validation split, one eval batch, no judge.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kto_jax.losses import LOSSES, get_loss
from tests.train_helpers import CLI_SMALL_FLAGS, REPO, finish, read, start, subprocess_env, tail, train_rows

CLI_LOSSES = ("kto", "dpo")
MIXTURES = ("rpo", "kto+sft", "mpo")  # loss mixtures (kto_jax/losses/mixture.py): paired, unary, with run state
WORKER_LOSSES = tuple(name for name in sorted(LOSSES) if name not in CLI_LOSSES) + MIXTURES
TIMEOUT = 600
ALWAYS = ("step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "step_time_s")
PAIRED_REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
KTO_KEYS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins")


@pytest.fixture(scope="module")
def data_dir(synthetic_data_dir):
    return synthetic_data_dir


@pytest.fixture(scope="module", autouse=True)
def runs(tmp_path_factory, data_dir):
    """Start every run now; ``runs[name]()`` waits for it and returns (workdir, return code, log)."""
    root = str(tmp_path_factory.mktemp("cli_runs"))
    waiting = {}
    for name in CLI_LOSSES:
        workdir = os.path.join(root, name)
        args = [
            "-m",
            "kto_jax.train",
            "--config",
            f"experiments/tiny.py:loss={name},steps=1",
            "--workdir",
            workdir,
            f"--config.data.data_dir={data_dir}",
            *CLI_SMALL_FLAGS,
        ]
        waiting[name] = (workdir, start(args, subprocess_env(), os.path.join(root, f"{name}.log")))
    half = len(WORKER_LOSSES) // 2
    for i, names in enumerate((WORKER_LOSSES[:half], WORKER_LOSSES[half:])):
        proc = start(
            ["-m", "tests.train_worker", "losses", "--data_dir", data_dir, "--out", root, *names],
            subprocess_env(),
            os.path.join(root, f"worker{i}.log"),
        )
        for name in names:
            waiting[name] = (os.path.join(root, name), proc)
    done = {}

    def result(name):
        if name not in done:
            workdir, proc = waiting[name]
            done[name] = (workdir, *finish(proc, TIMEOUT))
        return done[name]

    yield {name: (lambda name=name: result(name)) for name in waiting}
    for _, proc in waiting.values():  # a test that failed early leaves nothing running
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------- bad input


def cli(experiment: str, *overrides: str, devices: int, data_dir: str, tmp_path) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "kto_jax.train",
        "--config",
        f"experiments/tiny.py:{experiment}",
        "--workdir",
        str(tmp_path / "run"),
        f"--config.data.data_dir={data_dir}",
        *CLI_SMALL_FLAGS,
        *overrides,
    ]
    return subprocess.run(
        command, cwd=REPO, env=subprocess_env(devices), capture_output=True, text=True, timeout=TIMEOUT
    )


@pytest.mark.parametrize(
    "experiment, overrides, devices, expected",
    [
        pytest.param("loss=nope", [], 1, ["unknown loss 'nope'", "config.loss.name"], id="unknown-loss"),
        pytest.param(
            "loss=kto",
            ["--config.train.stepz=3"],
            1,
            ["--config.train.stepz", "config.train has no field 'stepz'", "'steps'"],
            id="misspelled-key",
        ),
        pytest.param("loss=kto", ["--config.mesh.data=3"], 1, ["config.mesh", "needs 3 devices"], id="mesh-vs-devices"),
        pytest.param(
            "loss=kto",
            ["--config.mesh.data=4", "--config.train.global_batch_size=6"],
            4,
            ["config.train.global_batch_size=6"],
            id="batch-vs-data-axes",
        ),
        pytest.param(
            "loss=kto",
            ["--config.train.global_batch_size=2", "--config.train.num_microbatches=2"],
            1,
            ["config.train.global_batch_size", "num_microbatches"],
            id="kto-microbatch-of-one",
        ),
        pytest.param(
            "loss=dpo",
            ["--config.data.sources=synthetic/unary"],
            1,
            ["needs paired data", "config.data.sources"],
            id="paired-loss-on-unary-data",
        ),
    ],
)
def test_bad_input_exits_with_a_message_naming_the_field(experiment, overrides, devices, expected, data_dir, tmp_path):
    proc = cli(experiment, *overrides, devices=devices, data_dir=data_dir, tmp_path=tmp_path)
    assert proc.returncode != 0, proc.stderr[-3000:]
    for text in expected:
        assert text in proc.stderr, f"{text!r} not in stderr:\n{tail(proc.stderr)}"
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl"), "nothing should have trained"


# ---------------------------------------------------------------------------- every loss


def expected_keys(name: str) -> tuple[str, ...]:
    if name in MIXTURES:  # each term's metrics under its name, the total as "loss"
        return ALWAYS + tuple(f"{t.name}/loss" for t in get_loss(name).terms)
    spec = LOSSES[name]
    if spec.kind == "paired":
        return ALWAYS + PAIRED_REWARDS
    if name == "kto":
        return ALWAYS + KTO_KEYS
    return ALWAYS


@pytest.mark.parametrize("name", sorted(LOSSES) + list(MIXTURES))
def test_every_loss_trains_one_step(name, runs):
    workdir, rc, log = runs[name]()
    error = os.path.join(workdir, "error.txt")
    assert rc == 0 and not os.path.exists(error), tail(read(error) if os.path.exists(error) else log)
    for file in ("config.json", "data_stats.json", "metrics.jsonl", "eval.json"):
        assert os.path.exists(os.path.join(workdir, file)), f"{file} missing in {sorted(os.listdir(workdir))}"
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["loss"]["name"] == name
    rows = train_rows(workdir)
    assert len(rows) == 1 and rows[0]["step"] == 1, rows
    row = rows[0]
    missing = [key for key in expected_keys(name) if key not in row]
    assert not missing, f"metrics.jsonl lacks {missing}: {sorted(row)}"
    assert all(isinstance(v, (int, float)) and v == v for v in row.values()), row  # numbers, no NaN
    assert row["tokens"] > 0 and row["grad_norm"] > 0 and row["lr"] > 0
    with open(os.path.join(workdir, "eval.json"), encoding="utf-8") as f:
        results = json.load(f)
    assert results["step"] == 1 and "eval/loss" in results["held_out"], results


# ---------------------------------------------------------------------------- console


def test_cli_console_is_quiet_by_default(runs):
    """The CLI shows its progress bar and warnings, not the libraries' INFO logs (orbax writes ~30
    absl INFO lines per checkpoint; --verbosity=0 brings them back)."""
    import re

    workdir, rc, log = runs["kto"]()
    assert rc == 0, tail(log)
    assert re.search(r"^kto: 100%", log.replace("\r", "\n"), re.M), tail(log)
    info = re.findall(r"^I\d{4} \d\d:\d\d:\d\d.*$", log, re.M)
    assert not info, f"{len(info)} INFO lines, e.g. {info[:3]}"


def test_libtpu_on_a_host_without_tpus_is_left_out_quietly():
    """With the [tpu] extra (libtpu, for AOT checks) installed and no TPU chips, importing kto_jax
    keeps JAX's TPU plugin out of backend discovery: no TPU_WORKER_HOSTNAMES error, CPU devices."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs libtpu ('.[tpu]')")
        pytest.skip("libtpu not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    proc = subprocess.run(
        [sys.executable, "-c", "import kto_jax, jax; print(jax.devices()[0].platform)"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "cpu"
    assert "TPU_WORKER_HOSTNAMES" not in proc.stderr and "libtpu" not in proc.stderr, proc.stderr[-2000:]
