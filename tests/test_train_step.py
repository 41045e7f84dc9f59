"""The pure train step (kto_jax/train/step.py) on one device, in-process.

A 2-layer tiny-1m Llama, batches of 8 synthetic examples (<= 32 tokens) from FeedbackLoader.
The reference model is a second random init (seed 1), so log-ratios, rewards and KTO's z0 are
not all zero and a mix-up of reference log-probs shows. Jitted with low XLA optimisation
(tests/train_helpers.py) to keep compilation short; compiled steps are shared between tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from kto_jax.data.builders import load_examples
from kto_jax.data.feedback import unary_view
from kto_jax.data.loader import FeedbackLoader
from kto_jax.data.tokenize import TokenizeConfig, get_tokenizer
from kto_jax.losses import get_loss
from kto_jax.models import build_model
from kto_jax.models.presets import get_preset
from kto_jax.train.feeds import StepSpec
from kto_jax.train.state import TrainState, init_state, learning_rate, make_optimizer
from kto_jax.train.step import microbatch_loss, reference_logps, train_step
from tests.train_helpers import FAST_COMPILER_OPTIONS

MODEL_CONFIG = get_preset("tiny-1m", num_layers=2)
MODEL = build_model(MODEL_CONFIG)
TOKENIZE = TokenizeConfig(max_length=32, max_prompt_length=16, chat_template="plain")
BATCH = 8

OPTIMIZERS = {
    # the tiny experiments' optimizer, at a higher rate to see the loss fall in 10 steps
    "adamw": ml_collections.ConfigDict(
        dict(name="adamw", lr=1e-3, warmup_steps=0, grad_clip=1.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    ),
    # new params = params - grads: the update *is* the (accumulated) gradient
    "sgd": ml_collections.ConfigDict(
        dict(name="sgd", lr=1.0, warmup_steps=0, grad_clip=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    ),
}


def jit(fn):
    return jax.jit(fn, compiler_options=FAST_COMPILER_OPTIONS)


def synthetic_examples(data_dir: str) -> dict:
    """The synthetic validation split, paired and in the unary view."""
    paired = load_examples("synthetic", "validation", data_dir)
    return {"paired": paired, "unary": unary_view(paired, seed=0)[0]}


def loader(examples, loss: str, *, num_microbatches: int = 1, seed: int = 0) -> FeedbackLoader:
    spec = get_loss(loss)
    return FeedbackLoader(
        examples["paired" if spec.kind == "paired" else "unary"],
        get_tokenizer("bytes"),
        TOKENIZE,
        global_batch_size=BATCH,
        seed=seed,
        kl_pairing=spec.needs_kl,
        num_microbatches=num_microbatches,
        bucket=16,
        process_index=0,
        process_count=1,
    )


def step_spec(loss: str, num_microbatches: int = 1, mode: str = "model") -> StepSpec:
    spec = get_loss(loss)
    mode = mode if spec.needs_reference else "none"
    return StepSpec(MODEL, spec, tuple(sorted(spec.defaults.items())), num_microbatches, mode, 256)


@functools.cache
def compiled_step(loss: str, num_microbatches: int = 1, mode: str = "model", optimizer: str = "adamw"):
    """jit(train_step) for one (loss, microbatches, reference mode, optimizer), shared between tests."""
    cfg = OPTIMIZERS[optimizer]
    step = functools.partial(
        train_step, step_spec(loss, num_microbatches, mode), make_optimizer(cfg), functools.partial(learning_rate, cfg)
    )
    return jit(step)


@functools.cache
def compiled_reference_logps(loss: str, num_microbatches: int):
    return jit(functools.partial(reference_logps, step_spec(loss, num_microbatches)))


def initial_state(loss: str, params, optimizer: str = "adamw") -> TrainState:
    """The shipped state builder (kto_jax.train.state.init_state), on one device."""
    return init_state(step_spec(loss), make_optimizer(OPTIMIZERS[optimizer]), params, seed=0)


def assert_trees_close(actual, expected, atol, what=""):
    flat_a = jax.tree_util.tree_leaves_with_path(actual)
    flat_e = jax.tree_util.tree_leaves(expected)
    assert len(flat_a) == len(flat_e)
    for (path, a), e in zip(flat_a, flat_e):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(e), rtol=0, atol=atol, err_msg=f"{what}{jax.tree_util.keystr(path)}"
        )


def assert_metrics_close(actual: dict, expected: dict, atol: float):
    assert sorted(actual) == sorted(expected)
    for key in expected:
        a, e = np.asarray(actual[key], np.float64), np.asarray(expected[key], np.float64)
        np.testing.assert_allclose(a, e, rtol=0, atol=atol, err_msg=key)


# ---------------------------------------------------------------------------- training


@pytest.mark.parametrize("loss, start", [("kto", 0.5), ("dpo", float(np.log(2.0)))])
def test_loss_falls_on_a_fixed_batch(loss, start, examples, policy):
    """Ten adamw steps on one batch, reference = initial policy: the loss starts at its
    zero-reward value (KTO 1 - sigmoid(0), DPO log 2) and falls steadily."""
    batch = next(loader(examples, loss))
    state = initial_state(loss, policy)
    step = compiled_step(loss)
    losses = []
    for _ in range(10):
        state, metrics = step(state, batch, policy)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)), losses
    assert losses[0] == pytest.approx(start, abs=1e-5)
    assert int(state.step) == 10
    assert losses[-1] < 0.7 * losses[0], losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 8, losses
    assert float(metrics["rewards/margins"]) > 0


# ---------------------------------------------------------------------------- cached reference


@pytest.mark.parametrize("loss", ["kto", "dpo", "ipo", "kto_zero"])
def test_cached_reference_logps_give_the_model_reference_loss(loss, examples, policy, reference):
    """microbatch_loss with reference_mode="cached" (reference_logps arrays added to the batch)
    equals reference_mode="model" (a reference forward inside the step): loss and every metric.
    (IPO's log-probs are length-normalised; kto_zero takes no KL sequences.)"""
    batch = next(loader(examples, loss))
    model_spec, cached_spec = step_spec(loss, 1, "model"), step_spec(loss, 1, "cached")

    @jit
    def both(params, reference_params, batch):
        cached = reference_logps(model_spec, reference_params, batch)
        from_model = microbatch_loss(model_spec, params, reference_params, batch, {})
        from_cache = microbatch_loss(cached_spec, params, None, {**batch, **cached}, {})
        return cached, from_model, from_cache

    cached, (loss_m, (metrics_m, _)), (loss_c, (metrics_c, _)) = both({"model": policy}, reference, batch)
    expected_keys = {"kto": {"reference_logps", "reference_kl_logps"}, "kto_zero": {"reference_logps"}}.get(
        loss, {"reference_chosen_logps", "reference_rejected_logps"}
    )
    assert set(cached) == expected_keys
    assert all(v.shape == (BATCH,) for v in cached.values())
    assert abs(float(metrics_m["rewards/margins"])) > 1e-3  # the reference differs from the policy
    np.testing.assert_allclose(float(loss_c), float(loss_m), rtol=0, atol=1e-6)
    assert_metrics_close(metrics_c, metrics_m, atol=1e-6)


@pytest.mark.parametrize("loss", ["kto", "dpo"])
def test_cached_reference_train_step_with_microbatches(loss, examples, policy, reference):
    """train_step with 2 strided microbatches: cached reference log-probs (computed microbatch by
    microbatch and put back in row order) give the same loss, metrics and update as the model."""
    batch = next(loader(examples, loss, num_microbatches=2))
    cached = compiled_reference_logps(loss, 2)(reference, batch)
    state = initial_state(loss, policy, "sgd")
    new_m, metrics_m = compiled_step(loss, 2, "model", "sgd")(state, batch, reference)
    new_c, metrics_c = compiled_step(loss, 2, "cached", "sgd")(state, {**batch, **cached}, None)
    np.testing.assert_allclose(float(metrics_c["loss"]), float(metrics_m["loss"]), rtol=0, atol=1e-6)
    assert_metrics_close(metrics_c, metrics_m, atol=1e-6)
    assert_trees_close(new_c.params, new_m.params, atol=1e-6)


# ---------------------------------------------------------------------------- microbatches


@pytest.mark.parametrize("k", [2, 4])
def test_dpo_accumulated_microbatches_equal_one_big_batch(k, examples, policy, reference):
    """DPO's loss is a mean over pairs, so k accumulated microbatches give the loss, metrics and
    gradient (sgd at lr 1: the param update) of the whole batch at once."""
    batch = next(loader(examples, "dpo"))
    state = initial_state("dpo", policy, "sgd")
    one, metrics_one = compiled_step("dpo", 1, "model", "sgd")(state, batch, reference)
    acc, metrics_acc = compiled_step("dpo", k, "model", "sgd")(state, batch, reference)
    assert float(metrics_one["grad_norm"]) > 1e-3
    np.testing.assert_allclose(float(metrics_acc["loss"]), float(metrics_one["loss"]), rtol=0, atol=1e-5)
    assert_metrics_close(metrics_acc, metrics_one, atol=1e-5)
    assert_trees_close(acc.params, one.params, atol=1e-5)


@functools.cache
def compiled_microbatch_grad(loss: str):
    spec = step_spec(loss, 1)
    return jit(jax.value_and_grad(lambda p, ref, mb: microbatch_loss(spec, p, ref, mb, {}), has_aux=True))


@pytest.mark.parametrize("k", [2])
def test_kto_microbatches_average_their_own_losses(k, examples, policy, reference):
    """KTO with k microbatches: each microbatch (rows m, m+k, ...) has its own z0, and the step's
    loss, kl and gradient are the averages of the k microbatch losses computed separately."""
    batch = next(loader(examples, "kto", num_microbatches=k))
    state = initial_state("kto", policy, "sgd")
    new, metrics = compiled_step("kto", k, "model", "sgd")(state, batch, reference)

    grad = compiled_microbatch_grad("kto")
    parts = [grad(state.params, reference, {key: v[m::k] for key, v in batch.items()}) for m in range(k)]
    losses = np.array([float(loss) for (loss, _), _ in parts])
    kls = np.array([float(m["kl"]) for (_, (m, _)), _ in parts])
    mean_grads = jax.tree_util.tree_map(lambda *g: sum(g) / k, *[g for _, g in parts])

    assert kls.max() > 0 and np.ptp(kls) > 1e-5, f"the microbatches' z0 should differ: {kls}"
    np.testing.assert_allclose(float(metrics["loss"]), losses.mean(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(float(metrics["kl"]), kls.mean(), rtol=0, atol=1e-6)
    expected = jax.tree_util.tree_map(lambda p, g: p - g, state.params, mean_grads)
    assert_trees_close(new.params, expected, atol=1e-6)


# ---------------------------------------------------------------------------- loss state, PPO


def test_bco_running_mean_is_carried_across_steps(examples, policy, reference):
    """bco_pair's running reward mean lives in state.loss_state: after step t it equals that
    step's bco/running_mean metric and the mean of the t batch-mean rewards so far."""
    data = loader(examples, "bco_pair")
    state = initial_state("bco_pair", policy)
    assert set(state.loss_state) == {"running_mean", "running_count"}
    step = compiled_step("bco_pair")
    batch_means, seen = [], []
    for t in range(1, 4):
        state, metrics = step(state, next(data), reference)
        batch_means.append((float(metrics["rewards/chosen"]) + float(metrics["rewards/rejected"])) / 2)
        running = float(state.loss_state["running_mean"])
        seen.append(running)
        assert float(state.loss_state["running_count"]) == t
        np.testing.assert_allclose(running, float(metrics["bco/running_mean"]), rtol=0, atol=1e-7)
        np.testing.assert_allclose(running, np.mean(batch_means), rtol=0, atol=1e-6)
    assert np.ptp(batch_means) > 1e-4 and len(set(seen)) == 3, (batch_means, seen)


def test_offline_ppo_trains_one_step_with_a_value_head(examples, policy):
    """ppo_offline: per-token log-probs and a value head (HALOs' 3-layer MLP) on the final hidden
    states; one step gives a finite loss and gradient and moves every layer of the value head."""
    batch = next(loader(examples, "ppo_offline"))
    state = initial_state("ppo_offline", policy)
    new, metrics = compiled_step("ppo_offline")(state, batch, policy)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in metrics.values()), metrics
    assert float(metrics["grad_norm"]) > 0
    head = jax.tree_util.tree_map(
        lambda a, b: float(jnp.abs(a - b).max()), new.params["value_head"], state.params["value_head"]
    )
    assert min(jax.tree_util.tree_leaves(head)) > 0, f"the value head did not train: {head}"
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), new.params["model"], state.params["model"])
    assert max(jax.tree_util.tree_leaves(moved)) > 0
    assert int(new.step) == 1


