"""Training: state, pure steps, the loop and the CLI (``python -m kto_jax.train``)."""
