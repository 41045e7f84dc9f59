"""AOT fit check of SFT, DPO and KTO for every Qwen3 size (scripts/aot_check.py --sweep)."""

from kto_jax.sweeps import product

MODELS = ["qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b"]


def get_sweep():
    return product("experiments/qwen3_scale.py", model=MODELS, loss=["kto", "dpo"])
