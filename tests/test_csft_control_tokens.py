"""CSFT on a tokenizer without <|good|>/<|bad|> (Pythia's and LLaMA's lack them): the run adds
them to the tokenizer and grows the model's vocabulary, as HALOs does; the exported folder
carries the grown vocabulary and a tokenizer that knows the tokens."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kto_jax.models.presets import get_preset
from kto_jax.models.vocab import grow_vocab
from tests.train_helpers import REPO, small_config

CONTROL = ("<|good|>", "<|bad|>")


def _byte_bpe_folder(path, model_config=None):
    """A byte-level BPE tokenizer.json (256 bytes + </s>, no control tokens) with its config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {ch: i for i, ch in enumerate(ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["</s>"])
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>"}, f)
    return tok.get_vocab_size()


def test_grow_vocab_appends_mean_rows_and_keeps_the_old_ones():
    config = get_preset("tiny-1m", num_layers=1, vocab_size=300)
    from kto_jax.models.hf import init_params

    params = init_params(config, seed=0)
    grown_config, grown = grow_vocab(config, params, 302)
    assert grown_config.vocab_size == 302
    table, new_table = np.asarray(params["embed"]["embedding"]), np.asarray(grown["embed"]["embedding"])
    assert new_table.shape == (302, 128)
    np.testing.assert_array_equal(new_table[:300], table)
    np.testing.assert_allclose(new_table[300:], np.broadcast_to(table.mean(0), (2, 128)), rtol=0, atol=1e-7)
    kernel, new_kernel = np.asarray(params["lm_head"]["kernel"]), np.asarray(grown["lm_head"]["kernel"])
    np.testing.assert_array_equal(new_kernel[:, :300], kernel)
    np.testing.assert_allclose(
        new_kernel[:, 300:], np.broadcast_to(kernel.mean(1, keepdims=True), (128, 2)), rtol=0, atol=1e-7
    )
    with pytest.raises(ValueError, match="below the model's 300"):
        grow_vocab(config, params, 299)


def test_csft_adds_the_control_tokens_grows_the_vocabulary_and_exports_them(tmp_path, synthetic_data_dir):
    from kto_jax.models import build_model
    from kto_jax.models.hf import init_params, to_hf
    from kto_jax.train import loop

    folder = str(tmp_path / "base")
    vocab = _byte_bpe_folder(folder)
    base = get_preset("tiny-1m", num_layers=2, vocab_size=vocab)
    to_hf(build_model(base), init_params(base, seed=0), folder)
    config = small_config("csft", synthetic_data_dir, steps=1)
    config.model.name = folder
    config.data.tokenizer = ""  # the folder's tokenizer, which lacks <|good|> and <|bad|>
    workdir = str(tmp_path / "run")
    loop.run(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert rows and np.isfinite(rows[0]["loss"])

    out = str(tmp_path / "exported")
    proc = subprocess.run(
        [sys.executable, "scripts/export_hf.py", "--workdir", workdir, "--out", out],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert [tokenizer.convert_tokens_to_ids(t) for t in CONTROL] == [vocab, vocab + 1]
    assert tokenizer.decode(tokenizer("hi<|good|>")["input_ids"]) == "hi<|good|>"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == vocab + 2
    embedding = model.get_input_embeddings().weight.detach().numpy()
    assert embedding.shape == (vocab + 2, 128) and np.all(np.isfinite(embedding))
