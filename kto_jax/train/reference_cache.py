"""Cached reference log-probs (``config.reference.mode = "cached"``), shared across runs.

Computed once before training for every training step's batch and every held-out batch; the
step then reads them from the batch and the reference model is freed. A cache is keyed by what
the log-probs depend on and nothing else:

    reference   checkpoint.fingerprint of the reference weights (the init source's)
    batches     a digest of each step's batch and each held-out batch (every array of the
                feed's layout: token ids, masks, labels, in order), so data, seed, batch size,
                microbatches and tokenization are all in it

It lives in ``config.reference.cache_dir`` (default: the run's workdir) as
``reference_cache-<key>.npz``. A run uses a cache there with its reference fingerprint whose
digests begin with its own (a longer run's cache serves a shorter one, and runs that differ in
a loss hyperparameter, learning rate or evaluation share one: the paper grid's ten losses on
one SFT model compute the reference once). Every other cache in the folder is passed over with
its reason, printed once (another reference model, other batches from step k, too few steps).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
import zipfile

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from kto_jax import faults, files, sharding
from kto_jax.log import note

PREFIX = "reference_cache-"
# Bumped when the file layout changes: a cache written by older code is passed over, not misread.
LAYOUT_VERSION = 3


def batch_digest(batch: dict) -> str:
    """sha256 (16 hex digits) of a batch's arrays, by name; over all processes' rows."""
    h = hashlib.sha256()
    for name in sorted(batch):
        value = np.ascontiguousarray(np.asarray(batch[name]))
        h.update(f"{name}:{value.dtype}:{value.shape};".encode())
        h.update(value.tobytes())
    digest = h.digest()[:8]
    if jax.process_count() > 1:  # each process holds its own rows: the global batch is all of them
        gathered = multihost_utils.process_allgather(np.frombuffer(digest, np.uint8))
        digest = hashlib.sha256(np.asarray(gathered).tobytes()).digest()[:8]
    return digest.hex()


def _compute(engine, reference_params, batches, mesh) -> tuple[list[dict], list[str]]:
    """Reference log-probs of each batch, as host arrays of the global batch, and each batch's digest."""
    out, digests = [], []
    for batch in batches:
        digests.append(batch_digest(batch))
        logps = engine.reference_fn(reference_params, sharding.to_global(batch, mesh))
        out.append({k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in logps.items()})
    return out, digests


def _meta(path: str) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return json.loads(str(f["meta"]))


def why_not(meta: dict, reference: str, train: list[str], evals: list[str], outputs: tuple[str, ...]) -> str | None:
    """Why a cache with ``meta`` cannot serve a run with these fingerprints and reference
    ``outputs`` (log-prob names), or None if it can."""
    if meta.get("layout") != LAYOUT_VERSION:
        return f"written by another version of kto_jax (layout {meta.get('layout')}, this one {LAYOUT_VERSION})"
    missing = sorted(set(outputs) - set(meta["outputs"]))
    if missing:
        return f"holds {meta['outputs']}; this run's loss also needs {missing}"
    if meta["reference"] != reference:
        return (
            f"computed against another reference model ({meta.get('reference_source')!r}, fingerprint "
            f"{meta['reference']}; this run's is {reference})"
        )
    if len(meta["train"]) < len(train):
        return f"has {len(meta['train'])} training steps; this run needs {len(train)}"
    for name, theirs, ours in (("training", meta["train"], train), ("held-out", meta["eval"], evals)):
        differing = next((i for i, d in enumerate(ours) if i >= len(theirs) or theirs[i] != d), None)
        if differing is not None:
            return (
                f"other {name} batches from batch {differing + 1} (another data, seed, batch size, "
                "microbatches or tokenization)"
            )
    return None


def caches(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(folder), f"{PREFIX}*.npz")))


def find(
    paths: list[str], reference: str, train: list[str], evals: list[str], outputs: tuple[str, ...]
) -> tuple[str | None, list[str]]:
    """``(the first of the cache files paths that can serve, or None; [why each one before it cannot])``."""
    passed = []
    for path in paths:
        try:
            reason = why_not(_meta(path), reference, train, evals, outputs)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            reason = f"unreadable ({type(e).__name__}: {str(e)[:200]})"
        if reason is None:
            return path, passed
        passed.append(f"{path}: {reason}")
    return None, passed


def _read(path: str, steps: int, num_eval: int, names: tuple[str, ...]) -> tuple[list[dict], list[dict]]:
    with np.load(path, allow_pickle=False) as f:

        def read(prefix, n):
            return [{k: f[f"{prefix}/{i}/{k}"] for k in names} for i in range(n)]

        return read("train", steps), read("eval", num_eval)


def _write(path: str, meta: dict, train: list[dict], evals: list[dict]) -> None:
    arrays = {
        f"{p}/{i}/{k}": v
        for p, rows in (("train", train), ("eval", evals))
        for i, row in enumerate(rows)
        for k, v in row.items()
    }
    with files.atomic_path(path) as tmp:  # a kill mid-write leaves no cache, never half of one
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.asarray(json.dumps(meta)), **arrays)
        faults.point("reference_cache.write")


def cached_reference(
    cache_dir: str,
    engine,
    reference_params,
    make_batches,
    eval_batches,
    mesh,
    workdir: str,
    steps: int,
    reference: dict,
    outputs: tuple[str, ...],
) -> tuple[list[dict], list[dict]]:
    """``(train, eval)``: per-step and per-eval-batch dicts of ``[G]`` reference log-probs, from a
    matching cache in ``cache_dir`` (``config.reference.cache_dir``; "" = the workdir) or computed and saved there.
    ``make_batches()`` yields the run's ``steps`` training batches afresh; ``reference`` is the
    run's ``{"source", "fingerprint"}``, ``outputs`` the reference log-probs its loss takes."""
    folder = os.path.abspath(os.path.expanduser(cache_dir or workdir))
    found = caches(folder)
    if found:  # digests first (one pass of the loader), to look for a cache before computing
        path, passed = find(
            found,
            reference["fingerprint"],
            [batch_digest(b) for b in make_batches()],
            [batch_digest(b) for b in eval_batches],
            outputs,
        )
        for line in passed[:5]:
            note(f"reference cache not used: {line}")
        if len(passed) > 5:
            note(f"... and {len(passed) - 5} more caches in {folder} not used")
        if path is not None:
            try:
                train, evals = _read(path, steps, len(eval_batches), outputs)
                note(f"reference log-probs for {steps} steps read from {path}")
                return train, evals
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                logging.warning(
                    "reference cache %s is unreadable (%s: %s); computing it again", path, type(e).__name__, e
                )
    start = time.perf_counter()
    train, train_digests = _compute(engine, reference_params, make_batches(), mesh)
    evals, eval_digests = _compute(engine, reference_params, eval_batches, mesh)
    key = hashlib.sha256(
        json.dumps([reference["fingerprint"], sorted(outputs), train_digests, eval_digests]).encode()
    ).hexdigest()[:16]
    path = os.path.join(folder, f"{PREFIX}{key}.npz")
    if jax.process_index() == 0:
        meta = {
            "layout": LAYOUT_VERSION,
            "reference": reference["fingerprint"],
            "reference_source": reference["source"],
            "outputs": sorted(outputs),
            "train": train_digests,
            "eval": eval_digests,
            "written_by": workdir,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _write(path, meta, train, evals)
    note(f"cached reference log-probs for {steps} steps in {time.perf_counter() - start:.1f}s ({path})")
    return train, evals
