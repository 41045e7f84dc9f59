"""Loss mixtures (kto_jax/losses/mixture.py): loss = sum_k w_k loss_k, against the numpy references.

Each term's reference (tests/numpy_reference*.py, written from TRL/HALOs code) is called on the inputs
the term would see alone: an sft term on paired data scores the chosen replies, on unary data the
desirable examples; a length-normalised term gets per-token means. The gradient is checked against
float64 central differences of the references' weighted sum; the step-level tests are in
tests/test_train_mixture.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kto_jax.config import loss_config
from kto_jax.errors import InputError
from kto_jax.losses import get_loss
from kto_jax.losses.mixture import MixtureSpec
from tests import numpy_reference as R
from tests import numpy_reference_free as F
from tests.numpy_grad import central_difference

B = 6


def _paired_inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = {
        n: (-30 + 8 * rng.standard_normal(B)).astype(np.float32)
        for n in ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")
    }
    x["chosen_token_counts"] = rng.integers(3, 20, B).astype(np.float32)
    x["rejected_token_counts"] = rng.integers(3, 20, B).astype(np.float32)
    return x


def _unary_inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = {n: (-30 + 8 * rng.standard_normal(B)).astype(np.float32) for n in ("policy_logps", "reference_logps")}
    x["policy_kl_logps"] = (-40 + 8 * rng.standard_normal(B)).astype(np.float32)
    x["reference_kl_logps"] = (-42 + 8 * rng.standard_normal(B)).astype(np.float32)
    x["desirable"] = np.array([True, False, True, True, False, False])
    x["token_counts"] = rng.integers(3, 20, B).astype(np.float32)
    return x


def _call(spec, x, **overrides):
    return spec.fn(**{n: jnp.asarray(x[n]) for n in spec.inputs()}, **spec.hyperparameters(overrides))


PC, PR, RC, RR = "policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps"


def reference_dpo_sft(x, w, beta=0.1):
    """w0 * DPO + w1 * token-mean NLL of the chosen replies (TRL's RPO with rpo_alpha = w1 / w0 when w0 = 1)."""
    dpo = R.dpo(x[PC], x[PR], x[RC], x[RR], beta=beta)[0]
    nll = F.sft(x[PC], x["chosen_token_counts"])[0]
    return w[0] * dpo + w[1] * nll


def test_dpo_plus_sft_is_the_weighted_sum_of_the_references():
    x = _paired_inputs()
    spec = get_loss("dpo+sft")
    loss, metrics = _call(spec, x, weights=[1.0, 0.37], dpo={"beta": 0.3})
    np.testing.assert_allclose(float(loss), reference_dpo_sft(x, (1.0, 0.37), beta=0.3), rtol=2e-6)
    np.testing.assert_allclose(float(metrics["dpo/loss"]), R.dpo(x[PC], x[PR], x[RC], x[RR], beta=0.3)[0], rtol=2e-6)
    np.testing.assert_allclose(float(metrics["sft/loss"]), F.sft(x[PC], x["chosen_token_counts"])[0], rtol=2e-6)
    ref_metrics = R.dpo(x[PC], x[PR], x[RC], x[RR], beta=0.3)[1]
    for key, value in ref_metrics.items():
        np.testing.assert_allclose(float(metrics[f"dpo/{key}"]), value, rtol=2e-5, atol=1e-6, err_msg=key)
    assert "rewards/margins" not in metrics  # every term's metrics carry its prefix


def test_rpo_preset_is_dpo_plus_the_chosen_nll():
    """RPO (Pang et al. 2024; TRL rpo_alpha=1): DPO + 1.0 * NLL of the chosen reply."""
    x = _paired_inputs(1)
    spec = get_loss("rpo")
    assert [t.name for t in spec.terms] == ["dpo", "sft"] and spec.hyperparameters()["weights"] == (1.0, 1.0)
    np.testing.assert_allclose(float(_call(spec, x)[0]), reference_dpo_sft(x, (1.0, 1.0)), rtol=2e-6)


def test_kto_plus_sft_trains_the_nll_on_the_desirable_examples_only():
    x = _unary_inputs()
    loss, metrics = _call(get_loss("kto+sft"), x, weights=[1.0, 0.5])
    kto = R.kto(x["policy_logps"], x["reference_logps"], x["policy_kl_logps"], x["reference_kl_logps"], x["desirable"])[
        0
    ]
    d = x["desirable"]
    nll = -x["policy_logps"][d].sum() / x["token_counts"][d].sum()  # token-mean NLL over the desirable rows
    np.testing.assert_allclose(float(loss), kto + 0.5 * nll, rtol=2e-6)
    np.testing.assert_allclose(float(metrics["sft/tokens"]), x["token_counts"][d].sum())
    assert float(metrics["kto/num_desirable"]) == d.sum()


def test_a_length_normalised_term_gets_per_token_means_and_the_others_sums():
    """ipo is length-normalised (the registry's flag): the mixture divides its log-probs by the token
    counts; dpo in the same mixture sees the summed log-probs."""
    x = _paired_inputs(2)
    spec = get_loss("dpo+ipo")
    assert {"chosen_token_counts", "rejected_token_counts"} <= set(spec.inputs())
    nc, nr = x["chosen_token_counts"], x["rejected_token_counts"]
    ipo = R.ipo(x[PC] / nc, x[PR] / nr, x[RC] / nc, x[RR] / nr, beta=0.5)[0]
    dpo = R.dpo(x[PC], x[PR], x[RC], x[RR])[0]
    loss = _call(spec, x, weights=[0.25, 2.0], ipo={"beta": 0.5})[0]
    np.testing.assert_allclose(float(loss), 0.25 * dpo + 2.0 * ipo, rtol=2e-6)


def test_mpo_carries_bco_pairs_running_mean_as_its_own_state():
    x = _paired_inputs(3)
    spec = get_loss("mpo")
    assert spec.state_metrics == (
        ("bco_pair__running_mean", "bco_pair/bco/running_mean"),
        ("bco_pair__running_count", "bco_pair/bco/running_count"),
    )
    args = {n: jnp.asarray(x[n]) for n in spec.inputs()}
    loss, metrics = spec.fn(**args, **spec.hyperparameters(), bco_pair__running_mean=0.7, bco_pair__running_count=3.0)
    bco, bco_metrics = R.bco_pair(x[PC], x[PR], x[RC], x[RR], running_mean=0.7, running_count=3.0)
    expected = 0.8 * R.dpo(x[PC], x[PR], x[RC], x[RR])[0] + 0.2 * bco + F.sft(x[PC], x["chosen_token_counts"])[0]
    np.testing.assert_allclose(float(loss), expected, rtol=2e-6)
    np.testing.assert_allclose(float(metrics["bco_pair/bco/running_mean"]), bco_metrics["bco/running_mean"], rtol=1e-6)
    assert float(metrics["bco_pair/bco/running_count"]) == 4.0


@pytest.mark.parametrize("name", ["dpo+sft", "dpo+ipo"])
def test_mixture_gradient_equals_central_differences_of_the_references(name):
    """d loss / d policy log-probs, float32 JAX against float64 central differences of the references."""
    x = _paired_inputs(4)
    spec = get_loss(name)
    w = (0.6, 1.7)
    nc, nr = x["chosen_token_counts"], x["rejected_token_counts"]

    def reference(pc, pr):
        if name == "dpo+sft":
            return w[0] * R.dpo(pc, pr, x[RC], x[RR])[0] + w[1] * F.sft(pc, nc)[0]
        return w[0] * R.dpo(pc, pr, x[RC], x[RR])[0] + w[1] * R.ipo(pc / nc, pr / nr, x[RC] / nc, x[RR] / nr)[0]

    def loss(pc, pr):
        args = {n: jnp.asarray(x[n]) for n in spec.inputs()}
        return spec.fn(**{**args, PC: pc, PR: pr}, **spec.hyperparameters({"weights": w}))[0]

    grads = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x[PC]), jnp.asarray(x[PR]))
    expected_c = central_difference(lambda v: reference(v, x[PR].astype(np.float64)), x[PC])
    expected_r = central_difference(lambda v: reference(x[PC].astype(np.float64), v), x[PR])
    np.testing.assert_allclose(np.asarray(grads[0]), expected_c, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grads[1]), expected_r, rtol=1e-3, atol=1e-6)
    assert np.abs(expected_c).max() > 1e-3


