"""KTO under data imbalance (KTO paper, section 4.3 and its "fracdata" runs).

    --config experiments/imbalance.py:desirable_fraction=0.1
    --config experiments/imbalance.py:undesirable_fraction=0.05,model=llama-7b

Keeps a fraction of one class and reweights it as the paper did, so that
desirable_weight * n_D / (undesirable_weight * n_U) stays at most 4/3:
desirable_weight = (4/3) / desirable_fraction, or undesirable_weight = 0.75 / undesirable_fraction
(the paper's runs: 0.1 -> 13.33, 0.01 -> 133.33; 0.1 -> 7.5). Everything else is the paper
suite's KTO config (experiments/paper.py), after SFT.
"""

import importlib.util
import os

from kto_jax.config import parse_arg

ARGS = ("desirable_fraction", "undesirable_fraction", "model", "data", "runs")


def _paper():
    spec = importlib.util.spec_from_file_location("paper", os.path.join(os.path.dirname(__file__), "paper.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = ""):
    args = parse_arg(arg, ARGS, "experiments/imbalance.py")
    fd, fu = float(args.get("desirable_fraction", 1.0)), float(args.get("undesirable_fraction", 1.0))
    if fd < 1.0 and fu < 1.0:
        raise ValueError("experiments/imbalance.py: drop one class at a time (desirable_fraction or undesirable_fraction)")
    paper_arg = f"model={args.get('model', 'llama-7b')},loss=kto,sft=true,data={args.get('data', 'shp+hh+oasst')}"
    if "runs" in args:
        paper_arg += f",runs={args['runs']}"
    c = _paper().get_config(paper_arg)
    c.data.desirable_fraction, c.data.undesirable_fraction = fd, fu
    c.loss.desirable_weight = (4.0 / 3.0) / fd if fd < 1.0 else 1.0
    c.loss.undesirable_weight = 0.75 / fu if fu < 1.0 else 1.0
    return c