def ppo_spec(critic_coef: float) -> StepSpec:
    spec = get_loss("ppo_offline")
    return StepSpec(MODEL, spec, tuple(sorted({**spec.defaults, "critic_coef": critic_coef}.items())), 1, "model", 256)


@pytest.fixture(scope="module")
def ppo_grads(examples, policy, reference):
    """(params, {critic_coef: gradient of one offline-PPO microbatch loss}) at critic_coef 0.01 and 10.
    The head's params are shifted off their init (+0.05), so a head that let gradients through
    would pass the critic's gradient to the LM whatever its init (e.g. a zero last layer)."""
    batch = next(loader(examples, "ppo_offline"))
    params = initial_state("ppo_offline", policy).params
    params = {**params, "value_head": jax.tree_util.tree_map(lambda x: x + 0.05, params["value_head"])}
    grads = {}
    for coef in (0.01, 10.0):
        spec = ppo_spec(coef)
        grads[coef] = jit(jax.grad(lambda p, ref, mb, spec=spec: microbatch_loss(spec, p, ref, mb, {})[0]))(
            params, reference, batch
        )
    return params, grads


def test_offline_ppo_critic_does_not_train_the_language_model(ppo_grads):
    """The value head reads stop_gradient(hidden states) (HALOs: "detach so that loss isn't
    backproped through LM"): the LM's gradient is the same at critic_coef 0.01 and 10, and the
    head's gradient, which comes from the critic loss alone, scales with critic_coef (x1000)."""
    _, grads = ppo_grads
    low, high = grads[0.01], grads[10.0]
    assert_trees_close(high["model"], low["model"], atol=1e-6, what="model")
    assert float(optax.tree.norm(low["value_head"])) > 1e-6
    for (path, h), lo in zip(
        jax.tree_util.tree_leaves_with_path(high["value_head"]), jax.tree_util.tree_leaves(low["value_head"])
    ):
        h, lo = np.asarray(h, np.float64), np.asarray(lo, np.float64)  # float32 sums: compare to the leaf's scale
        assert np.linalg.norm(h - 1000.0 * lo) <= 1e-5 * np.linalg.norm(h), jax.tree_util.keystr(path)


