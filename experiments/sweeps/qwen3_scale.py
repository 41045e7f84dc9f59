"""qwen3_scale: SFT of every Qwen3 size, then DPO and KTO from the base and after SFT (30 runs).

    python scripts/sweep.py experiments/sweeps/qwen3_scale.py --root runs/qwen3_scale --launcher slurm

The "sft=true" runs start from the SFT run of the same size (runs/qwen3_scale/sft_{model}), so
launch in two waves (the sft_* runs first) or with a scheduler that orders them. Each run reads
its size's base model from WEIGHTS (edit it to where the Hugging Face folders are).
"""

from kto_jax.sweeps import product

MODELS = ["qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b"]
WEIGHTS = "/models/Qwen3-{size}-Base"  # a folder per size, e.g. /models/Qwen3-8B-Base


def _weights(model: str) -> str:
    return WEIGHTS.format(size=model.removeprefix("qwen3-").upper())


def get_sweep():
    runs = []
    for model in MODELS:
        w = _weights(model)
        runs += [
            {**r, "name": f"sft_{model}"}
            for r in product("experiments/qwen3_scale.py", model=[model], loss=["sft"], weights=[w])
        ]
        runs += product(
            "experiments/qwen3_scale.py", model=[model], loss=["dpo", "kto"], sft=["false", "true"], weights=[w]
        )
    return runs
