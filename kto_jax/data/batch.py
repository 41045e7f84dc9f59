"""The schema of a global batch: which arrays it holds, their names, dtypes and shapes.

One schema per batch layout, built by the feed of the run's loss (``kto_jax.train.feeds``);
the loader fills it, and the AOT check, the benchmark and the FLOP count read it. A batch
holds, for each sequence group ``g`` (``""`` the training completions, ``"kl"`` KTO's
mismatched pairs, ``"chosen"``, ``"rejected"``), the ``[G, L]`` arrays

    {g_}input_ids (int32), {g_}attention_mask (int32), {g_}loss_mask (bool, completion tokens)

and ``[G]`` per-example arrays (``desirable``; cached reference log-probs such as
``reference_logps``), G the global batch size and L the padded length.

Packed (``config.data.packing``): several sequences share a row. Each group's arrays are
``[R, L]`` rows of the pack length L (``config.data.max_length``),

    {g_}input_ids (int32), {g_}segment_ids (int32), {g_}loss_mask (bool)

``segment_ids`` = 1 + the example's index within its microbatch (0 on padding): attention is
causal within a segment only and positions restart per segment (``kto_jax.models.common``),
and per-sequence log-probs are the sums over each segment (``kto_jax.logprobs.segment_sums``).
The first token of every segment has no loss (as position 0 of a padded row). Per-example
arrays stay ``[G]``, with ``example_index`` (int32, the row in the global batch) among them;
a group in ``unpack`` also has ``{g_}unpack_index [G, L]`` (int32): the flat position in its
microbatch's ``[R, L]`` rows of token t of example i (-1 past its end), which turns per-token
values back into the padded layout (offline PPO's GAE runs per example).
"""

from __future__ import annotations

import dataclasses

import numpy as np

SEQUENCE_ARRAYS = (("input_ids", "int32"), ("attention_mask", "int32"), ("loss_mask", "bool"))
PACKED_ARRAYS = (("input_ids", "int32"), ("segment_ids", "int32"), ("loss_mask", "bool"))
GROUPS = ("", "kl", "chosen", "rejected")
NOT_TRAINING = ("kl",)  # groups whose tokens are not training tokens (TRL counts the completions only)


def prefix(group: str) -> str:
    """The key prefix of a sequence group: "" for the training completions, else "group_"."""
    return f"{group}_" if group else ""


@dataclasses.dataclass(frozen=True)
class BatchSchema:
    """Sequence groups (each three ``[G, L]`` arrays, or ``[R, L]`` rows when ``packed``) and
    ``(name, dtype)`` per-example ``[G]`` arrays; ``unpack``: packed groups with an unpack index."""

    sequences: tuple[str, ...]
    per_example: tuple[tuple[str, str], ...] = ()
    packed: bool = False
    unpack: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = set(self.sequences) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown sequence groups {sorted(unknown)}; known: {GROUPS}")
        if self.packed and ("example_index", "int32") not in self.per_example:
            object.__setattr__(self, "per_example", self.per_example + (("example_index", "int32"),))

    def fields(self) -> dict[str, tuple[str, str]]:
        """name -> (dtype, kind): every array of the batch; kind "token" (``[G, L]``, packed
        ``[R, L]``), "example" (``[G]``) or "example_token" (``[G, L]``, the unpack indices)."""
        arrays = PACKED_ARRAYS if self.packed else SEQUENCE_ARRAYS
        out = {f"{prefix(g)}{name}": (dtype, "token") for g in self.sequences for name, dtype in arrays}
        out.update({name: (dtype, "example") for name, dtype in self.per_example})
        if self.packed:
            out.update({f"{prefix(g)}unpack_index": ("int32", "example_token") for g in self.unpack})
        return out

    def shapes(self, batch: int, length: int, rows: int | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """name -> (shape, dtype) of a batch of ``batch`` examples padded (or packed) to ``length``
        tokens; packed sequences fill ``rows`` rows (default ``batch``: one example per row, the most
        packing can need)."""
        token_rows = batch if rows is None else rows
        shape = {"token": (token_rows, length), "example": (batch,), "example_token": (batch, length)}
        return {name: (shape[kind], np.dtype(dtype)) for name, (dtype, kind) in self.fields().items()}

    def with_per_example(self, *fields: tuple[str, str]) -> BatchSchema:
        return dataclasses.replace(self, per_example=self.per_example + tuple(fields))

    def as_packed(self, unpack: tuple[str, ...] = ()) -> BatchSchema:
        return dataclasses.replace(self, packed=True, unpack=unpack)

    @property
    def presence_key(self) -> str:
        """The per-token array that is nonzero on real tokens: attention_mask, or segment_ids when packed."""
        return "segment_ids" if self.packed else "attention_mask"

    def training_tokens(self, batch) -> float:
        """Tokens of the training sequences (not KL ones) in ``batch``: its real (non-pad) tokens."""
        key = self.presence_key
        return sum((batch[f"{prefix(g)}{key}"] > 0).sum() for g in self.sequences if g not in NOT_TRAINING)

    def real_fraction(self, batch) -> float:
        """The share of the first group's row tokens that are real (not padding) in ``batch``."""
        return float((batch[f"{prefix(self.sequences[0])}{self.presence_key}"] > 0).mean())

    @property
    def length_key(self) -> str:
        """A ``[G, L]`` (packed ``[R, L]``) key of the batch, to read its padded length from."""
        return f"{prefix(self.sequences[0])}input_ids"


def feedback_schema(paired: bool, kl_pairing: bool = False, packed: bool = False) -> BatchSchema:
    """The loader's layout of feedback data: chosen/rejected pairs, or unary completions with a
    ``desirable`` flag and (``kl_pairing``) KTO's mismatched KL sequences; padded or ``packed``."""
    if paired:
        return BatchSchema(("chosen", "rejected"), packed=packed)
    return BatchSchema(
        ("", "kl") if kl_pairing else ("",), (("desirable", "bool"),), packed=packed, unpack=("",) if packed else ()
    )