def test_value_head_is_halos_three_layer_mlp():
    """HALOs' ValueHead (legacy models.py): Linear(H, H), ReLU, Linear(H, H), ReLU, Linear(H, 1) in
    float32, torch.nn.Linear's init U(-1/sqrt(H), 1/sqrt(H)) for kernels and biases; values of
    bfloat16 hidden states are float32 and equal the numpy MLP."""
    from kto_jax.models.value_head import ValueHead
    from kto_jax.train.feeds import TokenFeed

    H = MODEL_CONFIG.hidden_size
    head = TokenFeed().init_params(MODEL_CONFIG, seed=0)["value_head"]
    shapes = jax.tree_util.tree_map(lambda x: (x.shape, str(x.dtype)), head)
    assert shapes == {
        name: {"kernel": ((H, out), "float32"), "bias": ((out,), "float32")}
        for name, out in (("hidden_0", H), ("hidden_1", H), ("value", 1))
    }
    bound = H**-0.5
    for leaf in jax.tree_util.tree_leaves(head):
        assert float(jnp.abs(leaf).max()) <= bound
    assert float(jnp.abs(head["hidden_0"]["kernel"]).max()) > 0.95 * bound  # uniform over the whole range
    hidden = jax.random.normal(jax.random.PRNGKey(3), (2, 5, H)).astype(jnp.bfloat16)
    values = ValueHead().apply({"params": head}, hidden)
    assert values.shape == (2, 5) and values.dtype == jnp.float32
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), head)
    x = np.asarray(hidden.astype(jnp.float32), np.float64)
    for name in ("hidden_0", "hidden_1"):
        x = np.maximum(x @ p[name]["kernel"] + p[name]["bias"], 0.0)
    expected = (x @ p["value"]["kernel"] + p["value"]["bias"])[..., 0]
    np.testing.assert_allclose(np.asarray(values), expected, rtol=1e-5, atol=1e-6)


