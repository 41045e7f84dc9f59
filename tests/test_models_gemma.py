"""What only the Gemma families have (kto_jax/models/gemma2.py, gemma3.py): the language model of a
Gemma 3 vision-language folder, the final logit soft-cap on the chunked log-prob path the train
step takes, and the config.json options and attention implementations they refuse by name.

The logits, padding, generation and export checks of the tiny Gemma configs are the shared ones of
tests/test_models_hf.py (HF_CONFIGS: gemma2_softcap, gemma2_mqa_untied, gemma3_rope,
gemma3_mqa_untied)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

from kto_jax.errors import InputError
from kto_jax.logprobs import token_logps
from kto_jax.losses import get_loss
from kto_jax.models.config import ModelConfig
from kto_jax.models.hf import from_hf
from kto_jax.models.hf_config import config_from_hf
from kto_jax.train.feeds import StepSpec, head_token_logps, hidden_states
from tests.hf_checkpoints import HF_CONFIGS, TOL, forward, hf_logits, max_diff, perturb_vectors, random_ids


def test_loaded_config_fields(loaded):
    """The config.json fields that select Gemma's code paths arrive in the ModelConfig."""
    cfg = loaded("gemma2_softcap")[2].config
    gemma2 = (
        cfg.architecture,
        cfg.head_dim,
        cfg.query_pre_attn_scalar,
        cfg.attn_logit_softcap,
        cfg.final_logit_softcap,
    )
    assert gemma2 == ("gemma2", 16, 12, 2.0, 3.0)
    assert (cfg.layer_types, cfg.sliding_window, cfg.hidden_act) == (
        ("sliding_attention", "full_attention"),
        4,
        "gelu_pytorch_tanh",
    )
    assert (cfg.norm_unit_offset, cfg.scale_embeddings, cfg.tie_word_embeddings) == (True, True, True)
    assert set(loaded("gemma2_softcap")[3]["layers"]) == {
        "attention",
        "attention_norm",
        "post_attention_norm",
        "mlp",
        "mlp_norm",
        "post_mlp_norm",
    }
    cfg = loaded("gemma3_rope")[2].config
    gemma3 = (cfg.architecture, cfg.qk_norm, cfg.rope_type, cfg.rope_factor, cfg.rope_theta, cfg.rope_local_theta)
    assert gemma3 == ("gemma3", True, "linear", 2.0, 1e6, 100.0)
    assert cfg.attn_logit_softcap is None and cfg.final_logit_softcap is None
    cfg = loaded("gemma3_mqa_untied")[2].config
    assert cfg.layer_types == ("sliding_attention",) * 5 + ("full_attention", "sliding_attention")
    assert "lm_head" in loaded("gemma3_mqa_untied")[3] and cfg.num_kv_heads == 1


# ---------------------------------------------------------------- Gemma3ForConditionalGeneration


@pytest.fixture(scope="module")
def vision_language(tmp_path_factory):
    """A tiny Gemma3ForConditionalGeneration (the tiny gemma3_rope language model, a one-layer SigLIP
    tower), saved as transformers saves it (``language_model.model.*``): (folder, model)."""
    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = Gemma3Config(
        text_config=HF_CONFIGS["gemma3_rope"]().to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=1
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).float().eval()
    perturb_vectors(model, 0)
    folder = str(tmp_path_factory.mktemp("gemma3_vl"))
    model.save_pretrained(folder)
    return folder, model


def test_vision_language_folder_loads_its_language_model(vision_language, capsys):
    folder, hf_model = vision_language
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["model_type"] == "gemma3"
    model, params = from_hf(folder)
    assert (model.config.architecture, model.config.hf_model_type) == ("gemma3", "gemma3_text")
    assert "vision tower and projector are left out" in capsys.readouterr().err
    ids = random_ids(seed=8)
    assert max_diff(forward(model, params, ids), hf_logits(hf_model, ids)) < TOL


def test_vision_language_folder_with_transformers_5_tensor_names(vision_language, tmp_path):
    """The same tensors under ``model.language_model.*`` (transformers 5.x's module names) load alike."""
    folder, hf_model = vision_language
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    renamed = {
        (
            "model.language_model." + name[len("language_model.model.") :]
            if name.startswith("language_model.model.")
            else name
        ): t
        for name, t in tensors.items()
    }
    assert any(n.startswith("model.language_model.layers.") for n in renamed)
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    model, params = from_hf(str(tmp_path))
    ids = random_ids(seed=9)
    assert max_diff(forward(model, params, ids), hf_logits(hf_model, ids)) < TOL


def test_vision_language_config_without_text_config_is_named():
    with pytest.raises(InputError, match=r"model_type='gemma3' has no text_config"):
        config_from_hf({"model_type": "gemma3", "vision_config": {}})


# ---------------------------------------------------------------- soft-capped log-probs of the step


