"""LoRA (kto_jax/models/lora.py, peft.py) against PEFT on the transformers base.

For each family (the tiny random checkpoints of tests/hf_checkpoints.py): our model with adapters
(random A and B, so the update is not zero) gives the logits of (a) its merged export loaded by
transformers and (b) its PEFT folder loaded by ``peft.PeftModel.from_pretrained`` onto the
transformers base; an adapter made by peft itself (random init, ``save_pretrained``) imports and
gives peft's logits. With B = 0 (LoRA's init) the model is the base; the params less the adapters
are the base model."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from kto_jax.errors import InputError
from kto_jax.models import build_model, lora
from kto_jax.models.hf import to_hf
from kto_jax.models.peft import load_peft, save_peft
from tests.hf_checkpoints import TOL, forward, hf_logits, max_diff, random_ids

# name -> LoRA targets; every family, and GPT-NeoX's adaptable projections (its q/k/v are fused)
CASES = {
    "llama_gqa": "all_linear",
    "qwen2_gqa": "attention",
    "qwen3_head_dim": "q,v,down",
    "gemma2_softcap": "all_linear",
    "gemma3_rope": "o|gate|up",
    "pythia_parallel": "all_linear",
}


def with_random_adapters(loaded, name: str, rank: int = 4, alpha: float = 8.0, rslora: bool = False):
    """(config, base params, params with adapters whose A and B are both random)."""
    folder, hf_model, model, base = loaded(name)
    config = model.config.replace(
        lora_rank=rank,
        lora_alpha=alpha,
        lora_rslora=rslora,
        lora_targets=lora.resolve_targets(CASES[name], model.config),
    )
    params = lora.init_adapters(config, base, seed=1)
    _, adapters = lora.split_adapters(params)
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    adapters = jax.tree_util.tree_unflatten(tree, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return config, base, lora.merge_trees(base, adapters)


@pytest.mark.parametrize("name", sorted(CASES))
def test_merged_export_and_peft_folder_give_our_logits(loaded, tmp_path, name):
    folder = loaded(name)[0]
    config, base, params = with_random_adapters(loaded, name)
    ids = random_ids(seed=11)
    mask = np.ones_like(ids)
    mask[2, :3] = 0
    real = mask.astype(bool)  # (a padding position's logits are never read; HF and we fill them differently)
    ours = np.asarray(build_model(config).apply({"params": params}, ids, mask))
    assert max_diff(ours, forward(build_model(config.replace(lora_rank=0, lora_targets=())), base, ids, mask)) > 1e-2

    merged_config, merged = lora.merge_weights(config, params)
    assert not lora.split_adapters(merged)[1] and merged_config.lora_rank == 0
    to_hf(build_model(config), params, str(tmp_path / "merged"))  # to_hf writes a LoRA model merged
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).float().eval()
    assert max_diff(hf_logits(reloaded, ids, mask)[real], ours[real]) < TOL

    save_peft(config, params, str(tmp_path / "adapter"), base=folder)
    base_hf = AutoModelForCausalLM.from_pretrained(folder).float().eval()
    peft_model = PeftModel.from_pretrained(base_hf, str(tmp_path / "adapter")).eval()
    assert max_diff(hf_logits(peft_model, ids, mask)[real], ours[real]) < TOL

    config2, params2 = load_peft(str(tmp_path / "adapter"), config.replace(lora_rank=0, lora_targets=()), base)
    assert config2 == config
    for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "name, modules",
    [("llama_gqa", ["q_proj", "v_proj", "down_proj"]), ("gemma2_softcap", ["k_proj", "o_proj", "up_proj"])],
)
@pytest.mark.parametrize("rslora", [False, True])
def test_an_adapter_made_by_peft_imports(loaded, tmp_path, name, modules, rslora):
    """peft's own adapter (random A and B: init_lora_weights=False), saved by save_pretrained, loads
    onto our base and gives peft's logits (rsLoRA's alpha / sqrt(r) too)."""
    folder, _, model, base = loaded(name)
    torch.manual_seed(0)
    hf_base = AutoModelForCausalLM.from_pretrained(folder).float().eval()
    peft_model = get_peft_model(
        hf_base, LoraConfig(r=4, lora_alpha=12, target_modules=modules, init_lora_weights=False, use_rslora=rslora)
    ).eval()
    peft_model.save_pretrained(str(tmp_path))
    config, params = load_peft(str(tmp_path), model.config, base)
    assert (config.lora_rank, config.lora_alpha, config.lora_rslora) == (4, 12.0, rslora)
    ids = random_ids(seed=12)
    ours = build_model(config).apply({"params": params}, ids, np.ones_like(ids))
    assert max_diff(ours, hf_logits(peft_model, ids)) < TOL
    assert max_diff(ours, forward(model, base, ids)) > 1e-2


def test_fresh_adapters_are_the_base_and_the_base_is_the_params_less_the_adapters(loaded):
    _, _, model, base = loaded("qwen3_head_dim")
    config = model.config.replace(lora_rank=8, lora_targets=lora.LORA_MODULES)
    params = lora.init_adapters(config, base, seed=0)
    _, adapters = lora.split_adapters(params)
    b = [x for p, x in jax.tree_util.tree_leaves_with_path(adapters) if "lora_b" in jax.tree_util.keystr(p)]
    a = [x for p, x in jax.tree_util.tree_leaves_with_path(adapters) if "lora_a" in jax.tree_util.keystr(p)]
    assert len(a) == len(b) == 7 and all(float(jnp.abs(x).max()) == 0.0 for x in b)
    # A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as PEFT's kaiming-uniform(a=sqrt(5)): q's fan_in is hidden
    q_a = np.asarray(adapters["layers"]["attention"]["q"]["lora_a"])
    assert 0.5 / np.sqrt(32) < np.abs(q_a).max() <= 1 / np.sqrt(32)
    ids = random_ids(seed=13)
    lora_model = build_model(config)
    want = model.apply({"params": base}, ids)
    assert max_diff(lora_model.apply({"params": params}, ids), want) < 1e-6  # x A 0 adds zeros
    _, _, moved = with_random_adapters(loaded, "qwen3_head_dim")
    assert max_diff(lora_model.apply({"params": lora.split_adapters(moved)[0]}, ids), want) == 0.0


def test_adapters_carry_the_logical_axes_of_their_projection():
    from flax import linen as nn
    from jax.sharding import PartitionSpec as P

    from kto_jax.models import abstract_params
    from kto_jax.models.presets import get_preset

    config = get_preset("tiny-1m", lora_rank=4, lora_targets=("q", "o", "up"))
    specs = nn.get_partition_spec(abstract_params(config))["layers"]
    assert specs["attention"]["q"]["lora_a"] == P("layers", "embed", "lora_rank")
    assert specs["attention"]["q"]["lora_b"] == P("layers", "lora_rank", "heads", "head_dim")
    assert specs["attention"]["o"]["lora_a"] == P("layers", "heads", "head_dim", "lora_rank")
    assert specs["mlp"]["up"]["lora_b"] == P("layers", "lora_rank", "mlp")
    assert "lora_a" not in specs["mlp"]["down"]


# ---------------------------------------------------------------- bad input


def test_targets_that_match_nothing_are_named():
    from kto_jax.models.presets import get_preset

    llama, pythia = get_preset("tiny-1m"), get_preset("tiny-pythia-1m")
    assert lora.resolve_targets("q|k, up", llama) == ("q", "k", "up")
    with pytest.raises(InputError, match=r"config\.model\.lora\.targets: 'qproj' matches no projection of llama"):
        lora.resolve_targets("qproj", llama)
    assert lora.resolve_targets("attention", pythia) == ("o",)  # GPT-NeoX's q/k/v are one fused tensor
    with pytest.raises(InputError, match=r"'q' matches no projection of gpt_neox \(adaptable: o, up, down"):
        lora.resolve_targets("q", pythia)
    with pytest.raises(InputError, match=r"ModelConfig\.lora_rank=-1 is invalid"):
        llama.replace(lora_rank=-1, lora_targets=("q",))
    with pytest.raises(InputError, match=r"ModelConfig\.lora_targets=\(\) is invalid"):
        llama.replace(lora_rank=4)


def test_an_adapter_of_another_base_is_refused(loaded, tmp_path):
    config, _, params = with_random_adapters(loaded, "llama_gqa")
    save_peft(config, params, str(tmp_path))
    _, _, other, other_base = loaded("llama3_rope_bias")  # hidden 64, not 32
    with pytest.raises(InputError, match=r"an adapter of another base model"):
        load_peft(str(tmp_path), other.config, other_base)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(InputError, match=r"use_dora=True is not supported"):
        load_peft(str(tmp_path), config, params)
    os.remove(tmp_path / "adapter_config.json")
    with pytest.raises(FileNotFoundError, match=r"no adapter_config\.json"):
        load_peft(str(tmp_path), config, params)


def test_model_flops_of_a_lora_step_count_no_weight_gradients():
    """A frozen base's backward is activation gradients only: KTO's policy group costs 2 forwards, not 3,
    so the step is 5 forward-equivalents (2 + KL 1 + reference 2) against full training's 6; DPO 6 of 8."""
    from kto_jax.losses import get_loss
    from kto_jax.models.presets import get_preset
    from kto_jax.train.flops import step_flops

    full = get_preset("tiny-25m")
    adapted = full.replace(lora_rank=16, lora_targets=("q", "k", "v", "o", "gate", "up", "down"))
    for name, ratio in (("kto", 5 / 6), ("dpo", 6 / 8)):
        lora_flops, full_flops = (step_flops(c, get_loss(name), batch=8, length=128) for c in (adapted, full))
        assert lora_flops / full_flops == pytest.approx(ratio, rel=1e-3), name