def test_value_head_gradient_is_clipped_apart_from_the_model(ppo_grads):
    """HALOs' PPOTrainer.clip_gradient clips the value head's gradient to global norm 0.1 and the LM's
    to max_grad_norm, separately; the update rule is the same. With sgd at lr 1 (update = -clipped
    gradient), critic_coef 10 (the head's gradient norm far above 0.1) and the model's clip at half
    the model's gradient norm: the head's update has norm 0.1 along its gradient, and the model's
    is half its gradient, the same as at critic_coef 0.01 (one global clip would shrink it by the
    head's norm)."""
    params, grads = ppo_grads
    high, low = grads[10.0], grads[0.01]
    head_norm, model_norm = float(optax.tree.norm(high["value_head"])), float(optax.tree.norm(high["model"]))
    assert head_norm > 1.0 and model_norm > 1e-3
    cfg = ml_collections.ConfigDict(
        dict(OPTIMIZERS["sgd"].to_dict(), grad_clip=model_norm / 2, value_head_grad_clip=0.1)
    )
    optimizer = make_optimizer(cfg)
    updates, _ = optimizer.update(high, optimizer.init(params), params)
    updates_low, _ = optimizer.update(low, optimizer.init(params), params)
    np.testing.assert_allclose(float(optax.tree.norm(updates["value_head"])), 0.1, rtol=1e-5)
    assert_trees_close(
        updates["value_head"], jax.tree_util.tree_map(lambda g: -g * 0.1 / head_norm, high["value_head"]), atol=1e-7
    )
    assert_trees_close(updates["model"], jax.tree_util.tree_map(lambda g: -g / 2, high["model"]), atol=1e-7)
    assert_trees_close(updates["model"], updates_low["model"], atol=1e-7)


