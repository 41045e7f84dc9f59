"""Hugging Face interop, continued: config.json reading (transformers 4.x and 5.x), tokenizers, and the errors
on bad checkpoints (missing files and tensors, wrong shapes, unknown architectures). See tests/test_models_hf.py."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from kto_jax.errors import InputError
from kto_jax.models import ARCHITECTURES, FAMILIES, get_family
from kto_jax.models.hf import config_from_hf, config_to_hf, from_hf, load_tokenizer, to_hf
from kto_jax.models.hf_config import HF_ARCHITECTURES
from kto_jax.models.presets import get_preset
from tests.hf_checkpoints import HF_CONFIGS

# ---------------------------------------------------------------- config.json reading

SMALL_QWEN = dict(
    vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=8
)


LLAMA3_V4 = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}
LLAMA3_V5 = {
    **{k: v for k, v in LLAMA3_V4.items() if k not in ("rope_theta", "rope_scaling")},
    "rope_parameters": {"rope_theta": 500000.0, **LLAMA3_V4["rope_scaling"]},
}
PYTHIA_V4 = {
    "model_type": "gpt_neox",
    "architectures": ["GPTNeoXForCausalLM"],
    "vocab_size": 50304,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "max_position_embeddings": 2048,
    "layer_norm_eps": 1e-5,
    "hidden_act": "gelu",
    "rotary_pct": 0.25,
    "rotary_emb_base": 10000,
    "use_parallel_residual": True,
    "tie_word_embeddings": False,
}
PYTHIA_V5 = {
    **{k: v for k, v in PYTHIA_V4.items() if k not in ("rotary_pct", "rotary_emb_base")},
    "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.25, "rope_type": "default"},
}
LINEAR_V4 = {
    "model_type": "llama",
    "vocab_size": 100,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "rope_theta": 20000.0,
    "rope_scaling": {"type": "linear", "factor": 2.0},
}
# Qwen/Qwen2.5-7B and Qwen/Qwen3-8B config.json (the fields that are not defaults or ignored)
QWEN25_7B = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": 131072,
    "max_window_layers": 28,
}
QWEN3_8B = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 36,
}
LINEAR_V5 = {
    **{k: v for k, v in LINEAR_V4.items() if k not in ("rope_theta", "rope_scaling")},
    "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0},
}


@pytest.mark.parametrize("v4, v5", [(LLAMA3_V4, LLAMA3_V5), (PYTHIA_V4, PYTHIA_V5), (LINEAR_V4, LINEAR_V5)])
def test_config_from_hf_reads_v4_and_v5_fields_alike(v4, v5):
    assert config_from_hf(v4) == config_from_hf(v5)


def test_config_from_hf_known_configs():
    assert config_from_hf(LLAMA3_V4) == get_preset("llama3-8b").replace(
        max_position_embeddings=131072, norm_eps=1e-5, rope_type="llama3", rope_factor=8.0
    )
    assert config_from_hf(PYTHIA_V5) == get_preset("pythia-1.4b")
    linear = config_from_hf(LINEAR_V4)
    assert (linear.rope_type, linear.rope_factor, linear.rope_theta) == ("linear", 2.0, 20000.0)
    assert config_from_hf(LINEAR_V4, compute_dtype="bfloat16", remat_policy="dots").compute_dtype == "bfloat16"
    assert config_from_hf(QWEN25_7B) == get_preset("qwen2.5-7b")
    assert config_from_hf(QWEN3_8B) == get_preset("qwen3-8b")
    # Qwen3Config's head_dim default is 128, not hidden_size / num_attention_heads
    assert config_from_hf({k: v for k, v in QWEN3_8B.items() if k != "head_dim"}).head_dim == 128


@pytest.mark.parametrize("hf", [QWEN25_7B, QWEN3_8B], ids=["qwen2", "qwen3"])
def test_qwen_sliding_window_is_refused_by_name(hf):
    """use_sliding_window: true (a window from layer max_window_layers on) is not implemented."""
    pattern = r"config\.json use_sliding_window=True \(sliding_window=4096, max_window_layers=2\) is not supported"
    with pytest.raises(InputError, match=pattern):
        config_from_hf({**hf, "use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 2})
    # written by transformers itself (5.x to_dict: layer_types with sliding layers)
    hf_config = transformers.AutoConfig.for_model(
        hf["model_type"], **{**SMALL_QWEN, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}
    )
    with pytest.raises(InputError, match=r"use_sliding_window=True"):
        config_from_hf(hf_config.to_dict())


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


def test_family_registry():
    """Every family is registered once; config.json model_types and architecture names resolve through it."""
    assert list(FAMILIES) == ["llama", "gpt_neox", "qwen2", "qwen3", "gemma2", "gemma3"]
    assert all(get_family(name).name == name for name in FAMILIES)
    assert ARCHITECTURES == {name: family.build for name, family in FAMILIES.items()}
    assert HF_ARCHITECTURES == {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "gpt_neox": "GPTNeoXForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "gemma2": "Gemma2ForCausalLM",
        "gemma3_text": "Gemma3ForCausalLM",
    }
    assert all(hasattr(transformers, cls) for cls in HF_ARCHITECTURES.values())
    classifiers = {t: c for family in FAMILIES.values() for t, c in family.hf_classifiers.items()}
    assert classifiers.keys() == HF_ARCHITECTURES.keys()
    assert all(hasattr(transformers, cls) for cls in classifiers.values())
    assert FAMILIES["gemma3"].hf_multimodal == {"gemma3": "gemma3_text"}  # Gemma3ForConditionalGeneration folders
    pattern = r"model_type='phi3' is not supported.*gemma2.*gemma3.*gemma3_text.*gpt_neox.*llama.*mistral.*qwen2.*qwen3"
    with pytest.raises(InputError, match=pattern):
        config_from_hf({**LINEAR_V4, "model_type": "phi3"})
    with pytest.raises(InputError, match=r"unknown architecture 'phi3'.*llama, gpt_neox, qwen2, qwen3, gemma2, gemma3"):
        get_family("phi3")


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
