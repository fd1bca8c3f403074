"""argparse value readers shared by the command-line tools (one message per kind of mistake)."""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence


def positive_int(text: str) -> int:
    """An integer >= 1; :class:`argparse.ArgumentTypeError` otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def missing_module(names: Sequence[str]) -> str | None:
    """The first of ``names`` that cannot be imported, without importing any (torch's import
    takes seconds); None when all are there. For the tools that need an extra installed."""
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):  # a finder that refuses it, a half-removed package
            return name
    return None
