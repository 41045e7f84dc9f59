"""Mistral-7B on UltraFeedback (the KTO paper's Zephyr-beta comparison): SFT, then DPO, KTO,
or KTO with one completion per prompt.

    --config experiments/zephyr.py:loss=sft
    --config experiments/zephyr.py:loss=kto,one_y=true,weights=/models/Mistral-7B-v0.1

Data: HuggingFaceH4/ultrafeedback_binarized (train_prefs / test_prefs); the aligned runs start
from this sweep's SFT run (``{runs}/zephyr_sft``); bf16 compute.

Optimizer, schedule and lengths are HALOs main's (``kto_jax.config.halos_main_optimizer`` cites
each value): AdamW lr 5e-6, 10% warmup from 0.1 lr, cosine for SFT and constant for DPO/KTO, grad
clip 1.0, max_length 1250, max_prompt_length 625, batch 32, one epoch.
"""

from kto_jax.config import base_config, halos_main_optimizer, halos_main_ultrafeedback, loss_config, parse_arg
from kto_jax.errors import InputError

ARGS = ("loss", "one_y", "weights", "runs")


def get_config(arg: str = ""):
    args = parse_arg(arg, ARGS, "experiments/zephyr.py")
    loss = args.get("loss", "kto")
    if loss not in ("sft", "dpo", "kto"):
        raise InputError(f"experiments/zephyr.py: loss={loss!r}; use sft, dpo or kto")
    one_y = args.get("one_y", "false") == "true"
    if one_y and loss != "kto":
        raise InputError("experiments/zephyr.py: one_y=true is a KTO variant (one completion per prompt)")
    runs, weights = args.get("runs", "runs/zephyr"), args.get("weights", "")
    c = base_config()
    c.model.name = weights or "mistral-7b"
    c.model.update(dict(compute_dtype="bfloat16", param_dtype="float32", remat_policy="full"))
    c.init.source = "" if loss == "sft" else f"orbax:{runs}/zephyr_sft"
    c.loss = loss_config(loss)
    c.data.update(
        dict(
            **halos_main_ultrafeedback(weights, "halos"),
            one_y_per_x=one_y,
        )
    )
    c.train.update(dict(global_batch_size=32, steps=0))
    c.train.optimizer.update(halos_main_optimizer(loss))
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.target.topology = "v5p-16"
    return c
