"""Mistral-7B on UltraFeedback (the KTO paper's Zephyr-beta comparison): SFT, then DPO, KTO,
or KTO with one completion per prompt.

    --config experiments/zephyr.py:loss=sft
    --config experiments/zephyr.py:loss=kto,one_y=true,weights=/models/Mistral-7B-v0.1

Data: HuggingFaceH4/ultrafeedback_binarized (train_prefs / test_prefs); the aligned runs start
from this sweep's SFT run (``{runs}/zephyr_sft``); bf16 compute.

Optimizer, schedule and lengths mirror ContextualAI/HALOs branch ``main`` at commit 4831988
(2025-09-30): config/config.yaml with config/model/base_model.yaml (config/model/mistral.yaml
changes none of them) and the optimizer/scheduler of launch.py:

    AdamW lr 5e-6, betas (0.9, 0.999), weight decay 0.01  config.yaml:50,71-80; launch.py:264
    eps 1e-8: config.yaml:83 says eps 1e-5, but launch.py:264 never passes it, so torch.optim.AdamW's
              default 1e-8 is what HALOs main runs
    warmup 10% of the steps, linear from 0.1 lr to lr     config.yaml:86; launch.py:272-273 (LinearLR start_factor 0.1)
    then cosine to 0 for SFT, constant for DPO/KTO        launch.py:275-278 (cosine only for the SFTDataLoader)
    grad clip 1.0 (global norm)                           base_model.yaml:25
    max_length 1250, max_prompt_length 625                base_model.yaml:31,34
    batch 32, one epoch                                   base_model.yaml:40; config.yaml:53
"""

from kto_jax.config import base_config, loss_config, parse_arg
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
            sources="ultrafeedback",
            train_split="train_prefs",
            eval_split="test_prefs",
            tokenizer=weights,
            chat_template="halos",
            max_length=1250,
            max_prompt_length=625,
            one_y_per_x=one_y,
        )
    )
    c.train.update(dict(global_batch_size=32, steps=0))
    c.train.optimizer.update(
        dict(  # HALOs main (module docstring)
            name="adamw",
            lr=5e-6,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            grad_clip=1.0,
            schedule="cosine" if loss == "sft" else "constant",
            warmup_ratio=0.1,
            warmup_start_factor=0.1,
        )
    )
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.target.topology = "v5p-16"
    return c
