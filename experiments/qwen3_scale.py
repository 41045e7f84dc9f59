"""The scale curves on a modern ladder: Qwen3 0.6B-32B on UltraFeedback, SFT, DPO, KTO and
SFT+DPO / SFT+KTO, with HALOs main's recipe (the zephyr comparison's, experiments/zephyr.py).

    --config experiments/qwen3_scale.py:model=qwen3-8b,loss=sft,weights=/models/Qwen3-8B-Base
    --config experiments/qwen3_scale.py:model=qwen3-8b,loss=kto,sft=true,weights=/models/Qwen3-8B-Base

Arguments: model (a Qwen3 preset), loss (sft, dpo, kto), sft (true: start from the SFT run of the
same size, ``{runs}/sft_{model}``: SFT+DPO, SFT+KTO; false: align the base model), weights (a
Hugging Face folder with the base model's weights and tokenizer; the default, the preset name,
gives random weights: fine for AOT checks, not for training), runs (default runs/qwen3_scale).

Recipe (``kto_jax.config.halos_main_optimizer`` cites each value): AdamW lr 5e-6, betas (0.9,
0.999), weight decay 0.01, 10% warmup from 0.1 lr, cosine for SFT and constant for DPO/KTO, grad
clip 1.0; max_length 1250, max_prompt_length 625; batch 32, one epoch; beta 0.1; seed 1 as the
paper's runs. Data: HuggingFaceH4/ultrafeedback_binarized (train_prefs / test_prefs); KTO takes
the pairs' chosen replies as desirable and rejected as undesirable (the paper's conversion).
Chat template: the tokenizer folder's own (Qwen3's, with weights), else HALOs' format. bf16
compute, float32 params and optimizer state; examples packed into rows of 1280 tokens (a multiple
of the splash kernel's 128-token blocks, the TPU targets' attention).

Each size carries its target slice, mesh and remat policy (``TARGETS``; scripts/aot_check.py
--sweep experiments/sweeps/qwen3_fit.py compiles them and docs/paper.md has the table). At the
end 512 held-out prompts are sampled (``samples.jsonl``) for the judge (scripts/judge.py), and
scripts/plot_scale.py draws win rate against size as for the paper's suites.
"""

from kto_jax.config import base_config, halos_main_optimizer, halos_main_ultrafeedback, loss_config, parse_arg
from kto_jax.errors import InputError

MODELS = ("qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b")
LOSSES = ("sft", "dpo", "kto")
ARGS = ("model", "loss", "sft", "weights", "runs")
SEED = 1
PACK_LENGTH = 1280

# target slice, mesh and memory policy per size (global batch 32, rows of 1280 tokens): the smallest
# slice each fits on (experiments/results/qwen3_fit.md, scripts/aot_check.py --smallest), one larger
# where that left under 10 GiB per chip (14B DPO 8.1 on v5p-8, 32B KTO 3.5 on v5p-16)
TARGETS = {
    "qwen3-0.6b": dict(topology="v5p-8", mesh=dict(data=1, fsdp=-1, tensor=1), remat="dots_no_batch"),
    "qwen3-1.7b": dict(topology="v5p-8", mesh=dict(data=1, fsdp=-1, tensor=1), remat="dots_no_batch"),
    "qwen3-4b": dict(topology="v5p-8", mesh=dict(data=1, fsdp=-1, tensor=1), remat="full"),
    "qwen3-8b": dict(topology="v5p-8", mesh=dict(data=1, fsdp=-1, tensor=1), remat="full"),
    "qwen3-14b": dict(topology="v5p-16", mesh=dict(data=1, fsdp=-1, tensor=1), remat="full"),
    "qwen3-32b": dict(topology="v5p-32", mesh=dict(data=1, fsdp=-1, tensor=2), remat="full"),
}


def get_config(arg: str = ""):
    args = parse_arg(arg, ARGS, "experiments/qwen3_scale.py")
    model, loss = args.get("model", "qwen3-0.6b"), args.get("loss", "kto")
    if model not in TARGETS:
        raise InputError(f"experiments/qwen3_scale.py: model={model!r} is not in the ladder {MODELS}")
    if loss not in LOSSES:
        raise InputError(f"experiments/qwen3_scale.py: loss={loss!r}; use one of {', '.join(LOSSES)}")
    sft = args.get("sft", "false").lower()
    if sft not in ("true", "false"):
        raise InputError(f"experiments/qwen3_scale.py: sft={sft!r}: use true or false")
    runs, weights, target = args.get("runs", "runs/qwen3_scale"), args.get("weights", ""), TARGETS[model]

    c = base_config()
    c.seed = SEED
    c.model.name = weights or model
    c.model.update(
        dict(compute_dtype="bfloat16", param_dtype="float32", remat_policy=target["remat"], attention_impl="splash")
    )
    c.init.source = f"orbax:{runs}/sft_{model}" if sft == "true" and loss != "sft" else ""
    c.loss = loss_config(loss)
    c.data.update(
        dict(
            **halos_main_ultrafeedback(weights, "tokenizer" if weights else "halos"),
            packing=True,
            pack_length=PACK_LENGTH,
        )
    )
    c.train.update(dict(global_batch_size=32, steps=0, log_every=10, eval_every=0))
    c.train.optimizer.update(halos_main_optimizer(loss))
    c.mesh.update(target["mesh"])
    c.target.topology = target["topology"]
    c.checkpoint.update(dict(every_minutes=30.0, keep_last=2))
    c.eval.update(dict(evaluators="held_out,samples", judge="", num_prompts=512, max_new_tokens=512))
    return c
