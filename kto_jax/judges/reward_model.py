"""A reward model as a pairwise judge: each answer scored by an HF *ForSequenceClassification model in JAX.

``config.eval.reward_model``: ``path`` (the model folder, with its tokenizer.json), ``batch_size``,
``max_length`` and ``chat_template`` ("tokenizer": the folder's own Jinja template; or a built-in,
``halos``/``hh``/``plain``).

Rendering (:meth:`RewardModelJudge.encode`): the conversation and the answer as its last assistant
turn. With a Jinja template the ids are transformers'
``apply_chat_template(messages + [answer], tokenize=True)``: the template's BOS id, then the
rendered text's tokens, the EOS text and whatever the template writes after it included. With a
built-in template they are the training examples' ``prompt + answer + [EOS]``
(``kto_jax.data.tokenize``). Prompt and answer are encoded together (``encode_pair``).

Truncation keeps the end: a sequence over ``max_length`` loses tokens from the left of the prompt,
behind the BOS, which stays first; the whole answer is kept when it fits in ``max_length`` (minus
the BOS), else its last tokens (the reward is read at the last token).

Scoring (:meth:`RewardModelJudge.scores`): the sequences sorted by length, in batches of
``batch_size`` rows (rounded up to a multiple of the device count; short batches padded with empty
rows) and right-padded to a bucketed length (a power of two from 16, capped at ``max_length``), so
few shapes compile; one jitted ``sequence_scores``. With several devices the batch is split over a
``data`` mesh axis and the params are replicated.

Verdicts (:meth:`RewardModelJudge.compare`): ``s1 > s2`` -> "first", ``s2 > s1`` -> "second", equal
-> "tie"; ``raw = f"{s1:.6f} {s2:.6f}"``; ``p_first = sigmoid(s1 - s2)``, the Bradley-Terry
probability that the first answer is preferred.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from kto_jax import sharding as sharding_lib
from kto_jax.data.chat import (
    BUILTIN_TEMPLATES,
    CHAT_TEMPLATE_NAMES,
    JinjaChatTemplate,
    bos_id_for,
    get_chat_template,
)
from kto_jax.data.tokenize import HFTokenizer, encode_pair
from kto_jax.errors import InputError, MissingInput
from kto_jax.judges.base import Turns, Verdict
from kto_jax.models.reward import load_reward_model, read_hf_config, sequence_scores

FIELD = "config.eval.reward_model"
MIN_BUCKET = 16
FINGERPRINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
SAMPLE_BYTES = 1 << 20


def sigmoid(x: float) -> float:
    """1 / (1 + exp(-x)), without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def verdict(s1: float, s2: float) -> Verdict:
    """The verdict of two scores: the higher wins, equal ties; ``p_first = sigmoid(s1 - s2)``."""
    winner = "first" if s1 > s2 else "second" if s2 > s1 else "tie"
    return Verdict(winner, f"{s1:.6f} {s2:.6f}", sigmoid(s1 - s2))


def bucket_length(n: int, max_length: int) -> int:
    """The padded length of a batch whose longest row has ``n`` tokens: min(max(16, 2^ceil(log2 n)), max_length)."""
    return min(max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()), max_length)


def truncate_left(prompt_ids: list[int], answer_ids: list[int], max_length: int, bos_id: int | None) -> list[int]:
    """``prompt_ids + answer_ids`` cut to its last ``max_length`` tokens, a leading BOS kept first."""
    ids = prompt_ids + answer_ids
    if len(ids) <= max_length:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id:
        return ids[:1] + ids[len(ids) - max_length + 1 :]
    return ids[len(ids) - max_length :]


