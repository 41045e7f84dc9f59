"""Tokenizers of the real kinds, built small with ``tokenizers``: a LLaMA-style SentencePiece
(Unigram, Metaspace pre-tokenizer) and a GPT-NeoX-style byte-level BPE. Which add a BOS
(``HFTokenizer.bos_id``), and completions encoded in the joint text (``encode_pair``)."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from kto_jax.data import tokenize as T
from kto_jax.data.chat import render_prompt
from kto_jax.data.tokenize import HFTokenizer, TokenizeConfig, tokenize_example

PIECES = [
    "<unk>",
    "<s>",
    "</s>",
    "▁",
    "▁Q",
    ":",
    "\n",
    "▁Hello",
    "Hello",
    "▁world",
    "world",
    "!",
    "<",
    "|",
    ">",
    "▁a",
    "a",
    "Q",
    "H",
    "e",
    "l",
    "o",
    "w",
    "r",
    "d",
    "s",
    "i",
    "t",
    "n",
    "u",
    "m",
    "y",
]
LLAMA_CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}


def sentencepiece_folder(path, template=False, config=None):
    """A LLaMA-1/2-style tokenizer folder: Unigram pieces, Metaspace ("▁" prepended), <s> and </s>.

    ``template``: tokenizer.json's post-processor is TemplateProcessing "<s> $A" (as HF's
    LLaMA/Mistral files); ``config``: the tokenizer_config.json to write, if any.
    """
    scores = [(p, 0.0 if p in ("<unk>", "<s>", "</s>") else -2.0 if len(p) > 1 else -6.0) for p in PIECES]
    tok = Tokenizer(models.Unigram(scores, unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens(["<s>", "</s>"])
    if template:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return _save(tok, path, config)


def byte_bpe_folder(path, template=False, config=None):
    """A GPT-NeoX/Pythia-style byte-level BPE (ByteLevel post-processor: no BOS), or with
    ``template`` LLaMA-3's Sequence[ByteLevel, TemplateProcessing "<|begin_of_text|> $A"]."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|begin_of_text|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["Hello world! Q: Hello there\nHello, said the user to the assistant."] * 4, trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    if template:
        begin = ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=True),
                processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[begin]),
            ]
        )
    return _save(tok, path, config)


def _save(tok, path, config):
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return HFTokenizer(str(path))


# ---------------------------------------------------------------- BOS


@pytest.mark.parametrize("add", [True, False])
def test_llama_add_bos_token_decides(tmp_path, add):
    tok = sentencepiece_folder(tmp_path, config={**LLAMA_CONFIG, "add_bos_token": add})
    assert tok.bos_id == (tok.token_id("<s>") if add else None)
    # add_bos_token=false wins over a post-processor that would prepend <s> (as transformers' LLaMA tokenizer)
    tok = sentencepiece_folder(tmp_path / "t", template=True, config={**LLAMA_CONFIG, "add_bos_token": add})
    assert tok.bos_id == (tok.token_id("<s>") if add else None)


def test_template_post_processor_prepends_bos(tmp_path):
    assert sentencepiece_folder(tmp_path / "sp", template=True).bos_id == 1  # no tokenizer_config.json
    llama3 = byte_bpe_folder(tmp_path / "bpe", template=True, config={"eos_token": "<|endoftext|>"})
    assert llama3.bos_id == llama3.token_id("<|begin_of_text|>")


