"""Streamed answers (``stream=true``): a job's text deltas as OpenAI's chunks, sent as server-sent
events (``data: {json}\\n\\n`` per chunk, then ``data: [DONE]\\n\\n``).

The batcher puts each streamed row's text so far on ``Job.events`` after every generated chunk
of tokens (``kto_jax.serve.engine.CHUNK`` tokens); ``EventStream`` turns them into deltas, ends
each choice with a chunk carrying its ``finish_reason`` (and the rest of its text), and, with
``stream_options.include_usage``, a last chunk with empty ``choices`` and the usage. The deltas
of a choice join to the unstreamed answer's text. ``gone()`` is asked after every event: when
the client has disconnected the job is cancelled (its rows stop counting, its batch can end).
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable, Iterator

from absl import logging

from kto_jax.serve.batching import Job
from kto_jax.serve.responses import chunk_choice, usage


class EventStream:
    """The chunks (dicts) of one streamed job, in order; ``cancel`` when the client is gone."""

    def __init__(self, job: Job, *, chat: bool, head: dict, prompt_tokens: int, include_usage: bool):
        self.job, self.chat, self.head = job, chat, head
        self.prompt_tokens, self.include_usage = prompt_tokens, include_usage

    def cancel(self) -> None:
        self.job.cancel()

    def _chunk(self, choices: list[dict], **extra) -> dict:
        return {**self.head, "choices": choices, **({"usage": None} if self.include_usage else {}), **extra}

    def chunks(self, gone: Callable[[], bool] = lambda: False) -> Iterator[dict]:
        """The chunks as the job makes them; stops (and cancels the job) once ``gone()`` is true."""
        n = len(self.job.rows)
        sent = [""] * n
        if self.chat:
            yield self._chunk([chunk_choice(True, i, "", None, first=True) for i in range(n)])
        while (item := self.job.events.get()) is not None:
            if gone():
                self.cancel()
                return
            i, text = item
            if len(text) > len(sent[i]) and text.startswith(sent[i]):
                yield self._chunk([chunk_choice(self.chat, i, text[len(sent[i]) :], None)])
                sent[i] = text
        choices = self.job.future.result()
        for i, c in enumerate(choices):
            if not c.text.startswith(sent[i]):  # a tokenizer whose prefix decodes differently
                logging.warning("streamed text %r is not a prefix of the answer %r", sent[i], c.text)
            rest = c.text[len(sent[i]) :] if c.text.startswith(sent[i]) else ""
            yield self._chunk([chunk_choice(self.chat, i, rest, c.finish_reason)])
        if self.include_usage:
            yield {**self.head, "choices": [], "usage": usage(self.prompt_tokens, sum(len(c.tokens) for c in choices))}


def peer_closed(sock: socket.socket) -> bool:
    """Whether the client closed its end of ``sock`` (readable with nothing left to read)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
