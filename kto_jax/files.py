"""Atomic writes for every file a run owns: a reader (or a rerun after ``kill -9``) sees the old
file or the new one, never half of one.

    write_atomic(path, text_or_bytes)   # temporary name in the same folder, fsync, rename
    write_json(path, obj)
    append_lines(path, lines)           # whole lines, flushed and fsynced (JSONL logs)
    read_jsonl(path)                    # rows; a torn last line (a killed append) is dropped and counted

The rename is atomic because the temporary file is in the target's folder (same file system);
the folder is fsynced too, so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator

from kto_jax.errors import InputError


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path next to ``path``; on a clean exit it is fsynced and renamed onto ``path``
    (on an exception it is removed and ``path`` is untouched)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private; the file others read is not
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_folder(folder)


def umask() -> int:
    """The process's file-creation mask (read by setting it and back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: str) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` (text is UTF-8) atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)


def write_json(path: str, obj, indent: int | None = 2) -> None:
    write_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def append_lines(path: str, lines: Iterable[str]) -> None:
    """Append whole lines (each ending in a newline) and fsync."""
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(line if line.endswith("\n") else line + "\n" for line in lines)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str) -> tuple[list[dict], int]:
    """``(rows, torn)``: the file's JSON lines, and 1 if its last line is a torn write (no newline
    and not JSON: a process killed mid-append), which is left out. A bad line elsewhere is an
    error naming the file and line."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    rows, torn = [], 0
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):  # the last line, without its newline
                torn = 1
                continue
            raise InputError(
                f"{path}, line {i}: not JSON ({e}); the file was edited or damaged: fix or remove that line"
            ) from None
    return rows, torn
