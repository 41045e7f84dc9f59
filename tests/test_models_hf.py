"""Hugging Face interop (kto_jax/models/hf.py): logits equal transformers' for every supported
architecture variant, padding, the hidden-state path, to_hf round trips, config.json reading,
tokenizers and errors on bad checkpoints.

Every checkpoint is a random tiny transformers model saved to a pytest tmp folder (no
downloads). Weights use initializer_range 0.25 so attention is far from uniform and RoPE,
windows and masks visibly change the logits; norm weights and biases are perturbed away from
ones/zeros.
"""

from __future__ import annotations

import functools
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, MistralConfig

from kto_jax.models import abstract_params, build_model, lm_head_kernel
from kto_jax.models.common import ModelConfig
from kto_jax.models.hf import config_from_hf, config_to_hf, from_hf, load_tokenizer, to_hf
from kto_jax.models.presets import get_preset

TOL = 1e-4
VOCAB = 101
BATCH, LENGTH = 4, 12  # one shape everywhere, so each config compiles once
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, initializer_range=0.25)

# name -> transformers config; each one exercises one code path of the importer.
HF_CONFIGS = {
    "llama_mha": lambda: LlamaConfig(**SMALL, num_attention_heads=4),
    "llama_gqa": lambda: LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2),
    "llama3_rope": lambda: LlamaConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8},
    ),
    # head_dim 16 and original length 32: wavelengths fall in all three llama3 bands
    # (unchanged < 8, smoothed 8..32, divided by factor > 32); also q/k/v/o biases.
    "llama3_rope_bias": lambda: LlamaConfig(
        **{**SMALL, "hidden_size": 64}, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
        attention_bias=True,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
    ),
    "llama_linear_rope": lambda: LlamaConfig(
        **SMALL, num_attention_heads=4, rope_scaling={"rope_type": "linear", "factor": 3.0}
    ),
    "llama_tied": lambda: LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mistral_window": lambda: MistralConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2, sliding_window=4),
    "mistral_head_dim": lambda: MistralConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=5
    ),
    "pythia_parallel": lambda: GPTNeoXConfig(
        **{**SMALL, "hidden_size": 64}, num_attention_heads=4, rotary_pct=0.25, use_parallel_residual=True
    ),
    "pythia_sequential": lambda: GPTNeoXConfig(
        **{**SMALL, "hidden_size": 64}, num_attention_heads=4, rotary_pct=0.25, use_parallel_residual=False
    ),
}


def perturb_vectors(model: torch.nn.Module, seed: int) -> None:
    """Norm weights -> 1 + 0.3 N(0, 1), biases -> 0.3 N(0, 1) (HF initialises them to ones/zeros)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                noise = 0.3 * torch.randn(p.shape, generator=gen)
                p.copy_(noise if name.endswith("bias") else 1.0 + noise)


def make_hf_model(hf_config, seed: int = 0, attn_implementation: str | None = None):
    torch.manual_seed(seed)
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_config(hf_config, **kw).float().eval()
    perturb_vectors(model, seed)
    return model


def hf_logits(model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        ids_t = torch.tensor(np.asarray(ids), dtype=torch.long)
        mask_t = None if mask is None else torch.tensor(np.asarray(mask), dtype=torch.long)
        return model(input_ids=ids_t, attention_mask=mask_t).logits.float().numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (folder, in-memory transformers model), built lazily and once per module."""
    cache: dict = {}

    def get(name):
        if name not in cache:
            folder = str(tmp_path_factory.mktemp(name))
            model = make_hf_model(HF_CONFIGS[name](), seed=sorted(HF_CONFIGS).index(name))
            model.save_pretrained(folder)
            cache[name] = (folder, model)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def loaded(checkpoints):
    """name -> (folder, hf model, our model, our params)."""
    cache: dict = {}

    def get(name):
        if name not in cache:
            folder, hf_model = checkpoints(name)
            model, params = from_hf(folder)
            cache[name] = (folder, hf_model, model, params)
        return cache[name]

    return get


@functools.lru_cache(maxsize=None)
def _jitted_apply(config: ModelConfig):
    return jax.jit(build_model(config).apply, static_argnames="return_hidden")


