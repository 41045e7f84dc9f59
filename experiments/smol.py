"""SmolLM2-135M-Instruct aligned on your own feedback file, in its own chat template, on CPU.

    python scripts/convert_smollm2.py --out ~/.cache/kto_jax/smollm2-135m-instruct   # once (about 45 s)
    python scripts/make_feedback.py --kind binary --malformed 3 --out data/feedback.jsonl
    python -m kto_jax.train --config experiments/smol.py:loss=kto,data=data/feedback.jsonl --workdir runs/smol-kto \
        --config.data.skip_bad_records=True
    python scripts/make_feedback.py --kind preference --out data/prefs.jsonl
    python -m kto_jax.train --config experiments/smol.py:loss=dpo,data=data/prefs.jsonl --workdir runs/smol-dpo

Before and after (the README's table; 12.6 minutes on 2 CPU cores, one run after the other):

    python scripts/make_feedback.py --kind binary --n 600 --malformed 3 --out data/feedback.jsonl
    python -m kto_jax.train --config experiments/smol.py:data=data/feedback.jsonl,temperature=0 \
        --workdir runs/smol-base --config.eval.only=True --config.data.skip_bad_records=True   # nothing trained
    python -m kto_jax.train --config experiments/smol.py:loss=kto,data=data/feedback.jsonl,before=runs/smol-base,steps=15,lr=1e-4,temperature=0 \
        --workdir runs/smol-kto --config.data.skip_bad_records=True
    python -m kto_jax.train --config experiments/smol.py:loss=dpo,data=data/feedback.jsonl,before=runs/smol-base,steps=10,lr=5e-5,temperature=0 \
        --workdir runs/smol-dpo --config.data.skip_bad_records=True
    python scripts/runs_table.py runs/smol-base runs/smol-kto runs/smol-dpo

LoRA KTO on the same budget (experiments/results/smol_lora.md: judged rate, peak memory, time):

    python -m kto_jax.train --config experiments/smol.py:loss=kto,data=data/feedback.jsonl,before=runs/smol-base,steps=15,lr=1e-3,temperature=0 \
        --workdir runs/smol-lora-kto --config.data.skip_bad_records=True --config.model.lora.rank=16 \
        --config.model.lora.alpha=32 --config.model.lora.targets=all_linear

Arguments (comma-separated key=value): loss (any registered name), data (a ``files:`` pattern:
JSONL, JSON, Parquet, CSV or a save_to_disk folder, in any of the formats of the README's Data
section), model (the HF folder; default the converted SmolLM2), steps (0 = one epoch), lr
(default HALOs main's 5e-6), before (a workdir of the starting model's samples: adds the pairwise
evaluator against them, the paper's protocol with the exact judge: a win is a right answer where
the starting model's was wrong; ties and unparseable verdicts are not wins), temperature (of the
judged samples; default HALOs' 1.0, 0 = greedy, which the table uses so that a difference is the
model's and not the sampler's).

The model's own Jinja chat template renders every prompt (``chat_template="tokenizer"``), 10% of
the prompts are held out by hash for evaluation, and the optimizer is HALOs main's AdamW
(lr 5e-6, warmup 10% from 0.1 lr). At the end, 64 held-out prompts are sampled (HALOs'
top-p 0.95, top-k 50) and judged exactly ("feedback" judge). A preference file trains KTO through its unary view; a
binary-feedback file trains DPO on the prompts that have both a desirable and an undesirable
reply (counted in data_stats.json).
"""

from kto_jax.config import base_config, loss_config, parse_arg

ARGS = ("loss", "data", "model", "steps", "lr", "before", "temperature")
SMOLLM2 = "~/.cache/kto_jax/smollm2-135m-instruct"


def get_config(arg: str = ""):
    args = parse_arg(arg, ARGS, "experiments/smol.py")
    c = base_config()
    c.model.name = args.get("model", SMOLLM2)
    c.loss = loss_config(args.get("loss", "kto"))
    c.data.update(
        dict(
            sources="files:" + args.get("data", "data/feedback.jsonl"),
            holdout_fraction=0.1,
            train_split="train",
            eval_split="test",
            tokenizer="",
            chat_template="tokenizer",
            max_length=160,
            max_prompt_length=128,
            bucket=32,
        )
    )
    c.train.update(dict(global_batch_size=8, steps=int(args.get("steps", 0)), log_every=5, eval_batches=2))
    c.train.optimizer.update(
        dict(
            name="adamw",
            lr=float(args.get("lr", 5e-6)),
            warmup_steps=0,
            warmup_ratio=0.1,
            warmup_start_factor=0.1,
            grad_clip=1.0,
            weight_decay=0.01,
        )
    )
    # the example file's tasks have exact answers (kto_jax/judges/exact.py:check_feedback); another
    # file needs another judge (config.eval.judge) or config.eval.evaluators="held_out"
    c.eval.update(
        dict(
            evaluators="held_out,judged",
            judge="feedback",
            num_prompts=64,
            batch_size=64,
            max_new_tokens=24,
            temperature=float(args.get("temperature", 1.0)),
            top_k=50,
            top_p=0.95,
        )
    )
    if args.get("before"):  # the paper's pairwise protocol against the starting model's samples (a run with eval.only)
        c.eval.update(dict(evaluators="held_out,judged,pairwise", against=args["before"]))
    return c
