"""The server's batcher: concurrent requests -> few ``generate`` calls of few shapes.

A ``Job`` is one HTTP request's work: its prompt rows (one per choice: ``n`` copies of
each prompt), ``max_tokens``, sampling settings, an optional seed and stop strings, and a
future the handler waits on. The ``Batcher`` thread takes the first job from its queue,
then collects more for at most ``wait_s`` (or until ``max_batch`` rows are collected),
groups the jobs whose sampling settings agree, and runs one ``generate_fn`` call per group.

Shapes are kept few, since each one is compiled: the batch size is the number of rows
rounded up to a power of two (at most ``max_batch``; more rows run in several batches of
``max_batch``), prompts are left-padded to a power of two (at least ``MIN_BUCKET``
tokens), and ``max_new_tokens`` is the group's largest ``max_tokens`` rounded up to a
power of two (at least ``MIN_BUCKET``). Each row is then cut at its own job's
``max_tokens``, at extra stop token ids (e.g. a second EOS of the model), and at its stop
strings (``finish_row``).

Rows are generated ``kto_jax.serve.engine.CHUNK`` tokens per device call: after each chunk a
batch ends once every row is done (EOS, its job's ``max_tokens``, a stop token or string, or
its client gone: ``Job.cancel``), and a streamed job (``Job.events``) gets each row's text so
far that no stop string can still take back (``partial_text``). A job that asks for log-probs
(``logprobs``, ``echo``) has its rows (prompt + completion) scored after the generation
(``kto_jax.serve.scoring``); a job with ``max_tokens`` 0 is scored only.

Greedy jobs (temperature 0) batch together whatever their top_p/top_k/seed, and give the
same tokens in any batch. A sampled job with a ``seed`` runs in a batch of its own with
that seed, so the same request gives the same answer; sampled jobs without one share
batches and a fresh seed per batch.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from absl import logging

from kto_jax.serve.engine import CHUNK
from kto_jax.serve.scoring import Scores

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Sampling:
    """``kto_jax.generate.sample_token``'s settings; temperature 0 is greedy (top_p/top_k unused)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def normalized(self) -> Sampling:
        """Greedy settings all compare equal, so greedy jobs share batches."""
        return Sampling(0.0) if self.temperature == 0 else self


@dataclasses.dataclass
class Choice:
    """One completion: its text, the tokens it took, and why it ended ("stop" or "length")."""

    text: str
    tokens: list[int]
    finish_reason: str
    scores: Scores | None = None  # log-probs of the prompt + completion row (jobs that ask for them)
    end_token: int | None = None  # the EOS or stop token that ended it (not in ``tokens`` nor the text)

    @property
    def scored_tokens(self) -> list[int]:
        """The completion's tokens as log-probs report them: ``tokens``, then the token that ended it."""
        return self.tokens + ([] if self.end_token is None else [self.end_token])


@dataclasses.dataclass(eq=False)
class Job:
    """One request's rows (token ids, one per choice), answered as a list of ``Choice`` in row order."""

    rows: list[list[int]]
    max_tokens: int
    sampling: Sampling = Sampling()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # top-k log-probs per token (0: the tokens' own only); None: none
    echo: bool = False  # score the prompt tokens too
    events: queue.Queue | None = None  # streamed: (row, text so far) after each chunk, then None
    future: Future = dataclasses.field(default_factory=Future)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        """The client is gone: its rows count as done, and a queued job is not run."""
        self.cancelled.set()

    @property
    def scored(self) -> bool:
        return self.logprobs is not None or self.echo

    def group_key(self):
        """Jobs of one key share a ``generate`` call: same sampling; a seeded sampled job is alone."""
        sampling = self.sampling.normalized()
        alone = id(self) if sampling.temperature > 0 and self.seed is not None else None
        return (sampling, alone)


def pow2_at_least(n: int, floor: int = 1) -> int:
    """The smallest power of two >= max(n, floor)."""
    n = max(int(n), int(floor), 1)
    return 1 << (n - 1).bit_length()


