"""Offline PPO's value head (its critic): a small MLP on the decoder's final hidden states, with
params of its own beside the model's (``params["value_head"]``, made by the ``token`` feed,
``kto_jax.train.feeds``)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def _torch_linear_init(fan_in: int):
    """torch.nn.Linear's default init (the HALOs value head's): kernel and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = fan_in**-0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class ValueHead(nn.Module):
    """Offline PPO's critic: a scalar per token from the final hidden states h, HALOs' ``ValueHead``
    (legacy models.py:218-253): in float32, on stop_gradient(h), so the critic loss does not train
    the language model ("detach so that loss isn't backproped through LM", models.py:249),

        V = W3 relu(W2 relu(W1 h + b1) + b2) + b3,   W1, W2: [H, H], W3: [H, 1]

    with torch.nn.Linear's default init. HALOs also puts Dropout(0.1) after each hidden layer
    (``summary_dropout_prob``, models.py:227, active in train mode); this head has none.
    """

    @nn.compact
    def __call__(self, hidden):
        h = jax.lax.stop_gradient(hidden).astype(jnp.float32)
        size = h.shape[-1]
        init = _torch_linear_init(size)  # every layer's fan-in is H
        h = nn.relu(nn.Dense(size, kernel_init=init, bias_init=init, name="hidden_0")(h))
        h = nn.relu(nn.Dense(size, kernel_init=init, bias_init=init, name="hidden_1")(h))
        return nn.Dense(1, kernel_init=init, bias_init=init, name="value")(h)[..., 0]
