"""Packed batches on meshes of 8 simulated CPU devices, and through the training loop.

``tests/train_worker.py packed`` (a subprocess with 8 CPU devices, one per loss, two at a
time): three sgd steps (lr 0.1) with 2 microbatches of a 2-layer tiny-1m Llama on a global
batch of 16 synthetic examples, padded on one device against packed into rows of 64 tokens on
(data, fsdp, tensor) = (1,1,1), (8,1,1) and (2,2,2): every metric and the params after three
steps agree to 1e-5 for KTO, DPO, SFT and offline PPO. Then ``kto_jax.train.loop.run`` packed
against padded (the logged rows), and a packed run resumed from its checkpoint against the
uninterrupted one (bitwise).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.train_helpers import metrics_rows, rounding_noise, run_workers, small_config

LOSSES = ("kto", "dpo", "sft", "ppo_offline")
TIMEOUT = 600


@pytest.fixture(scope="module")
def summaries(tmp_path_factory, synthetic_data_dir):
    return run_workers("packed", LOSSES, tmp_path_factory, synthetic_data_dir, TIMEOUT, at_once=2)  # 2 cores


@pytest.mark.parametrize("run", ["packed_1x1x1", "packed_8x1x1", "packed_2x2x2"])
@pytest.mark.parametrize("loss", LOSSES)
def test_packed_steps_on_meshes_match_padded_on_one_device(loss, run, summaries):
    out, summary = summaries[loss]
    padded, packed = summary["padded_1x1x1"], summary[run]
    first = packed["shapes"][0]
    key = "chosen_input_ids" if loss == "dpo" else "input_ids"
    rows = first[key][0]  # rows divide over the data-parallel devices and the 2 microbatches
    assert first[key][1] == 64 and rows % (8 if run == "packed_8x1x1" else 4 if run == "packed_2x2x2" else 2) == 0
    assert rows <= 16 if run == "packed_8x1x1" else rows < 16  # 16 sequences of <= 32 tokens
    norms = [row["grad_norm"] for row in padded["metrics"]]
    assert min(norms) > 1e-3, f"the steps should move the weights: gradient norms {norms}"
    for step, (row, expected) in enumerate(zip(packed["metrics"], padded["metrics"]), 1):
        assert sorted(row) == sorted(expected)
        for k, v in expected.items():
            if rounding_noise(step, k, row, expected):
                continue
            np.testing.assert_allclose(row[k], v, rtol=1e-5, atol=1e-5, err_msg=f"step {step} {k}")
    expected = np.load(os.path.join(out, "params_padded_1x1x1.npz"))
    actual = np.load(os.path.join(out, f"params_{run}.npz"))
    assert sorted(actual.files) == sorted(expected.files)
    for name in expected.files:
        np.testing.assert_allclose(actual[name], expected[name], rtol=0, atol=1e-5, err_msg=name)


def _logged(workdir: str) -> list[dict]:
    skip = ("step_time_s", "tokens_per_s", "time", "mfu")
    return [{k: v for k, v in row.items() if k not in skip} for row in metrics_rows(workdir)]


def test_loop_packed_equals_padded_and_resumes_exactly(tmp_path, synthetic_data_dir):
    """loop.run with data.packing: the logged train and held-out rows equal the padded run's
    (1e-5); a packed run of 2 steps extended to 4 (resumed from its checkpoint) logs the 4-step
    packed run's rows bitwise."""
    from kto_jax.train import loop

    def config(steps, packing):
        c = small_config("kto", synthetic_data_dir, steps=steps)
        c.data.update(dict(packing=packing, pack_length=64 if packing else 0))
        return c

    loop.run(config(4, False), str(tmp_path / "padded"))
    loop.run(config(4, True), str(tmp_path / "packed"))
    loop.run(config(2, True), str(tmp_path / "resumed"))
    loop.run(config(4, True), str(tmp_path / "resumed"))
    padded, packed, resumed = (_logged(str(tmp_path / n)) for n in ("padded", "packed", "resumed"))
    assert [r["step"] for r in packed] == [r["step"] for r in padded] and len(packed) >= 5
    for row, expected in zip(packed, padded):
        assert sorted(row) == sorted(expected)
        for k, v in expected.items():
            np.testing.assert_allclose(row[k], v, rtol=1e-5, atol=1e-5, err_msg=f"step {row['step']} {k}")
    # the resumed run logged steps 1-2, its 2-step evaluation, then 3-4 and the final evaluation
    final = [r for r in resumed if not (r["step"] == 2 and any(k.startswith("eval/") for k in r))]
    assert final == packed
