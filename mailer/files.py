"""Files the commands write (exports, rejects, reports, previews): whole or not at all.

Each is written beside its final path (parent folders are made), so a failure to write shows
before any work is done, and then moved over it, atomically.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from mailer.errors import InputError

PUBLIC = 0o644  # a file of no reader's data, readable as any file the shell writes


@contextmanager
def replacing(path: Path, what: str) -> Iterator[TextIO]:
    """A UTF-8 text file that replaces ``path`` when the block ends normally, and never before.

    The file is its owner's only (0600): it may hold readers' data. ``what`` names the path
    in errors (``--out``, ``rejects file``).
    """
    with _beside(path, what) as fd, os.fdopen(fd, "w", encoding="utf-8", newline="") as file:
        yield file


def write_replacing(path: Path, what: str, data: bytes, *, mode: int = PUBLIC) -> None:
    """Replace ``path`` with ``data``, atomically (``replacing`` for bytes already made)."""
    try:
        with _beside(path, what) as fd, os.fdopen(fd, "wb") as file:
            os.fchmod(fd, mode)
            file.write(data)
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot write ({exc.strerror})") from None


@contextmanager
def _beside(path: Path, what: str) -> Iterator[int]:
    """A new file's descriptor beside ``path``, moved over it if the block ends normally."""
    if path.is_dir():  # found now, not when the work is done and the move fails
        raise InputError(f"{what} {path}: is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot write ({exc.strerror})") from None
    tmp = Path(name)
    try:
        yield fd
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
