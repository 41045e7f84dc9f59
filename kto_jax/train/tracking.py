"""Weights & Biases tracking (``config.logging.wandb``): a run's metrics.jsonl rows, its config and
eval.json's numbers in one wandb run, written by process 0 (through ``hooks.MetricsWriter``).

    check_available(config)                     # prepare: wandb asked for and not installed -> InputError
    tracker = WandbTracker.open(config, workdir)  # None unless config.logging.wandb.enabled
    tracker.log(step, row)                      # every metrics.jsonl row (training and held-out)
    tracker.close(results)                      # eval.json's numbers into the run's summary; finish

A resumed run continues the same wandb run: its id is kept in ``WORKDIR/wandb_run_id`` and passed
to ``wandb.init(id=..., resume="allow")``. Each step reaches the run's history once. A run killed
at step k resumes from its checkpoint c < k and trains c+1..k again, while wandb may hold any
prefix of the dead process's steps (wandb-core writes the ``.wandb`` file every 15 s; the server
has what was streamed). So the tracker first finds the last step the run holds: on line the
server's (``run.starting_step - 1``), and the history of the earlier local ``.wandb`` files of this
id (offline, wandb ignores ``resume`` and each process writes a new ``wandb/offline-run-*-ID``
folder that ``wandb sync`` uploads). Steps up to it are not logged again (they keep the values
logged before the kill: the same numbers, timing aside); metrics.jsonl's rows after it, up to c,
are logged first; then training goes on.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import secrets
import string
import struct
import zlib
from collections.abc import Iterator

from kto_jax import files
from kto_jax.errors import InputError

RUN_ID_FILE = "wandb_run_id"
INSTALL = "pip install -e '.[wandb]'"


def settings(config) -> dict | None:
    """``config.logging.wandb`` as a dict, or None when it is off (or the config predates it)."""
    section = config.get("logging", None)
    wandb = section.get("wandb", None) if section is not None else None
    if wandb is None or not wandb.get("enabled", False):
        return None
    return dict(wandb)


def check_available(config) -> None:
    """Raise :class:`InputError` when the config asks for wandb and the package is not installed."""
    if settings(config) is not None and importlib.util.find_spec("wandb") is None:
        raise InputError(
            "config.logging.wandb.enabled=True: the wandb package is not installed; install it with "
            f"{INSTALL} (or pip install 'wandb>=0.17'), or set config.logging.wandb.enabled=False"
        )


def _new_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def run_id(workdir: str) -> str:
    """The workdir's wandb run id: the one in ``WORKDIR/wandb_run_id``, or a new one written there."""
    path = os.path.join(workdir, RUN_ID_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
        if not value or not all(c.isalnum() or c in "-_" for c in value):
            raise InputError(
                f"{path} holds {value!r}, not a wandb run id (letters, digits, '-', '_'): write the run's id "
                "there, or delete the file to start a new wandb run"
            )
        return value
    value = _new_id()
    files.write_atomic(path, value + "\n")
    return value


# wandb's transaction log (the .wandb file): a 7-byte header (":W&B", 0xBEE1, version), then the
# LevelDB log format in 32 KiB blocks: records with a 7-byte header (crc32 of the type byte and the
# data, length, type), a record split over blocks as FIRST, MIDDLE..., LAST; each record is one
# serialized wandb.proto Record.
_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: str) -> Iterator:
    """The ``wandb.proto.wandb_internal_pb2.Record`` messages of a ``.wandb`` file, in order, up to a
    torn or not yet written tail (a record whose checksum fails ends the file)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b":W&B":
        raise InputError(f"{path} is not a wandb transaction log (no ':W&B' header)")
    pos, parts = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        body = data[pos + _HEADER : pos + _HEADER + length]
        if kind not in (_FULL, _FIRST, _MIDDLE, _LAST) or len(body) < length:
            return
        if zlib.crc32(body, zlib.crc32(bytes([kind]))) != crc:
            return
        pos += _HEADER + length
        parts = body if kind in (_FULL, _FIRST) else parts + body
        if kind in (_FULL, _LAST):
            yield wandb_internal_pb2.Record.FromString(parts)
            parts = b""


def history(path: str) -> list[dict]:
    """The history rows of a ``.wandb`` file (``_step`` among their keys), values decoded from JSON."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def segments(workdir: str, rid: str) -> list[str]:
    """The ``.wandb`` files of run ``rid`` under ``WORKDIR/wandb``, one per process that ran it, oldest
    first: folders ``[offline-]run-YYYYmmdd_HHMMSS-ID``, with ``-N`` added by wandb to a second one
    started in the same second."""
    folder = re.compile(r"(?:offline-)?run-(\d{8}_\d{6})-" + re.escape(rid) + r"(?:-(\d+))?")
    found = []
    for path in glob.glob(os.path.join(workdir, "wandb", "*", f"run-{rid}.wandb")):
        match = folder.fullmatch(os.path.basename(os.path.dirname(path)))
        if match:
            found.append((match[1], int(match[2] or 0), path))
    return [path for *_, path in sorted(found)]


def last_local_step(workdir: str, rid: str) -> int:
    """The last step in the histories of the run's local ``.wandb`` files (-1: none)."""
    return max((row["_step"] for path in segments(workdir, rid) for row in history(path)), default=-1)


def numbers(row: dict) -> dict:
    """A metrics row's numeric values (what TensorBoard gets too), less its ``step``."""
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


def flat_numbers(tree: dict, prefix: str = "") -> dict:
    """``{"held_out": {"eval/loss": 1.0}}`` -> ``{"held_out/eval/loss": 1.0}``: the numbers only."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)):
            out[f"{prefix}{key}"] = value
    return out


class WandbTracker:
    """One process's part of the workdir's wandb run; steps up to ``floor`` are already in it."""

    def __init__(self, run, floor: int):
        self.run, self.floor = run, floor

    @classmethod
    def open(cls, config, workdir: str) -> WandbTracker | None:
        """Start (or continue) the workdir's wandb run and log metrics.jsonl's rows it lacks."""
        s = settings(config)
        if s is None:
            return None
        import wandb

        rid = run_id(workdir)
        earlier = last_local_step(workdir, rid)  # before init makes this process's folder
        try:
            run = wandb.init(
                project=s["project"],
                entity=s["entity"] or None,
                name=s["name"] or os.path.basename(os.path.normpath(workdir)),
                tags=[t.strip() for t in s["tags"].split(",") if t.strip()] or None,
                id=rid,
                resume="allow",
                dir=workdir,
                mode=s["mode"] or None,
                config=json.loads(config.to_json_best_effort()),
            )
        except wandb.Error as e:
            raise InputError(
                f"config.logging.wandb: wandb.init failed ({e}); run `wandb login` or set WANDB_API_KEY, "
                "or set config.logging.wandb.mode='offline' (upload later with `wandb sync`)"
            ) from None
        tracker = cls(run, max(earlier, run.starting_step - 1))
        path = os.path.join(workdir, "metrics.jsonl")  # cut back to the checkpoint's step
        rows = files.read_jsonl(path)[0] if os.path.exists(path) else []
        for row in rows:
            tracker.log(row["step"], row)
        return tracker

    def log(self, step: int, row: dict) -> None:
        """One metrics row at ``step`` (rows of one step merge into one history row)."""
        if step > self.floor:
            self.run.log(numbers(row), step=step)

    def close(self, results: dict | None = None) -> None:
        """eval.json's numbers into the run's summary (at the end of training); finish the run."""
        if results:
            self.run.summary.update(flat_numbers(results))
        self.run.finish()
