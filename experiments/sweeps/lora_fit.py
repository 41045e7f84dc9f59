"""AOT fit check of LoRA against full fine-tuning, KTO and DPO, for the largest Llama of the paper and the
largest Qwen3 (scripts/aot_check.py --sweep ... --smallest: the smallest v5p slice each fits on).

LoRA: rank 16, alpha 32, every linear projection (q, k, v, o, gate, up, down), as TRL's and HALOs' peft
examples; its reference is the frozen base (one copy of the weights)."""

from kto_jax.sweeps import product

LORA = {"model.lora.rank": 16, "model.lora.alpha": 32.0, "model.lora.targets": "all_linear"}


def get_sweep():
    runs = []
    for config, model in (("experiments/paper.py", "llama-30b"), ("experiments/qwen3_scale.py", "qwen3-32b")):
        runs += product(config, model=[model], loss=["kto", "dpo"])
        runs += product(config, overrides=LORA, model=[model], loss=["kto", "dpo"])
    return runs
