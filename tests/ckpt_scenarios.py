"""The subprocess scenarios behind tests/test_checkpoint.py (kill -9, SIGTERM, non-finite, corrupted
checkpoints, init, export), each run in a thread; the tests assert on their results."""

from __future__ import annotations

import os
import random
import shutil
import signal

from tests import ckpt_helpers as H
from tests.ckpt_helpers import ckpt_dir, ckpt_steps

SEED = int(os.environ.get("KTO_TEST_SEED", random.randrange(2**31)))


# ---------------------------------------------------------------- scenarios (each in a thread)


def scenario_kill(root: str, data: str) -> dict:
    """kill -9 (the whole process group) at two random steps, rerunning the same command each time."""
    H.wait_compiled()
    rng = random.Random(SEED)
    out = os.path.join(root, "kill")
    workdir = os.path.join(out, "run")
    segments = []
    target = rng.randint(5, 12)
    for name in ("kill1", "kill2"):
        if segments:
            low = H.last_step(workdir) + 3  # rows up to here may be stale ones the next run truncates
            assert low <= H.STEPS - 3, f"seed {SEED}: the first run overshot its kill step: {segments}"
            target = rng.randint(low, H.STEPS - 3)
        proc = H.Proc(H.train_args(workdir, data), out, name)
        reached = H.wait_for_step(proc, workdir, target)
        # a save is asynchronous: at the target step the latest one may still be a temporary folder,
        # and a rerun with no finalised checkpoint starts over instead of resuming; wait for one
        H.wait_for(proc, lambda: ckpt_steps(workdir), f"a finalised checkpoint in {ckpt_dir(workdir)}")
        proc.kill_group(signal.SIGKILL)
        rc = proc.wait()
        segments.append(
            dict(
                target=target,
                reached=reached,
                rc=rc,
                stderr=proc.stderr,
                last_row=H.last_step(workdir),
                listing=sorted(os.listdir(ckpt_dir(workdir))),
            )
        )
    final = H.Proc(H.train_args(workdir, data), out, "kill3").result()
    return dict(segments=segments, final=final, rows=H.rows(workdir), workdir=workdir)


def scenario_sigterm(root: str, data: str) -> dict:
    H.wait_compiled()
    rng = random.Random(SEED + 1)
    out = os.path.join(root, "sigterm")
    workdir = os.path.join(out, "run")
    target = rng.randint(5, 20)
    proc = H.Proc(H.train_args(workdir, data), out, "term1")
    H.wait_for_step(proc, workdir, target)
    os.kill(proc.popen.pid, signal.SIGTERM)
    first = proc.result()
    first.update(target=target, steps=ckpt_steps(workdir), last_row=H.last_step(workdir))
    final = H.Proc(H.train_args(workdir, data), out, "term2").result()
    return dict(first=first, final=final, rows=H.rows(workdir), workdir=workdir)


def scenario_nonfinite(root: str, data: str, skip: bool) -> dict:
    """lr 1e30 without clipping: step 1 is finite and throws the weights to ~1e28, later steps are not.
    With skip_nonfinite, 2 steps and then the same run extended to 4 (a resume)."""
    H.wait_compiled()
    name = "skip" if skip else "nonfinite"
    out = os.path.join(root, name)
    workdir = os.path.join(out, "run")
    extra = ["--config.train.optimizer.lr=1e30", "--config.train.optimizer.grad_clip=0"]
    if skip:
        extra.append("--config.train.skip_nonfinite=True")
        first = H.Proc(H.train_args(workdir, data, "loss=kto,steps=2", tuple(extra), every=1), out, "skip1").result()
        first["rows"] = H.rows(workdir)
    result = H.Proc(H.train_args(workdir, data, "loss=kto,steps=4", tuple(extra), every=1), out, name).result()
    result.update(rows=H.rows(workdir), steps=ckpt_steps(workdir), workdir=workdir)
    if skip:
        result["first"] = first
    return result


def _corrupt(step_dir: str, how: str, rng: random.Random) -> list[str]:
    state = os.path.join(step_dir, "state")
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(state) for f in fs)
    if how == "garbage":  # every file of the state overwritten with random bytes of the same size
        for path in files:
            size = os.path.getsize(path)
            with open(path, "wb") as f:
                f.write((bytes(rng.getrandbits(8) for _ in range(min(size, 4096))) * (size // 4096 + 1))[:size])
        return files
    biggest = max(files, key=os.path.getsize)  # the array data; metadata left intact
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    return [biggest]


def scenario_corrupt(root: str, data: str, reference, how: str) -> dict:
    """The newest checkpoint corrupted (``garbage``) or truncated (``truncate``, which also leaves a
    half-written step 29 the way orbax names it: ``29.orbax-checkpoint-tmp-<timestamp>``), then a rerun."""
    ref = reference.result()
    rng = random.Random(SEED + 2)
    out = os.path.join(root, f"corrupt_{how}")
    workdir = H.copy_run(ref["workdir"], os.path.join(out, "run"))
    # a run that died after its last save, before its evaluation (a finished run rerun with the
    # same config is a no-op that reads no checkpoint)
    os.remove(os.path.join(workdir, "eval.json"))
    steps = ckpt_steps(workdir)
    newest = os.path.join(ckpt_dir(workdir), str(steps[-1]))
    tmp = None
    if how == "truncate":
        tmp = os.path.join(ckpt_dir(workdir), f"{steps[-1] - 1}.orbax-checkpoint-tmp-1700000000000000")
        shutil.copytree(newest, tmp)
        os.remove(os.path.join(tmp, "commit_success.txt"))
        _corrupt(tmp, "truncate", rng)
    corrupted = _corrupt(newest, how, rng)
    result = H.Proc(H.train_args(workdir, data), out, how).result()
    result.update(rows=H.rows(workdir), workdir=workdir, steps_before=steps, corrupted=corrupted, tmp=tmp)
    return result


def scenario_init(root: str, data: str, reference) -> dict:
    ref = reference.result()
    step = ckpt_steps(ref["workdir"])[0]
    out = os.path.join(root, "init")
    workdir = os.path.join(out, "run")
    source = f"orbax:{ref['workdir']}@{step}"
    result = H.Proc(H.train_args(workdir, data, f"loss=kto,steps=2,init={source}", every=1), out, "init").result()
    result.update(workdir=workdir, source=source, step=step)
    return result


def scenario_export(root: str, reference) -> dict:
    ref = reference.result()
    out = os.path.join(root, "export")
    step = ckpt_steps(ref["workdir"])[0]
    script = os.path.join(H.REPO, "scripts", "export_hf.py")
    procs = {
        "latest": H.Proc([script, "--workdir", ref["workdir"], "--out", os.path.join(out, "latest")], out, "latest"),
        "at_step": H.Proc(
            [script, "--workdir", ref["workdir"], "--step", str(step), "--out", os.path.join(out, "at_step")],
            out,
            "at_step",
        ),
    }
    return {name: {**p.result(), "out": os.path.join(out, name)} for name, p in procs.items()} | {"step": step}


class Scenarios:
    def __init__(self, futures, reference):
        self.futures, self.reference_future = futures, reference

    def __getitem__(self, name):
        return self.futures[name].result()

    @property
    def reference(self):
        return self.reference_future.result()
