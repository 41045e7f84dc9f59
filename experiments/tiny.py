"""Tiny runs on the embedded synthetic task, on CPU.

    python -m kto_jax.train --config experiments/tiny.py:loss=sft,steps=600 --workdir runs/sft
    python -m kto_jax.train --config experiments/tiny.py:loss=kto,init=orbax:runs/sft --workdir runs/kto

Arguments (comma-separated key=value): loss (any registered name), model (a preset),
steps, init (an init source such as orbax:runs/sft).
"""

from kto_jax.config import tiny_config

ARGS = ("loss", "model", "steps", "init")


def parse_arg(arg: str) -> dict:
    out = {}
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config argument {item!r} is not key=value (e.g. experiments/tiny.py:loss=kto)")
        out[key.strip()] = value.strip()
    unknown = set(out) - set(ARGS)
    if unknown:
        raise ValueError(f"experiments/tiny.py: unknown arguments {sorted(unknown)}; use {', '.join(ARGS)}")
    return out


def get_config(arg: str = ""):
    return tiny_config(**parse_arg(arg))
