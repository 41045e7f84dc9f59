"""SmolLM2-135M-Instruct through kto_jax.models.hf.from_hf: logits equal transformers' (float32)
on chat-rendered prompts of its own template, one forward per prompt; greedy decoding with
kto_jax.generate.generate (KV cache, left-padded batches) equals transformers' generate token
for token, one prompt at a time and the three in one batch."""

from __future__ import annotations

import numpy as np
import pytest

from kto_jax.data.chat import JinjaChatTemplate, bos_id_for
from kto_jax.data.tokenize import HFTokenizer, encode_prompt
from kto_jax.generate import generate
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
    "long": (
        ("system", "You are a careful assistant who answers in full sentences."),
        ("user", "What is the capital of France?"),
        ("assistant", "The capital of France is Paris."),
        ("user", "And how many people live there? Give an estimate and explain where it comes from."),
    ),
}


# greedy decoding: a one-turn question, a system turn, a multi-turn conversation (whose answer ends
# with EOS before NEW_TOKENS: the EOS path). Prompt lengths 41, 31 and 59 tokens: in one batch they
# are left-padded by 23, 33 and 5 (bucket 16 -> 64); alone, by 7, 1 and 5. Transformers' smallest
# top-2 logit gap along the three greedy paths is 5.8e-3 ("system", step 10), 40x the float32 logit
# differences above: no near-ties.
NEW_TOKENS = 24
CHATS = {
    "question": (("user", "What is the boiling point of water at sea level?"),),
    "system": (
        ("system", "You are a pirate. Answer every question like a pirate."),
        ("user", "Where is the treasure?"),
    ),
    "multi_turn": (
        ("user", "Name a fruit that is yellow."),
        ("assistant", "A banana is yellow."),
        ("user", "And one that is red?"),
    ),
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


def _tokenizer(path):
    template, tok = JinjaChatTemplate.from_folder(path), HFTokenizer(path)
    tok.bos_id = bos_id_for(template, tok)
    return template, tok


@pytest.fixture(scope="module")
def greedy(models):
    """name -> (prompt ids, transformers' greedy tokens up to (not including) EOS, its per-step logits)."""
    import torch

    path, hf_model, _, _ = models
    template, tok = _tokenizer(path)
    out = {}
    for name, turns in CHATS.items():
        ids = encode_prompt(tok, template.prompt(turns))
        with torch.no_grad():
            gen = hf_model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                output_scores=True,
                return_dict_in_generate=True,
            )
        new = gen.sequences[0, len(ids) :].tolist()
        assert new.count(tok.eos_id) <= 1 and (
            tok.eos_id not in new or new[-1] == tok.eos_id
        )  # stops at EOS, which it keeps
        out[name] = (
            ids,
            new[: new.index(tok.eos_id)] if tok.eos_id in new else new,
            [s[0].numpy() for s in gen.scores],
        )
    assert (
        sum(len(r) < NEW_TOKENS for _, r, _ in out.values()) >= 1
    )  # one answer ends with EOS: the EOS path is exercised
    assert len({len(ids) for ids, _, _ in out.values()}) == 3  # different left padding in the batch
    return out


def _check_greedy(name, ours, reference):
    """ours == transformers' tokens; else the message says where they diverge and transformers' top-2
    logit gap there (a float32 near-tie is a gap ~1e-5, a bug is not)."""
    _, ref, scores = reference
    if ours == ref:
        return
    i = next((k for k, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    top2 = np.sort(scores[i])[-2:] if i < len(scores) else None
    gap = None if top2 is None else float(top2[1] - top2[0])
    raise AssertionError(
        f"{name}: greedy tokens diverge at step {i} (transformers' top-2 logit gap there: {gap}):\n"
        f"ours         {ours}\ntransformers {ref}"
    )


@pytest.mark.parametrize("name", sorted(CHATS))
def test_greedy_generation_matches_transformers(models, greedy, name):
    path, _, model, params = models
    _, tok = _tokenizer(path)
    ids = greedy[name][0]
    ours = generate(
        model,
        params,
        [ids],
        max_new_tokens=NEW_TOKENS,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        temperature=0.0,
        batch_size=1,
    )[0]
    _check_greedy(name, ours, greedy[name])


def test_greedy_generation_in_one_left_padded_batch_matches_transformers(models, greedy):
    """The three prompts in one batch, each left-padded differently: the same tokens as each alone in transformers."""
    path, _, model, params = models
    _, tok = _tokenizer(path)
    names = list(CHATS)
    ours = generate(
        model,
        params,
        [greedy[n][0] for n in names],
        max_new_tokens=NEW_TOKENS,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        temperature=0.0,
        batch_size=len(names),
    )
    for name, tokens in zip(names, ours):
        _check_greedy(name, tokens, greedy[name])
