"""Train-step throughput and MFU on the bench shape (compare with shared/anchors' TRL numbers).

    python scripts/bench.py [--preset tiny-25m] [--steps 10] [--dtype float32]

Bench shape: a Llama of ~27M parameters (hidden 512, 8 layers, 8 heads, ffn 1376, vocab
2048), batch 8 of 64 prompt + 64 completion tokens. For KTO and DPO, in both reference
modes, prints one JSON object per line: loss, reference_mode, median_step_s, tokens_per_s
(training sequences only: KTO 8 x 128, DPO 16 x 128, as TRL counts) and mfu against the
matmul peak measured in the same run (or the device's listed peak with --listed_peak).
"""

from __future__ import annotations

import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from kto_jax import sharding
from kto_jax.config import base_config
from kto_jax.flops import device_peak_flops, step_flops
from kto_jax.losses import get_loss
from kto_jax.models import build_model
from kto_jax.models.hf import init_params
from kto_jax.models.presets import get_preset
from kto_jax.train.engine import build_engine
from kto_jax.train.step import StepSpec

_PRESET = flags.DEFINE_string("preset", "tiny-25m", "Model preset.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype (params stay float32).")
_BATCH = flags.DEFINE_integer("batch", 8, "Examples (KTO) or pairs (DPO) per step.")
_PROMPT = flags.DEFINE_integer("prompt_tokens", 64, "Prompt tokens per sequence.")
_COMPLETION = flags.DEFINE_integer("completion_tokens", 64, "Completion tokens per sequence.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).")
_LOSSES = flags.DEFINE_list("losses", ["kto", "dpo"], "Losses to bench.")
_MODES = flags.DEFINE_list("modes", ["model", "cached"], "Reference modes.")
_LISTED_PEAK = flags.DEFINE_bool("listed_peak", False, "Use the device's listed bf16 peak instead of a measured matmul peak.")
_REMAT = flags.DEFINE_string("remat", "none", "Remat policy.")
_ATTENTION = flags.DEFINE_string("attention_impl", "", "'' (XLA's choice), 'xla' or 'cudnn'.")


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
    spec = StepSpec(model, loss, tuple(sorted(loss.defaults.items())), 1, mode if loss.needs_reference else "none", 256)
    engine = build_engine(spec, optimizer_cfg, sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    rng = np.random.default_rng(0)
    schema = spec.feed.schema(spec.inputs, "none")  # what the loader fills
    batch = {k: jnp.asarray(v) for k, v in make_batch(schema, rng, _BATCH.value, _PROMPT.value, _COMPLETION.value, model.config.vocab_size).items()}
    reference = params
    if spec.reference_mode == "cached":
        batch.update(engine.reference_fn(reference, batch))
        reference = None
    state = engine.create_state(params)  # the state the loop builds (params copied; donated by the step)
    times = []
    for i in range(_STEPS.value + 2):
        start = time.perf_counter()
        state, metrics = engine.train_fn(state, batch, reference)
        jax.block_until_ready(metrics["loss"])
        if i >= 2:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    length = _PROMPT.value + _COMPLETION.value
    flops = step_flops(model.config, loss, batch=_BATCH.value, length=length, reference_mode=mode)
    return {
        "loss": name, "reference_mode": mode, "median_step_s": round(median, 4),
        "tokens_per_s": round(float(schema.training_tokens(batch)) / median, 1), "mfu": round(flops / median / peak, 4),
        "model_tflops_per_step": round(flops / 1e12, 4), "device": jax.devices()[0].device_kind,
        "preset": _PRESET.value, "dtype": _DTYPE.value,
    }


def main(argv):
    del argv
    config = get_preset(_PRESET.value, compute_dtype=_DTYPE.value, remat_policy=_REMAT.value, attention_impl=_ATTENTION.value or None)
    model = build_model(config)
    params = init_params(config, seed=0)
    listed = device_peak_flops(jax.devices()[0].device_kind)
    peak = listed if (_LISTED_PEAK.value and listed) else measured_matmul_peak(jnp.dtype(_DTYPE.value))
    print(json.dumps({"matmul_peak_flops": round(peak), "peak_source": "listed" if (_LISTED_PEAK.value and listed) else "measured"}), flush=True)
    for name in _LOSSES.value:
        for mode in _MODES.value:
            print(json.dumps(bench_one(name, mode, model, params, peak)), flush=True)


if __name__ == "__main__":
    app.run(main)
