"""Test configuration: full-precision float32 matmuls; reproducible hypothesis runs in CI."""

import os

import jax
from hypothesis import settings

jax.config.update("jax_default_matmul_precision", "highest")

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
