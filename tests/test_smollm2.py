"""SmolLM2-135M-Instruct through kto_jax.models.hf.from_hf: logits equal transformers' (float32)
on chat-rendered prompts of its own template, one forward per prompt."""

from __future__ import annotations

import numpy as np
import pytest

from kto_jax.data.chat import JinjaChatTemplate, bos_id_for
from kto_jax.data.tokenize import HFTokenizer, encode_prompt
from kto_jax.models.hf import from_hf
from tests.hf_checkpoints import forward, hf_logits, max_diff
from tests.smollm2 import smollm2_dir

# float32 roundoff over 30 layers, logits up to ~38: measured max |ours - transformers| 1.4e-4 (short
# prompt, one position) and 8.8e-5 (long), means ~1.5e-5; transformers' own float32 logits are 6.6e-5
# from its float64 run on the short prompt (ours 1.3e-4). 1e-4 was the aim; 2e-4 leaves no room for a real bug
# (a wrong norm eps, RoPE base or tied head moves logits by >1e-2).
TOL, MEAN_TOL = 2e-4, 3e-5
PROMPTS = {
    "short": (("user", "Hi!"),),
    "long": (("system", "You are a careful assistant who answers in full sentences."),
             ("user", "What is the capital of France?"), ("assistant", "The capital of France is Paris."),
             ("user", "And how many people live there? Give an estimate and explain where it comes from.")),
}


@pytest.fixture(scope="module")
def models():
    import torch
    from transformers import AutoModelForCausalLM

    path = smollm2_dir()
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model, params = from_hf(path)
    return path, hf_model, model, params


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_logits_match_transformers(models, name):
    path, hf_model, model, params = models
    template, tok = JinjaChatTemplate.from_folder(path), HFTokenizer(path)
    tok.bos_id = bos_id_for(template, tok)
    ids = np.asarray([encode_prompt(tok, template.prompt(PROMPTS[name]))], np.int32)
    assert ids.shape[1] > (60 if name == "long" else 20)
    ours = np.asarray(forward(model, params, ids), np.float32)
    ref = hf_logits(hf_model, ids)
    assert ours.shape == ref.shape == (1, ids.shape[1], tok.vocab_size)
    assert np.std(ref) > 0.5
    assert max_diff(ours, ref) < TOL
    assert float(np.mean(np.abs(ours - ref))) < MEAN_TOL
    # the model continues the chat: its next token after "<|im_start|>assistant\n" is the same in both
    assert int(ours[0, -1].argmax()) == int(ref[0, -1].argmax())
