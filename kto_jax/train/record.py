"""A run's record in its workdir, kept true: the config the checkpoints came from, and every change.

    resume = check_resume(config, workdir, allow_changes)   # before anything is loaded; writes nothing
    write_start(workdir, config, resume, data_stats, first, steps)  # once every check has passed

A workdir with checkpoints (or a finished evaluation) holds a run. Rerunning it with a config
that differs only in :data:`kto_jax.train.rules.RESUMABLE` fields continues it and appends the
change to ``config_changes.jsonl``; any other difference is an :class:`InputError` naming each
field with both values, unless ``--resume_with_changes`` (then the change is recorded with
``"forced": true``). The same config on a finished run is a no-op that touches nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os

import jax

from kto_jax import files
from kto_jax.checkpoint import CHECKPOINT_DIR, complete_steps
from kto_jax.config import base_config
from kto_jax.errors import InputError
from kto_jax.train.rules import (
    ABSENT,
    config_diff,
    disallowed_on_resume,
    flatten,
)

CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.jsonl"
EVAL_FILE = "eval.json"


@dataclasses.dataclass(frozen=True)
class Resume:
    """What :func:`check_resume` found: the saved config's differences, or a finished run's results."""

    changes: tuple = ()  # ((field, saved, new), ...) to record
    forced: bool = False  # some of them are outside RESUMABLE (--resume_with_changes)
    finished: dict | None = None  # eval.json of a finished run rerun with the same config
    checkpoint_step: int | None = None


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of the workdir's complete checkpoints."""
    return complete_steps(os.path.join(workdir, CHECKPOINT_DIR))


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(
            f"{path} is not readable JSON ({e}): restore it from the run's copy "
            "(checkpoints/<step>/meta holds the config) or use a new --workdir"
        ) from None


def _show(value) -> str:
    return json.dumps(value) if not isinstance(value, str) or value == "(absent)" else repr(value)


def _without_new_defaults(diff: list[tuple]) -> list[tuple]:
    """The diff less the fields the saved config predates (added to kto_jax since) at their
    default: those are no change."""
    if not any(old == ABSENT for _, old, _ in diff):
        return diff

    defaults = flatten(base_config().to_dict())
    return [(f, old, new) for f, old, new in diff if not (old == ABSENT and f in defaults and defaults[f] == new)]


def check_resume(config, workdir: str, allow_changes: bool = False) -> Resume:
    """Compare ``config`` with the run already in ``workdir`` (see the module docstring)."""
    steps = checkpoint_steps(workdir)
    eval_path = os.path.join(workdir, EVAL_FILE)
    config_path = os.path.join(workdir, CONFIG_FILE)
    if not steps and not os.path.exists(eval_path):
        return Resume()  # a fresh workdir, or a run that died before its first checkpoint: nothing to protect
    if not os.path.exists(config_path):
        raise InputError(
            f"{workdir} holds a run (checkpoints or eval.json) but no {CONFIG_FILE}, so this config cannot "
            "be checked against the one it was trained with: restore config.json or use a new --workdir"
        )
    diff = _without_new_defaults(config_diff(_read_json(config_path), json.loads(config.to_json_best_effort())))
    step = steps[-1] if steps else None
    if not diff and os.path.exists(eval_path):
        results = _read_json(eval_path)
        if step is None or results.get("step") == step:
            return Resume(finished=results, checkpoint_step=step)
    bad = disallowed_on_resume(diff)
    if bad and not allow_changes:
        listed = "; ".join(f"config.{field}: {_show(old)} (saved) -> {_show(new)} (now)" for field, old, new in bad)
        raise InputError(
            f"{workdir} holds a run trained with another config ({len(bad)} field(s) differ: {listed}). Use a new --workdir "
            f"for the new config, or pass --resume_with_changes to continue this run with it (recorded in {CHANGES_FILE})"
        )
    return Resume(changes=tuple(diff), forced=bool(bad), checkpoint_step=step)


def check_steps(first: int, steps: int) -> None:
    """A resumed run cannot be shortened below the step its checkpoint is at."""
    if first > steps:
        raise InputError(
            f"config.train.steps={steps}: the run's checkpoint is already at step {first}; use "
            f"train.steps >= {first} to extend it, or a new --workdir for a shorter run"
        )


def _final_eval_row(row: dict) -> bool:
    return all(k == "step" or k.startswith("eval/") for k in row)


def truncate_metrics(workdir: str, step: int, steps: int | None = None) -> None:
    """Drop metrics.jsonl rows past ``step`` (written by a run that died after its last checkpoint)
    and a torn last line; rewritten atomically. When ``step == steps`` (training was complete and
    only the final evaluation is redone) that evaluation's held-out row goes too."""
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    rows, torn = files.read_jsonl(path)
    kept = [
        row
        for row in rows
        if row["step"] < step or (row["step"] == step and not (step == steps and _final_eval_row(row)))
    ]
    if torn or len(kept) < len(rows):
        files.write_jsonl(path, kept)


def write_start(workdir: str, config, resume: Resume, data_stats: dict, first: int, steps: int) -> None:
    """The run's record once every check has passed: config.json, data_stats.json, the change
    (if any) appended to config_changes.jsonl, metrics.jsonl cut back to the restored step, and
    an earlier eval.json removed (it describes the run before this config; the run writes a new
    one at its end, so a run killed before then is not taken for finished)."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    truncate_metrics(workdir, first, steps)
    if os.path.exists(os.path.join(workdir, EVAL_FILE)):
        os.remove(os.path.join(workdir, EVAL_FILE))
    if resume.changes:
        row = {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "step": first,
            "forced": resume.forced,
            "changes": [{"field": f, "saved": a, "new": b} for f, a, b in resume.changes],
        }
        files.append_lines(os.path.join(workdir, CHANGES_FILE), [json.dumps(row)])
    files.write_atomic(os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2))
    files.write_json(os.path.join(workdir, "data_stats.json"), data_stats)
