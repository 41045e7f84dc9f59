"""An OpenAI-compatible HTTP server over kto-jax's KV-cache generation (``scripts/serve.py``).

    served = load_served_model("~/.cache/kto_jax/smollm2-135m-instruct")   # or "tiny-1m", "orbax:RUN@STEP"
    server = make_server(served, host="127.0.0.1", port=8000)
    server.serve_forever()

Endpoints: POST /v1/chat/completions (messages rendered by the chat template with the
generation prompt), POST /v1/completions (raw text or token ids, no template), GET
/v1/models, GET /health (unauthenticated; batching counters). Requests of all handler
threads go to one ``kto_jax.serve.batching.Batcher``; their bodies are read by
``kto_jax.serve.requests``.

Streaming (``stream``, ``stream_options.include_usage``): server-sent events of OpenAI's chunks
(``kto_jax.serve.streaming``), the text sent as it is generated, a chunk every
``kto_jax.serve.engine.CHUNK`` tokens; streamed and unstreamed answers are the same text.
Log-probs (``kto_jax.serve.scoring``: training's forward and log-probs, float32): completions'
``logprobs`` (top-k count) and ``echo`` (the prompt's tokens too; ``max_tokens`` 0 allowed),
chat's ``logprobs`` and ``top_logprobs``. Other methods than GET and POST are a 405; every
error is an OpenAI-style JSON body.

Request fields: ``max_tokens`` (chat also ``max_completion_tokens``; default
``default_max_tokens``, lowered to what the context leaves), ``temperature`` (default 1),
``top_p``, ``top_k`` (an extension, as vLLM's; 0 or -1 = off), ``n``, ``seed``, ``stop``.
Any ``model`` name is accepted; answers carry the served name. A prompt whose tokens plus
``max_tokens`` exceed the model's context (``max_position_embeddings``) is refused with
HTTP 400 (code ``context_length_exceeded``): prompts are never cut. Bad input is a 400
``{"error": {"message", "type": "invalid_request_error", "param", "code"}}``; with an API
key set, a missing or wrong ``Authorization: Bearer KEY`` is a 401.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import os
import queue
import time
import uuid
from http.server import ThreadingHTTPServer
from typing import Any

from absl import logging

from kto_jax.data.chat import bos_id_for, get_chat_template
from kto_jax.data.tokenize import get_tokenizer
from kto_jax.errors import InputError
from kto_jax.models.hf import from_hf
from kto_jax.models.presets import PRESETS
from kto_jax.serve.batching import Batcher, Job, Sampling
from kto_jax.serve.engine import CHUNK, generate_chunked
from kto_jax.serve.handler import Server
from kto_jax.serve.requests import (
    RequestError,
    chat_turns,
    completion_prompts,
    parse_options,
    resolve_max_tokens,
)
from kto_jax.serve.responses import chat_logprobs, choice_body, completion_logprobs, usage
from kto_jax.serve.scoring import score_rows
from kto_jax.serve.streaming import EventStream
from kto_jax.train import setup

# ---------------------------------------------------------------- the served model


@dataclasses.dataclass
class ServedModel:
    """What the server needs of a model: weights, tokenizer, chat template and limits.

    ``chat_bos_id`` starts a chat prompt (the BOS the template writes, ``bos_id_for``);
    ``raw_bos_id`` starts a raw completion prompt (the tokenizer's own). ``stop_token_ids`` end a
    completion besides ``tokenizer.eos_id`` (generation_config.json's other EOS ids).
    """

    name: str
    model: Any
    params: Any
    tokenizer: Any
    template: Any
    context_length: int
    chat_bos_id: int | None = None
    raw_bos_id: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def encode(self, text: str, bos_id: int | None) -> list[int]:
        """``text``'s token ids after ``bos_id`` (when not None)."""
        return ([] if bos_id is None else [bos_id]) + self.tokenizer.encode(text)

    def chat_ids(self, turns) -> list[int]:
        """The token ids of ``turns`` rendered with the generation prompt."""
        return self.encode(self.template.prompt(turns), self.chat_bos_id)

    def generate(
        self, rows, *, max_new_tokens, sampling: Sampling, seed, batch_size, bucket, on_chunk=None, chunk=CHUNK
    ) -> list[list[int]]:
        """``kto_jax.generate.generate``'s tokens on this model, by chunks (the ``Batcher``'s ``generate_fn``)."""
        return generate_chunked(
            self.model,
            self.params,
            rows,
            max_new_tokens=max_new_tokens,
            eos_id=self.tokenizer.eos_id,
            pad_id=self.tokenizer.pad_id,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            batch_size=batch_size,
            seed=seed,
            bucket=bucket,
            on_chunk=on_chunk,
            chunk=chunk,
        )

    def score(self, rows, *, top_k: int, batch_size: int, bucket: int):
        """Each row's ``kto_jax.serve.scoring.Scores`` (the ``Batcher``'s ``score_fn``)."""
        return score_rows(
            self.model,
            self.params,
            rows,
            top_k=top_k,
            batch_size=batch_size,
            bucket=bucket,
            pad_id=self.tokenizer.pad_id,
        )


def load_served_model(
    source: str,
    *,
    chat_template: str = "auto",
    tokenizer: str = "",
    dtype: str = "",
    name: str = "",
    seed: int = 0,
    context_length: int = 0,
) -> ServedModel:
    """A preset name (random init, seed ``seed``; byte tokenizer unless ``tokenizer``), a Hugging Face
    folder, or ``orbax:WORKDIR[@STEP]`` (a kto_jax run's weights, latest step by default).

    chat_template: a built-in (halos, hh, plain), "tokenizer" (the folder's Jinja template), or
    "auto": the run's own template for orbax, else the folder's when it has one, else halos.
    dtype: params and activations ("float32", "bfloat16"); "" = float32 (an orbax run: its own).
    context_length: 0 = the model's max_position_embeddings.
    """
    template = None
    if source.startswith("orbax:"):
        model, params, tok, template, folder = _load_orbax(source[len("orbax:") :], dtype)
    else:
        path = source if source in PRESETS else os.path.abspath(os.path.expanduser(source))
        model, params = from_hf(path, param_dtype=dtype or "float32", seed=seed)
        folder = (
            os.path.expanduser(tokenizer) if tokenizer and tokenizer != "bytes" else (None if path in PRESETS else path)
        )
        tok = get_tokenizer(folder or "bytes")
    if chat_template != "auto" or template is None:
        template = _template(chat_template, folder)
    if tok.vocab_size > model.config.vocab_size:
        raise InputError(
            f"the tokenizer of {source!r} has {tok.vocab_size} tokens but the model embeds only "
            f"{model.config.vocab_size}: pass the model's own tokenizer"
        )
    raw_bos = tok.bos_id
    limit = int(context_length) or int(model.config.max_position_embeddings)
    return ServedModel(
        name=name or _default_name(source),
        model=model,
        params=params,
        tokenizer=tok,
        template=template,
        context_length=limit,
        chat_bos_id=bos_id_for(template, tok),
        raw_bos_id=raw_bos,
        stop_token_ids=_extra_eos_ids(folder, tok.eos_id),
    )


def _template(name: str, folder: str | None):
    """``name``'s template; "auto": the folder's own when it has one, else halos."""
    if name != "auto":
        return get_chat_template(name, folder)
    if folder:
        try:
            return get_chat_template("tokenizer", folder)
        except InputError:
            logging.warning("%s has no chat template; chat requests use the halos template", folder)
    return get_chat_template("halos")


def _load_orbax(workdir_and_step: str, dtype: str):
    """``(model, params, tokenizer, template, tokenizer folder)`` of a kto_jax run (``setup.load_run``),
    its params on the first local device; ``dtype`` ("" = the run's own) for params and activations."""
    run = setup.load_run(
        workdir_and_step, model_fields={"param_dtype": dtype, "compute_dtype": dtype} if dtype else None
    )
    logging.info("loaded step %d of %s", run.step, run.workdir)
    return run.model, run.params, run.tokenizer, run.chat_template, run.tokenizer_folder


def _default_name(source: str) -> str:
    """A preset's name, a folder's basename, or ``RUN[@STEP]`` of an orbax source."""
    if source.startswith("orbax:"):
        workdir, at, step = source[len("orbax:") :].partition("@")
        return os.path.basename(os.path.normpath(workdir)) + (f"@{step}" if at else "")
    return os.path.basename(os.path.normpath(os.path.expanduser(source)))


def _extra_eos_ids(folder: str | None, eos_id: int) -> tuple[int, ...]:
    """generation_config.json's ``eos_token_id`` entries other than the tokenizer's EOS."""
    file = os.path.join(folder, "generation_config.json") if folder else ""
    if not file or not os.path.exists(file):
        return ()
    with open(file, encoding="utf-8") as f:
        ids = json.load(f).get("eos_token_id")
    ids = ids if isinstance(ids, list) else [ids] if isinstance(ids, int) else []
    return tuple(int(i) for i in ids if int(i) != eos_id)


# ---------------------------------------------------------------- the app


class App:
    """The endpoints over one served model and its batcher: ``get``/``post`` return the JSON answer or
    raise ``RequestError`` (what the HTTP handler sends as the error status and body)."""

    def __init__(self, served: ServedModel, batcher: Batcher, *, api_key: str = "", default_max_tokens: int = 256):
        self.served, self.batcher, self.api_key, self.default_max_tokens = served, batcher, api_key, default_max_tokens

    def authorize(self, header: str | None) -> None:
        """A 401 unless the server has no key or ``header`` is ``Bearer KEY``."""
        if self.api_key and not hmac.compare_digest((header or "").encode(), f"Bearer {self.api_key}".encode()):
            raise RequestError("invalid or missing API key (Authorization: Bearer KEY)", None, 401, "invalid_api_key")

    def get(self, path: str) -> dict:
        if path in ("/health", "/v1/health"):
            return {"status": "ok", "model": self.served.name, **self.batcher.stats}
        if path == "/v1/models":
            return {
                "object": "list",
                "data": [{"id": self.served.name, "object": "model", "created": 0, "owned_by": "kto_jax"}],
            }
        raise RequestError(f"no endpoint GET {path}", None, 404, kind="not_found_error")

    def post(self, path: str, body: Any) -> dict | EventStream:
        """The answer of POST ``path``: a JSON body, or an ``EventStream`` for ``stream=true``."""
        if path not in ("/v1/chat/completions", "/v1/completions"):
            raise RequestError(f"no endpoint POST {path}", None, 404, kind="not_found_error")
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object", None)
        chat = path == "/v1/chat/completions"
        options = parse_options(body, chat=chat)
        if chat:
            try:
                prompts = [self.served.chat_ids(chat_turns(body))]
            except InputError as e:  # the template refused the conversation (e.g. roles that do not alternate)
                raise RequestError(str(e), "messages") from None
        else:
            prompts = completion_prompts(body, self.served)
        max_tokens = resolve_max_tokens(
            options, prompts, self.served, self.default_max_tokens, "messages" if chat else "prompt"
        )
        rows = [p for p in prompts for _ in range(options["n"])]
        job = Job(
            rows,
            max_tokens,
            options["sampling"],
            options["seed"],
            options["stop"],
            logprobs=options["logprobs"],
            echo=options["echo"],
            events=queue.Queue() if options["stream"] else None,
        )
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": ("chat.completion" if chat else "text_completion") + (".chunk" if chat and job.events else ""),
            "created": int(time.time()),
            "model": self.served.name,
        }
        self.batcher.submit(job)
        prompt_tokens = sum(len(p) for p in prompts)
        if job.events is not None:
            return EventStream(
                job, chat=chat, head=head, prompt_tokens=prompt_tokens, include_usage=options["include_usage"]
            )
        choices = job.future.result()
        out = [self._choice(chat, i, c, job) for i, c in enumerate(choices)]
        return {**head, "choices": out, "usage": usage(prompt_tokens, sum(len(c.tokens) for c in choices))}

    def _choice(self, chat: bool, index: int, choice, job: Job) -> dict:
        """One answer choice with its log-probs (when asked for) and, with ``echo``, the prompt's text first."""
        decode, prompt = self.served.tokenizer.decode, job.rows[index]
        if chat:
            logprobs = None if job.logprobs is None else chat_logprobs(decode, len(prompt), choice, job.logprobs)
            return choice_body(True, index, choice, logprobs)
        shown = decode(prompt) if job.echo else ""
        logprobs = None
        if job.logprobs is not None:
            logprobs = completion_logprobs(decode, prompt, choice, job.echo, 0 if job.echo else len(decode(prompt)))
        return choice_body(False, index, dataclasses.replace(choice, text=shown + choice.text), logprobs)


def make_server(
    served: ServedModel,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    wait_ms: float = 5.0,
    api_key: str = "",
    default_max_tokens: int = 256,
) -> ThreadingHTTPServer:
    """A ``ThreadingHTTPServer`` (port 0: a free one, ``server.server_address[1]``) with its batcher
    (``server.app.batcher``); call ``serve_forever``. Threads are daemons."""
    batcher = Batcher(
        served.generate,
        served.tokenizer.decode,
        score_fn=served.score,
        max_batch=max_batch,
        wait_s=wait_ms / 1000,
        stop_token_ids=served.stop_token_ids,
        context_length=served.context_length,
        eos_id=served.tokenizer.eos_id,
    )
    server = Server((host, port))
    server.app = App(served, batcher, api_key=api_key, default_max_tokens=default_max_tokens)  # type: ignore[attr-defined]
    return server


def warm_up(app: App) -> None:
    """One short greedy chat request through the batcher: compiles the commonest shape before serving."""
    ids = app.served.chat_ids([("user", "Hi")])
    app.batcher.submit(Job([ids], 1, Sampling(0.0))).result()