# ---------------------------------------------------------------------------- feeds


def test_halo_around_zero_skips_the_kl_forward_and_equals_kto_zero(examples, policy, reference):
    """halo with reference_point="zero" takes no KL log-probs, so its feed asks the loader for no
    KL sequences and runs one policy forward fewer (4 forward-equivalents per example, not 6);
    on the same batch its loss and gradient are kto_zero's."""
    from kto_jax.train.flops import step_flops

    spec_kl = get_loss("halo")
    hparams = {**spec_kl.defaults, "reference_point": "zero"}
    zero = StepSpec(MODEL, spec_kl, tuple(sorted(hparams.items())), 1, "model", 256)
    assert zero.schema.sequences == ("",) and step_spec("halo").schema.sequences == ("", "kl")
    assert step_flops(MODEL_CONFIG, spec_kl, batch=8, length=32, hparams=hparams) / step_flops(
        MODEL_CONFIG, spec_kl, batch=8, length=32
    ) == pytest.approx(4 / 6)
    batch = next(loader(examples, "kto_zero"))
    assert "kl_input_ids" not in batch
    value_halo, grad_halo = jax.value_and_grad(lambda p: microbatch_loss(zero, p, reference, batch, {})[0])(
        {"model": policy}
    )
    value_kto, grad_kto = jax.value_and_grad(
        lambda p: microbatch_loss(step_spec("kto_zero"), p, reference, batch, {})[0]
    )({"model": policy})
    np.testing.assert_allclose(float(value_halo), float(value_kto), rtol=0, atol=1e-6)
    assert_trees_close(grad_halo, grad_kto, atol=1e-6)