def test_step_log_probs_take_the_final_soft_cap(loaded):
    """The train step's chunked log-probs (hidden states through the LM head, never the full logits)
    equal the log-softmax of transformers' soft-capped logits; without the cap they would not."""
    _, hf_model, model, params = loaded("gemma2_softcap")
    assert model.config.final_logit_softcap == 3.0
    ids = random_ids(seed=10)
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # left padding
    loss_mask = mask.copy()
    loss_mask[:, :4] = 0  # a prompt
    loss_mask[1, :6] = 0  # (its first real token is scored off a padding position: never in a batch)
    spec = StepSpec(model, get_loss("sft"), (), 1, "none", 5)  # chunks of 5 tokens: three chunks per row
    hidden = hidden_states(spec, params, jnp.asarray(ids), jnp.asarray(mask))
    got = head_token_logps(spec, params, hidden, jnp.asarray(ids), jnp.asarray(loss_mask))
    want = token_logps(jnp.asarray(hf_logits(hf_model, ids, mask)), ids, loss_mask)
    assert max_diff(got, want) < TOL
    uncapped = head_token_logps(
        StepSpec(model.clone(config=model.config.replace(final_logit_softcap=None)), get_loss("sft"), (), 1, "none", 5),
        params,
        hidden,
        jnp.asarray(ids),
        jnp.asarray(loss_mask),
    )
    assert max_diff(uncapped, want) > 1e-2


# ---------------------------------------------------------------- refused by name


GEMMA2 = HF_CONFIGS["gemma2_softcap"]().to_dict()
GEMMA3 = HF_CONFIGS["gemma3_rope"]().to_dict()


@pytest.mark.parametrize(
    "hf, pattern",
    [
        ({**GEMMA2, "use_bidirectional_attention": True}, r"use_bidirectional_attention=True is not supported"),
        ({**GEMMA3, "attn_logit_softcapping": 50.0}, r"attn_logit_softcapping=50.0 is not supported"),
        (
            {
                **GEMMA3,
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                },
            },
            r"rope_parameters\.sliding_attention=.* is not supported",
        ),
        ({**GEMMA2, "layer_types": ["sliding_attention", "chunked_attention"]}, r"ModelConfig\.layer_types="),
        ({**GEMMA2, "sliding_window": None}, r"ModelConfig\.sliding_window=None is invalid"),
        ({**GEMMA2, "query_pre_attn_scalar": None}, r"ModelConfig\.query_pre_attn_scalar=None is invalid"),
    ],
    ids=["bidirectional", "gemma3_attn_softcap", "local_rope_scaled", "layer_kind", "no_window", "no_scalar"],
)
def test_unsupported_options_name_the_field(hf, pattern):
    with pytest.raises(InputError, match=pattern):
        config_from_hf(hf)


def test_cudnn_has_no_soft_capped_attention():
    """A soft-capped model on cuDNN is refused when the config is made (before anything compiles),
    naming attention_impl and the implementations that take the cap."""
    cfg = config_from_hf(GEMMA2)
    with pytest.raises(
        InputError, match=r"ModelConfig\.attention_impl='cudnn' is invalid: expected None, 'xla' or 'splash'"
    ):
        cfg.replace(attention_impl="cudnn")
    assert config_from_hf(GEMMA3, attention_impl="cudnn").attention_impl == "cudnn"  # Gemma 3: no cap


@pytest.mark.parametrize(
    "field, value, family",
    [
        ("final_logit_softcap", 30.0, "llama"),
        ("layer_types", ("full_attention",) * 2, "qwen3"),
        ("norm_unit_offset", True, "qwen2"),
    ],
)
def test_gemma_layers_belong_to_the_gemma_families(field, value, family):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
    extra = {"qkv_bias": True} if family == "qwen2" else {"qk_norm": True} if family == "qwen3" else {}
    with pytest.raises(InputError, match=rf"ModelConfig\.{field}=.* has no such layer"):
        ModelConfig(architecture=family, **base, **extra, **{field: value})


def test_a_window_without_layer_kinds_is_refused():
    """Gemma with a window but no per-layer kinds would window every layer, which its config.json
    (always listing layer_types) cannot say: refused, naming layer_types."""
    cfg = config_from_hf(GEMMA2)
    with pytest.raises(InputError, match=r"ModelConfig\.layer_types=None is invalid"):
        cfg.replace(layer_types=None)


def test_layer_kinds_are_scanned_data_not_unrolled_layers(loaded):
    """Seven alternating layers compile as one scanned layer: the jaxpr holds one scan over 7 steps."""
    _, _, model, params = loaded("gemma3_mqa_untied")
    jaxpr = jax.make_jaxpr(lambda p, i: model.apply({"params": p}, i))(params, random_ids(seed=0))
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert [e.params["length"] for e in scans] == [7]
