"""LoRA runs (config.model.lora): only the adapters train, the frozen base is the reference (no
second copy), and at LoRA's init (B = 0) the first step is the full-parameter step's forward.

- The first step's loss and metrics equal a full fine-tuning step's at the same weights (KTO, DPO);
  the state holds the adapters only, and only B moves (dL/dA = 0 while B = 0).
- The reference log-probs are the base model's, from the policy's own frozen leaves: the compiled
  step's argument bytes hold one set of base weights.
- A CLI run trains, leaves the base bitwise at its start, checkpoints adapters only, reopens with
  ``load_run`` and exports merged weights and a PEFT adapter.
- Bad input: reference.mode=sync, dropout, an unmatched target, init.adapter without LoRA, a resumed
  run whose LoRA changed: each one line naming the field.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import pytest

from kto_jax.errors import InputError
from kto_jax.models import build_model, lora
from kto_jax.models.hf import init_params
from kto_jax.train.aot import lower_train_step
from kto_jax.train.plan import make_plan
from kto_jax.train.setup import load_run
from kto_jax.train.state import init_state, make_optimizer
from kto_jax.train.step import train_step
from tests import ckpt_helpers as H
from tests.test_freeze import ADAM, paths
from tests.test_train_step import MODEL_CONFIG, loader, step_spec, synthetic_examples
from tests.train_helpers import small_config, tail

LORA_CONFIG = MODEL_CONFIG.replace(lora_rank=4, lora_alpha=8.0, lora_targets=lora.LORA_MODULES)


def test_a_lora_runs_base_is_the_base_models_init(synthetic_data_dir):
    """A preset's LoRA run starts from the weights the same run without LoRA starts from, plus adapters."""
    from kto_jax.train import setup

    config = small_config("kto", synthetic_data_dir)
    config.model.lora.rank = 4
    plan = make_plan(config, 1)
    model, params = setup.load_model(plan, None)
    base, adapters = lora.split_adapters(params)
    assert model.config.lora_rank == 4 and adapters
    plain = init_params(plan.model_config.replace(lora_rank=0, lora_targets=()), seed=plan.seed)
    for x, y in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module", params=["kto", "dpo"])
def first_step(request, synthetic_data_dir):
    loss = request.param
    base = init_params(MODEL_CONFIG, seed=0)
    batch = next(loader(synthetic_examples(synthetic_data_dir), loss))
    optimizer = make_optimizer(ADAM)
    out = {}
    for name, config, freeze in (("full", MODEL_CONFIG, ()), ("lora", LORA_CONFIG, (lora.FREEZE_BASE,))):
        spec = dataclasses.replace(step_spec(loss), model=build_model(config), freeze=freeze)
        params = lora.init_adapters(config, base, seed=1)
        state = init_state(spec, optimizer, params, seed=0)
        step = jax.jit(lambda s, b, r, spec=spec: train_step(spec, optimizer, lambda c: 0.0, s, b, r, {}))
        out[name] = (state, *step(state, batch, base))  # the reference: the base, for both
    return loss, out


def test_first_step_is_the_full_steps_forward_and_only_adapters_train(first_step):
    loss, out = first_step
    (_, _, full), (state0, state1, ours) = out["full"], out["lora"]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "kl"):
        if key in full:
            np.testing.assert_allclose(ours[key], full[key], rtol=0, atol=1e-6, err_msg=key)
    trained = paths(state0.params)
    assert trained and all(p.endswith(("lora_a", "lora_b")) for p in trained), trained
    assert len(trained) == 2 * len(lora.LORA_MODULES)
    for p, a, b in zip(trained, jax.tree_util.tree_leaves(state0.params), jax.tree_util.tree_leaves(state1.params)):
        if p.endswith("lora_a"):  # dL/dA = (dL/dy) B^T x = 0 while B = 0
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)
        else:
            assert not np.array_equal(np.asarray(a), np.asarray(b)), p
    assert float(ours["grad_norm"]) > 0


