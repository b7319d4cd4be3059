"""Atomic file replacement: readers never see half a file, a crash leaves the old one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(
    path: str | Path, write: Callable[[BinaryIO], object], *, durable: bool = False
) -> Path:
    """Replace ``path`` with what ``write`` puts into a binary file object.

    The bytes go to a temporary file in the same directory, which is then renamed over
    ``path`` (``os.replace`` is atomic on POSIX and Windows). With ``durable`` the file
    and the rename are fsync'ed, so the new content survives a power loss (privacy
    ledgers, checkpoints). On any error the temporary file is removed and the error
    propagates; ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself
        finally:
            os.close(dir_fd)
    return path


def write_text_atomically(path: str | Path, text: str, *, durable: bool = False) -> Path:
    """:func:`write_atomically` for UTF-8 text (newlines written as given)."""
    data = text.encode()
    return write_atomically(path, lambda f: f.write(data), durable=durable)