def forward(model, params, ids, mask=None, **kw):
    """``model.apply({"params": params}, ids, mask, **kw)``, jitted once per config (compiles
    dominate test time); a missing mask is passed as ones so that it is the same program."""
    mask = np.ones_like(ids) if mask is None else mask
    return _jitted_apply(model.config)({"params": params}, ids, mask, **kw)


def random_ids(batch=BATCH, length=LENGTH, seed=0, vocab=VOCAB):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length)).astype(np.int32)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


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


@pytest.mark.parametrize(
    "name, override",
    [
        ("llama3_rope", {"rope_type": "default"}),
        ("llama_linear_rope", {"rope_type": "default"}),
        ("mistral_window", {"sliding_window": 5}),
        ("pythia_parallel", {"rotary_pct": 1.0}),
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
    from kto_jax.models.common import attention_mask_4d

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
@pytest.mark.parametrize("name", ["llama_gqa", "mistral_window", "pythia_parallel"])
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


# ---------------------------------------------------------------- hidden states @ LM head


@pytest.mark.parametrize("name", ["llama_tied", "pythia_sequential"])
def test_return_hidden_times_lm_head_is_logits(loaded, name):
    _, _, model, params = loaded(name)
    ids = random_ids(seed=4)
    mask = np.ones_like(ids)
    mask[0, 8:] = 0
    hidden = forward(model, params, ids, mask, return_hidden=True)
    assert hidden.shape == (BATCH, LENGTH, model.config.hidden_size)
    kernel = lm_head_kernel(model.config, params)
    assert kernel.shape == (model.config.hidden_size, VOCAB)
    logits = forward(model, params, ids, mask)
    assert max_diff(hidden @ kernel, logits) < 1e-5


# ---------------------------------------------------------------- to_hf round trip


def assert_same_tree(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize(
    "name", ["llama_gqa", "llama3_rope", "llama_linear_rope", "llama_tied", "llama3_rope_bias",
             "mistral_head_dim", "pythia_parallel", "pythia_sequential"]
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
    model, params = from_hf(folder, dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))
    out = str(tmp_path / "export")
    to_hf(model, params, out)
    assert all(t.dtype == torch.bfloat16 for t in AutoModelForCausalLM.from_pretrained(out).state_dict().values())
    _, params2 = from_hf(out, dtype="bfloat16")
    assert_same_tree(params, params2)


# ---------------------------------------------------------------- presets through from_hf


def test_from_hf_preset_is_random_init_with_abstract_shapes():
    model, params = from_hf("tiny-1m", dtype="bfloat16", compute_dtype="float32", remat_policy="full", seed=3)
    assert model.config == get_preset("tiny-1m", param_dtype="bfloat16", dtype="float32", remat_policy="full")
    abstract = nn.unbox(abstract_params(model.config))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(abstract)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(abstract)):
        assert (x.shape, x.dtype) == (y.shape, y.dtype), jax.tree_util.keystr(path)
        assert x.dtype == jnp.bfloat16
    # random normal(initializer_range=0.02) kernels; norms start at one
    q = np.asarray(params["layers"]["attention"]["q"]["kernel"], np.float32)
    assert 0.015 < q.std() < 0.025
    np.testing.assert_array_equal(np.asarray(params["final_norm"]["scale"], np.float32), 1.0)


# ---------------------------------------------------------------- config.json reading


LLAMA3_V4 = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
    "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
LLAMA3_V5 = {
    **{k: v for k, v in LLAMA3_V4.items() if k not in ("rope_theta", "rope_scaling")},
    "rope_parameters": {"rope_theta": 500000.0, **LLAMA3_V4["rope_scaling"]},
}
PYTHIA_V4 = {
    "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "vocab_size": 50304, "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 16, "max_position_embeddings": 2048,
    "layer_norm_eps": 1e-5, "hidden_act": "gelu", "rotary_pct": 0.25, "rotary_emb_base": 10000,
    "use_parallel_residual": True, "tie_word_embeddings": False,
}
PYTHIA_V5 = {
    **{k: v for k, v in PYTHIA_V4.items() if k not in ("rotary_pct", "rotary_emb_base")},
    "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.25, "rope_type": "default"},
}
LINEAR_V4 = {
    "model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "rope_theta": 20000.0, "rope_scaling": {"type": "linear", "factor": 2.0},
}
LINEAR_V5 = {
    **{k: v for k, v in LINEAR_V4.items() if k not in ("rope_theta", "rope_scaling")},
    "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0},
}


@pytest.mark.parametrize("v4, v5", [(LLAMA3_V4, LLAMA3_V5), (PYTHIA_V4, PYTHIA_V5), (LINEAR_V4, LINEAR_V5)])
def test_config_from_hf_reads_v4_and_v5_fields_alike(v4, v5):
    assert config_from_hf(v4) == config_from_hf(v5)


def test_config_from_hf_known_configs():
    assert config_from_hf(LLAMA3_V4) == get_preset("llama3-8b").replace(max_position_embeddings=131072, norm_eps=1e-5,
                                                                       rope_type="llama3", rope_factor=8.0)
    assert config_from_hf(PYTHIA_V5) == get_preset("pythia-1.4b")
    linear = config_from_hf(LINEAR_V4)
    assert (linear.rope_type, linear.rope_factor, linear.rope_theta) == ("linear", 2.0, 20000.0)
    assert config_from_hf(LINEAR_V4, dtype="bfloat16", remat_policy="dots").dtype == "bfloat16"


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_config_from_hf_reads_transformers_own_dicts(name):
    """transformers' to_dict() (5.x fields) and our config_to_hf (4.x fields) describe one config."""
    cfg = config_from_hf(HF_CONFIGS[name]().to_dict())
    assert config_from_hf(config_to_hf(cfg)) == cfg


# ---------------------------------------------------------------- tokenizer


def test_load_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "the": 1, "cat": 2, "sat": 3, "on": 4, "mat": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.save(str(tmp_path / "tokenizer.json"))
    for path in (str(tmp_path), str(tmp_path / "tokenizer.json")):
        loaded_tok = load_tokenizer(path)
        enc = loaded_tok.encode("the cat sat on the dog mat")
        assert enc.ids == [1, 2, 3, 4, 1, 0, 5]
        assert loaded_tok.decode([1, 2, 3, 4, 1, 5]) == "the cat sat on the mat"
        assert loaded_tok.get_vocab_size() == 6
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------- bad input


@pytest.fixture
def llama_copy(checkpoints, tmp_path):
    """A writable copy of the tiny GQA Llama checkpoint: (folder, tensors)."""
    src, _ = checkpoints("llama_gqa")
    dst = tmp_path / "ckpt"
    dst.mkdir()
    for file in os.listdir(src):
        with open(os.path.join(src, file), "rb") as f, open(dst / file, "wb") as g:
            g.write(f.read())
    return str(dst), load_file(str(dst / "model.safetensors"))


def test_missing_folder_names_config_and_presets(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match=r"no_such_model.*config\.json.*preset name.*tiny-1m"):
        from_hf(missing)


def test_folder_without_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json.*not found.*Hugging Face model folder"):
        from_hf(str(tmp_path))


def test_folder_without_weights(llama_copy):
    folder, _ = llama_copy
    os.remove(os.path.join(folder, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        from_hf(folder)


def test_unknown_architecture(llama_copy):
    folder, _ = llama_copy
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["model_type"] = "bert"
    with open(path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"model_type='bert' is not supported.*gpt_neox.*llama.*mistral"):
        from_hf(folder)


def test_unsupported_rope_type_names_field():
    with pytest.raises(ValueError, match=r"rope_type='yarn'"):
        config_from_hf({**LINEAR_V4, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_missing_tensor_is_named(llama_copy):
    folder, tensors = llama_copy
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        from_hf(folder)


def test_wrong_shape_is_named_with_expected_shape(llama_copy):
    folder, tensors = llama_copy
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)  # GQA expects [16, 32]
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    expected = r"model\.layers\.0\.self_attn\.k_proj\.weight.*has shape \(32, 32\).*expects \(16, 32\)"
    with pytest.raises(ValueError, match=expected):
        from_hf(folder)


def test_index_pointing_to_missing_shard(loaded, tmp_path):
    _, _, model, params = loaded("llama_gqa")
    out = str(tmp_path / "export")
    files = to_hf(model, params, out, max_shard_bytes=20_000)
    lost = os.path.basename(files[1])
    os.remove(files[1])
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        held = [n for n, file in json.load(f)["weight_map"].items() if file == lost]
    assert held
    expected = rf"{re.escape(lost)}.*holding tensor '({'|'.join(map(re.escape, held))})'.*index\.json.*missing"
    with pytest.raises(FileNotFoundError, match=expected):
        from_hf(out)
