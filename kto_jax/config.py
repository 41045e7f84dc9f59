"""The run config: one ``ml_collections.ConfigDict`` holding every hyperparameter.

Experiments (``experiments/NAME.py:get_config(arg)``) start from :func:`base_config` and
override fields; the CLI locks the result, so a misspelled ``--config.x.y`` is an error.
``config.loss`` holds the loss name and exactly that loss's hyperparameters (read from
the loss registry), so choose the loss in the experiment argument (``:loss=dpo``).
"""

from __future__ import annotations

import ml_collections

from kto_jax.errors import InputError
from kto_jax.losses import get_loss


def parse_arg(arg: str, allowed: tuple[str, ...], where: str) -> dict:
    """An experiment's config argument ``a=1,b=2`` -> {"a": "1", "b": "2"}; keys outside ``allowed`` fail."""
    out = {}
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"config argument {item!r} is not key=value (e.g. {where}:loss=kto)")
        out[key.strip()] = value.strip()
    unknown = set(out) - set(allowed)
    if unknown:
        raise InputError(f"{where}: unknown arguments {sorted(unknown)}; use {', '.join(allowed)}")
    return out


def loss_config(name: str, **overrides) -> ml_collections.ConfigDict:
    """``{"name": name, **defaults of that loss}`` with overrides checked against the registry; a
    mixture's (``"dpo+sft"``) are ``weights`` and one dict per term (``LossSpec.config_values``)."""
    spec = get_loss(name)
    return ml_collections.ConfigDict({"name": name, **spec.config_values(overrides)})


