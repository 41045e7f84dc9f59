"""Float64 gradients of the numpy references (tests/numpy_reference.py, numpy_reference_ppo.py) by
central differences, for tests/test_losses_grad.py."""

from __future__ import annotations

import numpy as np

STEP = 1e-5  # inputs are log-probs of size <= 60 and the references are float64: truncation ~1e-10


def central_difference(f, x, h=STEP) -> np.ndarray:
    """d f(x) / d x_j = (f(x + h e_j) - f(x - h e_j)) / (2 h) for every element j of ``x``, in float64.

    ``f`` maps an array shaped like ``x`` to a float (a reference's loss with the other inputs fixed).
    """
    x = np.asarray(x, np.float64)
    grad = np.zeros(x.shape)
    for j in np.ndindex(*x.shape):
        plus, minus = x.copy(), x.copy()
        plus[j] += h
        minus[j] -= h
        grad[j] = (f(plus) - f(minus)) / (2.0 * h)
    return grad


def reference_gradient(reference, args: list, optional: dict, hparams: dict, index: int, example_mask=None):
    """Central-difference gradient of ``reference(*args, **optional, **hparams)[0]`` with respect to
    ``args[index]`` (the other arguments fixed)."""

    def loss(x):
        moved = list(args)
        moved[index] = x
        return reference(*moved, **optional, **hparams, example_mask=example_mask)[0]

    return central_difference(loss, args[index])
