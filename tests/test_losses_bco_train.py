"""``bco`` (unpaired BCO) through the train step: its running reward mean lives in state.loss_state
and counts every valid example once (the helpers and fixtures of tests/test_train_step.py)."""

from __future__ import annotations

import numpy as np

from tests.test_train_step import compiled_step, initial_state, loader


def test_bco_running_mean_counts_every_reward_across_steps(examples, policy, reference):
    """After step t the state's running mean is the mean of all valid rewards of steps 1..t (the batch
    sums rebuilt from the class means and counts of the metrics) and its count their number."""
    data = loader(examples, "bco")
    state = initial_state("bco", policy)
    assert set(state.loss_state) == {"running_mean", "running_count"}
    step = compiled_step("bco")
    total, count, seen = 0.0, 0.0, []
    for _ in range(3):
        state, metrics = step(state, next(data), reference)
        nd, nu = float(metrics["num_desirable"]), float(metrics["num_undesirable"])
        total += float(metrics["rewards/chosen"]) * nd + float(metrics["rewards/rejected"]) * nu
        count += nd + nu
        running = float(state.loss_state["running_mean"])
        seen.append(running)
        assert float(state.loss_state["running_count"]) == count
        np.testing.assert_allclose(running, float(metrics["bco/running_mean"]), rtol=0, atol=1e-7)
        np.testing.assert_allclose(running, total / count, rtol=0, atol=1e-5)
        assert np.isfinite(float(metrics["loss"]))
    assert count > 3 and len(set(seen)) == 3, (count, seen)
