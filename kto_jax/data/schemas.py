"""Feedback-file schemas: detection from a row's columns, the column map, normalization.

Schemas (``SCHEMAS``), detected from a row's columns after the column map
(``config.data.columns``, e.g. ``"prompt=question,completion=answer,label=thumbs_up"``,
canonical=file column), or named (``config.data.schema``):

* ``unpaired_preference`` (TRL): ``{prompt, completion, label}``, unary.
* ``preference`` (TRL): ``{prompt, chosen, rejected}``, paired.
* ``implicit_prompt_preference`` (TRL): ``{chosen, rejected}``, paired; the prompt is their
  common prefix (``split_implicit``).
* ``halos_binary_feedback`` (ContextualAI/HALOs main, ``train/data.py:get_feedback``, the
  JSON list ``train/label.py`` writes): ``{"prompt_id", "prompt": [messages], "output":
  [{"role": "assistant", "content"}], "label": 1|0, "reward", "type": "binary_feedback"}``,
  optional ``"split"``; unary, ``desirable = label``.
* ``halos_pairwise_feedback`` (same files): ``{"prompt_id", "prompt", "output_A", "output_B",
  "label", "reward_A", "reward_B", "reward_difference", "type": "pairwise_feedback"}``,
  optional ``"split"``; paired: ``label == 1`` means A is preferred (chosen = A), else B.
  HALOs rows are recognized by their ``type`` (or, without one, by their columns). HALOs
  takes ``bool(label)`` (binary) and ``label == 1`` (pairwise) of any value; here a label
  other than those of ``parse_label`` is a bad record.

Detection order: a HALOs ``type``; else ``prompt`` + ``chosen`` + ``rejected`` is
``preference``, ``chosen`` + ``rejected`` is ``implicit_prompt_preference``, ``prompt`` +
``completion`` + ``label`` is ``unpaired_preference``, then the HALOs columns. Other columns
are ignored.

Each TRL schema comes in standard form (strings) or conversational form (lists of
``{"role": "system"|"user"|"assistant", "content"}`` messages). A prompt string is one user
turn; a prompt list may hold system messages and several turns, and must end with a user
message. A completion / chosen / rejected / output is a string or a list of exactly one
assistant message. Labels are bools, 0/1, or (from CSV) the strings true/false/1/0.
Empty (whitespace-only) text is a bad record naming the field; texts are otherwise kept
as they are (a standard-form completion keeps its leading space).
"""

from __future__ import annotations

from kto_jax.errors import InputError

ROLES = ("system", "user", "assistant")  # the roles of a conversation's turns


class BadRecord(InputError):
    """A source record that does not have the expected structure."""


UNPAIRED, PREFERENCE, IMPLICIT = "unpaired_preference", "preference", "implicit_prompt_preference"
HALOS_BINARY, HALOS_PAIRWISE = "halos_binary_feedback", "halos_pairwise_feedback"
# name -> (required columns, kind)
SCHEMAS = {
    UNPAIRED: (("prompt", "completion", "label"), "unary"),
    PREFERENCE: (("prompt", "chosen", "rejected"), "paired"),
    IMPLICIT: (("chosen", "rejected"), "paired"),
    HALOS_BINARY: (("prompt", "output", "label"), "unary"),
    HALOS_PAIRWISE: (("prompt", "output_A", "output_B", "label"), "paired"),
}
CANONICAL = ("prompt", "completion", "label", "chosen", "rejected", "output", "output_A", "output_B", "type", "split")
HALOS_TYPES = {"binary_feedback": HALOS_BINARY, "pairwise_feedback": HALOS_PAIRWISE}
HALOS_OTHER_TYPES = ("sample", "scalar_feedback")  # HALOs' other file types: not feedback this source reads


class FileFormatError(InputError):
    """A source file (not one record) that cannot be used: never skipped by skip_bad_records."""


def parse_columns(spec: str) -> dict[str, str]:
    """``"prompt=question,label=thumbs_up"`` -> ``{"prompt": "question", "label": "thumbs_up"}``."""
    columns: dict[str, str] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        canonical, eq, column = (s.strip() for s in part.partition("="))
        if not eq or not canonical or not column:
            raise InputError(f"config.data.columns={spec!r}: {part!r} should be canonical=file_column")
        if canonical not in CANONICAL:
            raise InputError(
                f"config.data.columns={spec!r}: {canonical!r} is no canonical column; known: {', '.join(CANONICAL)}"
            )
        if canonical in columns:
            raise InputError(f"config.data.columns={spec!r}: {canonical!r} is mapped twice")
        columns[canonical] = column
    return columns


