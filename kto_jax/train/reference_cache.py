"""Cached reference log-probs (``config.reference.mode = "cached"``): computed once before
training, for every training step's batch and every held-out batch, stored in
``WORKDIR/reference_cache.npz`` and reused on resume when the run's fingerprint matches.
The reference model is then freed: the step reads the log-probs from the batch."""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from kto_jax import faults, files
from kto_jax.train import setup
from kto_jax.train.hooks import note

# Bumped when the same config gives other token ids (2: BOS and prompt+completion encoded together),
# so a cache written by older code is recomputed rather than reused.
TOKENIZATION_VERSION = 2


def fingerprint(config, steps: int) -> str:
    """What the cached log-probs depend on: model, init, data, loss, seed, steps, batch layout, tokenization."""
    keys = {"tokenization": TOKENIZATION_VERSION, "model": config.model.to_dict(), "init": config.init.to_dict(), "data": config.data.to_dict(),
            "loss": config.loss.name, "seed": config.seed, "steps": steps,
            "batch": config.train.global_batch_size, "microbatches": config.train.num_microbatches}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def _compute(engine, reference_params, batches, mesh) -> list[dict]:
    """Reference log-probs of each batch, as host arrays of the global batch."""
    out = []
    for batch in batches:
        logps = engine.reference_fn(reference_params, setup.to_global(batch, mesh))
        out.append({k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in logps.items()})
    return out


def _read(path: str, key: str, steps: int, num_eval: int):
    """The cache at ``path`` if it has fingerprint ``key``, else None; an unreadable file is
    recomputed (with a warning), not an error."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["fingerprint"]) != key:
                return None
            names = sorted({k.split("/", 2)[2] for k in f.files if k != "fingerprint"})

            def read(prefix, n):
                return [{k: f[f"{prefix}/{i}/{k}"] for k in names} for i in range(n)]

            return read("train", steps), read("eval", num_eval)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        logging.warning("reference cache %s is unreadable (%s: %s); computing it again", path, type(e).__name__, e)
        return None


def cached_reference(config, engine, reference_params, make_batches, eval_batches, mesh, workdir, steps):
    """``(train, eval)``: per-step and per-eval-batch dicts of ``[G]`` reference log-probs."""
    key = fingerprint(config, steps)
    path = os.path.join(workdir, "reference_cache.npz")
    cached = _read(path, key, steps, len(eval_batches))
    if cached is not None:
        return cached
    start = time.perf_counter()
    train = _compute(engine, reference_params, make_batches(), mesh)
    evals = _compute(engine, reference_params, eval_batches, mesh)
    if jax.process_index() == 0:
        arrays = {f"{p}/{i}/{k}": v for p, rows in (("train", train), ("eval", evals)) for i, row in enumerate(rows) for k, v in row.items()}
        with files.atomic_path(path) as tmp:  # a kill mid-write leaves the old cache (or none), never half of one
            with open(tmp, "wb") as f:
                np.savez(f, fingerprint=np.asarray(key), **arrays)
            faults.point("reference_cache.write")
    note(f"cached reference log-probs for {steps} steps in {time.perf_counter() - start:.1f}s (fingerprint {key})")
    return train, evals