def test_the_union_of_inputs_is_the_paired_feeds_own():
    """dpo+sft asks the feed for DPO's four log-probs and the chosen counts, nothing more: the sft
    term reads the chosen replies DPO's forward already scores."""
    assert get_loss("dpo+sft").inputs() == (PC, PR, RC, RR, "chosen_token_counts")
    assert get_loss("dpo+sft").feed == "paired" and get_loss("kto+sft").feed == "unary"
    assert get_loss("kto+sft").needs_kl and get_loss("simpo+sft").needs_reference is False


def test_config_holds_weights_and_one_dict_per_term():
    c = loss_config("dpo+sft", dpo={"beta": 0.2})
    assert c.to_dict() == {
        "name": "dpo+sft",
        "weights": (1.0, 1.0),
        "dpo": {"beta": 0.2, "label_smoothing": 0.0},
        "sft": {"reduction": "token"},
        "ld_alpha": 1.0,  # the paired feed's options, at the top (docs/losses.md)
        "use_weighting": False,
    }
    flat = get_loss("dpo+sft").hyperparameters(
        get_loss("dpo+sft").split_options({k: v for k, v in c.items() if k != "name"})[0]
    )
    assert flat == {"weights": (1.0, 1.0), "dpo.beta": 0.2, "dpo.label_smoothing": 0.0, "sft.reduction": "token"}
    assert get_loss("dpo+sft") is get_loss("dpo+sft")  # one spec per name: the compiled steps are shared
    assert isinstance(get_loss("rpo"), MixtureSpec) and not isinstance(get_loss("dpo"), MixtureSpec)


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("dpo+nope", {}, "unknown loss 'nope'"),
        ("dpo+sft", {"weights": [1.0]}, "1 weights for 2 terms (dpo, sft)"),
        ("dpo+sft", {"weights": [1.0, -1.0]}, "config.loss.weights=[1.0, -1.0]: must be finite, >= 0"),
        ("dpo+sft", {"sft": {"beta": 0.3}}, "config.loss.sft.beta: loss 'sft' has no hyperparameter 'beta'"),
        ("dpo+sft", {"sft": {"beta": 0.3}}, "it is a hyperparameter of 'dpo': config.loss.dpo.beta"),
        ("dpo+sft", {"beta": 0.3}, "config.loss.beta: loss 'dpo+sft' is a mixture"),
        ("kto+dpo", {}, "mixes unary ['kto'] with paired ['dpo']: no feed serves both"),
        ("dpo+ppo_offline", {}, "'ppo_offline' takes per-token inputs"),
        ("dpo+csft", {}, "'csft' conditions the data on control tokens"),
        ("dpo+dpo", {}, "a term appears twice"),
        ("dpo++sft", {}, "an empty term"),
        ("rpo+sft", {}, "term 'rpo' is itself a mixture"),
        ("sft+sft", {}, "a term appears twice"),
    ],
)
def test_bad_mixtures_are_one_line_errors_naming_the_field(name, overrides, message):
    with pytest.raises(InputError) as e:
        loss_config(name, **overrides)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
