"""Shared pieces of the training-engine tests (tests/test_train_*.py and tests/train_worker.py).

* XLA options that make CPU compilation ~2x faster (the tests compile many tiny programs and
  run them for a few steps, so backend optimisation buys nothing);
* environments and a runner for subprocesses (simulated devices, no inherited
  multi-process settings) with a timeout, so a hang fails a test instead of blocking CI;
* the tiny config the engine tests run: tiny-1m with 2 layers, batches of 8, sequences of at
  most 32 tokens, the 500-pair validation split for training and evaluation.

The synthetic dataset comes from conftest.py's session fixture ``synthetic_data_dir``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
FAST_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# tiny-1m (Llama, 4 heads = 4 kv heads, vocab 384, hidden 128, mlp 344) with 2 layers instead of 4;
# registered into the presets of whichever process runs the engine (kto_jax.models.presets.PRESETS).
TEST_PRESET = "tiny-1m-2l"


def register_test_preset() -> str:
    from kto_jax.models.presets import PRESETS, get_preset

    PRESETS.setdefault(TEST_PRESET, get_preset("tiny-1m", num_layers=2))
    return TEST_PRESET


def small_config(loss: str, data_dir: str, *, steps: int = 1, batch: int = 8, model: str | None = None):
    """tiny_config(loss) made smaller: 2-layer model, global batch ``batch``, validation split, no judge."""
    from kto_jax.config import tiny_config

    config = tiny_config(loss, steps=steps, model=model or register_test_preset())
    config.data.update(dict(data_dir=data_dir, train_split="validation", eval_split="validation"))
    config.train.update(dict(global_batch_size=batch, eval_batches=1, log_every=1))
    config.eval.judge = ""
    return config


def record_loop_lowering(loop, set_attribute=setattr) -> list:
    """Make ``loop.run`` record the StableHLO of its first ``train_fn`` call (on the real state, batch
    and reference arrays) in the returned list; ``set_attribute`` may be ``monkeypatch.setattr``."""
    import dataclasses

    seen: list = []
    real_build = loop.build_engine

    def recording_build(*args, **kwargs):
        engine = real_build(*args, **kwargs)

        def train_fn(state, batch, reference, frozen=None):
            if not seen:
                seen.append(engine.train_fn.lower(state, batch, reference, frozen).as_text())
            return engine.train_fn(state, batch, reference, frozen)

        return dataclasses.replace(engine, train_fn=train_fn)

    set_attribute(loop, "build_engine", recording_build)
    return seen


CLI_SMALL_FLAGS = (
    "--config.eval.judge=",
    "--config.train.eval_batches=1",
    "--config.train.log_every=1",
    "--config.train.global_batch_size=8",
    "--config.data.train_split=validation",
    "--config.data.eval_split=validation",
)


def subprocess_env(devices: int = 1, **extra: str) -> dict:
    """os.environ for a child JAX process on ``devices`` simulated CPU devices, fast compilation."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("KTO_JAX_") and k not in ("XLA_FLAGS", "SLURM_NTASKS")
    }
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_XLA_FLAGS}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    env.update(extra)
    return env


def start(args: list[str], env: dict, log_path: str) -> subprocess.Popen:
    """Start ``python ARGS`` in the repository root, stdout+stderr going to ``log_path``."""
    log = open(log_path, "w", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log_path  # type: ignore[attr-defined]
    log.close()
    return proc


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """(return code, output) of a started process; killed (and an AssertionError) past ``timeout``."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{proc.args} did not finish in {timeout}s:\n{tail(read(proc.log_path))}") from None
    return proc.returncode, read(proc.log_path)


def read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(line[:400] for line in text.splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics_rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def train_rows(workdir: str) -> list[dict]:
    """The per-step training rows of metrics.jsonl (not the held-out ``eval/*`` rows)."""
    return [row for row in metrics_rows(workdir) if "loss" in row]


def run_workers(
    command: str,
    losses,
    tmp_path_factory,
    data_dir: str,
    timeout: float,
    *,
    devices: int = 8,
    at_once: int | None = None,
) -> dict:
    """``python -m tests.train_worker COMMAND --loss L`` for each loss (``at_once`` subprocesses at
    a time, default all) on ``devices`` simulated CPU devices: {loss: (out dir, its summary.json)}."""
    losses = list(losses)
    at_once = at_once or len(losses)
    results = {}
    for first in range(0, len(losses), at_once):
        procs = {}
        for loss in losses[first : first + at_once]:
            out = str(tmp_path_factory.mktemp(f"{command}_{loss}"))
            args = ["-m", "tests.train_worker", command, "--loss", loss, "--data_dir", data_dir, "--out", out]
            procs[loss] = (out, start(args, subprocess_env(devices=devices), os.path.join(out, "log.txt")))
        for loss, (out, proc) in procs.items():
            rc, log = finish(proc, timeout)
            assert rc == 0, f"{command} worker for {loss} failed:\n{tail(log)}"
            with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
                results[loss] = (out, json.load(f))
    return results


def rounding_noise(step: int, key: str, row: dict, expected: dict) -> bool:
    """Whether metric ``key`` of ``step`` is a sign of rounding noise, not compared across layouts or
    meshes: at step 1 the policy is the reference, every reward is 0 up to rounding (asserted here),
    and ``rewards/accuracies`` (the share of pairs whose chosen reward is the larger) is that noise's
    sign. The two forwards round differently since the blocked attention's backward-ready forward
    (``jax.custom_vjp``) and its plain one compile apart."""
    if step != 1 or key != "rewards/accuracies":
        return False
    assert abs(expected["rewards/chosen"]) < 1e-5 and abs(row["rewards/chosen"]) < 1e-5, (row, expected)
    return True
