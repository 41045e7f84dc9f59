"""GPU checks that CPU tests cannot make; prints one JSON line per check.

    python scripts/gpu_checks.py

1. attention: a bf16 Llama forward on a left- and right-padded batch with
   attention_impl="cudnn" equals attention_impl="xla" at the real tokens; the same for packed
   rows (segment ids: the segment mask goes to cuDNN as its mask argument).
2. chunked log-probs: XLA temp bytes of value-and-grad with full vs chunked logits at
   vocab 32k, 4k tokens, and both give the same value.
3. MFU at the paper's per-device shape: scripts/bench.py --lengths=mix on pythia-1.4b, KTO and
   DPO, global batch 32, max_length 2048 (prompt 1024), bf16 compute, fp32 params, remat as
   experiments/paper.py sets (dots_no_batch), padded buckets and packing, MFU on useful tokens
   against the listed peak; a jax.profiler trace of each timed pass in $OUT/traces (or
   ./traces), to read in TensorBoard's profile plugin or Perfetto. ``--skip_mfu`` leaves it out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kto_jax import logprobs as lp
from kto_jax.models import build_model
from kto_jax.models.hf import init_params
from kto_jax.models.presets import get_preset


def report(**kw):
    print(json.dumps(kw), flush=True)


def attention_check():
    base = get_preset("tiny-25m", compute_dtype="bfloat16", num_kv_heads=4)
    params = init_params(base, seed=0)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, base.vocab_size, (4, 256)))
    mask = np.ones((4, 256), np.int32)
    mask[1, :37] = 0  # left padding
    mask[2, 200:] = 0  # right padding
    mask = jnp.asarray(mask)
    out = {}
    for impl in ("xla", "cudnn"):
        model = build_model(base.replace(attention_impl=impl))
        try:
            fn = jax.jit(lambda p, i, m, model=model: model.apply({"params": p}, i, m))
            logits = fn(params, ids, mask).block_until_ready()
            start = time.perf_counter()
            for _ in range(10):
                logits = fn(params, ids, mask)
            logits.block_until_ready()
            out[impl] = (np.asarray(logits, np.float32), (time.perf_counter() - start) / 10)
        except Exception as e:  # report, do not hide
            report(check="attention", impl=impl, error=f"{type(e).__name__}: {str(e)[:400]}")
    if len(out) == 2:
        valid = np.asarray(mask, bool)
        diff = np.abs(out["xla"][0] - out["cudnn"][0])[valid].max()
        scale = np.abs(out["xla"][0][valid]).max()
        report(
            check="attention",
            max_abs_diff=float(diff),
            logit_scale=float(scale),
            xla_s=out["xla"][1],
            cudnn_s=out["cudnn"][1],
        )
    # packed rows: segment ids (three sequences in row 0, two in row 1, padding at the ends)
    segments = np.zeros((4, 256), np.int32)
    segments[0, :90], segments[0, 90:200], segments[0, 200:250] = 1, 2, 3
    segments[1, :128], segments[1, 128:] = 4, 5
    segments[2, :256], segments[3, :17] = 6, 7
    segments = jnp.asarray(segments)
    packed = {}
    for impl in ("xla", "cudnn"):
        model = build_model(base.replace(attention_impl=impl))
        try:
            packed[impl] = np.asarray(
                jax.jit(lambda p, i, s, model=model: model.apply({"params": p}, i, segment_ids=s))(
                    params, ids, segments
                ),
                np.float32,
            )
        except Exception as e:  # report, do not hide
            report(check="attention_packed", impl=impl, error=f"{type(e).__name__}: {str(e)[:400]}")
    if len(packed) == 2:
        valid = np.asarray(segments) > 0
        report(
            check="attention_packed",
            max_abs_diff=float(np.abs(packed["xla"] - packed["cudnn"])[valid].max()),
            logit_scale=float(np.abs(packed["xla"][valid]).max()),
        )


def chunked_check():
    batch, length, dim, vocab = 2, 4096, 1024, 32000
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(batch, length, dim)) * 0.05, jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(dim, vocab)) * 0.05, jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, vocab, (batch, length)))
    mask = jnp.ones((batch, length), bool)

    def full(h, w):
        logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
        return lp.sequence_logps(logits, labels, mask)[0].sum()

    def chunked(h, w):
        return lp.chunked_sequence_logps(h, w, labels, mask, chunk_size=512)[0].sum()

    res = {}
    for name, fn in (("full", full), ("chunked", chunked)):
        compiled = jax.jit(jax.value_and_grad(fn, (0, 1))).lower(h, w).compile()
        value, _ = compiled(h, w)
        res[name] = (compiled.memory_analysis().temp_size_in_bytes, float(value))
    report(
        check="chunked_logps",
        full_temp_bytes=res["full"][0],
        chunked_temp_bytes=res["chunked"][0],
        ratio=res["full"][0] / max(res["chunked"][0], 1),
        full_value=res["full"][1],
        chunked_value=res["chunked"][1],
    )


def mfu_check():
    """scripts/bench.py at the paper's shape (see the module docstring), its JSON lines passed on."""
    traces = os.path.join(os.environ.get("OUT", "."), "traces")
    bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")
    command = [
        sys.executable,
        bench,
        "--preset=pythia-1.4b",
        "--dtype=bfloat16",
        "--remat=dots_no_batch",
        "--listed_peak",
        "--lengths=mix",
        "--batch=32",
        "--max_length=2048",
        "--max_prompt_length=1024",
        "--bucket=64",
        "--batches=4",
        "--rounds=2",
        f"--profile_dir={traces}",
        "--losses=kto,dpo",
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            print(line, flush=True)
    report(
        check="mfu",
        returncode=done.returncode,
        seconds=round(time.perf_counter() - start, 1),
        stderr_tail=done.stderr[-2000:] if done.returncode else "",
    )


if __name__ == "__main__":
    report(devices=[str(d) for d in jax.devices()], jax=jax.__version__)
    attention_check()
    chunked_check()
    if "--skip_mfu" not in sys.argv:
        mfu_check()
