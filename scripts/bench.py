"""Train-step throughput and MFU on the bench shape (compare with shared/anchors' TRL numbers).

    python scripts/bench.py [--preset tiny-25m] [--steps 10] [--dtype float32]
    python scripts/bench.py --lengths=mix [--max_length 512] [--batches 8]
    python scripts/bench.py --attention_vs_torch [--max_length 512]
    python scripts/bench.py --generation=~/.cache/kto_jax/smollm2-135m-instruct [--batch 32]

``--generation=FOLDER``: batched generation from a Hugging Face folder (scripts/convert_smollm2.py
writes SmolLM2-135M-Instruct's), ``--batch`` chat prompts x ``--completion_tokens`` new tokens each
(EOS never ends a row, so both count the same tokens), greedy and at temperature 1, with
``kto_jax.generate.generate`` (KV cache, one ``lax.scan`` decode loop) against transformers'
``generate`` on the same prompt tokens, alternating, two rounds; new tokens per second and the ratio.

``--attention_vs_torch``: one attention layer of the preset's shape (``--batch`` rows of
``--max_length`` tokens, a fifth of each row left padding), forward and forward + backward, the
model's attention on this backend (``--attention_impl``; by default the blocked attention on CPU,
``kto_jax.models.blocked``) and XLA's dense ``jax.nn.dot_product_attention``, with the model's mask, against torch's
``scaled_dot_product_attention`` with the same mask (what transformers' Llama runs on CPU, as TRL
does), alternating, three rounds; seconds per call and the torch/jax ratio.

``--lengths=fixed`` (the default): every sequence 64 + 64 tokens, as below. ``--lengths=SOURCE``
(a source of scripts/length_histograms.json: hh, shp, oasst, ultrafeedback, or mix): prompt and
completion lengths drawn from that source's histogram, truncated as the loader truncates
(max_length, max_prompt_length), the same examples batched twice by the shipped loader: padded
to length buckets (``--bucket``) and packed (``config.data.packing``). Prints, per loss and
layout, the useful (non-pad) training tokens per second over ``--batches`` distinct batches
(each shape compiled in a first, untimed pass), the fraction of row tokens that are real, and
the last step's loss (equal between layouts: same examples in the same order, same updates).
scripts/trl_lengths_anchor.py trains TRL on the same examples (scripts/lengths.py).

Bench shape: a Llama of ~27M parameters (hidden 512, 8 layers, 8 heads, ffn 1376, vocab
2048), batch 8 of 64 prompt + 64 completion tokens. For KTO and DPO, in both reference
modes, prints one JSON object per line: loss, reference_mode, median_step_s, tokens_per_s
(training sequences only: KTO 8 x 128, DPO 16 x 128, as TRL counts) and mfu against the
matmul peak measured in the same run (or the device's listed peak with --listed_peak).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from kto_jax import sharding
from kto_jax.config import base_config
from kto_jax.data.feedback import Paired, Unary
from kto_jax.data.loader import FeedbackLoader
from kto_jax.data.tokenize import TokenizeConfig, get_tokenizer
from kto_jax.losses import get_loss
from kto_jax.models import build_model, lora
from kto_jax.models.hf import init_params
from kto_jax.models.positions import attention_mask_4d
from kto_jax.models.presets import get_preset
from kto_jax.train.engine import build_engine
from kto_jax.train.feeds import StepSpec
from kto_jax.train.flops import device_peak_flops, step_flops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lengths  # noqa: E402  (scripts/lengths.py, shared with the TRL anchor)

_PRESET = flags.DEFINE_string("preset", "tiny-25m", "Model preset.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype (params stay float32).")
_BATCH = flags.DEFINE_integer("batch", 8, "Examples (KTO) or pairs (DPO) per step.")
_PROMPT = flags.DEFINE_integer("prompt_tokens", 64, "Prompt tokens per sequence.")
_COMPLETION = flags.DEFINE_integer("completion_tokens", 64, "Completion tokens per sequence.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).")
_LOSSES = flags.DEFINE_list("losses", ["kto", "dpo"], "Losses to bench.")
_MODES = flags.DEFINE_list("modes", ["model", "cached"], "Reference modes.")
_LISTED_PEAK = flags.DEFINE_bool(
    "listed_peak", False, "Use the device's listed bf16 peak instead of a measured matmul peak."
)
_REMAT = flags.DEFINE_string("remat", "none", "Remat policy.")
_LORA_RANK = flags.DEFINE_integer(
    "lora_rank", 0, "LoRA rank (0: full fine-tuning); the base is frozen and is the reference."
)
_LORA_ALPHA = flags.DEFINE_float("lora_alpha", 16.0, "With --lora_rank: LoRA alpha.")
_LORA_TARGETS = flags.DEFINE_string("lora_targets", "all_linear", "With --lora_rank: the adapted projections.")
_ATTENTION = flags.DEFINE_string(
    "attention_impl", "", "'' (blocked on CPU, else XLA's choice), 'xla', 'cudnn' (GPU), 'splash' (TPU) or 'blocked'."
)
_LENGTHS = flags.DEFINE_string(
    "lengths", "fixed", "'fixed' (64 + 64 tokens) or a source of scripts/length_histograms.json."
)
_MAX_LENGTH = flags.DEFINE_integer("max_length", 512, "With --lengths=SOURCE: config.data.max_length (HALOs: 512).")
_MAX_PROMPT = flags.DEFINE_integer(
    "max_prompt_length", 256, "With --lengths=SOURCE: config.data.max_prompt_length (HALOs: 256)."
)
_BUCKET = flags.DEFINE_integer(
    "bucket", 64, "With --lengths=SOURCE: the padded layout's length bucket (config.data.bucket)."
)
_BATCHES = flags.DEFINE_integer("batches", 8, "With --lengths=SOURCE: distinct batches timed per layout.")
_PROFILE = flags.DEFINE_string(
    "profile_dir", "", "With --lengths=SOURCE: write a jax.profiler trace of the timed passes here."
)
_VS_TORCH = flags.DEFINE_bool("attention_vs_torch", False, "Time one attention layer against torch's SDPA (see above).")
_GENERATION = flags.DEFINE_string("generation", "", "A Hugging Face folder: time generation against transformers'.")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 2, "With --lengths=SOURCE: timed passes over the batches (after one warm-up pass)."
)


def measured_matmul_peak(dtype, n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of a large square matmul in ``dtype`` on this device (best of 3)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: functools.reduce(lambda acc, _: acc @ x, range(reps), x))
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best


def make_batch(schema, rng, batch, prompt, completion, vocab) -> dict:
    """A batch of the step's layout: random token ids, no padding, the completion after ``prompt`` tokens."""
    length = prompt + completion
    out = {}
    for name, (shape, dtype) in schema.shapes(batch, length).items():
        if name.endswith("input_ids"):
            out[name] = rng.integers(0, vocab, shape).astype(dtype)
        elif name.endswith("attention_mask"):
            out[name] = np.ones(shape, dtype)
        elif name.endswith("loss_mask"):
            out[name] = np.broadcast_to(np.arange(length) >= prompt, shape).copy()
        elif name == "desirable":
            out[name] = rng.random(batch) < 0.5
        else:
            raise ValueError(f"bench: no generator for batch field {name!r}")
    return out