def finish_row(
    tokens: Sequence[int],
    max_new_tokens: int,
    max_tokens: int,
    decode: Callable[[Sequence[int]], str],
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    eos_id: int | None = None,
) -> Choice:
    """A ``generate`` row (tokens up to, not including, EOS; ``max_new_tokens`` long when no EOS came)
    as a ``Choice`` cut at ``max_tokens``, at the first of ``stop_token_ids`` and at the first stop string.

    finish_reason is "stop" when EOS, a stop token or a stop string ended it within ``max_tokens``
    tokens, else "length". A stop string is dropped with what follows it; the tokens kept are those
    generated until the stop string was complete (what the usage counts).
    """
    tokens = list(tokens)
    ended = len(tokens) < max_new_tokens  # generate stopped at EOS
    end_token = eos_id if ended else None
    if len(tokens) >= max_tokens:
        tokens, ended, end_token = tokens[:max_tokens], False, None
    cut = next((i for i, t in enumerate(tokens) if t in stop_token_ids), None)
    if cut is not None:
        tokens, ended, end_token = tokens[:cut], True, tokens[cut]
    text = decode(tokens)
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    if hits:
        end = min(hits)
        text, ended, end_token = text[:end], True, None
        needed = next(
            (k for k in range(1, len(tokens) + 1) if any(s and s in decode(tokens[:k]) for s in stop)), len(tokens)
        )
        tokens = tokens[:needed]
    return Choice(text, tokens, "stop" if ended else "length", end_token=end_token)


def partial_text(
    tokens: Sequence[int],
    max_tokens: int,
    decode: Callable[[Sequence[int]], str],
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
) -> str:
    """The text of a row still being generated that its final ``finish_row`` text starts with: cut
    as ``finish_row`` cuts, less a tail that could begin a stop string and less a trailing U+FFFD
    (an incomplete UTF-8 character a later token may complete)."""
    tokens = list(tokens)[:max_tokens]
    cut = next((i for i, t in enumerate(tokens) if t in stop_token_ids), None)
    text = decode(tokens if cut is None else tokens[:cut])
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    if hits:
        return text[: min(hits)]
    hold = max((j for s in stop for j in range(1, len(s)) if text.endswith(s[:j])), default=0)
    return text[: len(text) - hold].rstrip("\ufffd")


def row_done(tokens: Sequence[int], generated: int, job: Job, decode, stop_token_ids: Sequence[int]) -> bool:
    """Whether a row needs no more tokens: EOS came (fewer tokens than ``generated``), it has
    ``job.max_tokens``, a stop token or stop string ended it, or its client is gone."""
    if job.cancelled.is_set() or len(tokens) < generated or len(tokens) >= job.max_tokens:
        return True
    if any(t in stop_token_ids for t in tokens):
        return True
    return bool(job.stop) and any(s in decode(tokens) for s in job.stop)