def test_aot_argument_bytes_hold_one_set_of_base_weights(synthetic_data_dir):
    """Full KTO passes the policy, its two Adam moments and the reference (4x the weights); LoRA KTO the
    base once (the reference, whose leaves are the policy's frozen ones) plus the adapters' state."""
    sizes = {}
    for rank in (0, 4):
        config = small_config("kto", synthetic_data_dir)
        config.model.lora.rank = rank
        plan = make_plan(config, 1)
        lowered, _ = lower_train_step(plan, jax.devices()[:1])
        sizes[rank] = lowered.compile().memory_analysis().argument_size_in_bytes
    base_bytes = sum(x.size * 4 for x in jax.tree_util.tree_leaves(init_params(MODEL_CONFIG, seed=0)))
    assert sizes[0] > 3.9 * base_bytes
    assert base_bytes < sizes[4] < 1.25 * base_bytes, (sizes, base_bytes)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"reference.mode": "sync"}, r"config\.reference\.mode='sync' with config\.model\.lora\.rank > 0"),
        ({"model.lora.dropout": 0.1}, r"config\.model\.lora\.dropout=0\.1: LoRA dropout is not implemented"),
        ({"model.lora.targets": "q_proj"}, r"config\.model\.lora: config\.model\.lora\.targets: 'q_proj' matches no"),
        ({"model.lora.rank": -2}, r"config\.model\.lora\.rank=-2"),
    ],
)
def test_plan_errors_name_the_field(synthetic_data_dir, changes, pattern):
    config = small_config("kto", synthetic_data_dir)
    config.model.lora.rank = 4
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        node = config
        for part in section.split("."):
            node = node[part]
        node[field] = value
    with pytest.raises(InputError, match=pattern):
        make_plan(config, 1)


def test_an_adapter_needs_lora_on(synthetic_data_dir, tmp_path):
    config = small_config("kto", synthetic_data_dir)
    config.init.adapter = str(tmp_path)
    with pytest.raises(InputError, match=r"config\.init\.adapter=.* but config\.model\.lora\.rank=0"):
        make_plan(config, 1)


# ---------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, synthetic_data_dir):
    """A 4-step LoRA KTO run through the CLI (rank 4, attention targets)."""
    tmp = tmp_path_factory.mktemp("lora_run")
    workdir = str(tmp / "run")
    flags = ("--config.model.lora.rank=4", "--config.model.lora.targets=attention")
    result = H.Proc(H.train_args(workdir, synthetic_data_dir, "loss=kto,steps=4", flags), str(tmp), "run").result()
    assert result["rc"] == 0, tail(result["stderr"])
    return workdir, tmp


@pytest.mark.slow
def test_cli_lora_run_keeps_its_base_and_saves_adapters_only(lora_run):
    workdir, _ = lora_run
    run = load_run(workdir)
    assert (run.model.config.lora_rank, run.model.config.lora_targets) == (4, ("q", "k", "v", "o"))
    base, adapters = lora.split_adapters(run.params)
    start = init_params(run.model.config.replace(lora_rank=0, lora_targets=()), seed=int(run.config.seed))
    for (p, x), y in zip(jax.tree_util.tree_leaves_with_path(base), jax.tree_util.tree_leaves(start)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))
    b = adapters["layers"]["attention"]["q"]["lora_b"]
    assert float(np.abs(np.asarray(b)).max()) > 0  # the adapters trained
    with open(os.path.join(workdir, "checkpoints", "4", "state", "_METADATA"), encoding="utf-8") as f:
        metadata = f.read()
    assert "lora_b" in metadata and "'kernel'" not in metadata and '"kernel"' not in metadata


@pytest.mark.slow
def test_cli_resume_with_another_lora_is_refused(lora_run, synthetic_data_dir):
    workdir, tmp = lora_run
    for flags in (("--config.model.lora.rank=8", "--config.model.lora.targets=attention"), ()):
        result = H.Proc(
            H.train_args(workdir, synthetic_data_dir, "loss=kto,steps=6", flags), str(tmp), "resume"
        ).result()
        assert result["rc"] == 2, tail(result["stderr"])
        assert "config.model.lora" in result["stderr"] and "Traceback" not in result["stderr"], tail(result["stderr"])


@pytest.mark.slow
def test_cli_lora_export_merged_and_peft_give_the_runs_logits(lora_run):
    """scripts/export_hf.py on the LoRA run: the merged folder (transformers) and the PEFT adapter
    (peft onto the run's base, exported as a folder) give our logits with the adapters."""
    import subprocess
    import sys

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kto_jax.models.hf import to_hf
    from tests.hf_checkpoints import hf_logits, max_diff
    from tests.train_helpers import subprocess_env

    workdir, tmp = lora_run
    out = str(tmp / "export")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "scripts/export_hf.py", f"--workdir={workdir}", f"--out={out}"],
        cwd=root,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = load_run(workdir)
    ids = np.random.default_rng(0).integers(0, 384, size=(2, 16)).astype(np.int32)
    ours = np.asarray(run.model.apply({"params": run.params}, ids))
    merged = AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert max_diff(hf_logits(merged, ids), ours) < 1e-4
    base_config = run.model.config.replace(lora_rank=0, lora_targets=())
    to_hf(build_model(base_config), lora.split_adapters(run.params)[0], str(tmp / "base"))
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(tmp / "base")).float(), os.path.join(out, "adapter")
        ).eval()
    assert max_diff(hf_logits(peft_model, ids), ours) < 1e-4
    assert max_diff(ours, build_model(base_config).apply({"params": lora.split_adapters(run.params)[0]}, ids)) > 1e-4


