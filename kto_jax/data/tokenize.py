"""Tokenizers, chat templates, truncation and completion masks.

A tokenized example is ``prompt_ids + completion_ids + [eos]`` with a loss mask that is 1
on the completion tokens and the EOS only. Prompt and completion are encoded separately
and concatenated (as TRL does), so the mask is exact whatever the tokenizer merges.

Truncation follows the KTO paper's code (HALOs): if prompt + completion exceed
``max_length`` and the prompt exceeds ``max_prompt_length``, the prompt is cut to
``max_prompt_length`` from the left (its end is kept; ``truncation_mode="keep_start"``
keeps its start instead, as HALOs does for SHP); then the completion is cut from the right
to fit, and EOS is appended (it always fits: ``max_length`` counts it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Protocol, Sequence

import numpy as np

# ---------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_id(self, token: str) -> int: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0-255, then special tokens: <pad>, <eos>, <|good|>, <|bad|>.

    The built-in tokenizer of the synthetic default; decoding replaces invalid UTF-8
    (a model can generate any byte sequence) instead of failing.
    """

    SPECIALS = ("<pad>", "<eos>", "<|good|>", "<|bad|>")

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


EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<eos>")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` from a model folder's tokenizer.json (no transformers needed).

    EOS comes from tokenizer_config.json's ``eos_token`` when present, else the first of
    the usual EOS strings in the vocabulary; PAD is ``pad_token`` or EOS.
    """

    def __init__(self, path: str):
        from kto_jax.models.hf import load_tokenizer

        self.tokenizer = load_tokenizer(path)
        self.vocab_size = self.tokenizer.get_vocab_size()
        config = {}
        config_file = os.path.join(path, "tokenizer_config.json") if os.path.isdir(path) else ""
        if config_file and os.path.exists(config_file):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        eos = _token_str(config.get("eos_token")) or next((t for t in EOS_CANDIDATES if self.tokenizer.token_to_id(t) is not None), None)
        if eos is None or self.tokenizer.token_to_id(eos) is None:
            raise ValueError(f"{path!r}: no EOS token found (set eos_token in tokenizer_config.json; tried {EOS_CANDIDATES})")
        self.eos_id = self.tokenizer.token_to_id(eos)
        pad = _token_str(config.get("pad_token"))
        self.pad_id = self.tokenizer.token_to_id(pad) if pad and self.tokenizer.token_to_id(pad) is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the tokenizer's vocabulary")
        return token_id


def _token_str(value) -> str | None:
    if isinstance(value, dict):  # {"content": "</s>", ...} in older tokenizer_config.json files
        return value.get("content")
    return value


def get_tokenizer(name_or_path: str) -> Tokenizer:
    """``"bytes"`` for the built-in byte tokenizer, else a model folder (or tokenizer.json)."""
    if name_or_path == "bytes":
        return ByteTokenizer()
    return HFTokenizer(name_or_path)


# ---------------------------------------------------------------- chat templates


def _halos(turns) -> str:
    """The KTO paper's template: "\\n<|user|>\\n{content}" / "\\n<|assistant|>\\n{content}", then the
    assistant marker that the completion follows."""
    return "".join(f"\n<|{role}|>\n{content}" for role, content in turns) + "\n<|assistant|>\n"


def _hh(turns) -> str:
    """Anthropic HH's own format: "\\n\\nHuman: ..." / "\\n\\nAssistant: ...", ending "\\n\\nAssistant:"."""
    names = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{names[role]}: {content}" for role, content in turns) + "\n\nAssistant:"


def _plain(turns) -> str:
    """The turns' contents joined by newlines, nothing added (the synthetic task)."""
    return "\n".join(content for _, content in turns)


CHAT_TEMPLATES = {"halos": _halos, "hh": _hh, "plain": _plain}


def render_prompt(turns: Sequence[tuple[str, str]], template: str) -> str:
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {template!r} (config.data.chat_template); known: {sorted(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[template](turns)


# ---------------------------------------------------------------- tokenization


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    max_length: int = 2048
    max_prompt_length: int = 1024
    chat_template: str = "halos"
    truncation_mode: str = "keep_end"

    def __post_init__(self):
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(
                f"need 0 < max_prompt_length < max_length; got max_prompt_length={self.max_prompt_length}, "
                f"max_length={self.max_length} (config.data)"
            )
        if self.truncation_mode not in ("keep_end", "keep_start"):
            raise ValueError(f"truncation_mode must be 'keep_end' or 'keep_start'; got {self.truncation_mode!r}")


def truncate(prompt_ids: list[int], completion_ids: list[int], cfg: TokenizeConfig) -> tuple[list[int], list[int]]:
    """The paper's truncation; room is left for the EOS appended after the completion."""
    limit = cfg.max_length - 1  # EOS
    if len(prompt_ids) + len(completion_ids) > limit and len(prompt_ids) > cfg.max_prompt_length:
        if cfg.truncation_mode == "keep_end":
            prompt_ids = prompt_ids[-cfg.max_prompt_length :]
        else:
            prompt_ids = prompt_ids[: cfg.max_prompt_length]
    if len(prompt_ids) + len(completion_ids) > limit:
        completion_ids = completion_ids[: max(limit - len(prompt_ids), 0)]
    return prompt_ids, completion_ids


def tokenize_example(tokenizer: Tokenizer, prompt: str, completion: str, cfg: TokenizeConfig):
    """``(ids, loss_mask)`` int32/bool numpy arrays, or None when no completion token is left.

    ``prompt`` is rendered text; the EOS after the completion is a completion token.
    """
    prompt_ids, completion_ids = truncate(tokenizer.encode(prompt), tokenizer.encode(completion), cfg)
    if not completion_ids:
        return None
    ids = np.asarray(prompt_ids + completion_ids + [tokenizer.eos_id], np.int32)
    mask = np.zeros(ids.shape, bool)
    mask[len(prompt_ids) :] = True
    return ids, mask
