"""Atomic file writes and checksums: the one copy every layer uses."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    return _hash_file(path, hashlib.sha256)


def sha1_file(path: str | Path) -> str:
    return _hash_file(path, hashlib.sha1)


def _hash_file(path: str | Path, new: Callable[[], hashlib._Hash]) -> str:
    h = new()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces ``path`` in one step when the block ends.

    For writers that want a file name (``savefig``, ``torch.save``). The temporary file lives in
    the same directory (``os.replace`` is atomic only within one file system) and gets the usual
    umask-based mode. On any failure, KeyboardInterrupt included, it is removed and ``path`` is
    left as it was. ``suffix`` keeps the extension for writers that choose a format by it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    # mkstemp creates 0600; a model, checkpoint or result file should be readable as usual.
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) never sees a partial file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


@contextmanager
def open_atomic(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """An open file whose contents replace ``path`` in one step when the block ends."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
