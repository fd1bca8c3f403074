"""`lstm-export` as CI runs it: real processes, no terminal, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contract.model import validate
from tests.export_support import random_model, save_checkpoint

_SCRIPT = Path(sys.executable).with_name("lstm-export")
CMD = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "export.cli"]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CMD, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lstm-export: error: ") and needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli-ck")
    save_checkpoint(d / "small" / "checkpoint.pt", random_model("scratch", "onehot", 2, 16))
    save_checkpoint(d / "embed.pt", random_model("torch", "embedding", 1, 16, seed=1))
    return d


def test_single_export_writes_a_valid_model_and_report(checkpoints: Path, tmp_path: Path) -> None:
    out = tmp_path / "m" / "model.onnx"
    report_file = tmp_path / "report.json"
    proc = run(
        str(checkpoints / "small" / "checkpoint.pt"),
        "--out",
        str(out),
        "--int8",
        "--no-speed",
        "--report",
        str(report_file),
    )
    assert proc.returncode == 0, proc.stderr
    assert "parity ok" in proc.stdout and "int8: wrote" in proc.stdout
    assert "pass --corpus PATH" in proc.stdout  # says int8 perplexity was not checked
    assert validate(out).num_layers == 2
    assert validate(out.with_name("model.int8.onnx")).config["variant"] == "int8"
    report = json.loads(report_file.read_text())
    assert report["parity"]["passed"] and report["fp32"]["path"] == str(out)

    proc = run(str(checkpoints / "embed.pt"), "--out", str(tmp_path / "e.onnx"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"]["input_mode"] == "embedding"


def test_single_export_errors_are_one_line(checkpoints: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.onnx"
    proc = run(str(tmp_path / "absent.pt"), "--out", str(out))
    assert proc.returncode == 1
    assert_one_line_error(proc, "checkpoint not found")

    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes((checkpoints / "embed.pt").read_bytes()[:2000])
    proc = run(str(truncated), "--out", str(out))
    assert proc.returncode == 1
    assert_one_line_error(proc, "not a PyTorch checkpoint")

    proc = run(str(checkpoints / "embed.pt"), "--out", str(out), "--corpus", str(tmp_path / "no"))
    assert proc.returncode == 1
    assert_one_line_error(proc, "corpus not found")
    assert not out.exists()

    proc = run(str(checkpoints / "embed.pt"))
    assert proc.returncode == 2 and "--out" in proc.stderr and "Traceback" not in proc.stderr


def test_batch_cli_failures_json_and_idempotence(checkpoints: Path, tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    ck.mkdir()
    for src in (checkpoints / "small" / "checkpoint.pt", checkpoints / "embed.pt"):
        (ck / f"{src.parent.name if src.name == 'checkpoint.pt' else src.stem}.pt").write_bytes(
            src.read_bytes()
        )
    (ck / "broken.pt").write_bytes(b"\x00" * 64)
    repo = tmp_path / "repo"

    proc = run("batch", "--checkpoints", str(ck), "--out", str(repo), "--jobs", "2")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    fail_lines = [ln for ln in proc.stderr.splitlines() if "FAILED" in ln]
    assert len(fail_lines) == 1 and "broken" in fail_lines[0]
    assert "not a PyTorch checkpoint" in fail_lines[0]
    assert "\r" not in proc.stderr  # no progress bar without a terminal
    assert "2 exported, 0 unchanged, 1 failed" in proc.stdout
    for name in ("small", "embed"):  # the workers' report and stderr files are not left there
        assert sorted(p.name for p in (repo / name / "1").iterdir()) == ["model.onnx"]

    proc = run("batch", "--checkpoints", str(ck), "--out", str(repo), "--json")
    assert proc.returncode == 1
    summary = json.loads(proc.stdout)  # stdout is pure JSON for machines
    assert summary["counts"] == {"exported": 0, "unchanged": 2, "failed": 1}
    assert {r["name"]: r["action"] for r in summary["results"]} == {
        "broken": "unchanged",
        "embed": "unchanged",
        "small": "unchanged",
    }
    assert "FAILED broken" in proc.stderr and "unchanged since the last run" in proc.stderr

    (ck / "broken.pt").unlink()
    proc = run("batch", "--checkpoints", str(ck / "*.pt"), "--out", str(repo))
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do: all 2 checkpoint(s) unchanged" in proc.stdout

    proc = run("batch", "--checkpoints", str(tmp_path / "none"), "--out", str(repo))
    assert proc.returncode == 2
    assert_one_line_error(proc, "no such checkpoint file or directory")


@pytest.mark.parametrize(("sig", "jobs"), [(signal.SIGINT, "1"), (signal.SIGTERM, "2")])
def test_interrupted_batch_leaves_nothing_partial(
    tmp_path: Path, sig: signal.Signals, jobs: str
) -> None:
    ck = tmp_path / "ck"
    # Enough checkpoints that the signal, sent when the first export is under way, always
    # finds work left (with fewer, a busy machine can finish the batch before it lands).
    n = 8
    for i in range(n):
        save_checkpoint(
            ck / f"m{i}.pt", random_model("scratch", "onehot", 2, 64, seed=i, scale=0.1)
        )
    repo = tmp_path / "repo"
    proc = subprocess.Popen(
        [*CMD, "batch", "--checkpoints", str(ck), "--out", str(repo), "--jobs", jobs],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A test run started in the background by a non-interactive shell inherits SIGINT
        # ignored, and so would the child (then Ctrl-C is meant not to reach it): give it the
        # disposition a terminal's foreground job has.
        preexec_fn=_default_sigint,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(repo.glob("*/.tmp-*")):  # an export is under way
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no export started"
            time.sleep(0.01)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert len(json.loads((repo / "manifest.json").read_text())["models"]) < n
    assert "Traceback" not in stderr
    assert "lstm-export: error: interrupted" in stderr
    assert not list(repo.rglob(".tmp-*")) and not list(repo.rglob("*.tmp"))
    manifest = json.loads((repo / "manifest.json").read_text())
    for name, entry in manifest["models"].items():  # whatever finished is complete and valid
        assert entry["status"] == "ok"
        validate(repo / entry["outputs"]["fp32"]["path"])
        assert name in {f"m{i}" for i in range(n)}
    onnx_files = {str(p.relative_to(repo)) for p in repo.rglob("*.onnx")}
    listed = {e["outputs"]["fp32"]["path"] for e in manifest["models"].values()}
    assert onnx_files == listed


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
