"""Export a run's weights as a Hugging Face folder that transformers loads.

    python scripts/export_hf.py --workdir runs/kto [--step N] --out exported/kto

Writes config.json, sharded model-*.safetensors with their index, and the tokenizer files
(with chat_template.jinja and generation_config.json): copied from the model folder when the
run used one (for a CSFT run, its tokenizer.json with the control tokens the run added, beside
the grown vocabulary), or, for the built-in byte tokenizer, an equivalent tokenizer.json
(byte-level, same ids, same special tokens).

A LoRA run (config.model.lora.rank > 0) exports its merged weights (W + scale * A B) there, and its
adapters in PEFT's format in ``OUT/adapter`` (adapter_config.json + adapter_model.safetensors, for
``peft.PeftModel.from_pretrained`` on the base model the run started from).
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile

from absl import app, flags

from kto_jax import faults
from kto_jax.data.tokenize import ByteTokenizer
from kto_jax.files import umask, write_json
from kto_jax.models.hf import to_hf
from kto_jax.models.peft import save_peft
from kto_jax.train.model_source import model_source
from kto_jax.train.setup import load_run

_WORKDIR = flags.DEFINE_string("workdir", None, "A kto_jax run directory (with config.json and checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest, i.e. the final weights).")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
flags.mark_flags_as_required(["workdir", "out"])

# copied from the run's model folder: recent transformers save a tokenizer's chat template as
# chat_template.jinja (not in tokenizer_config.json), and generation_config.json names the EOS
# that model.generate stops at (config.json as to_hf writes it names none)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)


def byte_tokenizer_json():
    """A ``tokenizers`` byte-level BPE with no merges whose ids equal ByteTokenizer's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins, in GPT-2's byte order
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(ByteTokenizer.SPECIALS))
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (used by ByteLevel)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def replace_folder(new: str, out: str) -> None:
    """Move the complete folder ``new`` to ``out``; an existing ``out`` is set aside first and
    removed only after the rename (a kill in between leaves it as ``.NAME.old-*``)."""
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".old", dir=os.path.dirname(out))
        os.rmdir(old)
        os.replace(out, old)
    os.replace(new, out)
    if old:
        shutil.rmtree(old)


def remove_unfinished(out: str) -> None:
    """Staging folders (``.NAME.*.tmp``) an earlier, killed export of ``out`` left behind."""
    for path in glob.glob(
        os.path.join(glob.escape(os.path.dirname(out)), f".{glob.escape(os.path.basename(out))}.*.tmp")
    ):
        shutil.rmtree(path, ignore_errors=True)


def main(argv):
    del argv
    workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
    if not os.path.exists(os.path.join(workdir, "config.json")):
        raise app.UsageError(f"{workdir}/config.json not found: --workdir must be a kto_jax run directory")
    # the run as it trained: its model, the tokenizer with what it added (CSFT's control tokens, the
    # vocabulary grown for them), and its final (or --step) weights over any frozen ones
    run = load_run(workdir if _STEP.value is None else f"{workdir}@{_STEP.value}")
    folder, tokenizer, step = run.tokenizer_folder, run.tokenizer, run.step
    out = os.path.abspath(os.path.expanduser(_OUT.value))
    # written into a temporary folder beside --out and renamed when complete: a killed export
    # leaves no half-written model folder (an earlier export at --out stays until the new one is whole)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    remove_unfinished(out)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=os.path.dirname(out))
    os.chmod(staging, 0o777 & ~umask())  # mkdtemp makes it private; the exported folder is for others to read
    try:
        files = [os.path.join(out, os.path.basename(f)) for f in to_hf(run.model, run.params, staging)]  # merged
        if run.model.config.lora_rank:  # the adapters as PEFT writes them, for the run's base model
            save_peft(run.model.config, run.params, os.path.join(staging, "adapter"), base=model_source(run.config))
        if folder is None:  # the byte tokenizer
            byte_tokenizer_json().save(os.path.join(staging, "tokenizer.json"))
            write_json(
                os.path.join(staging, "tokenizer_config.json"),
                {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "pad_token": "<pad>"},
            )
        else:
            for file in TOKENIZER_FILES:
                path = os.path.join(folder, file)
                if os.path.exists(path):
                    shutil.copy(path, staging)
            if run.added_tokens:  # the tokenizer the run trained with: the model folder's plus the added tokens
                tokenizer.tokenizer.save(os.path.join(staging, "tokenizer.json"))
        faults.point("export.write")
        replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"exported step {step} of {workdir} to {out} ({len(files)} weight files)")


if __name__ == "__main__":
    app.run(main)
