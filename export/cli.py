"""Placeholder for `lstm-export` until issue 3 lands: it does nothing and says so."""

import sys


def main() -> None:
    print("lstm-export: not yet implemented (issue 3)", file=sys.stderr)
    sys.exit(2)
