"""scripts/bench.py --attention_vs_torch: one attention layer timed against torch's SDPA, and the
two compute the same attention (the timing compares like with like)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_attention_vs_torch_reports_both_timings():
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/bench.py",
            "--attention_vs_torch",
            "--preset=tiny-1m",
            "--batch=2",
            "--max_length=64",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["shape"] == {"batch": 2, "length": 64, "heads": 4, "head_dim": 32}
    for key in ("jax_forward_s", "jax_forward_backward_s", "torch_forward_s", "torch_forward_backward_s"):
        assert row[key] > 0, key
    assert row["jax_over_torch_seconds_forward"] > 0


def test_torch_sdpa_with_the_model_mask_equals_jax_attention():
    """At the real tokens (the rows' padding queries see themselves only in both)."""
    import jax
    import jax.numpy as jnp
    import torch

    from kto_jax.models.positions import attention_mask_4d

    r = np.random.default_rng(0)
    q, k, v = (r.normal(size=(2, 16, 4, 8)).astype(np.float32) for _ in range(3))
    present = np.ones((2, 16), np.int32)
    present[:, :3] = 0
    mask = attention_mask_4d(jnp.asarray(present))
    ours = np.asarray(jax.nn.dot_product_attention(*map(jnp.asarray, (q, k, v)), mask=mask))
    theirs = (
        torch.nn.functional.scaled_dot_product_attention(
            *(torch.tensor(x).transpose(1, 2) for x in (q, k, v)), attn_mask=torch.tensor(np.asarray(mask))
        )
        .transpose(1, 2)
        .numpy()
    )
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5)
