"""CLI: python -m kto_jax.online --config experiments/online.py[:ARGS] --workdir DIR [--config.key=value ...]

Runs every online round of the config (kto_jax/online/rounds.py) in DIR; rerunning the same
command resumes where a run stopped. Console and errors as ``python -m kto_jax.train``: bad
input is one ``error:`` line on stderr with exit status 2 (``--verbosity=1`` adds the traceback).
"""

from __future__ import annotations

import sys

from absl import app

from kto_jax import sharding
from kto_jax.checkpoint import CheckpointNotSaved
from kto_jax.online import rounds
from kto_jax.train.__main__ import (
    _CONFIG,
    _RESUME_WITH_CHANGES,
    _WORKDIR,
    INPUT_ERRORS,
    _failing_in_one_line,
    _last_line,
    check_overrides,
    fail,
    parse_flags,
    quiet_by_default,
)


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]}; the flags are --config, --workdir and --config.<field>=<value>")
    if _RESUME_WITH_CHANGES.value:
        fail(
            "--resume_with_changes: an online run resumes only with its own config (each round's run is checked "
            "against it); use a new --workdir for another config"
        )
    try:
        config = _CONFIG.value
        config.seed  # noqa: B018  (a config that failed to load raises on first use)
    except OSError as e:
        fail(f"--config: {_last_line(e)}")
    if "online" not in config:
        fail(
            "--config: this config has no 'online' section; use experiments/online.py or add config.online "
            "(its fields: experiments/online.py)"
        )
    quiet_by_default()
    sharding.initialize_distributed()
    _failing_in_one_line(INPUT_ERRORS + (CheckpointNotSaved,), rounds.run, config, _WORKDIR.value)


if __name__ == "__main__":
    problem = check_overrides(sys.argv)
    if problem:
        fail(problem)
    app.run(main, flags_parser=parse_flags)
