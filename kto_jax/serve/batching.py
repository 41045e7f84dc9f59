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


@dataclasses.dataclass(eq=False)
class Job:
    """One request's rows (token ids, one per choice), answered as a list of ``Choice`` in row order."""

    rows: list[list[int]]
    max_tokens: int
    sampling: Sampling = Sampling()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    future: Future = dataclasses.field(default_factory=Future)

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
) -> Choice:
    """A ``generate`` row (tokens up to, not including, EOS; ``max_new_tokens`` long when no EOS came)
    as a ``Choice`` cut at ``max_tokens``, at the first of ``stop_token_ids`` and at the first stop string.

    finish_reason is "stop" when EOS, a stop token or a stop string ended it within ``max_tokens``
    tokens, else "length". A stop string is dropped with what follows it; the tokens kept are those
    generated until the stop string was complete (what the usage counts).
    """
    tokens = list(tokens)
    ended = len(tokens) < max_new_tokens  # generate stopped at EOS
    if len(tokens) >= max_tokens:
        tokens, ended = tokens[:max_tokens], False
    cut = next((i for i, t in enumerate(tokens) if t in stop_token_ids), None)
    if cut is not None:
        tokens, ended = tokens[:cut], True
    text = decode(tokens)
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    if hits:
        end = min(hits)
        text, ended = text[:end], True
        needed = next(
            (k for k in range(1, len(tokens) + 1) if any(s and s in decode(tokens[:k]) for s in stop)), len(tokens)
        )
        tokens = tokens[:needed]
    return Choice(text, tokens, "stop" if ended else "length")


class Batcher:
    """A thread answering ``Job``s submitted from any thread, in batches (see the module docstring).

    ``generate_fn(rows, *, max_new_tokens, sampling, seed, batch_size, bucket)`` returns each row's
    new tokens up to EOS (``kto_jax.generate.generate``); ``decode`` turns token ids into text.
    ``stats`` counts jobs, batches and the largest batch (in rows), for /health.
    """

    def __init__(
        self,
        generate_fn,
        decode,
        *,
        max_batch: int = 8,
        wait_s: float = 0.005,
        stop_token_ids: Sequence[int] = (),
        context_length: int | None = None,
    ):
        if max_batch < 1 or max_batch & (max_batch - 1):
            raise ValueError(f"max_batch must be a power of two >= 1 (batch shapes are powers of two); got {max_batch}")
        self.generate_fn, self.decode = generate_fn, decode
        self.max_batch, self.wait_s = int(max_batch), float(wait_s)
        self.stop_token_ids, self.context_length = tuple(stop_token_ids), context_length
        self.stats = {"jobs": 0, "batches": 0, "generate_calls": 0, "largest_batch": 0}
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
            self.stats["batches"] += 1
            self.stats["jobs"] += len(jobs)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], sum(len(j.rows) for j in jobs))
            for _, group in itertools.groupby(sorted(jobs, key=_order), key=lambda j: j.group_key()):
                self._run(list(group))
            if stop:
                return

    def _run(self, jobs: list[Job]) -> None:
        """One ``generate_fn`` call for jobs of one group key; each job's future answered."""
        rows = [row for job in jobs for row in job.rows]
        sampling, first = jobs[0].sampling.normalized(), jobs[0]
        max_new = pow2_at_least(max(job.max_tokens for job in jobs), MIN_BUCKET)
        if self.context_length:
            max_new = max(min(max_new, self.context_length), max(job.max_tokens for job in jobs))
        if sampling.temperature == 0:
            seed = 0
        else:
            seed = first.seed if first.seed is not None and len(jobs) == 1 else self._seeds.randrange(2**31)
        try:
            self.stats["generate_calls"] += 1
            out = self.generate_fn(
                rows,
                max_new_tokens=max_new,
                sampling=sampling,
                seed=seed,
                batch_size=min(self.max_batch, pow2_at_least(len(rows))),
                bucket=pow2_at_least(max(len(r) for r in rows), MIN_BUCKET),
            )
        except Exception as e:  # noqa: BLE001 -- the handlers answer 500 with the message
            logging.exception("generation failed for %d rows", len(rows))
            for job in jobs:
                job.future.set_exception(e)
            return
        start = 0
        for job in jobs:
            mine, start = out[start : start + len(job.rows)], start + len(job.rows)
            try:
                job.future.set_result(
                    [finish_row(t, max_new, job.max_tokens, self.decode, job.stop, self.stop_token_ids) for t in mine]
                )
            except Exception as e:  # noqa: BLE001 -- a decoding failure answers this job only
                job.future.set_exception(e)


def _order(job: Job):
    """Sort key that puts jobs of one group key next to each other (for ``itertools.groupby``)."""
    sampling, alone = job.group_key()
    return (sampling.temperature, sampling.top_p, sampling.top_k, alone or 0)
