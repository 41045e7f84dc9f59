"""Tokenization: templates, the paper's truncation, completion masks, byte-level edge cases."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from kto_jax.data import tokenize as T
from kto_jax.data.chat import render_prompt
from kto_jax.data.tokenize import (
    ByteTokenizer,
    HFTokenizer,
    TokenizeConfig,
    tokenize_example,
    truncate,
)

TOK = ByteTokenizer()


def test_templates():
    turns = (("user", "hi"), ("assistant", "hello"), ("user", "bye"))
    assert render_prompt(turns, "halos") == "\n<|user|>\nhi\n<|assistant|>\nhello\n<|user|>\nbye\n<|assistant|>\n"
    assert render_prompt(turns, "hh") == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
    assert render_prompt((("user", "Shout a!"),), "plain") == "Shout a!"
    with pytest.raises(ValueError, match="unknown chat template 'chatml'"):
        render_prompt(turns, "chatml")


def test_mask_covers_completion_and_eos_only():
    ids, mask = tokenize_example(TOK, "ab", "cd", TokenizeConfig(max_length=16, max_prompt_length=8))
    assert ids.tolist() == [97, 98, 99, 100, TOK.eos_id]
    assert mask.tolist() == [False, False, True, True, True]


def test_prompt_cut_from_left_then_completion_from_right():
    cfg = TokenizeConfig(max_length=10, max_prompt_length=4)
    p, c = truncate(list(range(8)), list(range(100, 108)), cfg)
    assert p == [4, 5, 6, 7]  # the prompt's end is kept
    assert c == [100, 101, 102, 103, 104]  # 4 + 5 + EOS = 10
    p, c = truncate(
        list(range(8)),
        list(range(100, 108)),
        TokenizeConfig(max_length=10, max_prompt_length=4, truncation_mode="keep_start"),
    )
    assert p == [0, 1, 2, 3]


def test_left_truncation_keeps_a_leading_bos_first():
    cfg, bos = TokenizeConfig(max_length=10, max_prompt_length=4), 999
    p, c = truncate([bos] + list(range(8)), list(range(100, 108)), cfg, bos_id=bos)
    assert p == [bos, 5, 6, 7] and c == [100, 101, 102, 103, 104]  # BOS + the prompt's last 3 tokens
    keep_start = TokenizeConfig(max_length=10, max_prompt_length=4, truncation_mode="keep_start")
    assert truncate([bos] + list(range(8)), list(range(100, 108)), keep_start, bos_id=bos)[0] == [bos, 0, 1, 2]
    assert T.cut_prompt([bos, 1, 2], 4, bos_id=bos) == [bos, 1, 2] and T.cut_prompt([bos, 1, 2], 1, bos_id=bos) == [bos]
    assert T.cut_prompt([7, 1, 2, 3], 2, bos_id=bos) == [2, 3]  # no BOS in front: a plain cut


def test_byte_tokenizer_adds_no_bos_and_encodes_pairs_as_separate_bytes():
    assert TOK.bos_id is None
    assert T.encode_prompt(TOK, "ab") == [97, 98]
    assert T.encode_pair(TOK, "héllo\n", "wörld") == (TOK.encode("héllo\n"), TOK.encode("wörld"))


def test_short_enough_example_is_not_truncated_even_with_long_prompt():
    cfg = TokenizeConfig(max_length=12, max_prompt_length=3)
    assert truncate(list(range(8)), [1, 2], cfg) == (list(range(8)), [1, 2])


def test_prompt_longer_than_max_length_still_keeps_completion():
    cfg = TokenizeConfig(max_length=8, max_prompt_length=4)
    ids, mask = tokenize_example(TOK, "x" * 50, "yy", cfg)
    assert len(ids) == 7 and mask.sum() == 3


def test_empty_completion_is_dropped():
    cfg = TokenizeConfig(max_length=8, max_prompt_length=4)
    assert tokenize_example(TOK, "prompt", "", cfg) is None


def test_multibyte_text_round_trips_and_invalid_utf8_decodes_safely():
    text = "héllo 🎉 — 日本"
    assert TOK.decode(TOK.encode(text)) == text
    cut = TOK.encode("🎉")[:2]  # half an emoji, as a model might generate
    assert TOK.decode(cut + TOK.encode("ok")) == "\ufffdok"
    assert TOK.decode([TOK.eos_id, 104, 105]) == "hi"  # specials are not text


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="max_prompt_length=64, max_length=32"):
        TokenizeConfig(max_length=32, max_prompt_length=64)
    with pytest.raises(ValueError, match="truncation_mode"):
        TokenizeConfig(truncation_mode="middle")


def test_hf_tokenizer_from_folder(tmp_path):
    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(str(tmp_path))
    assert hf.encode("hello world") == [2, 3] and hf.eos_id == 1 and hf.pad_id == 1
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "world"}}))
    hf = HFTokenizer(str(tmp_path))
    assert hf.eos_id == 3
    assert hf.bos_id is None  # no post-processor, no add_bos_token
    # the completion is encoded in the joint text: "hello hello", not "hello" + "hello" ("hellohello" is one unknown word)
    ids, mask = tokenize_example(hf, "hello", " hello", TokenizeConfig(max_length=8, max_prompt_length=4))
    np.testing.assert_array_equal(ids, [2, 2, 3])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HFTokenizer(str(tmp_path / "missing"))
