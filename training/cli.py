"""Placeholder for `lstm-train` until issue 2 lands: it does nothing and says so."""

import sys


def main() -> None:
    print("lstm-train: not yet implemented (issue 2)", file=sys.stderr)
    sys.exit(2)
