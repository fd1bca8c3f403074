"""A model file that nothing vouches for: a warning at load, and --model-sha256 to pin it."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from export.graph import random_model
from server.settings import Settings, SettingsError
from tests.integration.conftest import ROOT, VOCAB, ServerThread, make_settings


def _loose_model(path: Path) -> str:
    onnx.save(random_model(VOCAB, hidden_size=24, num_layers=2, seed=11), str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_loose_model_loads_with_a_warning_that_it_is_unverified(tmp_path: Path, caplog):
    path = tmp_path / "loose.onnx"
    digest = _loose_model(path)
    caplog.set_level(logging.WARNING)
    srv = ServerThread(make_settings(path)).start()
    srv.stop()
    lines = [r.getMessage() for r in caplog.records if "not verified" in r.getMessage()]
    assert len(lines) == 1 and digest in lines[0] and "--model-sha256" in lines[0]

    # Pinned with the right hash: it loads, and nothing warns.
    caplog.clear()
    srv = ServerThread(make_settings(path, model_sha256=digest.upper())).start()
    srv.stop()
    assert not [r for r in caplog.records if "not verified" in r.getMessage()]


def test_a_flipped_bit_in_a_pinned_model_is_refused_in_one_line(tmp_path: Path):
    path = tmp_path / "loose.onnx"
    digest = _loose_model(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # in the weights: ONNX Runtime would load it and serve it
    path.write_bytes(bytes(data))
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "--model", str(path), "--model-sha256", digest],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={
            **os.environ,
            "LSTM_SERVE_PROVIDER": "cpu",
            "LSTM_SERVE_PORT": "0",
            "LSTM_SERVE_METRICS_PORT": "-1",
        },
    )
    assert proc.returncode == 1, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("lstm-serve: error:")]
    assert len(errors) == 1 and "SHA-256 mismatch" in errors[0], proc.stderr
    assert digest in errors[0] and "--model-sha256" in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"model": "m.onnx", "model_sha256": "abc"}, "64 hex"),
        ({"model_sha256": "a" * 64}, "--model"),
    ],
)
def test_model_sha256_is_checked(fields, needle):
    with pytest.raises(SettingsError) as e:
        Settings(**fields).validate()
    assert "--model-sha256" in str(e.value) and needle in str(e.value)
