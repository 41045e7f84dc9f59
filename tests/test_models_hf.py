"""Hugging Face interop (kto_jax/models/hf.py): logits equal transformers' for every supported
architecture variant, padding, the hidden-state path, to_hf round trips, config.json reading,
tokenizers and errors on bad checkpoints.

Every checkpoint is a random tiny transformers model saved to a pytest tmp folder (no
downloads). Weights use initializer_range 0.25 so attention is far from uniform and RoPE,
windows and masks visibly change the logits; norm weights and biases are perturbed away from
ones/zeros.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from kto_jax.generate import generate
from kto_jax.models import abstract_params, lm_head_kernel
from kto_jax.models.common import softcap
from kto_jax.models.hf import config_to_hf, from_hf, to_hf
from kto_jax.models.presets import get_preset
from tests.hf_checkpoints import (
    BATCH,
    HF_CONFIGS,
    LENGTH,
    TOL,
    VOCAB,
    forward,
    hf_logits,
    max_diff,
    random_ids,
)

# ---------------------------------------------------------------- logits vs transformers


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_logits_match_transformers(loaded, name):
    folder, hf_model, model, params = loaded(name)
    ids = random_ids(seed=1)
    mask = np.ones_like(ids)
    ours = forward(model, params, ids, mask)
    ref = hf_logits(hf_model, ids, mask)
    assert ours.shape == ref.shape == (BATCH, LENGTH, VOCAB)
    assert ours.dtype == jnp.float32
    assert np.std(ref) > 0.5, "logits too flat to make the comparison meaningful"
    assert max_diff(ours, ref) < TOL
    if name == "llama_mha":  # no mask = all ones (its own compile, so for one model)
        assert max_diff(jax.jit(model.apply)({"params": params}, ids), ours) == 0.0


def test_loaded_config_fields(loaded):
    """The config.json fields that select code paths arrive in the ModelConfig."""
    cfg = loaded("llama3_rope")[2].config
    rope = (cfg.rope_type, cfg.rope_factor, cfg.rope_original_max_position, cfg.rope_theta)
    assert rope == ("llama3", 8.0, 8, 500000.0)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 8)
    cfg = loaded("mistral_head_dim")[2].config
    assert (cfg.head_dim, cfg.sliding_window, cfg.hf_model_type) == (16, 5, "mistral")
    cfg = loaded("pythia_sequential")[2].config
    neox = (cfg.architecture, cfg.rotary_dim, cfg.use_parallel_residual, cfg.attention_bias)
    assert neox == ("gpt_neox", 4, False, True)
    assert loaded("llama_tied")[2].config.tie_word_embeddings
    assert "lm_head" not in loaded("llama_tied")[3]
    cfg = loaded("qwen2_mqa")[2].config
    qwen2 = (cfg.architecture, cfg.num_kv_heads, cfg.qkv_bias, cfg.attention_bias, cfg.qk_norm, cfg.sliding_window)
    assert qwen2 == ("qwen2", 1, True, False, False, None)
    assert loaded("qwen2_gqa")[2].config.rope_theta == 1e6
    attention = loaded("qwen2_gqa")[3]["layers"]["attention"]
    assert "bias" in attention["q"] and "bias" not in attention["o"]
    cfg = loaded("qwen3_head_dim")[2].config
    qwen3 = (cfg.architecture, cfg.head_dim, cfg.hidden_size, cfg.qk_norm, cfg.qkv_bias, cfg.attention_bias)
    assert qwen3 == ("qwen3", 16, 32, True, False, False)
    attention = loaded("qwen3_head_dim")[3]["layers"]["attention"]
    assert attention["q_norm"]["scale"].shape == attention["k_norm"]["scale"].shape == (2, 16)  # [layers, head_dim]
    assert "bias" in loaded("qwen3_bias")[3]["layers"]["attention"]["o"]
    assert "lm_head" not in loaded("qwen3_tied")[3] and "lm_head" not in loaded("qwen2_tied")[3]


@pytest.mark.parametrize(
    "name, leaves",
    [
        ("qwen2_gqa", [("q", "bias"), ("k", "bias"), ("v", "bias")]),
        ("qwen3_head_dim", [("q_norm", "scale")]),
        ("qwen3_head_dim", [("k_norm", "scale")]),
    ],
)
def test_qwen_layers_change_the_logits(loaded, name, leaves):
    """The q/k/v biases (Qwen2) and each per-head norm (Qwen3) move the logits: resetting them to
    transformers' init (zeros, ones) gives logits > 1e-2 away, so matching transformers checks them."""
    _, hf_model, model, params = loaded(name)
    attention = dict(params["layers"]["attention"])
    for layer, leaf in leaves:
        reset = jnp.zeros_like if leaf == "bias" else jnp.ones_like
        attention[layer] = {**attention[layer], leaf: reset(attention[layer][leaf])}
    changed = {**params, "layers": {**params["layers"], "attention": attention}}
    ids = random_ids(seed=1)
    assert max_diff(forward(model, changed, ids), hf_logits(hf_model, ids)) > 1e-2


