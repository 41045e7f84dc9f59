"""The paper's suite: every model size times every method, from the base model and after SFT.

SFT runs come first; the "sft=true" runs start from the SFT run of the same model
(runs/paper/sft_{model}), so launch this sweep in two waves or with a scheduler that
orders them (SLURM: run the sft_* runs, then the rest).
"""

from kto_jax.sweeps import product

MODELS = ["pythia-1.4b", "pythia-2.8b", "pythia-6.9b", "pythia-12b", "llama-7b", "llama-13b", "llama-30b"]


def get_sweep():
    runs = [
        {**r, "name": f"sft_{r['args']['model']}"} for r in product("experiments/paper.py", model=MODELS, loss=["sft"])
    ]
    for sft in ("false", "true"):
        runs += product("experiments/paper.py", model=MODELS, loss=["csft", "slic", "dpo", "ppo", "kto"], sft=[sft])
    return runs
