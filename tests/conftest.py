"""Test configuration: full-precision float32 matmuls; reproducible hypothesis runs in CI."""

import os

# The tests run on CPU (simulated meshes included); with libtpu installed for the AOT test,
# this keeps JAX from probing for TPU chips in every test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory):
    """The synthetic dataset (paired and unary), prepared once per test session."""
    from kto_jax.data.builders import prepare

    path = str(tmp_path_factory.mktemp("tfds"))
    prepare("synthetic", path)
    prepare("synthetic/unary", path)
    return path
