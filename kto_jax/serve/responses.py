"""The server's answer bodies in OpenAI's shapes: completions and chat completions, their streamed
chunks, and their log-probs (the legacy completions format and the chat format).

The log-probs of a completion that EOS or a stop token ended report that token last (as vLLM),
though neither its text nor the usage counts it. Token strings are each token decoded alone (a byte of a multi-byte character decodes to U+FFFD;
a special token the tokenizer skips when decoding to ""); ``text_offset`` counts their lengths.
"""

from __future__ import annotations

from kto_jax.serve.batching import Choice
from kto_jax.serve.scoring import Scores


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(decode, prompt: list[int], choice: Choice, echo: bool, start_offset: int) -> dict:
    """OpenAI's legacy ``logprobs`` of a completion choice: ``tokens``, ``token_logprobs``,
    ``top_logprobs`` (dicts token -> log-prob) and ``text_offset`` (characters into the answer's
    text, from ``start_offset``); with ``echo`` the prompt's tokens first, the first one's
    log-prob and top log-probs null (no token predicts it)."""
    ids = (list(prompt) if echo else []) + choice.scored_tokens
    part: Scores = choice.scores if echo else choice.scores.tail(len(prompt))
    logps: list = list(part.token_logprobs)
    tops: list = [
        _top_dict(decode, t, part.top_ids[j] if part.top_ids else [], part.top_logprobs[j] if part.top_ids else [], lp)
        for j, (t, lp) in enumerate(zip(ids[1:] if echo else ids, logps))
    ]
    if echo:
        logps, tops = [None, *logps], [None, *tops]
    strings = [decode([t]) for t in ids]
    offsets, at = [], start_offset
    for s in strings:
        offsets.append(at)
        at += len(s)
    return {"tokens": strings, "token_logprobs": logps, "top_logprobs": tops, "text_offset": offsets}


def _top_dict(decode, token: int, ids: list[int], values: list[float], logp: float) -> dict:
    """token string -> log-prob of the top tokens; the token itself, when among them, with its own
    log-prob (so a greedy token's value equals the top one's exactly, as lm-eval's is_greedy compares)."""
    out: dict = {}
    for i, v in zip(ids, values):
        out.setdefault(decode([i]), logp if i == token else v)
    return out


def chat_logprobs(decode, prompt_len: int, choice: Choice, top_k: int) -> dict:
    """OpenAI's chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}, ...]}``."""
    scores = choice.scores.tail(prompt_len)
    content = []
    for j, t in enumerate(choice.scored_tokens):
        s = decode([t])
        tops = []
        if top_k:
            for i, v in zip(scores.top_ids[j], scores.top_logprobs[j]):
                si = decode([i])
                lp = scores.token_logprobs[j] if i == t else v
                tops.append({"token": si, "logprob": lp, "bytes": list(si.encode("utf-8"))})
        content.append(
            {"token": s, "logprob": scores.token_logprobs[j], "bytes": list(s.encode("utf-8")), "top_logprobs": tops}
        )
    return {"content": content, "refusal": None}


def choice_body(chat: bool, index: int, choice: Choice, logprobs) -> dict:
    """One entry of a non-streamed answer's ``choices``."""
    if chat:
        message = {"role": "assistant", "content": choice.text}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": choice.finish_reason}
    return {"index": index, "text": choice.text, "logprobs": logprobs, "finish_reason": choice.finish_reason}


def chunk_choice(chat: bool, index: int, text: str | None, finish_reason: str | None, first: bool = False) -> dict:
    """One entry of a streamed chunk's ``choices``: chat's ``delta`` (the role in the first) or a
    completion's ``text``."""
    if chat:
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