def bench_one(name, mode, model, params, peak):
    loss = get_loss(name)
    optimizer_cfg = base_config().train.optimizer
    optimizer_cfg.update(dict(name="adamw", lr=1e-5, warmup_steps=0))
    freeze = (lora.FREEZE_BASE,) if model.config.lora_rank else ()
    spec = StepSpec(
        model,
        loss,
        tuple(sorted(loss.defaults.items())),
        1,
        mode if loss.needs_reference else "none",
        256,
        freeze=freeze,
    )
    engine = build_engine(spec, optimizer_cfg, sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    rng = np.random.default_rng(0)
    schema = spec.feed.schema(spec.inputs, "none")  # what the loader fills
    batch = {
        k: jnp.asarray(v)
        for k, v in make_batch(
            schema, rng, _BATCH.value, _PROMPT.value, _COMPLETION.value, model.config.vocab_size
        ).items()
    }
    reference = lora.split_adapters(params)[0]  # the initial model; with LoRA its base, the same buffers
    if spec.reference_mode == "cached":
        batch.update(engine.reference_fn(reference, batch))
        reference = None
    state = engine.create_state(params)  # the state the loop builds (params copied; donated by the step)
    frozen = engine.frozen_params(params)  # with LoRA: the base, when the reference does not carry it
    times = []
    for i in range(_STEPS.value + 2):
        start = time.perf_counter()
        state, metrics = engine.train_fn(state, batch, reference, frozen)
        jax.block_until_ready(metrics["loss"])
        if i >= 2:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    length = _PROMPT.value + _COMPLETION.value
    flops = step_flops(model.config, loss, batch=_BATCH.value, length=length, reference_mode=mode)
    return {
        "loss": name,
        "reference_mode": mode,
        "median_step_s": round(median, 4),
        "tokens_per_s": round(float(schema.training_tokens(batch)) / median, 1),
        "mfu": round(flops / median / peak, 4),
        "model_tflops_per_step": round(flops / 1e12, 4),
        "device": jax.devices()[0].device_kind,
        "preset": _PRESET.value,
        "dtype": _DTYPE.value,
        "lora_rank": model.config.lora_rank,  # (mfu counts full fine-tuning's FLOPs, LoRA's or not)
    }


def realistic_examples(name: str, n: int) -> list:
    """kto-jax examples of scripts/lengths.py's texts (the TRL anchor trains on the same ones)."""
    kind = "paired" if get_loss(name).kind == "paired" else "unary"
    rows = lengths.example_texts(kind, _LENGTHS.value, n, seed=0)
    if kind == "paired":
        return [Paired(str(i), (("user", r["prompt"]),), r["chosen"], r["rejected"]) for i, r in enumerate(rows)]
    return [Unary(str(i), (("user", r["prompt"]),), r["completion"], r["label"]) for i, r in enumerate(rows)]


def bench_realistic(name, model, params, peak):
    """Useful tokens/s of the padded and the packed layout of the same examples (see the docstring)."""
    loss = get_loss(name)
    examples = realistic_examples(name, _BATCH.value * _BATCHES.value)
    tokenize = TokenizeConfig(max_length=_MAX_LENGTH.value, max_prompt_length=_MAX_PROMPT.value, chat_template="plain")
    optimizer_cfg = base_config().train.optimizer
    optimizer_cfg.update(dict(name="adamw", lr=1e-5, warmup_steps=0))
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    rows = []
    for packing in (False, True):
        spec = StepSpec(
            model,
            loss,
            tuple(sorted(loss.defaults.items())),
            1,
            "model" if loss.needs_reference else "none",
            256,
            packing=packing,
        )
        engine = build_engine(spec, optimizer_cfg, mesh)
        loader = FeedbackLoader(
            examples,
            get_tokenizer("bytes"),
            tokenize,
            global_batch_size=_BATCH.value,
            seed=0,
            bucket=_BUCKET.value,
            process_index=0,
            process_count=1,
            packing=packing,
            schema=spec.feed.schema(spec.inputs, "none", packing),
        )
        batches = [{k: jnp.asarray(v) for k, v in next(loader).items()} for _ in range(_BATCHES.value)]
        schema = spec.schema
        state = engine.create_state(params)
        for batch in batches:  # compile every shape
            state, metrics = engine.train_fn(state, batch, params)
        jax.block_until_ready(state.params)
        elapsed, losses = 0.0, []
        trace = os.path.join(_PROFILE.value, f"{name}_{'packed' if packing else 'padded'}") if _PROFILE.value else ""
        with jax.profiler.trace(trace) if trace else contextlib.nullcontext():
            for _ in range(_ROUNDS.value):
                for batch in batches:
                    start = time.perf_counter()
                    state, metrics = engine.train_fn(state, batch, params)
                    jax.block_until_ready(metrics["loss"])
                    elapsed += time.perf_counter() - start
                    losses.append(float(metrics["loss"]))
        useful = sum(float(schema.training_tokens(b)) for b in batches) * _ROUNDS.value
        key = schema.presence_key
        groups = [g for g in schema.sequences if g != "kl"]
        real = sum(float((b[f"{g}_{key}" if g else key] > 0).sum()) for b in batches for g in groups)
        slots = sum(b[f"{g}_input_ids" if g else "input_ids"].size for b in batches for g in groups)
        shapes = sorted({tuple(b[schema.length_key].shape) for b in batches})
        # model FLOPs of the real tokens: each batch's rows x row length, times its real fraction
        flops = (
            sum(
                step_flops(
                    model.config,
                    loss,
                    batch=b[schema.length_key].shape[0],
                    length=b[schema.length_key].shape[1],
                    reference_mode=spec.reference_mode,
                )
                * schema.real_fraction(b)
                for b in batches
            )
            * _ROUNDS.value
        )
        rows.append(
            {
                "loss": name,
                "lengths": _LENGTHS.value,
                "layout": "packed" if packing else f"buckets of {_BUCKET.value}",
                "useful_tokens_per_s": round(useful / elapsed, 1),
                "real_token_fraction": round(real / slots, 3),
                "useful_mfu": round(flops / elapsed / peak, 4),
                "step_s": round(elapsed / (_ROUNDS.value * len(batches)), 4),
                "last_loss": round(losses[-1], 6),
                "shapes": [list(x) for x in shapes],
                "max_length": _MAX_LENGTH.value,
                "batch": _BATCH.value,
                "preset": _PRESET.value,
                "device": jax.devices()[0].device_kind,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    padded, packed = rows
    print(
        json.dumps(
            {
                "loss": name,
                "lengths": _LENGTHS.value,
                "packed_over_buckets": round(packed["useful_tokens_per_s"] / padded["useful_tokens_per_s"], 3),
            }
        ),
        flush=True,
    )


def bench_attention_vs_torch(config) -> None:
    """Seconds per call of one attention layer, JAX against torch, alternating (module docstring)."""
    import torch

    from kto_jax.models.blocked import blocked_attention
    from kto_jax.models.common import blocked_impl

    torch.set_num_threads(os.cpu_count() or 1)
    B, T, H, D = _BATCH.value, _MAX_LENGTH.value, config.num_heads, config.head_dim
    r = np.random.default_rng(0)
    q, k, v, w = (r.normal(size=(B, T, H, D)).astype(np.float32) for _ in range(4))
    present = np.ones((B, T), np.int32)
    present[:, : T // 5] = 0
    mask = attention_mask_4d(jnp.asarray(present))
    impl = config.attention_impl
    blocked = blocked_impl(config)  # the model's attention here: blocked (on CPU by default) or XLA's

    def dense(q, k, v):
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, implementation=impl if impl in ("xla", "cudnn") else None
        )

    def attend(q, k, v):
        return blocked_attention(q, k, v, mask, scale=D**-0.5) if blocked else dense(q, k, v)

    jq, jk, jv, jw = map(jnp.asarray, (q, k, v, w))
    jax_fwd = jax.jit(attend)
    jax_grad = jax.jit(jax.grad(lambda q, k, v: (attend(q, k, v) * jw).sum(), argnums=(0, 1, 2)))
    xla_grad = jax.jit(jax.grad(lambda q, k, v: (dense(q, k, v) * jw).sum(), argnums=(0, 1, 2)))
    tq, tk, tv = (torch.tensor(x).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    tw, tmask = torch.tensor(w).transpose(1, 2), torch.tensor(np.asarray(mask))

    def torch_fwd():
        with torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask)

    def torch_grad():
        (torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask) * tw).sum().backward()

    calls = {
        "jax_forward": lambda: jax_fwd(jq, jk, jv).block_until_ready(),
        "jax_forward_backward": lambda: jax.block_until_ready(jax_grad(jq, jk, jv)),
        "torch_forward": torch_fwd,
        "torch_forward_backward": torch_grad,
        "xla_dense_forward_backward": lambda: jax.block_until_ready(xla_grad(jq, jk, jv)),
    }
    times = {name: [] for name in calls}
    for fn in calls.values():
        fn(), fn()  # compile / warm up
    for _ in range(3):
        for name, fn in calls.items():
            start = time.perf_counter()
            for _ in range(5):
                fn()
            times[name].append((time.perf_counter() - start) / 5)
    s = {name: statistics.median(t) for name, t in times.items()}
    print(
        json.dumps(
            {
                "shape": {"batch": B, "length": T, "heads": H, "head_dim": D},
                "jax_impl": "blocked" if blocked else (impl or "xla (default)"),
                **{f"{n}_s": round(x, 4) for n, x in s.items()},
                "jax_over_torch_seconds_forward": round(s["jax_forward"] / s["torch_forward"], 2),
                "jax_over_torch_seconds_forward_backward": round(
                    s["jax_forward_backward"] / s["torch_forward_backward"], 2
                ),
                "xla_dense_over_torch_seconds_forward_backward": round(
                    s["xla_dense_forward_backward"] / s["torch_forward_backward"], 2
                ),
            }
        ),
        flush=True,
    )


GENERATION_TOPICS = ("the sea", "a city at night", "autumn", "a robot", "coffee", "mountains", "rain", "friendship")


def bench_generation(folder: str) -> None:
    """New tokens per second of batched generation, kto-jax against transformers (module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kto_jax.generate import generate
    from kto_jax.models.hf import from_hf

    torch.set_num_threads(os.cpu_count() or 1)
    folder = os.path.expanduser(folder)
    batch, new = _BATCH.value, _COMPLETION.value
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    texts = [f"Write {n + 2} short lines about {GENERATION_TOPICS[n % len(GENERATION_TOPICS)]}." for n in range(batch)]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True)
        for t in texts
    ]
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
    model, params = from_hf(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    never = model.config.vocab_size  # an id no row samples: every row writes `new` tokens
    enc = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")

    def ours(temperature):
        out = generate(
            model, params, prompts, max_new_tokens=new, eos_id=never, pad_id=0, temperature=temperature,
            batch_size=batch, seed=0,
        )  # fmt: skip
        return sum(len(r) for r in out)

    def theirs(temperature):
        with torch.no_grad():
            out = hf.generate(
                **enc, max_new_tokens=new, min_new_tokens=new, do_sample=temperature > 0,
                temperature=temperature or None, top_p=1.0, top_k=0, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        return int(out.shape[0] * (out.shape[1] - enc["input_ids"].shape[1]))

    rows = {}
    for temperature in (0.0, 1.0):
        ours(temperature)  # compile
        times = {"kto_jax": [], "transformers": []}
        for _ in range(2):
            for name, fn in (("kto_jax", ours), ("transformers", theirs)):
                start = time.perf_counter()
                tokens = fn(temperature)
                times[name].append(tokens / (time.perf_counter() - start))
        tps = {n: statistics.median(t) for n, t in times.items()}
        rows["greedy" if temperature == 0 else "t1"] = {
            **{f"{n}_tokens_per_s": round(x, 1) for n, x in tps.items()},
            "ratio": round(tps["kto_jax"] / tps["transformers"], 2),
        }
    print(json.dumps({"prompts": batch, "new_tokens": new, **rows}), flush=True)


def main(argv):
    del argv
    if _GENERATION.value:
        return bench_generation(_GENERATION.value)
    config = get_preset(
        _PRESET.value, compute_dtype=_DTYPE.value, remat_policy=_REMAT.value, attention_impl=_ATTENTION.value or None
    )
    if _VS_TORCH.value:
        return bench_attention_vs_torch(config)
    params = init_params(config, seed=0)
    if _LORA_RANK.value:
        config = config.replace(
            lora_rank=_LORA_RANK.value,
            lora_alpha=_LORA_ALPHA.value,
            lora_targets=lora.resolve_targets(_LORA_TARGETS.value, config, field="--lora_targets"),
        )
        params = lora.init_adapters(config, params, seed=0)
    model = build_model(config)
    listed = device_peak_flops(jax.devices()[0].device_kind)
    peak = listed if (_LISTED_PEAK.value and listed) else measured_matmul_peak(jnp.dtype(_DTYPE.value))
    print(
        json.dumps(
            {
                "matmul_peak_flops": round(peak),
                "peak_source": "listed" if (_LISTED_PEAK.value and listed) else "measured",
            }
        ),
        flush=True,
    )
    if _LORA_RANK.value and _LENGTHS.value != "fixed":
        raise app.UsageError("--lora_rank is benched on the fixed shape only (--lengths=fixed)")
    for name in _LOSSES.value:
        if _LENGTHS.value != "fixed":
            bench_realistic(name, model, params, peak)
            continue
        for mode in _MODES.value:
            print(json.dumps(bench_one(name, mode, model, params, peak)), flush=True)


if __name__ == "__main__":
    app.run(main)
