"""AOT fit check of KTO and DPO for every paper model size (scripts/aot_check.py --sweep)."""

from kto_jax.sweeps import product

MODELS = ["pythia-1.4b", "pythia-2.8b", "pythia-6.9b", "pythia-12b", "llama-7b", "llama-13b", "llama-30b"]


def get_sweep():
    return product("experiments/paper.py", model=MODELS, loss=["kto", "dpo"])