def apply_columns(row: dict, columns: dict[str, str]) -> dict:
    """``row`` with each mapped file column renamed to its canonical name (absent ones left out)."""
    if not columns:
        return row
    sources = set(columns.values())
    out = {k: v for k, v in row.items() if k not in sources}
    out.update({canonical: row[column] for canonical, column in columns.items() if column in row})
    return out


def detect_schema(row: dict) -> str | None:
    """The schema of a (column-mapped) row, None when its columns match none."""
    kind = row.get("type")
    if kind in HALOS_TYPES:
        return HALOS_TYPES[kind]
    if kind in HALOS_OTHER_TYPES:
        raise BadRecord(f"HALOs {kind!r} rows are not feedback; supported HALOs types: {', '.join(HALOS_TYPES)}")
    for name in (PREFERENCE, IMPLICIT, UNPAIRED, HALOS_PAIRWISE, HALOS_BINARY):
        if all(c in row for c in SCHEMAS[name][0]):
            return name
    return None


def check_columns(row: dict, schema: str, path: str, columns: dict[str, str], raw_columns) -> str:
    """The schema of a file's first row (``schema`` or, for "auto", detected); a missing
    column is a FileFormatError naming the file, the column, the columns present and the fix."""
    if schema != "auto" and schema not in SCHEMAS:
        raise InputError(f"unknown schema {schema!r} (config.data.schema); known: auto, {', '.join(SCHEMAS)}")
    closest = ""
    if schema == "auto":
        try:
            found = detect_schema(row)
        except BadRecord as e:
            raise FileFormatError(f"{path}: {e}") from None
        if found is not None:
            return found
        # the closest schema: the largest share of its columns present (ties: SCHEMAS order)
        schema = max(SCHEMAS, key=lambda s: sum(c in row for c in SCHEMAS[s][0]) / len(SCHEMAS[s][0]))
        closest = " (config.data.schema=auto: the closest match)"
    missing = [c for c in SCHEMAS[schema][0] if c not in row]
    if missing:
        mapped = [f"{c} (mapped to {columns[c]!r})" for c in missing if c in columns]
        raise FileFormatError(
            f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} for schema "
            f"{schema}{closest}; columns present: {', '.join(map(repr, raw_columns))}"
            f"{'; config.data.columns maps to columns the file lacks: ' + ', '.join(mapped) if mapped else ''}. "
            f'Fix: map the file\'s columns, e.g. config.data.columns="{missing[0]}=<file column>", or set '
            f"config.data.schema (one of {', '.join(SCHEMAS)})"
        )
    return schema


def schema_kind(schema: str) -> str:
    return SCHEMAS[schema][1]


def row_form(row: dict, schema: str) -> str:
    """ "conversational" when any of the schema's text columns holds a message list, else "standard"."""
    return "conversational" if any(isinstance(row.get(c), list) for c in SCHEMAS[schema][0]) else "standard"


def _field(row: dict, field: str, names: dict):
    if field not in row:
        raise BadRecord(f"missing field {names.get(field, repr(field))}")
    value = row[field]
    if value is None:
        raise BadRecord(f"field {names.get(field, repr(field))} is null")
    return value


def _messages(value, field: str) -> list[tuple[str, str]]:
    out = []
    for i, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise BadRecord(
                f'field {field}, message {i}: expected {{"role": str, "content": str}}, got {str(message)[:80]}'
            )
        if message["role"] not in ROLES:
            raise BadRecord(f"field {field}, message {i}: role {message['role']!r} is not one of {', '.join(ROLES)}")
        out.append((message["role"], message["content"]))
    return out


def _prompt(value, field: str) -> dict:
    """A prompt string (one user turn) or message list as record turns."""
    if isinstance(value, str):
        turns = [("user", value)]
    elif isinstance(value, list):
        turns = _messages(value, field)
    else:
        raise BadRecord(f"field {field} should be a string or a list of messages, got {type(value).__name__}")
    if not turns:
        raise BadRecord(f"field {field} is empty (no message)")
    for i, (_, content) in enumerate(turns):
        if not content.strip():
            raise BadRecord(f"field {field}{f', message {i}' if len(turns) > 1 else ''} has empty content")
    if turns[-1][0] != "user":
        raise BadRecord(f"field {field} should end with a user message, ends with {turns[-1][0]!r}")
    return {"role": [r for r, _ in turns], "content": [c for _, c in turns]}


def _reply(value, field: str) -> str:
    """A completion: a string, or a list of exactly one assistant message."""
    if isinstance(value, list):
        messages = _messages(value, field)
        if len(messages) != 1 or messages[0][0] != "assistant":
            raise BadRecord(f"field {field} should be one assistant message, got roles {[r for r, _ in messages]}")
        value = messages[0][1]
    elif not isinstance(value, str):
        raise BadRecord(
            f"field {field} should be a string or a list of one assistant message, got {type(value).__name__}"
        )
    if not value.strip():
        raise BadRecord(f"field {field} is empty")
    return value


