"""tiny_scale: SFT, then KTO and DPO after SFT, for three tiny sizes (CPU, about an hour on 2 cores)."""

from kto_jax.sweeps import product

MODELS = ["tiny-1m", "tiny-5m", "tiny-25m"]


def get_sweep():
    runs = [
        {**r, "name": f"sft_{r['args']['model']}"}
        for r in product("experiments/tiny_scale.py", model=MODELS, loss=["sft"])
    ]
    return runs + product("experiments/tiny_scale.py", model=MODELS, loss=["kto", "dpo"], sft=["true"])
