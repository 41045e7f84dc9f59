"""checkpoint.fingerprint: the same weights give the same fingerprint wherever they are loaded.

A run records its reference model's fingerprint and a resume refuses a checkpoint whose reference
differs; an init from ``orbax:WORKDIR@STEP`` is checked the same way. The fingerprint hashes exact
integer sums of the leaves' bits (modulo 2**32), so it cannot depend on XLA's reduction order: the
processes below differ in compiler flags and in the mesh (1 device, 8 devices with the leaves
sharded), and all must agree with the numpy formula of the digest.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from kto_jax import checkpoint
from tests.train_helpers import FAST_XLA_FLAGS, REPO, subprocess_env

WORKER = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from kto_jax import checkpoint
rng = np.random.default_rng(0)
params = {"w": rng.normal(size=(16, 24)).astype(np.float32), "b": rng.normal(size=(24,)).astype(jnp.bfloat16)}
if len(jax.devices()) > 1:
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    params = {"w": jax.device_put(params["w"], NamedSharding(mesh, P("data", "model"))),
              "b": jax.device_put(params["b"], NamedSharding(mesh, P("data")))}
print(json.dumps(checkpoint.fingerprint(params)))
"""


def _digest_numpy(x: np.ndarray) -> list[int]:
    """[sum_i b_i, sum_i b_i (2654435761 i + 1)] mod 2**32 of the row-major bit patterns b_i."""
    bits = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).ravel().astype(np.uint64)
    position = (np.arange(bits.size, dtype=np.uint64) * 2654435761 + 1) % 2**32
    return [int(bits.sum() % 2**32), int(((bits * position) % 2**32).sum() % 2**32)]


def test_leaf_digest_is_the_integer_sums_of_the_bits():
    rng = np.random.default_rng(1)
    for x in (rng.normal(size=(5, 7)).astype(np.float32), rng.normal(size=(3, 2, 4)).astype(jnp.bfloat16)):
        assert np.asarray(checkpoint._leaf_digest(jnp.asarray(x))).tolist() == _digest_numpy(x)


def test_fingerprint_tells_values_permutations_dtypes_and_structure_apart():
    w = jnp.arange(16.0).reshape(4, 4)
    base = checkpoint.fingerprint({"w": w})
    assert checkpoint.fingerprint({"w": jnp.array(w)}) == base  # a copy: the same
    others = [
        {"w": w.T},  # the same values, permuted
        {"w": w.at[1, 2].add(1e-6)},  # one value, by one ulp-ish
        {"w": w.astype(jnp.bfloat16)},
        {"v": w},
        {"w": w.reshape(2, 8)},
    ]
    assert len({base, *(checkpoint.fingerprint(o) for o in others)}) == 1 + len(others)


def test_fingerprint_is_the_same_under_any_flags_and_mesh():
    fingerprints = {}
    for name, env in {
        "1 device, optimised": subprocess_env(devices=1) | {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
        "1 device, fast flags": subprocess_env(devices=1),
        "8 devices, sharded": subprocess_env(devices=8),
    }.items():
        out = subprocess.run(
            [sys.executable, "-c", WORKER], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-2000:]
        fingerprints[name] = json.loads(out.stdout.strip().splitlines()[-1])
    rng = np.random.default_rng(0)  # the worker's weights, in this process
    here = {"w": rng.normal(size=(16, 24)).astype(np.float32), "b": rng.normal(size=(24,)).astype(jnp.bfloat16)}
    fingerprints["this process"] = checkpoint.fingerprint(jax.tree.map(jnp.asarray, here))
    assert len(set(fingerprints.values())) == 1, fingerprints
    assert FAST_XLA_FLAGS in subprocess_env(devices=1)["XLA_FLAGS"]
