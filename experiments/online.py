"""Online rounds on the embedded synthetic task (kto_jax/online/rounds.py), on CPU.

    python -m kto_jax.train --config experiments/tiny.py:loss=sft,steps=600 --workdir runs/sft
    python -m kto_jax.online --config experiments/online.py:init=orbax:runs/sft --workdir runs/online

Each round samples ``samples`` completions for each of ``prompts`` new training prompts from
the current policy, labels them with the exact judge and trains ``steps`` steps of ``loss`` on
them, starting from (and referenced to) the last round's weights. Arguments (comma-separated
key=value): loss, model, init, rounds, prompts, samples, steps, feedback (binary|pairwise).
For your own task: ``config.data.sources`` (the prompts and the held-out split),
``config.online.judge`` (an exact judge or ``reward_model`` with ``config.eval.reward_model.path``).
"""

import ml_collections

from kto_jax.config import parse_arg, tiny_config

ARGS = ("loss", "model", "init", "rounds", "prompts", "samples", "steps", "feedback")


def get_config(arg: str = ""):
    a = parse_arg(arg, ARGS, "experiments/online.py")
    c = tiny_config(
        loss=a.get("loss", "kto"),
        steps=int(a.get("steps", 64)),
        init=a.get("init", ""),
        model=a.get("model", "tiny-1m"),
    )
    c.train.optimizer.warmup_steps = 10
    c.online = ml_collections.ConfigDict(
        dict(
            rounds=int(a.get("rounds", 3)),
            prompts_per_round=int(a.get("prompts", 256)),  # new prompts each round (disjoint slices of the split)
            samples_per_prompt=int(a.get("samples", 4)),  # HALOs' online scripts: 8
            prompt_split="train",  # of config.data.sources
            judge="synthetic",  # a name in kto_jax/judges (settings in config.eval.<name>)
            feedback=a.get("feedback", "binary"),  # "binary" (KTO) or "pairwise" (DPO); either feeds any loss
            threshold="median",  # binary labels of a scored judge: a number, "mean", "median"
            pair_mode="max",  # pairwise: "max", "min" or "random" (kto_jax/online/labels.py)
            pair_gap=0.0,  # pairwise: the reward gap a pair must exceed
            temperature=0.7,
            top_p=0.95,
            top_k=0,  # HALOs' train/sample.py defaults
            max_new_tokens=10,
            batch_size=256,  # sequences per generation batch
            chunk_prompts=64,  # prompts per samples file: what a killed run resamples at most
            carry_optimizer=True,  # rounds > 1 go on with the last round's optimizer state and
            # schedule (HALOs main's model.from_checkpoint); False: fresh
        )
    )
    return c
