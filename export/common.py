"""Small pieces shared by the exporter, the repository pipeline and the CLI (no torch, no onnx)."""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import metadata


class ExportError(RuntimeError):
    """An export step failed; the message is one line a user can act on."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message, prefixed by its type when it says nothing."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return first or type(exc).__name__


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
