"""Pure-bf16 training (HALOs' ``policy_dtype: bfloat16``) next to float32 master weights.

``param_dtype=bfloat16`` keeps params and the optimizer state in bfloat16 end to end. At the
paper's RMSprop lr 5e-7 the first update is about lr / sqrt(1 - 0.99) = 5e-6 per weight,
far below half a bf16 ulp of weights of size 0.02 (about 4e-5): on a 2-layer tiny-1m one
step moves 7% of the bf16 weights and 93% of the float32 ones (all that have a gradient:
the embedding rows of tokens the batch lacks have none).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kto_jax.losses import get_loss
from kto_jax.models import build_model
from kto_jax.models.hf import init_params
from kto_jax.models.presets import get_preset
from kto_jax.train.feeds import StepSpec
from kto_jax.train.state import init_state, learning_rate, make_optimizer
from kto_jax.train.step import train_step

PAPER_RMSPROP = ml_collections.ConfigDict(
    dict(name="rmsprop", lr=5e-7, warmup_steps=0, grad_clip=10.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
)


def _batch(vocab, rng, n=8, length=16, prompt=8):
    ids = rng.integers(0, vocab, (n, length)).astype(np.int32)
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "loss_mask": np.arange(length)[None].repeat(n, 0) >= prompt,
        "desirable": np.arange(n) % 2 == 0,
    }


def _one_step(param_dtype: str):
    config = get_preset("tiny-1m", num_layers=2, param_dtype=param_dtype, compute_dtype="float32")
    model = build_model(config)
    spec = StepSpec(model, get_loss("sft"), (), 1, "none", 256)
    optimizer = make_optimizer(PAPER_RMSPROP)
    params = init_params(config, seed=0)
    state = init_state(spec, optimizer, params, seed=0)
    step = jax.jit(lambda s, b: train_step(spec, optimizer, lambda c: learning_rate(PAPER_RMSPROP, c), s, b, None))
    new, metrics = step(state, _batch(config.vocab_size, np.random.default_rng(0)))
    return state, new, metrics


def _floating(tree):
    return [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def test_bf16_params_and_optimizer_state_stay_bf16_and_train():
    state, new, metrics = _one_step("bfloat16")
    assert {str(x.dtype) for x in _floating(new.params)} == {"bfloat16"}
    assert {str(x.dtype) for x in _floating(new.opt_state)} == {"bfloat16"}  # RMSprop's nu too
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0


def test_at_the_paper_lr_most_bf16_weights_do_not_move_while_fp32_ones_all_do():
    moved = {}
    for dtype in ("float32", "bfloat16"):
        state, new, _ = _one_step(dtype)
        before, after = _floating(state.params), _floating(new.params)
        changed = sum(
            int(np.sum(np.asarray(a, np.float32) != np.asarray(b, np.float32))) for a, b in zip(before, after)
        )
        moved[dtype] = changed / sum(a.size for a in before)
    assert moved["float32"] > 0.9, moved  # all but the embedding rows of tokens the batch does not use
    assert moved["bfloat16"] < 0.2, moved
