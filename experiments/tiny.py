"""Tiny runs on the embedded synthetic task, on CPU.

    python -m kto_jax.train --config experiments/tiny.py:loss=sft,steps=600 --workdir runs/sft
    python -m kto_jax.train --config experiments/tiny.py:loss=kto,init=orbax:runs/sft --workdir runs/kto

Arguments (comma-separated key=value): loss (any registered name), model (a preset),
steps, init (an init source such as orbax:runs/sft).
"""

from kto_jax.config import parse_arg, tiny_config

ARGS = ("loss", "model", "steps", "init")


def get_config(arg: str = ""):
    return tiny_config(**parse_arg(arg, ARGS, "experiments/tiny.py"))
