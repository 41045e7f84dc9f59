"""Learning-rate schedules of kto_jax/train/state.py against their formulas, and the optimizer following them.

W warmup steps, T total steps, k = s - W, D = T - W (kto_jax.train.state.lr_schedule).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kto_jax.config import base_config
from kto_jax.train.state import learning_rate, lr_schedule, make_optimizer, resolved_warmup_steps

LR = 5e-6


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
    cfg = base_config().train.optimizer
    cfg.update({**dict(name="sgd", lr=LR, warmup_steps=10, grad_clip=0.0), **overrides})
    return cfg


def lrs(cfg, steps, total_steps=0) -> np.ndarray:
    return np.asarray([float(learning_rate(cfg, s, total_steps)) for s in steps])


def test_defaults_are_todays_schedule():
    """The new fields default to the schedule every run had: HALOs legacy's warmup, then constant."""
    cfg = base_config().train.optimizer
    assert (cfg.schedule, cfg.warmup_ratio, cfg.warmup_start_factor, cfg.value_head_grad_clip) == (
        "constant",
        0.0,
        0.0,
        0.1,
    )


@pytest.mark.parametrize("warmup", [0, 1, 150])
def test_constant_is_halos_legacy_warmup(warmup):
    """ "constant": lr * min(1, (s + 1) / (W + 1)), total steps or not."""
    cfg = optimizer_config(warmup_steps=warmup)
    steps = [0, 1, max(warmup - 1, 0), warmup, warmup + 1, 1000]
    expected = np.array([LR * min(1.0, (s + 1) / (warmup + 1)) for s in steps])
    np.testing.assert_allclose(lrs(cfg, steps), expected, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(lrs(cfg, steps, total_steps=5000), lrs(cfg, steps))
    # bit for bit the old expression on the step counter (int32), as the train step calls it
    old = np.array([LR * jnp.minimum(1.0, (jnp.int32(s) + 1.0) / (warmup + 1.0)) for s in steps])
    np.testing.assert_array_equal(lrs(cfg, [jnp.int32(s) for s in steps]), old)


@pytest.mark.parametrize("start", [0.0, 0.1])
def test_cosine_and_linear_decay_to_zero_after_warmup(start):
    """W = 10, T = 100: warmup (legacy (s+1)/(W+1), or f + (1-f) s/W from f = 0.1), then
    cosine lr (1 + cos(pi k / D)) / 2 or linear lr (1 - k / D), 0 from step T on."""
    steps = [0, 5, 9, 10, 55, 99, 100, 150]
    warm = [(s + 1) / 11 if start == 0 else start + (1 - start) * s / 10 for s in steps[:3]]
    k = [min(s - 10, 90) for s in steps[3:]]
    cosine = warm + [(1 + math.cos(math.pi * x / 90)) / 2 for x in k]
    linear = warm + [1 - x / 90 for x in k]
    for name, expected in (("cosine", cosine), ("linear", linear)):
        cfg = optimizer_config(schedule=name, warmup_start_factor=start)
        np.testing.assert_allclose(
            lrs(cfg, steps, total_steps=100), LR * np.array(expected), rtol=1e-6, atol=1e-12, err_msg=name
        )
    assert lrs(optimizer_config(schedule="cosine"), [55], 100)[0] == pytest.approx(LR / 2, rel=1e-6)


def test_warmup_ratio_is_a_fraction_of_the_total_steps():
    """warmup_ratio > 0: W = ceil(ratio * T) (HALOs main's fractional milestone switches on the next step)."""
    assert resolved_warmup_steps(optimizer_config(warmup_ratio=0.1), 100) == 10
    assert resolved_warmup_steps(optimizer_config(warmup_ratio=0.1), 70) == 7  # 0.1 * 70 = 7.000000000000001
    assert resolved_warmup_steps(optimizer_config(warmup_ratio=0.1), 1234) == 124
    assert resolved_warmup_steps(optimizer_config(), 1234) == 10  # ratio 0: warmup_steps
    cfg = optimizer_config(schedule="cosine", warmup_ratio=0.1, warmup_start_factor=0.1, warmup_steps=999)
    np.testing.assert_allclose(
        lrs(cfg, [0, 10, 55, 100], 100), LR * np.array([0.1, 1.0, 0.5, 0.0]), rtol=1e-6, atol=1e-12
    )


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_the_optimizer_steps_at_the_logged_learning_rate(schedule):
    """sgd on a constant gradient 1: step s moves the param by learning_rate(cfg, s) (the ``lr`` metric)."""
    cfg = optimizer_config(
        schedule=schedule, warmup_ratio=0.2, warmup_start_factor=0.1 if schedule == "linear" else 0.0
    )
    optimizer = make_optimizer(cfg, total_steps=20)
    params = {"model": {"w": jnp.zeros(())}}
    state = optimizer.init(params)
    moves = []
    for _ in range(22):
        updates, state = optimizer.update({"model": {"w": jnp.ones(())}}, state, params)
        moves.append(-float(updates["model"]["w"]))
    np.testing.assert_allclose(moves, lrs(cfg, range(22), 20), rtol=1e-6, atol=1e-13)
    assert moves[-1] == pytest.approx(LR if schedule == "constant" else 0.0, rel=1e-6, abs=1e-13)


def test_schedule_errors_name_the_field():
    with pytest.raises(ValueError, match="schedule='cosin' is not known"):
        lr_schedule(optimizer_config(schedule="cosin"))
    with pytest.raises(ValueError, match=r"total_steps=T\) with T > 10"):
        make_optimizer(optimizer_config(schedule="cosine"))  # decay needs the run's steps
    with pytest.raises(ValueError, match="warmup_ratio=0.1 needs"):
        learning_rate(optimizer_config(warmup_ratio=0.1), 0)
