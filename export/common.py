"""Small pieces shared by the exporter, the batch pipeline and the CLI (no torch, no onnx)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path


class ExportError(RuntimeError):
    """An export step failed; the message is one line a user can act on."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message, prefixed by its type when it says nothing."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return first or type(exc).__name__


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) never sees a partial file.

    The bytes go to a temporary file in the same directory (``os.replace`` is atomic only within
    one file system), are fsynced, then replace ``path`` in one step. On any failure, including
    KeyboardInterrupt, the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; a model or manifest should get the usual umask-based mode.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str | None]:
    """Versions recorded in every exported model and manifest (found without importing torch)."""
    ort = _version("onnxruntime") or _version("onnxruntime-gpu")
    return {
        "lstm_serve": _version("lstm-serve"),
        "onnx": _version("onnx"),
        "onnxruntime": ort,
        "torch": _version("torch"),
    }
