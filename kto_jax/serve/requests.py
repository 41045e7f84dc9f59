"""Request validation of the OpenAI-compatible server (``kto_jax.serve.app``): JSON bodies -> prompts
and sampling options, or a ``RequestError`` (an HTTP 400 naming the field, as OpenAI's errors).

``served`` below is a ``kto_jax.serve.app.ServedModel`` (its tokenizer, template and context length).
"""

from __future__ import annotations

from kto_jax.serve.batching import Sampling

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_N = 64
MAX_LOGPROBS = 20


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` with OpenAI's error body naming ``param``."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _number(body: dict, field: str, default, lo: float, hi: float, integer: bool = False):
    """``body[field]`` (``default`` when absent or null), checked to be a number in [lo, hi]."""
    value = body.get(field)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise RequestError(f"{field} must be {kind} in [{lo}, {hi}]; got {value!r}", field)
    return value


def _flag(body: dict, field: str) -> bool:
    """``body[field]`` as a boolean (absent or null: False)."""
    value = body.get(field)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{field} must be true or false; got {value!r}", field)
    return value


def stream_options(body: dict) -> tuple[bool, bool]:
    """``(stream, include_usage)``: ``stream`` and ``stream_options.include_usage``."""
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise RequestError(f"stream_options must be an object; got {options!r}", "stream_options")
    if not stream:
        raise RequestError("stream_options is only allowed with stream=true", "stream_options")
    return stream, _flag(options, "include_usage")


def logprob_options(body: dict, chat: bool) -> tuple[int | None, bool]:
    """``(top-k count or None for no log-probs, echo)``: completions' ``logprobs`` (an integer) and
    ``echo``; chat's ``logprobs`` (a boolean) and ``top_logprobs``."""
    if chat:
        top = _number(body, "top_logprobs", None, 0, MAX_LOGPROBS, integer=True)
        wanted = _flag(body, "logprobs")
        if top is not None and not wanted:
            raise RequestError("top_logprobs needs logprobs=true", "top_logprobs")
        return (top or 0) if wanted else None, False
    if isinstance(body.get("logprobs"), bool):
        raise RequestError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] for completions", "logprobs")
    return _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True), _flag(body, "echo")


def parse_options(body: dict, chat: bool = False) -> dict:
    """The options of a request: ``sampling``, ``n``, ``seed``, ``stop``, ``max_tokens`` (None: default),
    ``stream``, ``include_usage``, ``logprobs`` (top-k count; None: none) and ``echo``."""
    stream, include_usage = stream_options(body)
    logprobs, echo = logprob_options(body, chat)
    if stream and (logprobs is not None or echo):
        field = "logprobs" if logprobs is not None else "echo"
        raise RequestError(f"{field} is not supported with stream=true here: send the request unstreamed", field)
    field = (
        "max_completion_tokens"
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is not None
        else "max_tokens"
    )
    max_tokens = _number(body, field, None, 0 if echo else 1, 2**31, integer=True)
    temperature = float(_number(body, "temperature", 1.0, 0.0, 100.0))
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0))
    if top_p == 0:
        raise RequestError("top_p must be > 0", "top_p")
    top_k = int(_number(body, "top_k", 0, -1, 2**31, integer=True))
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    seed = _number(body, "seed", None, -(2**63), 2**64, integer=True)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"stop must be a non-empty string or a list of them; got {body.get('stop')!r}", "stop")
    return {
        "sampling": Sampling(temperature, top_p, max(top_k, 0)),
        "n": n,
        "seed": None if seed is None else seed % 2**31,
        "stop": tuple(stop),
        "max_tokens": max_tokens,
        "max_tokens_field": field,
        "stream": stream,
        "include_usage": include_usage,
        "logprobs": logprobs,
        "echo": echo,
    }


def chat_turns(body: dict) -> list[tuple[str, str]]:
    """``messages`` as ``(role, content)`` turns (developer -> system; text parts of a content list joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", "messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        if m.get("role") not in ROLES:
            raise RequestError(
                f"messages[{i}].role is {m.get('role')!r}; known roles: {', '.join(ROLES)}", f"messages[{i}].role"
            )
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(str(p.get("text", "")) for p in content)
        if content is None and m["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            raise RequestError(
                f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content"
            )
        turns.append((ROLES[m["role"]], content))
    return turns


def completion_prompts(body: dict, served) -> list[list[int]]:
    """``prompt`` (a string, a list of strings, a list of token ids or a list of those) as token ids."""
    prompt = body.get("prompt")
    vocab = served.model.config.vocab_size
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise RequestError("prompt must be a string, a list of strings, or token ids", "prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            ids = served.encode(p, served.raw_bos_id)
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in p):
            ids = list(p)
        else:
            raise RequestError(
                f"prompt entries must be strings or lists of token ids in [0, {vocab}); got {p!r:.80}", "prompt"
            )
        if not ids:
            raise RequestError("prompt is empty (no tokens)", "prompt")
        out.append(ids)
    return out


def resolve_max_tokens(options: dict, prompts: list[list[int]], served, default: int, prompt_field: str) -> int:
    """The request's max_tokens, within the context: a prompt + max_tokens over it is a 400."""
    longest = max(len(p) for p in prompts)
    room = served.context_length - longest
    if room < (0 if options["max_tokens"] == 0 else 1):
        raise RequestError(
            f"this model's maximum context length is {served.context_length} tokens; the prompt has {longest}",
            prompt_field,
            code="context_length_exceeded",
        )
    max_tokens = options["max_tokens"]
    if max_tokens is None:
        return min(default, room)
    if max_tokens > room:
        raise RequestError(
            f"this model's maximum context length is {served.context_length} tokens; the prompt has {longest} "
            f"and {options['max_tokens_field']} is {max_tokens}: lower {options['max_tokens_field']} to at most "
            f"{room} or shorten the prompt",
            options["max_tokens_field"],
            code="context_length_exceeded",
        )
    return max_tokens
