"""Placeholder for `lstm-serve` until issue 4 lands: it does nothing and says so."""

import sys


def main() -> None:
    print("lstm-serve: not yet implemented (issue 4)", file=sys.stderr)
    sys.exit(2)
