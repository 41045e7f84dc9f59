"""kto-jax: human-aware alignment losses (KTO, DPO and the HALO family) in JAX."""

__version__ = "0.1.0"
