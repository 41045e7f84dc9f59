"""The schema of a global batch: which arrays it holds, their names, dtypes and shapes.

One schema per batch layout, built by the feed of the run's loss (``kto_jax.train.feeds``);
the loader fills it, and the AOT check, the benchmark and the FLOP count read it. A batch
holds, for each sequence group ``g`` (``""`` the training completions, ``"kl"`` KTO's
mismatched pairs, ``"chosen"``, ``"rejected"``), the ``[G, L]`` arrays

    {g_}input_ids (int32), {g_}attention_mask (int32), {g_}loss_mask (bool, completion tokens)

and ``[G]`` per-example arrays (``desirable``; cached reference log-probs such as
``reference_logps``), G the global batch size and L the padded length.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SEQUENCE_ARRAYS = (("input_ids", "int32"), ("attention_mask", "int32"), ("loss_mask", "bool"))
GROUPS = ("", "kl", "chosen", "rejected")
NOT_TRAINING = ("kl",)  # groups whose tokens are not training tokens (TRL counts the completions only)


def prefix(group: str) -> str:
    """The key prefix of a sequence group: "" for the training completions, else "group_"."""
    return f"{group}_" if group else ""


@dataclasses.dataclass(frozen=True)
class BatchSchema:
    """Sequence groups (each three ``[G, L]`` arrays) and ``(name, dtype)`` per-example ``[G]`` arrays."""

    sequences: tuple[str, ...]
    per_example: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        unknown = set(self.sequences) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown sequence groups {sorted(unknown)}; known: {GROUPS}")

    def fields(self) -> dict[str, tuple[str, bool]]:
        """name -> (dtype, per_token): every array of the batch."""
        out = {f"{prefix(g)}{name}": (dtype, True) for g in self.sequences for name, dtype in SEQUENCE_ARRAYS}
        out.update({name: (dtype, False) for name, dtype in self.per_example})
        return out

    def shapes(self, batch: int, length: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """name -> (shape, dtype) of a batch of ``batch`` rows padded to ``length`` tokens."""
        return {name: ((batch, length) if per_token else (batch,), np.dtype(dtype))
                for name, (dtype, per_token) in self.fields().items()}

    def with_per_example(self, *fields: tuple[str, str]) -> "BatchSchema":
        return dataclasses.replace(self, per_example=self.per_example + tuple(fields))

    def training_tokens(self, batch) -> float:
        """Tokens of the training sequences (not KL ones) in ``batch``: the attention-mask sum."""
        return sum(batch[f"{prefix(g)}attention_mask"].sum() for g in self.sequences if g not in NOT_TRAINING)

    @property
    def length_key(self) -> str:
        """A ``[G, L]`` key of the batch, to read its padded length from."""
        return f"{prefix(self.sequences[0])}input_ids"


def feedback_schema(paired: bool, kl_pairing: bool = False) -> BatchSchema:
    """The loader's layout of feedback data: chosen/rejected pairs, or unary completions with a
    ``desirable`` flag and (``kl_pairing``) KTO's mismatched KL sequences."""
    if paired:
        return BatchSchema(("chosen", "rejected"))
    return BatchSchema(("", "kl") if kl_pairing else ("",), (("desirable", "bool"),))
