"""Test configuration: float32 matmuls at full precision so references compare tightly."""

import jax

jax.config.update("jax_default_matmul_precision", "highest")
