"""KTO under data imbalance (KTO paper, section 4.3 and its "fracdata" runs).

    --config experiments/imbalance.py:desirable_fraction=0.1
    --config experiments/imbalance.py:undesirable_fraction=0.05,model=llama-7b

Keeps a fraction of one class and reweights it as the paper did, so that
desirable_weight * n_D / (undesirable_weight * n_U) stays near 4/3: the published runs'
weights for their fractions (``PUBLISHED_WEIGHTS``, from the configs in
``shared/reference/archangel_gpt4_judgments.jsonl``: rounded by hand, e.g. 5.32 for 0.25), else
desirable_weight = (4/3) / desirable_fraction or undesirable_weight = 0.75 / undesirable_fraction.
Everything else is the paper suite's KTO config (experiments/paper.py) from the base model
(the published fracdata runs have ``load_from: null``), judged on 256 prompts as they were.
"""

import importlib.util
import os

from kto_jax.config import parse_arg
from kto_jax.errors import InputError

ARGS = ("desirable_fraction", "undesirable_fraction", "model", "data", "runs")
# (class, fraction kept) -> its weight in the published fracdata_kto_llama7b runs
PUBLISHED_WEIGHTS = {
    ("desirable", 0.5): 2.66,
    ("desirable", 0.25): 5.32,
    ("desirable", 0.1): 13.33,
    ("desirable", 0.05): 26.66,
    ("desirable", 0.01): 133.33,
    ("undesirable", 0.5): 1.5,
    ("undesirable", 0.25): 3.0,
    ("undesirable", 0.1): 7.5,
    ("undesirable", 0.05): 15.04,
    ("undesirable", 0.01): 75.18,
}
NUM_PROMPTS = 256  # the fracdata runs were judged on 256 prompts (the suite on 512)


def class_weight(kind: str, fraction: float) -> float:
    """The weight of a class kept at ``fraction``: the published one, else (4/3) / f (desirable)
    or 0.75 / f (undesirable); 1 for a class kept whole."""
    if fraction >= 1.0:
        return 1.0
    return PUBLISHED_WEIGHTS.get((kind, fraction), (4.0 / 3.0 if kind == "desirable" else 0.75) / fraction)


def _paper():
    spec = importlib.util.spec_from_file_location("paper", os.path.join(os.path.dirname(__file__), "paper.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str = ""):
    args = parse_arg(arg, ARGS, "experiments/imbalance.py")
    fd, fu = float(args.get("desirable_fraction", 1.0)), float(args.get("undesirable_fraction", 1.0))
    if fd < 1.0 and fu < 1.0:
        raise InputError(
            "experiments/imbalance.py: drop one class at a time (desirable_fraction or undesirable_fraction)"
        )
    paper_arg = f"model={args.get('model', 'llama-7b')},loss=kto,sft=false,data={args.get('data', 'shp+hh+oasst')}"
    if "runs" in args:
        paper_arg += f",runs={args['runs']}"
    c = _paper().get_config(paper_arg)
    c.data.desirable_fraction, c.data.undesirable_fraction = fd, fu
    c.loss.desirable_weight = class_weight("desirable", fd)
    c.loss.undesirable_weight = class_weight("undesirable", fu)
    c.eval.num_prompts = NUM_PROMPTS
    return c
