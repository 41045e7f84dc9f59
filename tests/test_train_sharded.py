"""The train step on meshes of 8 simulated CPU devices gives the single-device results.

pytest's JAX already runs on one device, so ``tests/train_worker.py sharded`` runs in a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (one per loss, both at
once): three sgd steps (lr 0.1, gradients clipped at norm 1, fp32) of a 2-layer tiny-1m Llama (4 heads, 4 kv heads, so
tensor=2 divides them, vocab 384 and mlp 344) on a global batch of 8, on meshes
(data, fsdp, tensor) = (1,1,1) on one device, (8,1,1), (2,2,2) and (1,4,2); then
``kto_jax.train.loop.run`` itself on the (2,2,2) mesh.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.train_helpers import rounding_noise, run_workers

LOSSES = ("kto", "dpo")
MESHES = ("8x1x1", "2x2x2", "1x4x2")
TIMEOUT = 420


@pytest.fixture(scope="module")
def summaries(tmp_path_factory, synthetic_data_dir):
    return run_workers("sharded", LOSSES, tmp_path_factory, synthetic_data_dir, TIMEOUT)


def assert_rows_close(rows, expected_rows, atol):
    assert len(rows) == len(expected_rows) == 3
    for step, (row, expected) in enumerate(zip(rows, expected_rows), 1):
        for key, value in expected.items():
            if key in ("step_time_s", "tokens_per_s", "finite") or rounding_noise(step, key, row, expected):
                continue  # finite: a step output the loop does not log
            np.testing.assert_allclose(row[key], value, rtol=0, atol=atol, err_msg=f"step {step} {key}")


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("loss", LOSSES)
def test_sharded_steps_match_one_device(loss, mesh, summaries):
    """Loss and every metric of each step, and the params after 3 steps, match (1,1,1) to 1e-5."""
    out, summary = summaries[loss]
    single, sharded = summary["1x1x1"], summary[mesh]
    assert sharded["devices"] == 8
    losses = [row["loss"] for row in single["metrics"]]
    assert losses[-1] < losses[0] - 1e-3, f"the steps should train: {losses}"
    assert_rows_close(sharded["metrics"], single["metrics"], atol=1e-5)
    expected = np.load(os.path.join(out, "params_1x1x1.npz"))
    actual = np.load(os.path.join(out, f"params_{mesh}.npz"))
    assert sorted(actual.files) == sorted(expected.files)
    for name in expected.files:
        np.testing.assert_allclose(actual[name], expected[name], rtol=0, atol=1e-5, err_msg=name)


def test_params_are_really_sharded_on_2x2x2(summaries):
    """On (2,2,2) the weights are split (fsdp over embed, tensor over heads/mlp/vocab), not replicated."""
    _, summary = summaries["kto"]
    assert summary["1x1x1"]["sharded_params"] == []
    assert summary["8x1x1"]["sharded_params"] == []  # pure data parallelism replicates the weights
    specs = summary["2x2x2"]["param_specs"]
    sharded = set(summary["2x2x2"]["sharded_params"])
    kernels = {name for name in specs if "norm" not in name}
    assert kernels == sharded, f"every weight matrix should be split on (2,2,2): {specs}"
    for name in kernels:  # over both fsdp (embed) and tensor (heads, mlp, vocab)
        assert "fsdp" in specs[name] and "tensor" in specs[name], (name, specs[name])
    assert len(kernels) == 9, sorted(kernels)  # embedding, q k v o, gate up down, lm_head


@pytest.mark.parametrize("loss", LOSSES)
def test_loop_run_on_a_2x2x2_mesh_matches_one_device(loss, summaries):
    _, summary = summaries[loss]
    run = summary["loop_2x2x2"]
    assert "error" not in run, run.get("error")
    assert_rows_close(
        [{k: v for k, v in row.items() if k != "step"} for row in run["metrics"]],
        summary["1x1x1"]["metrics"],
        atol=1e-5,
    )


@pytest.mark.parametrize("loss", LOSSES)
def test_aot_lowers_the_program_the_loop_runs_on_a_2x2x2_mesh(loss, summaries):
    """kto_jax.train.aot.lower_train_step for the 2x2x2 config gives the StableHLO of the loop's own
    first step on that mesh (same shardings of state, batch and reference, same donation)."""
    _, summary = summaries[loss]
    run = summary["loop_2x2x2"]
    assert "error" not in run, run.get("error")
    assert run["loop_program_is_sharded"], "the recorded program should carry the mesh's shardings"
    assert run["aot_equals_loop"]
