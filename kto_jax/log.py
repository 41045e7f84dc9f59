"""Lines for the person running the job: :func:`note` (process 0's stderr, above the progress bar,
and the absl log)."""

from __future__ import annotations

import sys

import jax
from absl import logging
from tqdm import tqdm


def note(message: str) -> None:
    """A line for the person running the job (process 0's stderr, above the progress bar), also logged."""
    logging.info("%s", message)
    if jax.process_index() == 0:
        tqdm.write(message, file=sys.stderr)
