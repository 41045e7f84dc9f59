"""Tiny runs on the embedded synthetic task, on CPU.

    python -m kto_jax.train --config experiments/tiny.py:loss=kto --workdir runs/kto
    python -m kto_jax.train --config experiments/tiny.py:loss=sft,steps=600 --workdir runs/sft

Arguments (comma-separated key=value): loss (any registered name), model (a preset),
steps, init (an init source such as run:runs/sft).
"""

from kto_jax.config import base_config, loss_config


def parse_arg(arg: str) -> dict:
    out = {}
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config argument {item!r} is not key=value (e.g. experiments/tiny.py:loss=kto)")
        out[key.strip()] = value.strip()
    return out


def get_config(arg: str = ""):
    args = parse_arg(arg)
    unknown = set(args) - {"loss", "model", "steps", "init"}
    if unknown:
        raise ValueError(f"experiments/tiny.py: unknown arguments {sorted(unknown)}; use loss, model, steps, init")
    loss = args.get("loss", "kto")
    c = base_config()
    c.model.name = args.get("model", "tiny-1m")
    c.init.source = args.get("init", "")
    c.loss = loss_config(loss)
    c.data.update(dict(
        sources="synthetic", train_split="train", eval_split="test", tokenizer="bytes",
        chat_template="plain", max_length=32, max_prompt_length=16, bucket=16,
        sft_examples="all",  # the mixture: the SFT model writes both kinds, about half and half
    ))
    c.data.data_dir = "~/tensorflow_datasets"
    c.train.update(dict(global_batch_size=32, steps=int(args.get("steps", 200)), log_every=20, eval_batches=4))
    c.train.optimizer.update(dict(name="adamw", lr=1e-3 if loss in ("sft", "csft") else 1e-4, warmup_steps=20, grad_clip=1.0))
    c.eval.update(dict(judge="synthetic", num_prompts=512, batch_size=128, max_new_tokens=10, temperature=1.0))
    return c
