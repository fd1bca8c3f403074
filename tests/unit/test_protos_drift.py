"""The committed generated code is exactly what ``python -m protos.generate`` makes now."""

from __future__ import annotations

from pathlib import Path

import pytest

from protos.generate import ROOT, generate


def test_generated_code_has_not_drifted(tmp_path: Path):
    pytest.importorskip("grpc_tools")
    fresh = generate(tmp_path)
    assert fresh, "nothing generated"
    for path in fresh:
        rel = path.relative_to(tmp_path)
        committed = ROOT / rel
        assert committed.exists(), f"{rel} is not committed; run `make protos`"
        assert path.read_bytes() == committed.read_bytes(), f"{rel} drifted; run `make protos`"


def test_generated_imports_are_package_absolute():
    text = (ROOT / "protos/lstmserve/v1/lstm_serve_pb2_grpc.py").read_text()
    assert "from protos.lstmserve.v1 import lstm_serve_pb2" in text
