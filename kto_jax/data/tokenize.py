"""Tokenizers, chat templates, truncation and completion masks.

A tokenized example is ``prompt_ids + completion_ids + [eos]`` with a loss mask that is 1
on the completion tokens and the EOS only. ``prompt_ids`` starts with the tokenizer's BOS
when it adds one (``bos_id``: LLaMA/Mistral ``<s>``; none for GPT-NeoX or the byte
tokenizer). Prompt and completion are encoded together and split at the prompt's length
(``encode_pair``, as HALOs and TRL do), so the completion tokens the loss scores are those
of the joint text: a SentencePiece tokenizer encodes "Hello" alone as "▁Hello" but after
"\\n" as "Hello".

Truncation follows the KTO paper's code (HALOs): if prompt + completion exceed
``max_length`` and the prompt exceeds ``max_prompt_length``, the prompt is cut to
``max_prompt_length`` from the left (its end is kept, behind the BOS, which stays first;
``truncation_mode="keep_start"`` keeps its start instead, as HALOs does for SHP); then the
completion is cut from the right to fit, and EOS is appended (it always fits:
``max_length`` counts it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from kto_jax.errors import InputError
from kto_jax.models.hf import load_tokenizer

# ---------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None  # prepended to every prompt (``encode_prompt``); None: the tokenizer adds none

    def encode(self, text: str) -> list[int]: ...  # the text's tokens only: no BOS/EOS

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_id(self, token: str) -> int: ...

    def add_tokens(self, tokens: Sequence[str]) -> tuple[str, ...]: ...  # adds the missing ones; returns them


class ByteTokenizer:
    """UTF-8 bytes as tokens 0-255, then special tokens: <pad>, <eos>, <|good|>, <|bad|>.

    The built-in tokenizer of the synthetic default; decoding replaces invalid UTF-8
    (a model can generate any byte sequence) instead of failing. It adds no BOS.
    """

    SPECIALS = ("<pad>", "<eos>", "<|good|>", "<|bad|>")
    bos_id = None

    def __init__(self):
        self.special_ids = {tok: 256 + i for i, tok in enumerate(self.SPECIALS)}
        self.vocab_size = 256 + len(self.SPECIALS)
        self.pad_id = self.special_ids["<pad>"]
        self.eos_id = self.special_ids["<eos>"]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def token_id(self, token: str) -> int:
        if token not in self.special_ids:
            raise KeyError(f"{token!r} is not a special token of the byte tokenizer; it has {list(self.special_ids)}")
        return self.special_ids[token]

    def add_tokens(self, tokens: Sequence[str]) -> tuple[str, ...]:
        """The byte tokenizer's vocabulary is fixed: every token asked for must be one of its specials."""
        for token in tokens:
            self.token_id(token)
        return ()


EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<eos>")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` from a model folder's tokenizer.json (no transformers needed).

    EOS comes from tokenizer_config.json's ``eos_token`` when present, else the first of
    the usual EOS strings in the vocabulary; PAD is ``pad_token`` or EOS.

    BOS (``bos_id``): tokenizer_config.json's ``add_bos_token`` decides when present, as in
    transformers' LLaMA/Mistral tokenizers (true: its ``bos_token``, else the post-processor's
    leading special token; false: none, whatever the post-processor does); otherwise the
    special token, if any, that tokenizer.json's post-processor puts before a single sequence
    (TemplateProcessing ``<s> $A`` as in LLaMA/Mistral, ``<|begin_of_text|> $A`` in LLaMA-3;
    GPT-NeoX/Pythia's ByteLevel post-processor adds none, whatever ``bos_token`` names).
    ``encode`` itself never adds special tokens.
    """

    def __init__(self, path: str):
        self.tokenizer = load_tokenizer(path)
        self.vocab_size = self.tokenizer.get_vocab_size()
        config = {}
        config_file = os.path.join(path, "tokenizer_config.json") if os.path.isdir(path) else ""
        if config_file and os.path.exists(config_file):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        eos = _token_str(config.get("eos_token")) or next(
            (t for t in EOS_CANDIDATES if self.tokenizer.token_to_id(t) is not None), None
        )
        if eos is None or self.tokenizer.token_to_id(eos) is None:
            raise InputError(
                f"{path!r}: no EOS token found (set eos_token in tokenizer_config.json; tried {EOS_CANDIDATES})"
            )
        self.eos_id = self.tokenizer.token_to_id(eos)
        pad = _token_str(config.get("pad_token"))
        self.pad_id = (
            self.tokenizer.token_to_id(pad) if pad and self.tokenizer.token_to_id(pad) is not None else self.eos_id
        )
        self.bos_id = self._bos_id(path, config)

    def _bos_id(self, path: str, config: dict) -> int | None:
        """The rule of the class docstring; ``prepended`` is the post-processor's leading special token."""
        try:  # "a" with and without the post-processor's special tokens
            plain = self.tokenizer.encode("a", add_special_tokens=False).ids
            full = self.tokenizer.encode("a", add_special_tokens=True)
        except Exception:  # a word-level vocabulary without "a" nor an unknown token
            plain, full = [], None
        prepended = (
            full.ids[0]
            if full and full.special_tokens_mask[:1] == [1] and full.ids[1 : len(plain) + 1] == plain
            else None
        )
        add = config.get("add_bos_token")
        if add is None:
            return prepended
        if not add:
            return None
        bos = _token_str(config.get("bos_token"))
        bos_id = self.tokenizer.token_to_id(bos) if bos else prepended
        if bos_id is None:
            raise InputError(
                f"{path!r}: tokenizer_config.json has add_bos_token=true but its bos_token {bos!r} is not in the vocabulary"
            )
        return bos_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def add_tokens(self, tokens: Sequence[str]) -> tuple[str, ...]:
        """Add the tokens the vocabulary lacks as special tokens (never split, ids after the
        current ones, in order), as HALOs adds CSFT's control tokens; returns those added."""
        missing = tuple(t for t in tokens if self.tokenizer.token_to_id(t) is None)
        if missing:
            self.tokenizer.add_special_tokens(list(missing))
            self.vocab_size = self.tokenizer.get_vocab_size()
        return missing


def _token_str(value) -> str | None:
    if isinstance(value, dict):  # {"content": "</s>", ...} in older tokenizer_config.json files
        return value.get("content")
    return value


def get_tokenizer(name_or_path: str) -> Tokenizer:
    """``"bytes"`` for the built-in byte tokenizer, else a model folder (or tokenizer.json)."""
    if name_or_path == "bytes":
        return ByteTokenizer()
    return HFTokenizer(name_or_path)


# ---------------------------------------------------------------- tokenization


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    max_length: int = 2048
    max_prompt_length: int = 1024
    chat_template: object = "halos"  # a built-in's name or a kto_jax.data.chat.ChatTemplate
    truncation_mode: str = "keep_end"

    def __post_init__(self):
        if not 0 < self.max_prompt_length < self.max_length:
            raise InputError(
                f"need 0 < max_prompt_length < max_length; got max_prompt_length={self.max_prompt_length}, "
                f"max_length={self.max_length} (config.data)"
            )
        if self.truncation_mode not in ("keep_end", "keep_start"):
            raise InputError(f"truncation_mode must be 'keep_end' or 'keep_start'; got {self.truncation_mode!r}")


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """A rendered prompt's ids: the tokenizer's BOS (when it adds one), then the text's tokens."""
    return ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + tokenizer.encode(text)


def encode_pair(
    tokenizer: Tokenizer, prompt: str, completion: str, prompt_ids: Sequence[int] | None = None
) -> tuple[list[int], list[int]]:
    """``(prompt_ids, completion_ids)`` of ``prompt + completion`` encoded together, as HALOs and TRL do.

    The joint text's tokens are split at the length of the prompt's own tokens
    (``prompt_ids``: ``tokenizer.encode(prompt)``, passed in when cached). When the joint
    encoding's first tokens are not the prompt's own (the prompt's last token merged with the
    completion's first), the split moves one token earlier: the prompt part is the joint
    encoding's, and the completion part starts with the merged token (TRL's
    ``build_tokenized_answer``). So ``prompt_ids + completion_ids`` is always the joint
    encoding; BOS (``bos_id``) is then put before the prompt part.
    """
    own = list(tokenizer.encode(prompt) if prompt_ids is None else prompt_ids)
    joint = tokenizer.encode(prompt + completion)
    split = len(own) if joint[: len(own)] == own else len(own) - 1
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return bos + joint[:split], joint[split:]


def cut_prompt(
    prompt_ids: list[int], max_prompt_length: int, truncation_mode: str = "keep_end", bos_id: int | None = None
) -> list[int]:
    """The prompt cut to ``max_prompt_length`` tokens: its end kept (``keep_end``) or its start.

    A leading BOS (``prompt_ids[0] == bos_id``) stays first: ``keep_end`` keeps BOS and the
    last ``max_prompt_length - 1`` tokens.
    """
    if len(prompt_ids) <= max_prompt_length:
        return prompt_ids
    if truncation_mode == "keep_start":
        return prompt_ids[:max_prompt_length]
    if bos_id is not None and prompt_ids[0] == bos_id:
        return prompt_ids[:1] + prompt_ids[len(prompt_ids) - max_prompt_length + 1 :]
    return prompt_ids[-max_prompt_length:]


def truncate(
    prompt_ids: list[int], completion_ids: list[int], cfg: TokenizeConfig, bos_id: int | None = None
) -> tuple[list[int], list[int]]:
    """The paper's truncation; room is left for the EOS appended after the completion.

    A leading BOS survives the prompt's cut (``cut_prompt``).
    """
    limit = cfg.max_length - 1  # EOS
    if len(prompt_ids) + len(completion_ids) > limit and len(prompt_ids) > cfg.max_prompt_length:
        prompt_ids = cut_prompt(prompt_ids, cfg.max_prompt_length, cfg.truncation_mode, bos_id)
    if len(prompt_ids) + len(completion_ids) > limit:
        completion_ids = completion_ids[: max(limit - len(prompt_ids), 0)]
    return prompt_ids, completion_ids


def tokenize_example(tokenizer: Tokenizer, prompt: str, completion: str, cfg: TokenizeConfig):
    """``(ids, loss_mask)`` int32/bool numpy arrays, or None when no completion token is left.

    ``prompt`` is rendered text; BOS and the prompt are not in the mask, the completion and
    the EOS after it are.
    """
    prompt_ids, completion_ids = truncate(*encode_pair(tokenizer, prompt, completion), cfg, tokenizer.bos_id)
    if not completion_ids:
        return None
    ids = np.asarray(prompt_ids + completion_ids + [tokenizer.eos_id], np.int32)
    mask = np.zeros(ids.shape, bool)
    mask[len(prompt_ids) :] = True
    return ids, mask
