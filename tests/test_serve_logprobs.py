"""Log-probs of scripts/serve.py (tiny-1m, a real server process on 127.0.0.1; the official ``openai``
client), against kto_jax's training log-probs computed here on the same params and tokens:

* ``echo=true, max_tokens=0`` (and lm-eval's ``max_tokens=1, logprobs=1``): the prompt's tokens'
  log-probs, the first null; their sum over a continuation is ``kto_jax.logprobs.sequence_logps``
  of that continuation (within 1e-4); ``tokens`` and ``text_offset`` spell the prompt;
* ``logprobs=k`` on generated tokens (legacy format) and chat's ``logprobs``/``top_logprobs``:
  the greedy tokens' log-probs are the training log-probs of prompt + completion, each the top one.
* bad log-prob and stream options are a 400 naming the field; ``finish_row`` reports the token
  that ended a row (EOS, a stop token) for the log-probs.
The SmolLM2 check against transformers is in tests/test_lm_eval.py (its server is shared there).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_serve import KEY, ServerProcess, direct_greedy, request

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(openai client, model, params)``: the tiny-1m server and the same random weights here."""
    from kto_jax.models.hf import from_hf

    proc = ServerProcess(
        ["--model=tiny-1m", "--chat_template=plain", f"--api_key={KEY}"],
        str(tmp_path_factory.mktemp("logprobs") / "server.log"),
    )
    model, params = from_hf("tiny-1m", seed=0)
    yield openai.OpenAI(base_url=proc.url, api_key=KEY, max_retries=0, timeout=120), model, params
    proc.stop()


def training_logps(model, params, ids: list[int], start: int) -> np.ndarray:
    """Per-token log-probs of ``ids[start:]`` given what precedes, by kto_jax's training functions
    (full logits, ``kto_jax.logprobs.token_logps``), and their sum is ``sequence_logps``'."""
    import jax.numpy as jnp

    from kto_jax.logprobs import sequence_logps, token_logps

    x = jnp.asarray([ids], jnp.int32)
    loss_mask = jnp.asarray([[0] * start + [1] * (len(ids) - start)], jnp.int32)
    logits = model.apply({"params": params}, x, jnp.ones_like(x))
    per_token = np.asarray(token_logps(logits, x, loss_mask))[0, start - 1 :]
    total, count = sequence_logps(logits, x, loss_mask)
    assert int(count[0]) == len(ids) - start and abs(float(total[0]) - per_token.sum()) < 1e-4
    return per_token


def test_echo_loglikelihood_equals_training_sequence_logp(tiny):
    from kto_jax.data.tokenize import ByteTokenizer

    client, model, params = tiny
    tok = ByteTokenizer()
    context, continuation = "Question: what colour is the sky? Answer:", " blue, mostly."
    ids = tok.encode(context + continuation)
    start = len(tok.encode(context))
    expected = training_logps(model, params, ids, start)
    scored = client.completions.create(model="m", prompt=[ids], echo=True, max_tokens=0, logprobs=2, temperature=0)
    lp = scored.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
    served = np.asarray(lp.token_logprobs[start:])
    print(
        f"tiny-1m echo: max per-token |served - training| {np.abs(served - expected).max():.1e}, "
        f"sum {abs(served.sum() - expected.sum()):.1e}"
    )
    np.testing.assert_allclose(served, expected, atol=1e-4)
    assert abs(served.sum() - expected.sum()) < 1e-4
    assert "".join(lp.tokens) == context + continuation and scored.choices[0].text == context + continuation
    assert lp.text_offset == [len((context + continuation)[:i]) for i in range(len(ids))]
    assert all(len(t) <= 2 and max(t.values()) >= v - 1e-6 for t, v in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
    # lm-eval's loglikelihood request: max_tokens=1, logprobs=1, echo; the generated token comes last
    lm = client.completions.create(model="m", prompt=[ids], echo=True, max_tokens=1, logprobs=1, temperature=0)
    lm_lp = lm.choices[0].logprobs
    assert len(lm_lp.tokens) == len(ids) + 1 and lm.usage.completion_tokens == 1
    np.testing.assert_allclose(lm_lp.token_logprobs[start:-1], expected, atol=1e-4)
    assert lm_lp.token_logprobs[-1] == max(lm_lp.top_logprobs[-1].values())  # the greedy token is the top one


def test_generated_tokens_logprobs_legacy_and_chat(tiny):
    from kto_jax.data.chat import get_chat_template
    from kto_jax.data.tokenize import ByteTokenizer

    client, model, params = tiny
    tok = ByteTokenizer()
    prompt = "The quick brown fox jumps over"
    ids = tok.encode(prompt)
    out = client.completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
    greedy = direct_greedy(model, params, ids, 8)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == tok.decode(greedy) and len(lp.tokens) == len(greedy) == out.usage.completion_tokens
    np.testing.assert_allclose(lp.token_logprobs, training_logps(model, params, ids + greedy, len(ids)), atol=1e-4)
    assert all(len(t) <= 3 and v == max(t.values()) for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset[0] == len(prompt)

    messages = [{"role": "user", "content": "Is the sky blue?"}]
    chat = client.chat.completions.create(
        model="m", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    chat_ids = tok.encode(get_chat_template("plain").prompt([("user", "Is the sky blue?")]))
    greedy = direct_greedy(model, params, chat_ids, 6)
    content = chat.choices[0].logprobs.content
    assert len(content) == len(greedy) == chat.usage.completion_tokens
    expected = training_logps(model, params, chat_ids + greedy, len(chat_ids))
    np.testing.assert_allclose([c.logprob for c in content], expected, atol=1e-4)
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob  # greedy: the top token
        assert c.bytes == list(c.token.encode("utf-8"))
    plain = client.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == chat.choices[0].message.content


BAD = [  # (path, body, param named): log-prob and streaming options refused with a 400
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, "logprobs"),
    ("/completions", {"prompt": "hi", "stream": True, "logprobs": 1}, "logprobs"),
    ("/completions", {"prompt": "hi", "stream": True, "echo": True}, "echo"),
    ("/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
    ("/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),  # 0 only with echo
]


def test_bad_logprob_and_stream_options_are_400(tiny):
    client = tiny[0]
    for path, body, param in BAD:
        status, out = request(str(client.base_url).rstrip("/"), path, body)
        assert status == 400 and out["error"]["param"] == param, (body, out)


def test_finish_row_reports_the_token_that_ended_it():
    """EOS or a stop token ends a row and is reported after its tokens with log-probs (not a stop
    string, nor a cut at max_tokens)."""
    from kto_jax.serve.batching import finish_row

    def decode(ids):
        return "".join(chr(ord("a") + i) for i in ids)

    assert finish_row([0, 1, 2], 16, 8, decode, eos_id=7).scored_tokens == [0, 1, 2, 7]
    assert finish_row([0, 1, 5, 3], 16, 8, decode, stop_token_ids=(5,), eos_id=7).scored_tokens == [0, 1, 5]
    assert finish_row([0, 1, 2, 3], 16, 3, decode, eos_id=7).scored_tokens == [0, 1, 2]
    assert finish_row([0, 1, 2, 3], 16, 8, decode, stop=("bc",), eos_id=7).scored_tokens == [0, 1, 2]
