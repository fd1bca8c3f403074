"""argparse value readers shared by the command-line tools (one message per kind of mistake)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1; :class:`argparse.ArgumentTypeError` otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
