"""Build positional inputs for any registered loss from its spec (test helper)."""

import jax.numpy as jnp
import numpy as np


def sequence_inputs(spec, batch, rng, low=-60.0, high=0.0):
    """Random positional args for ``spec.fn`` (per-sequence losses), float32 numpy."""

    def logps():
        return rng.uniform(low, high, size=batch).astype(np.float32)

    if spec.kind == "unary":
        desirable = rng.random(batch) < 0.5
        if spec.needs_kl:
            return (logps(), logps(), logps(), logps(), desirable)
        return (logps(), logps(), desirable)
    if spec.kind == "paired":
        if spec.needs_reference:
            return (logps(), logps(), logps(), logps())
        return (logps(), logps())
    if spec.kind == "sft":
        return (logps(), rng.integers(1, 20, size=batch).astype(np.int32))
    raise AssertionError(spec.kind)


def token_inputs(batch, length, rng, scale=1.0):
    """Random (policy, reference, values, desirable, mask) per-token inputs for offline PPO."""
    policy = rng.uniform(-5, 0, size=(batch, length)).astype(np.float32)
    reference = (policy + rng.uniform(-scale, scale, size=(batch, length))).astype(np.float32)
    values = rng.normal(size=(batch, length)).astype(np.float32)
    desirable = rng.random(batch) < 0.5
    mask = np.zeros((batch, length), bool)
    for b in range(batch):
        start = int(rng.integers(0, length - 1))
        mask[b, start : int(rng.integers(start + 1, length + 1))] = True
    return policy, reference, values, desirable, mask


def float_arg_indices(args):
    """Positions of the float (differentiable) arguments."""
    return tuple(i for i, a in enumerate(args) if np.asarray(a).dtype.kind == "f")


def as_jnp(args):
    return tuple(jnp.asarray(a) for a in args)
