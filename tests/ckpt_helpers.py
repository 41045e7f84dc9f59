"""Shared pieces of tests/test_checkpoint.py and tests/test_bad_input.py.

* the CLI command of the small KTO run both files use (tiny-1m from random init, batches of 8
  from the synthetic validation split, sequences bucketed to 32 tokens so one program is
  compiled, a checkpoint every ``EVERY`` steps, a metrics row every step, no judge);
* the same config built in-process (``config_for``), for checks that fail before compiling;
* subprocesses in their own process group (so ``kill -9`` of the group kills the run) with
  stdout and stderr in separate files and a timeout, sharing one persistent JAX compilation
  cache (a cached executable is the same program: the runs stay bitwise comparable; the
  others start once the reference run has compiled, so they load instead of compiling);
* the uninterrupted reference run, run once per pytest session (whichever file asks first), on
  conftest.py's ``synthetic_data_dir``;
* metrics rows, metrics comparison, and workdir snapshots (path -> sha256);
* ``random_init``: a preset's random init built once per process (``from_hf`` jit-compiles the
  initialiser afresh on every call, ~3.5 s on a loaded 2-core CPU), also patched into
  ``kto_jax.train.setup`` by ``reuse_random_init`` for in-process runs that fail before training
  (the arrays are shared, so a run that trains and donates them must not use it).
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from tests.train_helpers import REPO, subprocess_env, tail

TINY = os.path.join(REPO, "experiments", "tiny.py")
STEPS = 30
EVERY = 4
TIMEOUT = 300
# per-step timing, not results: they differ between any two runs
TIMING = ("step_time_s", "tokens_per_s", "mfu")


def run_flags(data_dir: str, every: int = EVERY) -> list[str]:
    return [
        f"--config.data.data_dir={data_dir}",
        "--config.eval.judge=",
        "--config.train.eval_batches=1",
        "--config.train.log_every=1",
        f"--config.checkpoint.every_steps={every}",
        "--config.train.global_batch_size=8",
        "--config.data.train_split=validation",
        "--config.data.eval_split=validation",
        "--config.data.bucket=32",
    ]


def train_args(
    workdir: str, data_dir: str, arg: str = f"loss=kto,steps={STEPS}", extra: tuple = (), every: int = EVERY
) -> list[str]:
    return [
        "-m",
        "kto_jax.train",
        "--config",
        f"{TINY}:{arg}",
        "--workdir",
        workdir,
        *run_flags(data_dir, every),
        *extra,
    ]


_CACHE_DIR = tempfile.mkdtemp(prefix="kto_jax_test_compile_cache_")
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)


def proc_env() -> dict:
    """subprocess_env() (one CPU device, fast XLA flags) plus the shared compilation cache
    (a size limit turns on JAX's file lock, so concurrent processes can share it)."""
    return subprocess_env(
        JAX_COMPILATION_CACHE_DIR=_CACHE_DIR,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_COMPILATION_CACHE_MAX_SIZE=str(2**30),
    )


class Proc:
    """``python ARGS`` in the repository root, in a new session (process group), output to files."""

    def __init__(self, args: list[str], out_dir: str, name: str, env: dict | None = None):
        os.makedirs(out_dir, exist_ok=True)
        self.name = name
        self.stdout_path = os.path.join(out_dir, f"{name}.stdout")
        self.stderr_path = os.path.join(out_dir, f"{name}.stderr")
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.popen = subprocess.Popen(
                [sys.executable, *args], cwd=REPO, env=env or proc_env(), stdout=out, stderr=err, start_new_session=True
            )

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group(signal.SIGKILL)
            self.popen.wait()
            raise AssertionError(f"{self.name} did not finish in {timeout}s:\n{tail(self.stderr)}") from None

    def kill_group(self, sig) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    @property
    def stdout(self) -> str:
        return _read(self.stdout_path)

    @property
    def stderr(self) -> str:
        return _read(self.stderr_path)

    def result(self, timeout: float = TIMEOUT) -> dict:
        rc = self.wait(timeout)
        return {"rc": rc, "stdout": self.stdout, "stderr": self.stderr}


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def rows(workdir: str) -> list[dict]:
    """metrics.jsonl rows; a last line still being written is ignored."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def ckpt_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


def ckpt_steps(workdir: str) -> list[int]:
    """Finalised step folders (orbax renames a step's temporary folder to ``<step>`` when complete)."""
    path = ckpt_dir(workdir)
    return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def last_step(workdir: str) -> int:
    return max((r["step"] for r in rows(workdir) if "loss" in r), default=0)


def wait_for(proc: Proc, found, what: str, timeout: float = TIMEOUT):
    """Poll ``found()`` while ``proc`` runs until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        if proc.popen.poll() is not None:
            raise AssertionError(f"{proc.name} exited ({proc.popen.returncode}) before {what}:\n{tail(proc.stderr)}")
        time.sleep(0.05)
    proc.kill_group(signal.SIGKILL)
    raise AssertionError(f"{proc.name}: no {what} in {timeout}s")


def wait_for_step(proc: Proc, workdir: str, target: int, timeout: float = TIMEOUT) -> int:
    """Poll metrics.jsonl until a training row of step >= ``target``; returns that step."""
    return wait_for(proc, lambda: (s := last_step(workdir)) >= target and s, f"step {target}", timeout)


def comparable(rows_: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows_]


def assert_same_rows(got: list[dict], expected: list[dict], what: str) -> None:
    """Same rows (training and held-out) with bitwise-equal values, timing keys aside."""
    got, expected = comparable(got), comparable(expected)
    steps = [r["step"] for r in got]
    assert len(got) == len(expected), f"{what}: {len(got)} rows, uninterrupted run {len(expected)}; steps {steps}"
    for g, e in zip(got, expected):
        assert g.keys() == e.keys(), f"{what}: step {g['step']} keys {sorted(g)} != {sorted(e)}"
        diff = {k: (g[k], e[k]) for k in e if g[k] != e[k]}
        assert not diff, f"{what}: step {e['step']} differs from the uninterrupted run: {diff}"


def snapshot(path: str) -> dict[str, str]:
    """Every file under ``path`` -> its sha256."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def snapshot_diff(before: dict, after: dict) -> dict:
    return {
        "removed": sorted(set(before) - set(after)),
        "added": sorted(set(after) - set(before)),
        "changed": sorted(k for k in set(before) & set(after) if before[k] != after[k]),
    }


def copy_run(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- the uninterrupted reference run

_REFERENCE: dict = {}
_LOCK = threading.Lock()
_COMPILED = threading.Event()  # the reference run has written its first row: its programs are cached


def wait_compiled(timeout: float = 120) -> None:
    """Wait (a while) for the reference run to fill the compilation cache before starting a run."""
    _COMPILED.wait(timeout)


def reference_run(tmp_path_factory, data: str) -> dict:
    """The uninterrupted STEPS-step run (once per session; ``data`` is conftest's synthetic_data_dir):
    {"workdir", "rows", "stderr", "data_dir"}."""
    with _LOCK:
        if not _REFERENCE:
            root = str(tmp_path_factory.mktemp("reference"))
            workdir = os.path.join(root, "run")
            proc = Proc(train_args(workdir, data), root, "reference")
            try:
                wait_for_step(proc, workdir, 1)
            finally:
                _COMPILED.set()
            result = proc.result()
            assert result["rc"] == 0, f"the reference run failed:\n{tail(result['stderr'])}"
            _REFERENCE.update(workdir=workdir, rows=rows(workdir), stderr=result["stderr"], data_dir=data)
    return dict(_REFERENCE)


# ---------------------------------------------------------------- the same config in-process


def _tiny_module():
    spec = importlib.util.spec_from_file_location("experiments_tiny", TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def set_path(config, dotted: str, value: str) -> None:
    """``--config.a.b=value`` in-process: the string converted to the field's type."""
    *parents, last = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    kind = type(node[last])
    if kind is bool:
        node[last] = value in ("True", "true", "1")
    else:
        node[last] = kind(value)


def config_for(data_dir: str, arg: str = f"loss=kto,steps={STEPS}", extra: tuple = (), lock: bool = True):
    """The config ``train_args`` gives the CLI, built in-process."""
    config = _tiny_module().get_config(arg)
    for flag in [*run_flags(data_dir), *extra]:
        key, _, value = flag[len("--config.") :].partition("=")
        set_path(config, key, value)
    if lock:
        config.lock()
    return config


# ---------------------------------------------------------------- random inits, built once

_INITS: dict = {}


def random_init(name: str, **kwargs):
    """``kto_jax.models.hf.from_hf(name, **kwargs)`` for a preset, memoised (same seed, same arrays)."""
    from kto_jax.models.hf import from_hf

    mesh = kwargs.get("mesh")
    key = (
        name,
        repr(sorted((k, v) for k, v in kwargs.items() if k != "mesh")),
        None if mesh is None else (tuple(mesh.shape.items()), tuple(d.id for d in mesh.devices.flat)),
    )
    if key not in _INITS:
        _INITS[key] = from_hf(name, **kwargs)
    return _INITS[key]


def reuse_random_init(monkeypatch) -> None:
    """Make ``kto_jax.train.setup.load_model`` reuse a memoised random init for presets."""
    from kto_jax.models.hf import init_params
    from kto_jax.train import setup

    def memoised(config, seed=0, mesh=None):
        key = (
            config,
            seed,
            None if mesh is None else (tuple(mesh.shape.items()), tuple(d.id for d in mesh.devices.flat)),
        )
        if key not in _INITS:
            _INITS[key] = init_params(config, seed, mesh)
        return _INITS[key]

    monkeypatch.setattr(setup, "init_params", memoised)


# ---------------------------------------------------------------- trees


def assert_trees_equal(a, b, what: str) -> None:
    """Two pytrees with the same paths and bitwise equal leaves."""
    import jax
    import numpy as np

    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb], what
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{what} {jax.tree_util.keystr(path)}")