# ---------------------------------------------------------------- continuing an adapter trained with peft


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    """A Hugging Face base (tiny-1m's random init as transformers saves it) and an adapter peft made on it
    (random A and B, rank 4, alpha 12, q/v/down): (base folder, adapter folder, peft model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kto_jax.models.hf import to_hf

    tmp = tmp_path_factory.mktemp("peft_adapter")
    base_dir, adapter_dir = str(tmp / "base"), str(tmp / "adapter")
    to_hf(build_model(MODEL_CONFIG), init_params(MODEL_CONFIG, seed=3), base_dir)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir).float(),
        LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    ).eval()
    peft_model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir, peft_model


def adapter_config(synthetic_data_dir, base_dir, adapter_dir, **lora_fields):
    config = small_config("kto", synthetic_data_dir, model=base_dir)
    config.data.tokenizer = "bytes"
    config.init.adapter = adapter_dir
    config.model.lora.update({"rank": 4, "alpha": 12.0, "targets": "q,v,down", **lora_fields})
    return config


def test_init_adapter_starts_the_run_from_peft_adapters(synthetic_data_dir, peft_adapter):
    from kto_jax.train import setup
    from tests.hf_checkpoints import hf_logits, max_diff

    base_dir, adapter_dir, peft_model = peft_adapter
    plan = make_plan(adapter_config(synthetic_data_dir, base_dir, adapter_dir), 1)
    model, params = setup.load_model(plan, None)
    ids = np.random.default_rng(1).integers(0, 384, size=(2, 12)).astype(np.int32)
    assert max_diff(model.apply({"params": params}, ids), hf_logits(peft_model, ids)) < 1e-4
    base, _ = lora.split_adapters(params)
    with peft_model.disable_adapter():  # the base: peft's adapters switched off, ours left out
        assert max_diff(model.apply({"params": base}, ids), hf_logits(peft_model, ids)) < 1e-4


def test_init_adapter_that_differs_from_the_config_is_named(synthetic_data_dir, peft_adapter):
    from kto_jax.train import setup

    base_dir, adapter_dir, _ = peft_adapter
    plan = make_plan(adapter_config(synthetic_data_dir, base_dir, adapter_dir, rank=8), 1)
    with pytest.raises(
        InputError, match=r"config\.init\.adapter=.* differs from config\.model\.lora in rank: 4 \(config: 8\)"
    ):
        setup.load_model(plan, None)


@pytest.mark.slow
def test_a_lora_run_samples_as_its_merged_weights(lora_run):
    """What the server and the online rounds run on a LoRA run (``load_run``'s model and params, the
    adapters applied in each projection, KV cache): the greedy tokens of the merged weights."""
    from kto_jax.generate import generate

    workdir, _ = lora_run
    run = load_run(workdir)
    merged_config, merged = lora.merge_weights(run.model.config, run.params)
    prompts = [[1, 40, 41, 42], [1, 50, 51, 52, 53, 54, 55]]
    kw = dict(max_new_tokens=6, eos_id=2, pad_id=0, temperature=0.0, batch_size=2, bucket=8)
    ours = generate(run.model, run.params, prompts, **kw)
    assert ours == generate(build_model(merged_config), merged, prompts, **kw)
    assert all(len(t) > 0 for t in ours)


@pytest.mark.slow
def test_the_server_loads_a_lora_run_with_its_adapters(lora_run):
    """scripts/serve.py's loader (``orbax:WORKDIR``) serves the run as it trained: the LoRA model and the
    trained adapters over the base."""
    from kto_jax.serve import load_served_model

    workdir, _ = lora_run
    served, run = load_served_model(f"orbax:{workdir}"), load_run(workdir)
    assert served.model.config == run.model.config and served.model.config.lora_rank == 4
    for x, y in zip(jax.tree_util.tree_leaves(served.params), jax.tree_util.tree_leaves(run.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert lora.split_adapters(served.params)[1]
