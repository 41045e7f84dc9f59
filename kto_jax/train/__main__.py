"""CLI: python -m kto_jax.train --config experiments/NAME.py[:ARGS] --workdir DIR [--config.key=value ...]

The console shows the progress bar, the run's events (resume, caches, judged rates) and
warnings; ``--verbosity=0`` (absl's flag) brings back every library's INFO log (orbax's
per-checkpoint lines among them).

Bad input (config values, data, tokenizer, checkpoints, a workdir holding a run with another
config) is a :class:`kto_jax.errors.InputError`: one line on stderr, ``error: <field or file>: <problem>;
<fix>``, exit status 2, and nothing in the workdir is touched; ``--verbosity=1`` adds the traceback.
Anything else (a bug, a ValueError that is not an InputError among them, a device failure) shows
its traceback.
"""

from __future__ import annotations

import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from kto_jax import sharding
from kto_jax.checkpoint import CheckpointNotSaved
from kto_jax.errors import InputError
from kto_jax.sweeps import load_config
from kto_jax.train.loop import execute, prepare

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/NAME.py[:ARGS]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, evals and checkpoints.")
_RESUME_WITH_CHANGES = flags.DEFINE_bool(
    "resume_with_changes",
    False,
    "Continue the run in --workdir although its config differs in fields that change "
    "training (recorded in WORKDIR/config_changes.jsonl); without it such a difference is an error.",
)
flags.mark_flags_as_required(["config", "workdir"])

# what a run's checks raise on bad input (kto_jax.train.loop.prepare: nothing is written yet): every
# input exception is a kto_jax.errors.InputError (MissingInput, UnreadableCheckpoint, BadRecord, ...);
# any other exception, a ValueError of a bug among them, keeps its traceback
INPUT_ERRORS = (InputError,)


def check_overrides(argv: list[str]) -> str | None:
    """A clear message for a ``--config.a.b=v`` whose key the config does not have (the locked
    config would otherwise fail with a bare AttributeError), else None."""
    spec, keys = None, []
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
        elif arg.startswith("--config."):
            keys.append(arg[len("--config.") :].split("=", 1)[0])
    if not spec or not keys:
        return None
    try:
        config = load_config(spec)
    except Exception:  # a bad --config itself: config_flags reports it
        return None
    for key in keys:
        node, parts = config, key.split(".")
        for j, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(["config", *parts[:j]])
                fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                message = f"--config.{key}: {where} has no field {part!r}; its fields: {fields}"
                if parts[0] == "loss":
                    message += (
                        f". Loss {config.loss.name!r} takes {sorted(k for k in config.loss if k != 'name')}; "
                        f"for another loss choose it in the experiment argument ({spec.split(':')[0]}:loss=NAME)"
                    )
                return message
            node = node[part]
    return None


def quiet_by_default() -> None:
    """Library INFO logs (orbax writes ~30 lines per checkpoint) stay hidden unless --verbosity is given."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()  # dataset preparation's per-split bars; data_stats.json has the counts


def fail(message: str) -> None:
    """One ``error: ...`` line per line of the message on stderr, exit status 2."""
    for line in str(message).strip().splitlines() or ["(no message)"]:
        print(f"error: {line}", file=sys.stderr)
    sys.exit(2)


def _last_line(text: str) -> str:
    """The last non-blank line of an error text (config_flags quotes a whole traceback)."""
    return [line for line in str(text).splitlines() if line.strip()][-1].strip()


def _failing_in_one_line(errors, fn, *args):
    """``fn(*args)``, with ``errors`` as one ``error:`` line (the traceback with --verbosity >= 1)."""
    try:
        return fn(*args)
    except errors as e:
        if flags.FLAGS["verbosity"].value >= 1:
            raise
        fail(str(e))


def main(argv):
    if len(argv) > 1:
        fail(
            f"unexpected arguments: {argv[1:]}; the flags are --config, --workdir, --config.<field>=<value> and "
            "--resume_with_changes (see --helpfull)"
        )
    try:
        config = _CONFIG.value
        config.seed  # noqa: B018  (a config that failed to load raises on first use)
    except OSError as e:  # config_flags defers a missing or unloadable experiment file to here
        fail(f"--config: {_last_line(e)}")
    quiet_by_default()
    sharding.initialize_distributed()
    prepared = _failing_in_one_line(
        INPUT_ERRORS, lambda: prepare(config, _WORKDIR.value, resume_with_changes=_RESUME_WITH_CHANGES.value)
    )
    _failing_in_one_line(CheckpointNotSaved, execute, prepared)  # a full disk: one line, the way to resume in it


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad flag or experiment argument as one ``error:`` line (exit 2)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        text = str(e)
        if (
            "Traceback (most recent call last)" in text
        ):  # config_flags quotes the experiment's traceback: keep its error
            fail(f"{text.split(':', 1)[0]}: {_last_line(text).split(': ', 1)[-1]}")
        fail(f"{text}; see --helpfull")
    except OSError as e:  # an override (--config.a.b=v) on an experiment file that failed to load
        fail(f"--config: {_last_line(e)}")


if __name__ == "__main__":
    problem = check_overrides(sys.argv)
    if problem:
        fail(problem)
    app.run(main, flags_parser=parse_flags)
