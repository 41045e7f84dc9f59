"""Deterministic, resumable, per-process batches of tokenized feedback (numpy).

Batch b of epoch e is rows ``perm_e[b*G:(b+1)*G]`` of the examples, ``perm_e`` a
permutation seeded by (seed, e), G the global batch size. Process p of P gets rows
``[p*G/P, (p+1)*G/P)`` of it; every process computes the same global order and padded
length, so the per-process slices assemble into one global array
(``jax.make_array_from_process_local_data``). ``state()`` / ``restore(state)`` resume at
the exact next batch.

Arrays: those of ``self.schema`` (``kto_jax.data.batch.feedback_schema``), right-padded to a
length bucket (a multiple of ``bucket`` capped at max_length):
  unary:  input_ids, attention_mask, loss_mask [b, L]; desirable [b]; and, when
          ``kl_pairing`` is on, kl_input_ids, kl_attention_mask, kl_loss_mask
  paired: chosen_input_ids, chosen_attention_mask, chosen_loss_mask, rejected_* [b, L]

Microbatches are strided: with M microbatches, microbatch m is rows m, m + M, m + 2M, ...
of the global batch (the engine reshapes [G, L] -> [G/M, M, L]), so every microbatch is
spread over all data-parallel devices. KL pairing (KTO) stays inside a microbatch: the KL
sequence of row i is its own prompt with the completion of row (i + M) mod G, the next
row of the same microbatch (as TRL, the tokens of each part come from its own example's
joint encoding, ``kto_jax.data.tokenize.encode_pair``). A microbatch of B = G/M = 1 is an
error: the KL term would be the example's own reward.

Packing (``packing=True``, ``kto_jax.data.batch``): the same global batch, its sequences placed
several to a row of ``max_length`` tokens instead of one per padded row. Each microbatch's
sequences of each group are packed on their own into rows of ``pack_length`` tokens (default
``max_length``; first-fit decreasing: longest first, each into the first row with room), every group and microbatch into the same number of rows R, rounded up
so the M * R rows divide over ``row_multiple`` (the data-parallel devices), and to one of about
eight row counts (``packed_rows``) so few step shapes compile. Row r of microbatch
m is global row r * M + m, so the engine's strided microbatch split applies unchanged. Which
examples make a batch, their order and the KL partners are exactly the padded path's.

Every sequence is ``[BOS] + prompt + completion + [EOS]`` (BOS when the tokenizer adds one,
``Tokenizer.bos_id``), with the loss mask on the completion and EOS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from absl import logging

from kto_jax.data.batch import BatchSchema, feedback_schema, prefix
from kto_jax.data.chat import get_chat_template
from kto_jax.data.feedback import Paired, Unary
from kto_jax.data.tokenize import TokenizeConfig, Tokenizer, encode_pair, truncate
from kto_jax.errors import InputError

PACKED_ROW_BUCKETS = 8  # packed batches come in at most this many row counts (one compiled step each)


@dataclasses.dataclass(frozen=True)
class _Tokens:
    """One completion's ``encode_pair``: [BOS] + prompt tokens, and the completion's tokens in the joint text."""

    prompt: np.ndarray
    completion: np.ndarray


class FeedbackLoader:
    """Batches of unary (KTO family, SFT) or paired (DPO family) examples for one process."""

    def __init__(
        self,
        examples: Sequence[Unary] | Sequence[Paired],
        tokenizer: Tokenizer,
        tokenize: TokenizeConfig,
        *,
        global_batch_size: int,
        seed: int = 0,
        kl_pairing: bool = False,
        num_microbatches: int = 1,
        bucket: int = 64,
        process_index: int | None = None,
        process_count: int | None = None,
        control_tokens: tuple[str, str] | None = None,
        schema: BatchSchema | None = None,
        packing: bool = False,
        pack_length: int = 0,
        row_multiple: int = 1,
    ):
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        self.paired = bool(examples) and isinstance(examples[0], Paired)
        # the layout to fill: the feed's (kto_jax.train.feeds, via the plan), or the default one of the data
        self.schema = schema or feedback_schema(self.paired, kl_pairing, packed=packing)
        self.packing, self.row_multiple = self.schema.packed, max(1, int(row_multiple))
        self.pack_length = int(pack_length) or tokenize.max_length
        fillable = feedback_schema(self.paired, kl_pairing=True, packed=self.packing)
        missing = set(self.schema.fields()) - set(fillable.fields())
        if missing:
            raise ValueError(
                f"the batch layout asks for {sorted(missing)}, which {'paired' if self.paired else 'unary'} "
                f"examples do not have (they give {sorted(fillable.fields())})"
            )
        kl_pairing = "kl" in self.schema.sequences
        if global_batch_size % process_count:
            raise InputError(
                f"global batch size {global_batch_size} (config.train.global_batch_size) is not divisible by "
                f"the {process_count} processes"
            )
        if global_batch_size % num_microbatches:
            raise InputError(
                f"global batch size {global_batch_size} is not divisible by num_microbatches={num_microbatches} "
                "(config.train.num_microbatches)"
            )
        if kl_pairing and global_batch_size // num_microbatches < 2:
            raise InputError(
                f"KL pairing needs at least 2 examples per microbatch, got {global_batch_size // num_microbatches} "
                f"(global batch {global_batch_size} / {num_microbatches} microbatches): with 1 the KL sequence is the "
                "example itself and z0 equals its reward. Raise config.train.global_batch_size or lower num_microbatches."
            )
        self.tokenizer, self.cfg = tokenizer, tokenize
        self.global_batch_size, self.seed, self.bucket = global_batch_size, seed, bucket
        self.kl_pairing, self.num_microbatches = kl_pairing, num_microbatches
        self.process_index, self.process_count = process_index, process_count
        self.control_ids = tuple(tokenizer.token_id(t) for t in control_tokens) if control_tokens else None
        self._tokenize_all(examples)
        if len(self.examples) < global_batch_size:
            raise InputError(
                f"{len(self.examples)} examples after tokenization is fewer than one global batch of {global_batch_size}"
            )
        self.epoch, self.batch = 0, 0

    # ------------------------------------------------------------ preparation

    def _tokenize_all(self, examples) -> None:
        """Encode every example once; drop (and count) those left with no completion token.

        Each completion is encoded together with its prompt (``encode_pair``: the joint
        text's tokens split at the prompt's own length, BOS first); the prompt's own encoding
        is cached, as prompts repeat across examples.
        """
        self.examples, self.tokens, self.dropped = [], [], 0
        template = self.cfg.chat_template
        template = get_chat_template(template) if isinstance(template, str) else template
        cache: dict = {}
        for ex in examples:
            if ex.prompt not in cache:
                text = template.prompt(ex.prompt)
                cache[ex.prompt] = text, self.tokenizer.encode(text)
            text, own = cache[ex.prompt]
            completions = (ex.chosen, ex.rejected) if self.paired else (ex.completion,)
            # the text the template puts after the prompt for this reply (the reply itself for the built-ins)
            completions = [template.completion(ex.prompt, c, text) for c in completions]
            encoded = [encode_pair(self.tokenizer, text, c, own) for c in completions]
            if any(len(truncate(p, c, self.cfg, self.tokenizer.bos_id)[1]) == 0 for p, c in encoded):
                self.dropped += 1
                continue
            self.examples.append(ex)
            self.tokens.append([_Tokens(np.asarray(p, np.int32), np.asarray(c, np.int32)) for p, c in encoded])
        self.desirable = np.array([getattr(ex, "desirable", True) for ex in self.examples])
        logging.info(
            "loader: %d examples, %d dropped (no completion token left after truncation)",
            len(self.examples),
            self.dropped,
        )

    @property
    def steps_per_epoch(self) -> int:
        return len(self.examples) // self.global_batch_size

    # ------------------------------------------------------------ state

    def state(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "num_examples": len(self.examples)}

    def restore(self, state: dict) -> None:
        if state["seed"] != self.seed or state["num_examples"] != len(self.examples):
            raise InputError(
                f"loader state is for seed {state['seed']} with {state['num_examples']} examples, but this loader has "
                f"seed {self.seed} with {len(self.examples)}: the data or config.data changed since the checkpoint"
            )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    # ------------------------------------------------------------ batches

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.batch >= self.steps_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        rows = self.global_rows(self.epoch, self.batch)
        self.batch += 1
        return self.make_batch(rows)

    def global_rows(self, epoch: int, batch: int) -> np.ndarray:
        """Example indices of global batch ``batch`` of ``epoch``."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        return perm[batch * self.global_batch_size : (batch + 1) * self.global_batch_size]

    def _sequences(self, rows: np.ndarray) -> dict[str, list]:
        """Token sequences (ids, completion mask) per field, for the global batch."""
        seqs: dict[str, list] = {}
        if self.paired:
            seqs["chosen"] = [self._join(self.tokens[r][0].prompt, self.tokens[r][0].completion) for r in rows]
            seqs["rejected"] = [self._join(self.tokens[r][1].prompt, self.tokens[r][1].completion) for r in rows]
            return seqs
        seqs[""] = [self._join(self._prompt(r), self.tokens[r][0].completion) for r in rows]
        if self.kl_pairing:
            partner = [(i + self.num_microbatches) % len(rows) for i in range(len(rows))]
            seqs["kl"] = [
                self._join(self._prompt(rows[i]), self.tokens[rows[j]][0].completion) for i, j in enumerate(partner)
            ]
        return seqs

    def _prompt(self, row: int) -> np.ndarray:
        """The prompt tokens, followed by the CSFT control token (<|good|>/<|bad|>) when enabled."""
        prompt = self.tokens[row][0].prompt
        if self.control_ids is None:
            return prompt
        return np.append(prompt, self.control_ids[0] if self.desirable[row] else self.control_ids[1]).astype(np.int32)

    def _join(self, prompt: np.ndarray, completion: np.ndarray):
        p, c = truncate(list(prompt), list(completion), self.cfg, self.tokenizer.bos_id)
        ids = np.asarray(p + c + [self.tokenizer.eos_id], np.int32)
        mask = np.arange(len(ids)) >= len(p)
        return ids, mask

    def make_batch(self, rows: np.ndarray) -> dict:
        """This process's slice of the global batch ``rows``, padded to the global bucket length
        (or packed, :meth:`make_packed_batch`)."""
        seqs = self._sequences(rows)
        if self.packing:
            return self.make_packed_batch(rows, seqs)
        longest = max(len(ids) for field in seqs.values() for ids, _ in field)
        length = min(-(-longest // self.bucket) * self.bucket, self.cfg.max_length)
        local = self._share(self.global_batch_size)
        per_process = local.stop - local.start
        out = {}
        for group in self.schema.sequences:
            ids = np.full((per_process, length), self.tokenizer.pad_id, np.int32)
            attention = np.zeros((per_process, length), np.int32)
            loss = np.zeros((per_process, length), bool)
            for k, (seq, mask) in enumerate(seqs[group][local]):
                ids[k, : len(seq)] = seq
                attention[k, : len(seq)] = 1
                loss[k, : len(seq)] = mask
            p = prefix(group)
            out[f"{p}input_ids"], out[f"{p}attention_mask"], out[f"{p}loss_mask"] = ids, attention, loss
        return {**out, **self._per_example(rows, local)}

    def _share(self, total: int) -> slice:
        """This process's contiguous share of ``total`` global rows (process p: rows p*total/P ...)."""
        per = total // self.process_count
        return slice(self.process_index * per, (self.process_index + 1) * per)

    def _per_example(self, rows: np.ndarray, local: slice) -> dict:
        """The per-example arrays of the schema for this process's examples of the global batch ``rows``."""
        fields = dict(self.schema.per_example)
        out = {}
        if "example_index" in fields:
            out["example_index"] = np.arange(self.global_batch_size, dtype=np.int32)[local]
        if "desirable" in fields:
            out["desirable"] = self.desirable[rows[local]]
        return out

    def packed_rows(self, needed: int) -> int:
        """Rows per microbatch for ``needed`` rows of packed sequences: rounded up to a multiple of
        q, where M * q divides over ``row_multiple`` and q >= 1/8 of the microbatch's examples, so a
        run compiles at most ~8 batch shapes (the padded path's length buckets, for rows)."""
        M = self.num_microbatches
        step = self.row_multiple // np.gcd(self.row_multiple, M)  # the least R with M * R divisible
        coarse = -(-self.global_batch_size // (M * PACKED_ROW_BUCKETS))
        q = -(-coarse // step) * step
        return -(-max(needed, 1) // q) * q

    def make_packed_batch(self, rows: np.ndarray, seqs: dict[str, list]) -> dict:
        """This process's slice of the global batch ``rows`` packed into rows of ``pack_length`` tokens."""
        length, M = self.pack_length, self.num_microbatches
        placed = {
            g: [pack_lengths([len(ids) for ids, _ in seqs[g][m::M]], length) for m in range(M)]
            for g in self.schema.sequences
        }
        needed = max(max(r for r, _ in per_mb) for per_mb in placed.values())
        per_mb_rows = self.packed_rows(needed)
        total = per_mb_rows * M
        if total % self.process_count:
            raise ValueError(
                f"{total} packed rows do not divide over {self.process_count} processes: "
                "row_multiple must be a multiple of the process count"
            )
        rows_local, local = self._share(total), self._share(self.global_batch_size)
        out = {}
        for group in self.schema.sequences:
            ids = np.full((total, length), self.tokenizer.pad_id, np.int32)
            segments = np.zeros((total, length), np.int32)
            loss = np.zeros((total, length), bool)
            unpack = np.full((self.global_batch_size, length), -1, np.int32)
            for m in range(M):
                for k, ((seq, mask), (row, offset)) in enumerate(zip(seqs[group][m::M], placed[group][m][1])):
                    r, end = row * M + m, offset + len(seq)
                    ids[r, offset:end] = seq
                    segments[r, offset:end] = k + 1
                    loss[r, offset:end] = mask
                    loss[r, offset] = False  # a segment's first token is never scored (as position 0 of a padded row)
                    unpack[k * M + m, : len(seq)] = row * length + offset + np.arange(len(seq))
            p = prefix(group)
            out[f"{p}input_ids"], out[f"{p}segment_ids"], out[f"{p}loss_mask"] = (
                ids[rows_local],
                segments[rows_local],
                loss[rows_local],
            )
            if group in self.schema.unpack:
                out[f"{p}unpack_index"] = unpack[local]
        return {**out, **self._per_example(rows, local)}


def pack_lengths(lengths: Sequence[int], capacity: int) -> tuple[int, list[tuple[int, int]]]:
    """First-fit decreasing bin packing: ``(rows used, [(row, offset)] per sequence in input order)``.

    Sequences are placed longest first (ties by input order), each into the first row whose free
    space holds it, at that row's current end; a new row is opened when none does."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[int] = []
    where: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise InputError(
                f"a sequence of {n} tokens does not fit a packed row of {capacity} (config.data.pack_length)"
            )
        row = next((r for r, f in enumerate(free) if f >= n), None)
        if row is None:
            row = len(free)
            free.append(capacity)
        where[i] = (row, capacity - free[row])
        free[row] -= n
    return len(free), where
