"""AOT fit check of LoRA KTO and DPO for the largest Llama of the paper and the largest Qwen3
(scripts/aot_check.py --sweep experiments/sweeps/lora_fit.py --smallest --out experiments/results/lora_fit:
the smallest v5p slice each fits on). FULL=1 in the environment adds the full fine-tuning rows (their
smallest-slice search compiles several 30B programs on the way up; experiments/results/qwen3_fit.md has
Qwen3-32B's).

LoRA: rank 16, alpha 32, every linear projection (q, k, v, o, gate, up, down), as TRL's and HALOs' peft
examples; its reference is the frozen base (one copy of the weights)."""

import os

from kto_jax.sweeps import product

LORA = {"model.lora.rank": 16, "model.lora.alpha": 32.0, "model.lora.targets": "all_linear"}


def get_sweep():
    runs = []
    for config, model in (("experiments/paper.py", "llama-30b"), ("experiments/qwen3_scale.py", "qwen3-32b")):
        if os.environ.get("FULL") == "1":
            runs += product(config, model=[model], loss=["kto", "dpo"])
        runs += product(config, overrides=LORA, model=[model], loss=["kto", "dpo"])
    return runs