def test_byte_level_bpe_adds_no_bos(tmp_path):
    # Pythia's tokenizer_config.json names a bos_token, but nothing adds it
    tok = byte_bpe_folder(tmp_path, config={"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
    assert tok.bos_id is None
    assert sentencepiece_folder(tmp_path / "sp").bos_id is None  # no post-processor, no config


def test_word_level_vocabulary_that_cannot_encode_the_probe_adds_no_bos(tmp_path):
    tok = Tokenizer(models.WordLevel({"hello": 0, "</s>": 1}))  # no unknown token: encoding "a" raises
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    assert _save(tok, tmp_path, None).bos_id is None


def test_add_bos_token_with_unknown_bos_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="add_bos_token=true but its bos_token '<bos>'"):
        sentencepiece_folder(tmp_path, config={**LLAMA_CONFIG, "bos_token": "<bos>"})


def test_bos_once_first_out_of_the_mask_and_kept_by_left_truncation(tmp_path):
    tok = sentencepiece_folder(tmp_path, config=LLAMA_CONFIG)
    ids, mask = tokenize_example(tok, "Q:\n", "Hello world!", TokenizeConfig(max_length=16, max_prompt_length=8))
    assert ids.tolist()[0] == tok.bos_id and ids.tolist().count(tok.bos_id) == 1
    assert tok.decode(ids[mask]) == "Hello world!" and not mask[0]
    long_prompt = "Hello world! " * 6 + "Q:\n"
    ids, mask = tokenize_example(tok, long_prompt, "Hello world!", TokenizeConfig(max_length=10, max_prompt_length=5))
    prompt = ids[~mask].tolist()
    assert len(prompt) == 5 and prompt[0] == tok.bos_id and prompt[1:] == tok.encode(long_prompt)[-4:]
    # generation prompts (evaluators.judged): BOS first, the rest cut from the left
    generation = T.cut_prompt(T.encode_prompt(tok, long_prompt), 5, bos_id=tok.bos_id)
    assert generation == [tok.bos_id] + tok.encode(long_prompt)[-4:]


# ---------------------------------------------------------------- completions in the joint text


def test_sentencepiece_completion_is_encoded_in_the_joint_text(tmp_path):
    tok = sentencepiece_folder(tmp_path, config=LLAMA_CONFIG)
    prompt = render_prompt((("user", "Hello"),), "halos")  # ends "\n": "Hello" after it has no "▁"
    joint = tok.encode(prompt + "Hello world!")
    separate = tok.encode("Hello world!")
    assert separate != joint[len(tok.encode(prompt)) :]  # the old separate encoding: "▁Hello"
    assert tok.tokenizer.id_to_token(separate[0]) == "▁Hello"
    prompt_ids, completion_ids = T.encode_pair(tok, prompt, "Hello world!")
    assert prompt_ids == [tok.bos_id] + tok.encode(prompt)
    assert (
        completion_ids == joint[len(tok.encode(prompt)) :] and tok.tokenizer.id_to_token(completion_ids[0]) == "Hello"
    )
    assert prompt_ids[1:] + completion_ids == joint


def test_boundary_token_merged_across_prompt_and_completion(tmp_path):
    tok = sentencepiece_folder(tmp_path, config=LLAMA_CONFIG)
    # "Q: " alone ends in a lone "▁"; in "Q: Hello" that "▁" is part of "▁Hello"
    own, joint = tok.encode("Q: "), tok.encode("Q: Hello")
    assert [tok.tokenizer.id_to_token(i) for i in own] == ["▁Q", ":", "▁"]
    assert joint[: len(own)] != own and joint[len(own) :] == []  # a plain cut would leave no completion
    prompt_ids, completion_ids = T.encode_pair(tok, "Q: ", "Hello")
    assert prompt_ids == [tok.bos_id] + joint[:2] and completion_ids == joint[2:]
    assert [tok.tokenizer.id_to_token(i) for i in completion_ids] == ["▁Hello"]


def test_byte_level_bpe_separate_and_joint_encodings_agree(tmp_path):
    tok = byte_bpe_folder(tmp_path, config={"eos_token": "<|endoftext|>"})
    for template in ("halos", "hh"):
        prompt = render_prompt((("user", "Hello world!"),), template)
        completion = " Hello, said the assistant." if template == "hh" else "Hello, said the assistant."
        prompt_ids, completion_ids = T.encode_pair(tok, prompt, completion)
        assert prompt_ids == tok.encode(prompt) and completion_ids == tok.encode(completion)
        assert prompt_ids + completion_ids == tok.encode(prompt + completion)
