"""Mistral-7B on UltraFeedback (the KTO paper's Zephyr-beta comparison): SFT, then DPO, KTO,
or KTO with one completion per prompt.

    --config experiments/zephyr.py:loss=sft
    --config experiments/zephyr.py:loss=kto,one_y=true,weights=/models/Mistral-7B-v0.1

Data: HuggingFaceH4/ultrafeedback_binarized (train_prefs / test_prefs); the aligned runs start
from this sweep's SFT run (``{runs}/zephyr_sft``). Optimizer: the current HALOs defaults,
AdamW lr 5e-6 with 150 warmup steps; global batch 32; max_length 2048 (prompt 1024); bf16.
"""

from kto_jax.config import base_config, loss_config, parse_arg

ARGS = ("loss", "one_y", "weights", "runs")


def get_config(arg: str = ""):
    args = parse_arg(arg, ARGS, "experiments/zephyr.py")
    loss = args.get("loss", "kto")
    if loss not in ("sft", "dpo", "kto"):
        raise ValueError(f"experiments/zephyr.py: loss={loss!r}; use sft, dpo or kto")
    one_y = args.get("one_y", "false") == "true"
    if one_y and loss != "kto":
        raise ValueError("experiments/zephyr.py: one_y=true is a KTO variant (one completion per prompt)")
    runs, weights = args.get("runs", "runs/zephyr"), args.get("weights", "")
    c = base_config()
    c.model.name = weights or "mistral-7b"
    c.model.update(dict(compute_dtype="bfloat16", param_dtype="float32", remat_policy="full"))
    c.init.source = "" if loss == "sft" else f"orbax:{runs}/zephyr_sft"
    c.loss = loss_config(loss)
    c.data.update(dict(sources="ultrafeedback", train_split="train_prefs", eval_split="test_prefs", tokenizer=weights,
                       chat_template="halos", max_length=2048, max_prompt_length=1024, one_y_per_x=one_y))
    c.train.update(dict(global_batch_size=32, steps=0))
    c.train.optimizer.update(dict(name="adamw", lr=5e-6, warmup_steps=150, grad_clip=10.0))
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.target.topology = "v5p-16"
    return c