def halos_main_optimizer(loss: str) -> dict:
    """``config.train.optimizer`` of ContextualAI/HALOs branch ``main`` at commit 4831988 (2025-09-30):
    config/config.yaml with config/model/base_model.yaml and the optimizer/scheduler of launch.py.

        AdamW lr 5e-6, betas (0.9, 0.999), weight decay 0.01  config.yaml:50,71-80; launch.py:264
        eps 1e-8: config.yaml:83 says eps 1e-5, but launch.py:264 never passes it, so torch.optim.AdamW's
                  default 1e-8 is what HALOs main runs
        warmup 10% of the steps, linear from 0.1 lr to lr     config.yaml:86; launch.py:272-273 (LinearLR start_factor 0.1)
        then cosine to 0 for SFT, constant for the others     launch.py:275-278 (cosine only for the SFTDataLoader)
        grad clip 1.0 (global norm)                           base_model.yaml:25

    (its lengths, max_length 1250 and max_prompt_length 625, are base_model.yaml:31,34; batch 32, one
    epoch: base_model.yaml:40, config.yaml:53)."""
    return dict(
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


def halos_main_ultrafeedback(tokenizer: str, chat_template: str) -> dict:
    """``config.data`` of HALOs main's UltraFeedback runs: HuggingFaceH4/ultrafeedback_binarized
    (train_prefs / test_prefs), max_length 1250 and max_prompt_length 625 (base_model.yaml:31,34)."""
    return dict(
        sources="ultrafeedback",
        train_split="train_prefs",
        eval_split="test_prefs",
        tokenizer=tokenizer,
        chat_template=chat_template,
        max_length=1250,
        max_prompt_length=625,
    )


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(
        dict(
            name="tiny-1m",  # a preset (kto_jax/models/presets.py) or a Hugging Face folder
            compute_dtype="float32",  # activations (bfloat16 on accelerators)
            param_dtype="float32",  # params and optimizer state
            remat_policy="none",
            # "" (blocked on CPU, else XLA's choice), "xla", "cudnn" (GPU), "splash" (TPU kernel; rows of a
            # multiple of 128) or "blocked" (block-causal, kto_jax/models/blocked.py)
            attention_impl="",
            # LoRA (kto_jax/models/lora.py): rank 0 = full fine-tuning. With rank > 0 only the adapters
            # train, the base is frozen and is the reference (no second copy); targets: "attention"
            # (q,k,v,o), "mlp" (gate,up,down), "all_linear", or comma-separated regexes over q,k,v,o,gate,up,down;
            # scale alpha / rank (rslora: alpha / sqrt(rank)); dropout must stay 0 (not implemented)
            lora=ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets="all_linear", rslora=False, dropout=0.0)),
        )
    )
    # Where the policy's weights start (the reference model starts there too):
    # "" = the model's own (random init for a preset, the folder's weights for an HF folder),
    # "hf:PATH" = a Hugging Face folder, "orbax:WORKDIR[@STEP]" = a checkpoint of an earlier
    # run (its latest step by default, which is its final weights once it has finished).
    # source: the starting weights ("" = config.model.name's, "hf:PATH", "orbax:WORKDIR[@STEP]");
    # optimizer: "orbax:WORKDIR[@STEP]" starts from that run's optimizer state (moments and schedule
    # position; HALOs main's model.from_checkpoint) instead of a fresh one; "" = fresh
    # adapter: a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) loaded onto the
    # starting weights as the run's initial adapters (config.model.lora must match its r, alpha, targets)
    c.init = ml_collections.ConfigDict(dict(source="", optimizer="", adapter=""))
    c.loss = loss_config("kto")
    # "model": a frozen copy of the initial weights in the step; "cached": its log-probs computed
    # once before training and read from the batch (kto_jax/train/reference_cache.py), from a
    # matching cache in cache_dir when one is there ("" = the workdir; a folder shared by runs
    # on the same reference model and data computes it once for all of them); "sync": a moving
    # reference in the train state (saved with it), after every sync_every-th step set to
    # sync_alpha * policy + (1 - sync_alpha) * reference from the policy that step computed its
    # loss with (TR-DPO's soft update for alpha < 1 and hard update for alpha = 1; HALOs main's
    # humanline syncs every step: sync_every=1, sync_alpha=1.0).
    # humanline (HALOs main, arXiv 2509.24207): each token's log-ratio log pi/pi_ref clamped to
    # [log_epsilon_P, log_epsilon_R] before it is summed into a sequence's reward (kto_jax/train/feeds.py)
    c.reference = ml_collections.ConfigDict(
        dict(
            mode="model",
            cache_dir="",
            sync_every=1,
            sync_alpha=1.0,
            humanline=False,
            log_epsilon_P=-1.0,
            log_epsilon_R=1.5,
        )
    )
    c.data = ml_collections.ConfigDict(
        dict(
            # "+"-separated sources, each a dataset name (kto_jax/data/builders) or "files:PATTERN" (your own
            # JSONL/JSON/Parquet/CSV/save_to_disk files), optionally ":WEIGHT" (mixture proportions)
            sources="synthetic",
            # the eval split's sources when they are not the training ones ("" = sources): an online round
            # (kto_jax/online) trains on its own judged samples and is evaluated on the task's test split
            eval_sources="",
            # the "files:" sources' options: eval split from these files, or a fraction of the prompts held
            # out by hash; the schema ("auto" = detected from the columns) and a column map "prompt=question,..."
            eval_files="",
            holdout_fraction=0.0,
            file_schema="auto",
            columns="",
            train_split="train",
            eval_split="test",
            data_dir="~/tensorflow_datasets",
            manual_dir="",
            skip_bad_records=False,
            tokenizer="",  # "" = the model folder's tokenizer.json, or "bytes"
            chat_template="halos",  # "halos", "hh", "plain", or "tokenizer" (the model folder's Jinja template)
            max_length=2048,
            max_prompt_length=1024,
            truncation_mode="keep_end",
            bucket=64,
            # several examples per row of max_length tokens (segment ids, no padding between them) instead
            # of one per row padded to a bucket: same losses, fewer tokens (kto_jax/data/batch.py)
            packing=False,
            pack_length=0,  # tokens per packed row; 0 = max_length (one longest example per row at most)
            one_y_per_x=False,
            desirable_fraction=1.0,
            undesirable_fraction=1.0,
            sft_examples="desirable",  # SFT/CSFT train on "desirable" examples or "all" of them
            # SFT's targets: "all" completions (after sft_examples) or "per_prompt", one per unique prompt
            # as HALOs legacy's SFTDataLoader (kto_jax/data/feedback.py:sft_targets_per_prompt); not for CSFT
            sft_targets="all",
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            global_batch_size=32,
            num_microbatches=1,
            steps=0,  # 0 = one epoch over the training examples
            skip_nonfinite=False,  # skip (and count) updates with a non-finite loss or gradient norm
            # instead of stopping the run
            log_every=10,
            eval_every=0,  # 0 = evaluate at the end only
            eval_batches=4,
            chunk_size=256,  # tokens per chunk of the chunked log-prob path
            # comma-separated regexes over the '/'-joined policy param paths (re.fullmatch), e.g.
            # "model/embed/.*": matched leaves are frozen (no gradient, optimizer state or checkpoint
            # entry; kto_jax/train/trainable.py); "" trains every parameter
            freeze="",
            optimizer=ml_collections.ConfigDict(
                dict(
                    name="rmsprop",
                    lr=5e-7,
                    warmup_steps=150,
                    grad_clip=10.0,
                    b1=0.9,
                    b2=0.999,
                    eps=1e-8,
                    weight_decay=0.0,
                    # the learning rate schedule (kto_jax/train/state.py:lr_schedule): after warmup "constant",
                    # "cosine" or "linear" decay to 0 at the run's last step
                    schedule="constant",
                    warmup_ratio=0.0,  # > 0: warmup = this fraction of the run's steps instead of warmup_steps
                    warmup_start_factor=0.0,  # warmup from lr * this (HALOs main 0.1); 0 = HALOs legacy's lr * (s+1)/(W+1)
                    value_head_grad_clip=0.1,  # offline PPO's value head, clipped apart from the model (HALOs' v_head_max_grad_norm)
                )
            ),
        )
    )
    c.checkpoint = ml_collections.ConfigDict(
        dict(
            every_steps=0,  # save every N steps (0: only at the end and on preemption)
            every_minutes=0.0,  # and/or every M minutes
            keep_last=2,  # keep the last K checkpoints ...
            best_metric="",  # ... plus the best by this eval metric (e.g. "eval/loss")
            best_mode="min",
        )
    )
    # Where metrics go besides metrics.jsonl and TensorBoard (kto_jax/train/tracking.py). wandb: Weights &
    # Biases (pip install -e '.[wandb]'): the same rows, the config and eval.json's numbers; a resumed run
    # continues the same wandb run (its id in WORKDIR/wandb_run_id). name "" = the workdir's folder name;
    # tags comma-separated; mode "" = wandb's own (WANDB_MODE, else online), "online" or "offline"
    c.logging = ml_collections.ConfigDict(
        dict(
            wandb=ml_collections.ConfigDict(
                dict(enabled=False, project="kto-jax", entity="", name="", tags="", mode="")
            )
        )
    )
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.target = ml_collections.ConfigDict(dict(topology=""))  # the slice this config is sized for (aot_check)
    c.eval = ml_collections.ConfigDict(
        dict(
            only=False,  # True: evaluate the starting weights (init.source or the model), train nothing
            evaluators="held_out,judged",  # run at the end, by name (kto_jax/train/evaluators.py); held_out also every eval_every
            judge="",  # for "judged": "" = no generation; "synthetic" = the synthetic task's exact judge
            num_prompts=256,
            batch_size=64,
            max_new_tokens=16,
            temperature=1.0,
            top_p=1.0,
            top_k=0,  # 0 = off; HALOs samples at top_p 0.95 with HF generate's defaults temperature 1, top_k 50
            baseline="",  # a workdir whose samples.jsonl is the unary win-rate baseline ("judged")
            # "pairwise" (the paper's protocol, kto_jax/judges/protocol.py): each sample against this
            # baseline, the two answers in a random order per prompt: "sft_target" (the dataset's SFT
            # target, the paper) or a workdir whose samples.jsonl has the same prompts
            against="sft_target",
            order_seed=0,  # the per-prompt order of the two answers (recorded in judgments.jsonl)
            # judge="api": any OpenAI-compatible /v1/chat/completions server (vLLM, SGLang, llama.cpp,
            # scripts/serve.py, hosted APIs); the key is read from the environment variable api_key_env
            api=ml_collections.ConfigDict(
                dict(
                    base_url="http://127.0.0.1:8000/v1",
                    model="",
                    api_key_env="OPENAI_API_KEY",
                    template="paper",  # HALOs' compare.py prompt; or a path to a text file with {history}, {first}, {second}
                    concurrency=8,
                    timeout_s=60.0,
                    retries=4,
                    backoff_s=1.0,
                    max_tokens=10,
                    temperature=0.0,
                    seed=0,  # compare.py: temperature 0, max_tokens 10, seed 0
                )
            ),
            # judge="reward_model": an HF *ForSequenceClassification folder (Llama or GPT-NeoX), scored in JAX
            reward_model=ml_collections.ConfigDict(
                dict(path="", batch_size=16, max_length=512, chat_template="tokenizer")
            ),
        )
    )
    return c


def tiny_config(
    loss: str = "kto", steps: int = 200, init: str = "", model: str = "tiny-1m"
) -> ml_collections.ConfigDict:
    """A tiny run on the embedded synthetic task, sized for a 2-core CPU (experiments/tiny.py, the demo).

    SFT trains from scratch on the whole mixture (desirable and undesirable completions alike),
    so the SFT model writes both kinds about half the time; alignment losses start from it.
    """
    c = base_config()
    c.model.name = model
    c.init.source = init
    c.loss = loss_config(loss)
    c.data.update(
        dict(
            sources="synthetic",
            train_split="train",
            eval_split="test",
            tokenizer="bytes",
            chat_template="plain",
            max_length=32,
            max_prompt_length=16,
            bucket=16,
            sft_examples="all",
        )
    )
    c.train.update(dict(global_batch_size=32, steps=int(steps), log_every=20, eval_batches=4))
    supervised = get_loss(loss).kind == "sft"
    c.train.optimizer.update(dict(name="adamw", lr=1e-3 if supervised else 1e-4, warmup_steps=20, grad_clip=1.0))
    c.eval.update(dict(judge="synthetic", num_prompts=512, batch_size=128, max_new_tokens=10, temperature=1.0))
    return c
