"""Loss mixtures in the train step: one forward per sequence group for the union of the terms' inputs.

The same 2-layer tiny-1m and synthetic batches as tests/test_train_step.py (its compiled steps and
fixtures are shared). The FLOP count is XLA's own (``cost_analysis`` of the compiled step), so a
second forward for the sft term would show.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

from kto_jax.config import tiny_config
from kto_jax.errors import InputError
from kto_jax.losses import get_loss
from kto_jax.models.presets import get_preset
from kto_jax.train.feeds import sequence_logps
from kto_jax.train.flops import step_flops
from kto_jax.train.plan import make_plan
from kto_jax.train.state import learning_rate, make_optimizer
from kto_jax.train.step import microbatch_loss, train_step
from tests.test_train_step import OPTIMIZERS, compiled_step, initial_state, loader, step_spec


def test_dpo_plus_sft_step_is_the_dpo_step_plus_the_chosen_nll(examples, policy, reference):
    """On one batch and params: mixture loss = dpo's loss (a "dpo" step's, bitwise up to float
    rounding) + w * token-mean NLL of the chosen rows (scored here with the feed's sequence_logps)."""
    batch = next(loader(examples, "dpo"))
    spec = step_spec("dpo+sft")
    spec = dataclasses.replace(spec, hparams=tuple(sorted({**spec.kwargs, "weights": (1.0, 0.3)}.items())))
    loss, (metrics, _) = microbatch_loss(spec, {"model": policy}, reference, batch, {})
    dpo_loss, (dpo_metrics, _) = microbatch_loss(step_spec("dpo"), {"model": policy}, reference, batch, {})
    logps, counts = sequence_logps(
        spec, policy, batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_loss_mask"]
    )
    nll = -float(logps.sum()) / float(counts.sum())
    np.testing.assert_allclose(float(metrics["dpo/loss"]), float(dpo_loss), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["sft/loss"]), nll, rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(dpo_loss) + 0.3 * nll, rtol=1e-6)
    for key in ("rewards/margins", "rewards/accuracies"):
        np.testing.assert_allclose(float(metrics[f"dpo/{key}"]), float(dpo_metrics[key]), rtol=1e-6)


def _compiled_flops(loss, examples, policy, reference) -> float:
    batch = next(loader(examples, loss))
    state = initial_state(loss, policy)
    cfg = OPTIMIZERS["adamw"]
    step = functools.partial(train_step, step_spec(loss), make_optimizer(cfg), functools.partial(learning_rate, cfg))
    return float(jax.jit(step).lower(state, batch, reference).cost_analysis()["flops"])


@pytest.mark.parametrize("mixture, alone", [("dpo+sft", "dpo"), ("kto+sft", "kto")])
def test_a_mixture_step_costs_what_its_main_term_costs(mixture, alone, examples, policy, reference):
    """The sft term reads the log-probs the main term's forward already computes: XLA's FLOP count of
    the whole step (forwards, backward, optimizer) is the main term's within 0.5% (the loss
    arithmetic), where a second policy forward would add ~50%; the model count says equal."""
    ours, theirs = (_compiled_flops(n, examples, policy, reference) for n in (mixture, alone))
    assert ours == pytest.approx(theirs, rel=5e-3), (ours, theirs)
    config = get_preset("tiny-1m", num_layers=2)
    assert step_flops(config, get_loss(mixture), batch=8, length=32) == step_flops(
        config, get_loss(alone), batch=8, length=32
    )


def test_mpo_keeps_bco_pairs_running_mean_in_the_state(examples, policy, reference):
    data = loader(examples, "mpo")
    state = initial_state("mpo", policy)
    assert set(state.loss_state) == {"bco_pair__running_mean", "bco_pair__running_count"}
    step = compiled_step("mpo")
    for t in range(1, 3):
        state, metrics = step(state, next(data), reference)
        assert float(state.loss_state["bco_pair__running_count"]) == t
        np.testing.assert_allclose(
            float(state.loss_state["bco_pair__running_mean"]), float(metrics["bco_pair/bco/running_mean"]), atol=1e-7
        )
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0


def test_microbatched_mixture_sums_its_terms_counts(examples, policy, reference):
    """kto/num_desirable and sft/tokens are counts: summed over microbatches, as kto's own."""
    batch = next(loader(examples, "kto+sft", num_microbatches=2))
    _, metrics = compiled_step("kto+sft", 2)(initial_state("kto+sft", policy), batch, reference)
    _, alone = compiled_step("kto", 2)(initial_state("kto", policy), batch, reference)
    assert float(metrics["kto/num_desirable"]) + float(metrics["kto/num_undesirable"]) == 8
    assert float(metrics["kto/num_desirable"]) == float(alone["num_desirable"])
    np.testing.assert_allclose(float(metrics["kto/loss"]), float(alone["loss"]), rtol=1e-6)


def _plan(loss, *flags):
    config = tiny_config(loss, steps=1)
    for flag in flags:
        key, value = flag.split("=")
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = type(node[leaf])(value) if leaf in node else float(value)
    return make_plan(config, 1)


def test_plan_of_a_mixture_validates_each_terms_values():
    plan = _plan("dpo+sft", "loss.dpo.beta=0.25")
    assert dict(plan.hparams)["dpo.beta"] == 0.25 and plan.reference_mode == "model" and plan.loss.kind == "paired"
    with pytest.raises(InputError, match=r"config\.loss\.dpo\.beta=-1\.0: must be > 0"):
        _plan("dpo+sft", "loss.dpo.beta=-1")
    with pytest.raises(InputError, match=r"config\.loss\.kto\.desirable_weight=0\.0: must be > 0"):
        _plan("kto+sft", "loss.kto.desirable_weight=0")
