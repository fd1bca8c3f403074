"""The command lines: ``lstm-client`` against a real server, ``lstm-serve`` start-up errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from protos.lstmserve.v1 import lstm_serve_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


def _cli(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_client_generate_prints_only_the_continuation(shared_server, stub_for):
    stub = stub_for(shared_server)
    want = "".join(m.text for m in stub.Generate(pb.GenerateRequest(prompt="time", max_tokens=40)))
    out = _cli(
        "server.client",
        "generate",
        "--target",
        shared_server.target,
        "--prompt",
        "time",
        "--max-tokens",
        "40",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == want + "\n"
    seeded = [
        _cli(
            "server.client",
            "generate",
            "--target",
            shared_server.target,
            "--prompt",
            "time",
            "--max-tokens",
            "30",
            "--temperature",
            "0.9",
            "--top-k",
            "5",
            "--top-p",
            "0.9",
            "--seed",
            "4",
        ).stdout
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1] and len(seeded[0]) == 31


def test_client_step_health_info_and_errors(shared_server):
    t = shared_server.target
    out = _cli("server.client", "step", "--target", t, "--text", "the time", "--top-k", "3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("session ") and lines[0].endswith("steps=8")
    assert len(lines) == 4
    health = _cli("server.client", "health", "--target", t)
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING")
    info = _cli("server.client", "info", "--target", t)
    assert info.returncode == 0 and "CPUExecutionProvider" in info.stdout
    bad = _cli("server.client", "step", "--target", t, "--session", "f" * 32, "--text", "a")
    assert bad.returncode == 1
    assert bad.stderr.startswith("lstm-client: error: NOT_FOUND: ")
    assert "Traceback" not in bad.stderr
    gone = _cli("server.client", "health", "--target", "127.0.0.1:1", "--timeout", "2")
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr


def test_serve_reports_a_missing_model_in_one_line(tmp_path: Path):
    out = _cli("server.cli", "--port", "0", env={"LSTM_SERVE_MODEL": str(tmp_path / "no.onnx")})
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0
    assert "model not found" in out.stderr and "Traceback" not in out.stderr
    bad = _cli("server.cli", "--provider", "tpu")
    assert bad.returncode == 2 and "--provider" in bad.stderr