class Batcher:
    """A thread answering ``Job``s submitted from any thread, in batches (see the module docstring).

    ``generate_fn(rows, *, max_new_tokens, sampling, seed, batch_size, bucket, on_chunk, chunk)`` returns
    each row's new tokens up to EOS (``kto_jax.serve.engine.generate_chunked``), calling
    ``on_chunk(start, rows so far, tokens generated)`` after each chunk (False ends the batch); ``decode`` turns token
    ids into text; ``score_fn(rows, *, top_k, batch_size, bucket)`` gives each row's ``Scores``.
    ``stats`` counts jobs, batches, the largest batch (in rows) and the jobs whose client left
    (``cancelled``), for /health.
    """

    def __init__(
        self,
        generate_fn,
        decode,
        *,
        score_fn=None,
        max_batch: int = 8,
        wait_s: float = 0.005,
        stop_token_ids: Sequence[int] = (),
        context_length: int | None = None,
        eos_id: int | None = None,
    ):
        if max_batch < 1 or max_batch & (max_batch - 1):
            raise ValueError(f"max_batch must be a power of two >= 1 (batch shapes are powers of two); got {max_batch}")
        self.generate_fn, self.decode, self.score_fn = generate_fn, decode, score_fn
        self.max_batch, self.wait_s = int(max_batch), float(wait_s)
        self.stop_token_ids, self.context_length, self.eos_id = tuple(stop_token_ids), context_length, eos_id
        self.stats = {"jobs": 0, "batches": 0, "generate_calls": 0, "largest_batch": 0, "cancelled": 0}
        self._queue: queue.Queue = queue.Queue()
        self._seeds = random.Random()
        self._thread = threading.Thread(target=self._loop, name="kto_jax-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        """Queue ``job``; its future gets the list of ``Choice`` (or the generation's exception)."""
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        """Stop the thread after the jobs already queued."""
        self._queue.put(None)
        self._thread.join()

    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        """``first`` and the jobs that arrive within ``wait_s``, up to ``max_batch`` rows; and whether to stop."""
        jobs, rows = [first], len(first.rows)
        deadline = time.monotonic() + self.wait_s
        while rows < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            rows += len(job.rows)
        return jobs, False

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, stop = self._collect(first)
            gone = [j for j in jobs if j.cancelled.is_set()]
            for job in gone:  # the client left while the job waited: nothing to run
                self.stats["cancelled"] += 1
                _finish(job, error=CancelledJob("the client disconnected"))
            jobs = [j for j in jobs if not j.cancelled.is_set()]
            if jobs:
                self.stats["batches"] += 1
                self.stats["jobs"] += len(jobs)
                self.stats["largest_batch"] = max(self.stats["largest_batch"], sum(len(j.rows) for j in jobs))
                for _, group in itertools.groupby(sorted(jobs, key=_order), key=lambda j: j.group_key()):
                    self._run(list(group))
            if stop:
                return

    def _run(self, jobs: list[Job]) -> None:
        """One ``generate_fn`` call for jobs of one group key (none when all have ``max_tokens`` 0),
        then the scoring of the jobs that ask for log-probs; each job's future answered."""
        generating = [job for job in jobs if job.max_tokens > 0]
        out: list[list[int]] = []
        max_new = 0
        try:
            if generating:
                max_new, out = self._generate(generating)
        except Exception as e:  # noqa: BLE001 -- the handlers answer 500 with the message
            logging.exception("generation failed for %d rows", sum(len(j.rows) for j in generating))
            for job in jobs:
                _finish(job, error=e)
            return
        start = 0
        for job in jobs:
            self.stats["cancelled"] += int(job.cancelled.is_set())
            if job.max_tokens > 0:
                mine, start = out[start : start + len(job.rows)], start + len(job.rows)
            else:
                mine = [[] for _ in job.rows]
            try:
                choices = [
                    finish_row(t, max_new, job.max_tokens, self.decode, job.stop, self.stop_token_ids, self.eos_id)
                    for t in mine
                ]
                if job.scored:
                    self._score(job, choices)
                _finish(job, choices)
            except Exception as e:  # noqa: BLE001 -- a decoding or scoring failure answers this job only
                logging.exception("finishing a job failed")
                _finish(job, error=e)

    def _generate(self, jobs: list[Job]) -> tuple[int, list[list[int]]]:
        """``(max_new_tokens, rows)`` of one ``generate_fn`` call over ``jobs``' rows."""
        rows = [row for job in jobs for row in job.rows]
        owners = [(job, i) for job in jobs for i in range(len(job.rows))]
        sampling, first = jobs[0].sampling.normalized(), jobs[0]
        max_new = pow2_at_least(max(job.max_tokens for job in jobs), MIN_BUCKET)
        if self.context_length:
            max_new = max(min(max_new, self.context_length), max(job.max_tokens for job in jobs))
        if sampling.temperature == 0:
            seed = 0
        else:
            seed = first.seed if first.seed is not None and len(jobs) == 1 else self._seeds.randrange(2**31)

        def on_chunk(start: int, sofar: list[list[int]], generated: int) -> bool:
            done = True
            for k, tokens in enumerate(sofar):
                job, i = owners[start + k]
                if job.events is not None and not job.cancelled.is_set():
                    job.events.put(
                        (i, partial_text(tokens, job.max_tokens, self.decode, job.stop, self.stop_token_ids))
                    )
                done = done and row_done(tokens, generated, job, self.decode, self.stop_token_ids)
            return not done

        self.stats["generate_calls"] += 1
        out = self.generate_fn(
            rows,
            max_new_tokens=max_new,
            sampling=sampling,
            seed=seed,
            batch_size=min(self.max_batch, pow2_at_least(len(rows))),
            bucket=pow2_at_least(max(len(r) for r in rows), MIN_BUCKET),
            on_chunk=on_chunk,
            chunk=min(CHUNK, pow2_at_least(max(job.max_tokens for job in jobs))),  # max_tokens 1: one step
        )
        return max_new, out

    def _score(self, job: Job, choices: list[Choice]) -> None:
        """Attach each choice's ``Scores`` (of its prompt + completion row) to it."""
        if self.score_fn is None:
            raise RuntimeError("this batcher has no score_fn: log-probs cannot be computed")
        rows = [list(prompt) + c.scored_tokens for prompt, c in zip(job.rows, choices)]
        scores = self.score_fn(
            rows,
            top_k=job.logprobs or 0,
            batch_size=min(self.max_batch, pow2_at_least(len(rows))),
            bucket=pow2_at_least(max(len(r) for r in rows), MIN_BUCKET),
        )
        for c, s in zip(choices, scores):
            c.scores = s


class CancelledJob(Exception):
    """A job whose client disconnected before it ran."""


def _finish(job: Job, choices: list[Choice] | None = None, *, error: BaseException | None = None) -> None:
    """Answer ``job``'s future (``choices`` or ``error``) and end its event stream."""
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(choices)
    if job.events is not None:
        job.events.put(None)


def _order(job: Job):
    """Sort key that puts jobs of one group key next to each other (for ``itertools.groupby``)."""
    sampling, alone = job.group_key()
    return (sampling.temperature, sampling.top_p, sampling.top_k, alone or 0)
