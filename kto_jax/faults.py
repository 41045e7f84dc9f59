"""Named kill points for fault-injection tests: a run killed by SIGKILL exactly where it hurts most.

    faults.point("checkpoint.save")   # kills this process here when KTO_JAX_KILL_AT says so

``KTO_JAX_KILL_AT=NAME`` kills at the first time the point ``NAME`` is reached,
``KTO_JAX_KILL_AT=NAME@N`` at the N-th. Unset (always, outside tests) it costs one dict lookup.
The points (tests/test_faults.py kills at each and reruns the same command):

    data.prepare          a source record read while tfds prepares a dataset (base.read_records, files)
    reference_cache.write the cache's temporary file written, not yet renamed
    checkpoint.save       an asynchronous orbax save started, not yet finished
    eval.generate         a batch of held-out samples generated, more to come
    export.write          the exported folder written under its temporary name, not yet renamed
    online.sample         an online round's chunk of samples written, more to sample (kto_jax/online)
    online.label          an online round's chunk of labels written, more to judge
"""

from __future__ import annotations

import collections
import os
import signal

ENV = "KTO_JAX_KILL_AT"
POINTS = (
    "data.prepare",
    "reference_cache.write",
    "checkpoint.save",
    "eval.generate",
    "export.write",
    "online.sample",
    "online.label",
)
_hits: collections.Counter = collections.Counter()


def point(name: str) -> None:
    """SIGKILL this process if ``KTO_JAX_KILL_AT`` names this point and this is its chosen hit."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    _hits[name] += 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
