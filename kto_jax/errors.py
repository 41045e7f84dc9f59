"""The exceptions of bad input: what the CLIs print as one ``error:`` line (exit status 2).

    InputError     bad input: a config field, data (a file, a record), a checkpoint, a workdir,
                   a model folder, a tokenizer, a CLI flag, a judge's or server's setting
    MissingInput   a file or folder the input names is not there (also a FileNotFoundError)

Every check of user input raises one of these (or a subclass: checkpoint.IncompatibleCheckpoint,
data.schemas.BadRecord, ...) with a message naming the field or file, the problem and the fix.
Any other exception (a ValueError from a bug among them) is not bad input and keeps its traceback.
This module imports nothing of kto_jax, so every module can raise them.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input (config, data, checkpoint, workdir, CLI): the CLI prints it as one line and exits 2."""


class MissingInput(InputError, FileNotFoundError):
    """A file or folder the input names is not there."""
