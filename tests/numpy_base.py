"""Shared pieces of the float64 numpy references (tests/numpy_reference*.py): stable
log-sigmoid, log(1 - exp), masked means and row selection, and the paired reward metrics."""

from __future__ import annotations

import math

import numpy as np

# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def log_sigmoid(x):
    """log(sigmoid(x)) computed stably."""
    return -np.logaddexp(0.0, -np.asarray(x, dtype=np.float64))


def sigmoid(x):
    return np.exp(log_sigmoid(x))


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, as TRL's ``log1mexp`` (branch at -ln 2)."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x < -math.log(2.0), np.log1p(-np.exp(x)), np.log(-np.expm1(x)))


def mean_or_zero(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return 0.0
    return float(np.mean(x))


def _f64(x):
    return np.asarray(x, dtype=np.float64)


def _valid(batch_size: int, example_mask) -> np.ndarray:
    if example_mask is None:
        return np.ones(batch_size, dtype=bool)
    return np.asarray(example_mask, dtype=bool).reshape(batch_size)


def _select(example_mask, *arrays):
    """Cast to float64 and keep only the valid rows of every array."""
    batch_size = np.asarray(arrays[0]).shape[0]
    valid = _valid(batch_size, example_mask)
    return [np.asarray(a)[valid] for a in arrays]


def _paired_metrics(chosen_rewards, rejected_rewards, pc, pr):
    return {
        "rewards/chosen": mean_or_zero(chosen_rewards),
        "rewards/rejected": mean_or_zero(rejected_rewards),
        "rewards/margins": mean_or_zero(chosen_rewards - rejected_rewards),
        "rewards/accuracies": mean_or_zero((chosen_rewards > rejected_rewards).astype(np.float64)),
        "logps/chosen": mean_or_zero(pc),
        "logps/rejected": mean_or_zero(pr),
    }


def _unary_metrics(beta, policy, reference, desirable):
    rewards = beta * (policy - reference)
    chosen = mean_or_zero(rewards[desirable])
    rejected = mean_or_zero(rewards[~desirable])
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "logps/chosen": mean_or_zero(policy[desirable]),
        "logps/rejected": mean_or_zero(policy[~desirable]),
        "num_desirable": float(np.sum(desirable)),
        "num_undesirable": float(np.sum(~desirable)),
    }
