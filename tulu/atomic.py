"""Files other processes read are written whole or not at all.

Every writer here does the same five things: make a temporary file with a name of its own in the
target's folder (``.<name>.<pid>-<random>.tmp``: hidden, unique per writer, never the target),
write it, flush and fsync it, ``os.replace`` it onto the target, and fsync the folder so the
rename itself survives a crash. A reader sees the old file or the new one, never a part. On an
error the temporary file is removed and the target is left as it was.

``write_bytes_atomic``, ``write_text_atomic`` and ``write_json_atomic`` cover whole contents;
``open_atomic`` streams into a file object, and ``atomic_path`` hands out the temporary path for a
library that writes by file name (matplotlib's ``savefig``).

This module imports nothing from tulu: every layer may use it.
"""
from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["atomic_path", "fsync_dir", "is_temp_name", "open_atomic", "write_bytes_atomic",
           "write_json_atomic", "write_text_atomic"]

TEMP_SUFFIX = ".tmp"


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_temp_name(name: str, target: str | None = None) -> bool:
    """Whether ``name`` is a temporary file of this module (for ``target``'s name, if given)."""
    prefix = f".{target}." if target is not None else "."
    return name.startswith(prefix) and name.endswith(TEMP_SUFFIX)


def _make_temp(path: Path) -> Path:
    """Create (exclusively, mode 0666 less the umask, as a plain open would) a fresh temp file."""
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


def _commit(tmp: Path, path: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextmanager
def atomic_path(path: str | os.PathLike, *, mkdir: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends it becomes ``path``.

    The temporary file already exists (empty) when the block starts, so an unwritable folder fails
    before any work is done. Whatever the block raises, the temporary file is removed."""
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_temp(path)
    try:
        yield tmp
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def open_atomic(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8",
                mkdir: bool = True) -> Iterator[IO[Any]]:
    """``open`` for writing whose file appears at ``path`` only when the block ends without error."""
    if mode not in ("w", "wb"):
        raise ValueError(f"open_atomic writes a whole new file: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(path, mkdir=mkdir) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, mkdir: bool = True) -> Path:
    with open_atomic(path, "wb", mkdir=mkdir) as f:
        f.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, *, encoding: str = "utf-8",
                      mkdir: bool = True) -> Path:
    with open_atomic(path, "w", encoding=encoding, mkdir=mkdir) as f:
        f.write(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int | None = 1,
                      mkdir: bool = True) -> Path:
    """``data`` as JSON (``indent=1``; what JSON cannot hold is written as ``str``)."""
    return write_text_atomic(path, json.dumps(data, indent=indent, default=str), mkdir=mkdir)