@pytest.mark.parametrize(
    "name, override",
    [
        ("llama3_rope", {"rope_type": "default"}),
        ("llama_linear_rope", {"rope_type": "default"}),
        ("mistral_window", {"sliding_window": 5}),
        ("pythia_parallel", {"rotary_pct": 1.0}),
        ("gemma2_softcap", {"attn_logit_softcap": None}),
        ("gemma2_softcap", {"final_logit_softcap": None}),
        ("gemma2_softcap", {"query_pre_attn_scalar": 16}),
        ("gemma2_softcap", {"layer_types": ("full_attention", "full_attention")}),
        ("gemma2_mqa_untied", {"layer_types": ("sliding_attention",) * 3}),
        ("gemma3_rope", {"rope_local_theta": 1e6}),
        ("gemma3_rope", {"rope_type": "default"}),
        ("gemma3_mqa_untied", {"sliding_window": 12}),
    ],
)
def test_comparison_is_sensitive_to_the_feature(loaded, name, override):
    """Each feature the tests above check changes the logits, so matching HF is not an accident."""
    folder, hf_model, _, _ = loaded(name)
    model, params = from_hf(folder, **override)
    ids = random_ids(seed=1)
    assert max_diff(forward(model, params, ids), hf_logits(hf_model, ids)) > 1e-2


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_mistral_sliding_window_matches_hf_attention(checkpoints, attn_implementation):
    """HF's eager and sdpa attention both apply the window, as (i - j) < sliding_window."""
    folder, _ = checkpoints("mistral_window")
    model, params = from_hf(folder)
    assert model.config.sliding_window == 4 < LENGTH
    ids = random_ids(seed=2)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn_implementation).float().eval()
    assert hf_model.config.sliding_window == 4
    ref = hf_logits(hf_model, ids)
    assert max_diff(forward(model, params, ids), ref) < TOL
    no_window = AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation=attn_implementation, sliding_window=None
    )
    assert max_diff(hf_logits(no_window.float().eval(), ids), ref) > 1e-2, "HF ignored the window"


def test_sliding_window_mask_semantics():
    from kto_jax.models.positions import attention_mask_4d

    mask = np.asarray(attention_mask_4d(jnp.ones((1, 6), jnp.int32), sliding_window=3))[0, 0]
    i, j = np.arange(6)[:, None], np.arange(6)[None, :]
    np.testing.assert_array_equal(mask, (j <= i) & (i - j < 3))


# ---------------------------------------------------------------- padding


def pad_rows(ids, lengths, side, pad_id=0):
    batch, length = ids.shape
    padded = np.full_like(ids, pad_id)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        sl = slice(0, n) if side == "right" else slice(length - n, length)
        padded[b, sl] = ids[b, :n]
        mask[b, sl] = 1
    return padded, mask


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(
    "name",
    ["llama_gqa", "mistral_window", "pythia_parallel", "qwen2_gqa", "qwen3_head_dim", "gemma2_softcap", "gemma3_rope"],
)
def test_padding_gives_unpadded_logits(loaded, name, side):
    """Row b holds its first lengths[b] tokens, padded on ``side``. Unpadded, a causal model
    gives the prefix's logits as the first positions of the full row (causality is checked
    here too: changing the tokens after position 5 leaves positions <= 5 unchanged; and one
    row is also run alone at its own length)."""
    _, hf_model, model, params = loaded(name)
    lengths = [LENGTH, 7, 5, 1]
    ids = random_ids(seed=3)
    padded, mask = pad_rows(ids, lengths, side, pad_id=VOCAB - 1)
    out = np.asarray(forward(model, params, padded, mask))
    assert np.all(np.isfinite(out))
    unpadded = np.asarray(forward(model, params, ids))
    hf_padded = hf_logits(hf_model, padded, mask)  # HF's own masked forward (RoPE: shifts cancel)
    changed = np.where(np.arange(LENGTH) > 5, (ids + 1) % VOCAB, ids)
    assert max_diff(forward(model, params, changed)[:, :6], unpadded[:, :6]) < 1e-5
    alone = np.asarray(forward(model, params, ids[1:2, : lengths[1]]))[0]
    assert max_diff(out[1, mask[1].astype(bool)], alone) < 1e-5
    for b, n in enumerate(lengths):
        real = mask[b].astype(bool)
        assert max_diff(out[b, real], unpadded[b, :n]) < 1e-5, f"row {b} (length {n}) differs from running it unpadded"
        assert max_diff(out[b, real], hf_logits(hf_model, ids[b : b + 1, :n])[0]) < TOL
        assert max_diff(out[b, real], hf_padded[b, real]) < TOL