def fingerprint(path: str) -> str:
    """sha256 (16 hex digits) of the folder's config, tokenizer and template files and, for each
    ``*.safetensors`` file, its name, size, safetensors header and first and last MiB of data."""
    h = hashlib.sha256()
    for name in FINGERPRINT_FILES:
        file = os.path.join(path, name)
        if os.path.exists(file):
            with open(file, "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    for name in sorted(n for n in os.listdir(path) if n.endswith(".safetensors")):
        file = os.path.join(path, name)
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            header = f.read(min(int.from_bytes(f.read(8), "little"), size))  # the JSON header after its length
            head = f.read(SAMPLE_BYTES)
            f.seek(max(size - SAMPLE_BYTES, f.tell()))
            tail = f.read()
        h.update(f"{name}\0{size}\0".encode() + header + head + tail)
    return h.hexdigest()[:16]


class RewardModelJudge:
    """Pairwise judge by reward-model score (not unary: a score has no threshold)."""

    unary = False

    def __init__(
        self,
        path: str,
        batch_size: int = 16,
        max_length: int = 512,
        chat_template: str = "tokenizer",
        dtype: str = "float32",
        devices=None,
    ):
        if not path:
            raise InputError(
                f"{FIELD}.path is empty: set it to a Hugging Face *ForSequenceClassification folder "
                f"(Llama or GPT-NeoX) with its tokenizer.json"
            )
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isdir(path):
            raise MissingInput(
                f"{FIELD}.path={path!r} is not a folder: it must be a Hugging Face "
                f"*ForSequenceClassification folder saved with save_pretrained"
            )
        if batch_size < 1:
            raise InputError(f"{FIELD}.batch_size={batch_size} must be >= 1")
        if max_length < 2:
            raise InputError(f"{FIELD}.max_length={max_length} must be >= 2 (room for a prompt and an answer token)")
        if chat_template not in CHAT_TEMPLATE_NAMES:
            raise InputError(f"{FIELD}.chat_template={chat_template!r} is not known; use one of {CHAT_TEMPLATE_NAMES}")
        self.path, self.max_length, self.chat_template = path, int(max_length), chat_template
        hf = read_hf_config(path, f"{FIELD}.path")
        self.template = get_chat_template(chat_template, path)
        if not os.path.exists(os.path.join(path, "tokenizer.json")):
            raise MissingInput(
                f"{os.path.join(path, 'tokenizer.json')!r} not found: {FIELD}.path must hold the "
                f"reward model's tokenizer (save it into the folder with the model)"
            )
        self.tokenizer = HFTokenizer(path)
        self.tokenizer.bos_id = bos_id_for(self.template, self.tokenizer)
        devices = list(jax.devices() if devices is None else devices)
        self.mesh = sharding_lib.make_mesh({"data": -1}, devices) if len(devices) > 1 else None
        self.batch_size = -(-int(batch_size) // len(devices)) * len(devices)
        self.model, self.params, self.score_kernel = load_reward_model(path, dtype, mesh=self.mesh)
        self._scorer = jax.jit(functools.partial(sequence_scores, self.model))  # one compile per (batch, length)
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise InputError(
                f"{path!r}: the tokenizer has {self.tokenizer.vocab_size} tokens but the model embeds "
                f"only {self.model.config.vocab_size}: {FIELD}.path holds a mismatched tokenizer.json"
            )
        if self.score_kernel.shape[1] != 1:
            raise InputError(
                f"{path!r} has num_labels={self.score_kernel.shape[1]} (score.weight rows); a reward model "
                f"judge needs one score per answer (num_labels=1): set {FIELD}.path to a reward model"
            )
        self.key = (
            f"reward_model:{path}:{fingerprint(path)}:max_length={self.max_length}:"
            f"chat_template={chat_template}:arch={(hf.get('architectures') or ['?'])[0]}"
        )

    @classmethod
    def from_config(cls, cfg):
        """From ``config.eval.reward_model`` (path, batch_size, max_length, chat_template)."""
        return cls(cfg.path, batch_size=cfg.batch_size, max_length=cfg.max_length, chat_template=cfg.chat_template)

    # ---------------------------------------------------------------- rendering

    def render(self, turns: Turns, answer: str) -> tuple[str, str]:
        """``(prompt_text, answer_text)``: the prompt without a leading BOS, and what the conversation
        with ``answer`` as its last assistant turn adds to it (a Jinja template's EOS text included)."""
        prompt = self.template.prompt(turns)
        if self.chat_template in BUILTIN_TEMPLATES:
            return prompt, answer
        template: JinjaChatTemplate = self.template
        messages = [{"role": r, "content": c} for r, c in turns] + [{"role": "assistant", "content": answer}]
        full = template.render(messages, add_generation_prompt=False)
        if template.renders_bos and full.startswith(template.bos_token):
            full = full[len(template.bos_token) :]
        if not full.startswith(prompt):
            raise InputError(
                f"chat template {template.name!r} does not render the prompt as a prefix of the "
                f"conversation with the answer; set {FIELD}.chat_template to a built-in "
                f"({', '.join(BUILTIN_TEMPLATES)})"
            )
        return prompt, full[len(prompt) :]

    def encode(self, turns: Turns, answer: str) -> list[int]:
        """The ids scored for ``answer`` after ``turns`` (module docstring: rendering, truncation)."""
        prompt, rest = self.render(turns, answer)
        prompt_ids, answer_ids = encode_pair(self.tokenizer, prompt, rest)
        if self.chat_template in BUILTIN_TEMPLATES:
            answer_ids = answer_ids + [self.tokenizer.eos_id]
        return truncate_left(prompt_ids, answer_ids, self.max_length, self.tokenizer.bos_id)

    # ---------------------------------------------------------------- scoring

    def _put(self, array: np.ndarray):
        if self.mesh is None:
            return array
        sharding = sharding_lib.batch_sharding(self.mesh, array.ndim)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    def score_ids(self, sequences: list[list[int]]) -> np.ndarray:
        """float32 ``[N]`` scores of token sequences (each at most ``max_length`` long)."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        out = np.zeros(len(sequences), np.float32)
        scorer = self._scorer
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            length = bucket_length(max(len(sequences[i]) for i in rows), self.max_length)
            ids = np.full((self.batch_size, length), self.tokenizer.pad_id, np.int32)
            mask = np.zeros((self.batch_size, length), np.int32)
            for r, i in enumerate(rows):
                ids[r, : len(sequences[i])], mask[r, : len(sequences[i])] = sequences[i], 1
            if self.mesh is None:
                scores = scorer(self.params, self.score_kernel, ids, mask)
            else:
                with sharding_lib.activation_rules(self.mesh):
                    scores = scorer(self.params, self.score_kernel, self._put(ids), self._put(mask))
                if jax.process_count() > 1:  # every process gets every score
                    scores = multihost_utils.process_allgather(scores, tiled=True)
            out[rows] = np.asarray(scores)[: len(rows), 0]
        return out

    def scores(self, items) -> list[float]:
        """The reward of each ``(turns, answer)``."""
        return [float(s) for s in self.score_ids([self.encode(turns, answer) for turns, answer in items])]

    def compare(self, items) -> list[Verdict]:
        """A verdict per ``(turns, first, second)`` from the two answers' scores (module docstring)."""
        items = list(items)
        s = self.scores([(t, a) for t, a, _ in items] + [(t, b) for t, _, b in items])
        return [verdict(s[k], s[k + len(items)]) for k in range(len(items))]
