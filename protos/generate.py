"""Regenerate the committed gRPC code: ``python -m protos.generate`` (``make protos``).

Runs ``grpc_tools.protoc`` with ``-I .`` from the repository root so the generated modules
import each other as ``protos.lstmserve.v1...``. ``--out DIR`` writes elsewhere (the drift test
regenerates into a temporary folder and compares).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_FILES = ("protos/lstmserve/v1/lstm_serve.proto", "protos/inference/grpc_service.proto")


def generate(out: Path) -> list[Path]:
    """Write ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` under ``out``; return them."""
    from grpc_tools import protoc  # dev extra only: the server never needs it

    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        "-I",
        str(ROOT),
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(ROOT / p) for p in PROTO_FILES),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    written: list[Path] = []
    for proto in PROTO_FILES:
        stem = out / proto.removesuffix(".proto")
        written += [Path(f"{stem}{suffix}") for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repo)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