# ---------------------------------------------------------------- greedy generation vs transformers


@pytest.mark.parametrize("name", ["qwen2_gqa", "qwen3_head_dim", "gemma2_mqa_untied", "gemma3_mqa_untied"])
def test_greedy_generation_matches_transformers(loaded, name):
    """kto_jax.generate.generate (KV cache; the three prompts in one left-padded batch) gives
    transformers' greedy ``generate`` tokens for each prompt alone (EOS: a token id that
    transformers' greedy path reaches for one prompt, so the EOS path is exercised)."""
    _, hf_model, model, params = loaded(name)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(1, VOCAB, size=n).tolist() for n in (3, 9, 6)]
    new_tokens = 8

    def hf_greedy(prompt, eos):
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=new_tokens,
                eos_token_id=eos,
                pad_token_id=0,
                output_scores=True,
                return_dict_in_generate=True,
            )
        new = out.sequences[0, len(prompt) :].tolist()
        gaps = [float(np.diff(np.sort(s[0].numpy())[-2:])[0]) for s in out.scores]
        return (new[: new.index(eos)] if eos in new else new), gaps

    eos = hf_greedy(prompts[0], None)[0][new_tokens // 2]  # the first prompt stops there
    want = [hf_greedy(p, eos) for p in prompts]
    assert min(g for _, gaps in want for g in gaps) > 1e-3, "near-tie in transformers' greedy path"
    assert any(len(w) < new_tokens for w, _ in want)
    got = generate(
        model, params, prompts, max_new_tokens=new_tokens, eos_id=eos, pad_id=0, temperature=0.0, batch_size=3, bucket=8
    )
    assert got == [w for w, _ in want]


# ---------------------------------------------------------------- hidden states @ LM head


@pytest.mark.parametrize("name", ["llama_tied", "pythia_sequential", "qwen3_tied", "gemma2_softcap"])
def test_return_hidden_times_lm_head_is_logits(loaded, name):
    """logits = softcap(hidden @ kernel) (the cap: Gemma 2's final_logit_softcap, None elsewhere)."""
    _, _, model, params = loaded(name)
    ids = random_ids(seed=4)
    mask = np.ones_like(ids)
    mask[0, 8:] = 0
    hidden = forward(model, params, ids, mask, return_hidden=True)
    assert hidden.shape == (BATCH, LENGTH, model.config.hidden_size)
    kernel = lm_head_kernel(model.config, params)
    assert kernel.shape == (model.config.hidden_size, VOCAB)
    logits = forward(model, params, ids, mask)
    assert max_diff(softcap(hidden @ kernel, model.config.final_logit_softcap), logits) < 1e-5


# ---------------------------------------------------------------- to_hf round trip


def assert_same_tree(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize(
    "name",
    [
        "llama_gqa",
        "llama3_rope",
        "llama_linear_rope",
        "llama_tied",
        "llama3_rope_bias",
        "mistral_head_dim",
        "pythia_parallel",
        "pythia_sequential",
        "pythia_unbiased",
        "qwen2_gqa",
        "qwen2_tied",
        "qwen2_mqa",
        "qwen3_head_dim",
        "qwen3_tied",
        "qwen3_bias",
        "gemma2_softcap",
        "gemma2_mqa_untied",
        "gemma3_rope",
        "gemma3_mqa_untied",
    ],
)
def test_to_hf_round_trip(loaded, tmp_path, name):
    _, _, model, params = loaded(name)
    out = str(tmp_path / "export")
    files = to_hf(model, params, out)
    assert len(files) == 1 and all(os.path.exists(f) for f in files)
    reloaded = AutoModelForCausalLM.from_pretrained(out).float().eval()
    ids = random_ids(seed=5)
    assert max_diff(hf_logits(reloaded, ids), forward(model, params, ids)) < TOL
    model2, params2 = from_hf(out)
    assert model2.config == model.config
    assert_same_tree(params, params2)


@pytest.mark.parametrize("name", ["llama_gqa", "pythia_parallel"])
def test_to_hf_sharded_export(loaded, tmp_path, name):
    _, _, model, params = loaded(name)
    out = str(tmp_path / "export")
    files = to_hf(model, params, out, max_shard_bytes=20_000)
    assert len(files) >= 3
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert sorted(set(index["weight_map"].values())) == sorted(os.path.basename(f) for f in files)
    sizes = [sum(t.nbytes for t in load_file(f).values()) for f in files]
    assert index["metadata"]["total_size"] == sum(sizes)
    # a shard exceeds the limit only when it holds a single tensor that is larger on its own
    assert all(s <= 20_000 or len(load_file(f)) == 1 for s, f in zip(sizes, files))
    reloaded = AutoModelForCausalLM.from_pretrained(out).float().eval()
    ids = random_ids(seed=6)
    assert max_diff(hf_logits(reloaded, ids), forward(model, params, ids)) < TOL
    model2, params2 = from_hf(out)
    assert model2.config == model.config
    assert_same_tree(params, params2)


def test_to_hf_writes_each_shard_as_soon_as_it_is_full(loaded, tmp_path, monkeypatch):
    from kto_jax.models import hf as hf_module

    _, _, model, params = loaded("llama_gqa")
    gathered, at_save = [], []
    real_get, real_save = jax.device_get, hf_module.save_file

    def device_get(x):
        gathered.append(1)
        return real_get(x)

    def save_file(tensors, path, metadata=None):
        at_save.append(len(gathered))
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(hf_module.jax, "device_get", device_get)
    monkeypatch.setattr(hf_module, "save_file", save_file)
    files = to_hf(model, params, str(tmp_path / "export"), max_shard_bytes=20_000)
    assert len(at_save) == len(files) >= 3
    assert at_save[0] < len(gathered), "every tensor was gathered to the host before the first shard was written"


def test_to_hf_bfloat16_params(loaded, tmp_path):
    folder, _, _, _ = loaded("llama_gqa")
    model, params = from_hf(folder, param_dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))
    out = str(tmp_path / "export")
    to_hf(model, params, out)
    assert all(t.dtype == torch.bfloat16 for t in AutoModelForCausalLM.from_pretrained(out).state_dict().values())
    _, params2 = from_hf(out, param_dtype="bfloat16")
    assert_same_tree(params, params2)


def test_from_hf_takes_jnp_dtypes_and_stores_their_names(checkpoints):
    folder, _ = checkpoints("llama_gqa")
    model, params = from_hf(folder, param_dtype=jnp.float32, compute_dtype=jnp.bfloat16)
    assert (model.config.param_dtype, model.config.compute_dtype) == ("float32", "bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    assert json.loads(json.dumps(config_to_hf(model.config)))["torch_dtype"] == "float32"
    assert from_hf(folder, param_dtype=jnp.bfloat16)[0].config.compute_dtype == "bfloat16"  # follows param_dtype


def test_from_hf_rejects_the_ambiguous_dtype_keyword(checkpoints):
    folder, _ = checkpoints("llama_gqa")
    with pytest.raises(TypeError, match=r"param_dtype= \(storage\) and compute_dtype= \(activations\)"):
        from_hf(folder, dtype="float32")


# ---------------------------------------------------------------- presets through from_hf


def test_from_hf_preset_is_random_init_with_abstract_shapes():
    model, params = from_hf("tiny-1m", param_dtype="bfloat16", compute_dtype="float32", remat_policy="full", seed=3)
    assert model.config == get_preset("tiny-1m", param_dtype="bfloat16", compute_dtype="float32", remat_policy="full")
    abstract = nn.unbox(abstract_params(model.config))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(abstract)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(abstract)):
        assert (x.shape, x.dtype) == (y.shape, y.dtype), jax.tree_util.keystr(path)
        assert x.dtype == jnp.bfloat16
    # random normal(initializer_range=0.02) kernels; norms start at one
    q = np.asarray(params["layers"]["attention"]["q"]["kernel"], np.float32)
    assert 0.015 < q.std() < 0.025
    np.testing.assert_array_equal(np.asarray(params["final_norm"]["scale"], np.float32), 1.0)