def parse_label(value, field: str = "'label'") -> bool:
    """True/False from a bool, 0/1, or the strings true/false/1/0 (any case); else a BadRecord."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise BadRecord(f"unknown label value {value!r} in field {field} (expected true/false or 1/0)")


def split_implicit(chosen, rejected, names: dict | None = None) -> tuple:
    """(prompt, chosen reply, rejected reply) of an implicit-prompt pair.

    Conversational (message lists): the prompt is their longest common prefix of messages,
    and what remains of each must be exactly one assistant message.

    Standard (strings), TRL's ``extract_prompt`` rule (huggingface/trl, trl/data_utils.py):
    ``idx`` is the first character index, below the shorter length, where the two differ;
    if the character before it (in chosen) is a space, ``idx`` steps back by one, so the
    space starts both completions; the prompt is ``chosen[:idx]`` and the completions are
    ``chosen[idx:]`` / ``rejected[idx:]``. When they do not differ within the shorter length
    TRL's loop ends on its last index without breaking, so ``idx`` is the shorter length
    minus one (reproduced). A difference at the first character leaves no prompt: bad
    record (TRL would compare ``chosen[-1]``).
    """
    names = names or {}
    c_name, r_name = names.get("chosen", "'chosen'"), names.get("rejected", "'rejected'")
    if isinstance(chosen, list) and isinstance(rejected, list):
        c, r = _messages(chosen, c_name), _messages(rejected, r_name)
        k = 0
        while k < min(len(c), len(r)) and c[k] == r[k]:
            k += 1
        if len(c) - k != 1 or len(r) - k != 1:
            raise BadRecord(
                f"fields {c_name} and {r_name} should differ only in their last (assistant) message "
                f"(they share {k} of {len(c)} / {len(r)} messages)"
            )
        prompt = [{"role": role, "content": content} for role, content in c[:k]]
        return (
            _prompt(prompt, "prompt (the messages chosen and rejected share)"),
            _reply(chosen[k:], c_name),
            _reply(rejected[k:], r_name),
        )
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        raise BadRecord(
            f"fields {c_name} and {r_name} should both be strings or both message lists, "
            f"got {type(chosen).__name__} and {type(rejected).__name__}"
        )
    n = min(len(chosen), len(rejected))
    idx = n - 1
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i - 1 if i > 0 and chosen[i - 1] == " " else i
            break
    if idx <= 0 or not chosen[:idx].strip():
        raise BadRecord(f"fields {c_name} and {r_name} share no prompt (they differ from their first character)")
    return (
        _prompt(chosen[:idx], "prompt (the text chosen and rejected share)"),
        _reply(chosen[idx:], c_name),
        _reply(rejected[idx:], r_name),
    )


def normalize(row: dict, schema: str, columns: dict[str, str] | None = None) -> dict:
    """A (column-mapped) row as a record without id: unary ``{prompt, completion, desirable}``
    or paired ``{prompt, chosen, rejected}``; a bad row is a BadRecord naming the field (and
    the file column it was mapped from)."""
    names = {c: repr(c) + (f" (column {col!r})" if col != c else "") for c, col in (columns or {}).items()}

    def get(field):
        return _field(row, field, names)

    def name(field):
        return names.get(field, repr(field))

    if schema == UNPAIRED:
        return {
            "prompt": _prompt(get("prompt"), name("prompt")),
            "completion": _reply(get("completion"), name("completion")),
            "desirable": parse_label(get("label"), name("label")),
        }
    if schema == HALOS_BINARY:
        return {
            "prompt": _prompt(get("prompt"), name("prompt")),
            "completion": _reply(get("output"), name("output")),
            "desirable": parse_label(get("label"), name("label")),
        }
    if schema == PREFERENCE:
        return {
            "prompt": _prompt(get("prompt"), name("prompt")),
            "chosen": _reply(get("chosen"), name("chosen")),
            "rejected": _reply(get("rejected"), name("rejected")),
        }
    if schema == IMPLICIT:
        prompt, chosen, rejected = split_implicit(get("chosen"), get("rejected"), names)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if schema == HALOS_PAIRWISE:
        a, b = _reply(get("output_A"), name("output_A")), _reply(get("output_B"), name("output_B"))
        a_wins = parse_label(get("label"), name("label"))
        return {
            "prompt": _prompt(get("prompt"), name("prompt")),
            "chosen": a if a_wins else b,
            "rejected": b if a_wins else a,
        }
    raise ValueError(f"unknown schema {schema!r}; known: {', '.join(SCHEMAS)}")
