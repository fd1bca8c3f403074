"""The perf_analyzer command README.md documents is the one benchmark section 13 runs.

perf_analyzer itself (``.pa/``) is not on a fresh machine, so this runs nothing: it reads both
READMEs and the shipped data file, and captures the command :func:`benchmarks.perf_analyzer.run`
would start.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from typing import Any

import onnx
import pytest

from benchmarks import perf_analyzer as pa

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "server" / "model_repo" / "timemachine" / "1" / "model.onnx"


def _documented(readme: Path) -> list[str]:
    lines = [
        ln.strip() for ln in readme.read_text().splitlines() if ln.startswith("perf_analyzer ")
    ]
    assert lines, f"{readme.name} shows no perf_analyzer command"
    return lines


@pytest.mark.parametrize("readme", ["README.md", "benchmarks/README.md"])
def test_readme_shows_the_harness_command(readme: str) -> None:
    for line in _documented(ROOT / readme):
        assert shlex.split(line) == pa.command(), line
        assert line == pa.documented_command()


def test_data_file_is_valid_for_the_bundled_model() -> None:
    model = onnx.load(str(BUNDLED), load_external_data=False)
    vocab = json.loads({p.key: p.value for p in model.metadata_props}["lstm_serve.vocab"])
    data = json.loads((ROOT / pa.DATA).read_text())
    assert list(data) == ["data"] and len(data["data"]) == 1  # one stream
    steps = data["data"][0]
    assert len(steps) == pa.SEQUENCE_LENGTH == 20
    for step in steps:
        assert list(step) == ["tokens"]  # only `tokens`: the server takes one of tokens/text
        assert step["tokens"]["shape"] == [1, 1]
        assert len(step["tokens"]["content"]) == 1
    text = "".join(vocab[s["tokens"]["content"][0]] for s in steps)
    assert text == "the time traveller f"
    # The harness uses the shipped file for the bundled model, a generated one below its ids.
    assert pa.write_data(ROOT / "unused.json", len(vocab)) == pa.DATA


def test_write_data_falls_back_for_a_small_vocabulary(tmp_path: Path) -> None:
    out = pa.write_data(tmp_path / "tokens.json", 5)
    assert out == tmp_path / "tokens.json"
    steps = json.loads(out.read_text())["data"][0]
    assert len(steps) == pa.SEQUENCE_LENGTH
    assert all(0 < s["tokens"]["content"][0] < 5 for s in steps)


def test_section_13_runs_the_documented_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}

    def fake_run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        seen["cmd"], seen["cwd"] = cmd, kw.get("cwd")
        out = Path(cmd[cmd.index("-f") + 1])
        out.write_text(
            "Concurrency,Inferences/Second,p50 latency,p90 latency,p99 latency,"
            "Server Compute Infer\n16,1000.0,1500,2000,3000,300\n"
        )
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(pa.subprocess, "run", fake_run)
    row = pa.run(
        tmp_path / "perf_analyzer", {}, pa.DOC_TARGET, pa.DOC_MODEL, pa.DOC_CONCURRENCY, pa.DATA
    )
    cmd = seen["cmd"]
    assert seen["cwd"] == pa.ROOT  # the relative data path resolves as documented
    documented = pa.command()
    assert cmd[1 : len(documented)] == documented[1:]
    assert cmd[len(documented) :][:-1] == [
        "-p",
        "5000",
        "--stability-percentage",
        str(pa.STABILITY_PERCENT),
        "-f",
    ]
    assert row["command"].startswith(pa.documented_command().removeprefix("perf_analyzer "))
    assert row["infer_per_s"] == 1000.0 and row["p50_ms"] == 1.5
    assert row["server_compute_infer_us"] == 300.0
