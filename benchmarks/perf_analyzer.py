"""Triton's ``perf_analyzer`` against the server's KServe v2 gRPC endpoint, in sequence mode.

Installed as ../shared/notes/perf_analyzer.md found it works on this machine (Debian 12,
glibc 2.36, no GPU): its own virtual environment ``.pa/`` (its grpcio/protobuf pins differ
from ours) with ``tritonclient[grpc]==2.51.0`` (the newest wheel whose bundled binary runs on
glibc 2.36) and ``nvidia-cuda-runtime-cu12`` (only for ``libcudart.so.12``), plus the Debian
package ``libb64-0d``; the binary runs with the CUDA runtime's folder on ``LD_LIBRARY_PATH``.

perf_analyzer enters sequence mode because the model's configuration has a
``sequence_batching`` block: each of its ``--concurrency-range`` contexts runs sequences of
requests (start, continue..., end) over ``ModelStreamInfer``
(``--streaming``), one request in flight per sequence.

The command is the one README.md documents for a Triton user (:func:`command`, checked by
tests/integration/test_perf_analyzer_command.py): ``tokens`` is ``[1, -1]`` in the model's
metadata (a step takes 1..max_prompt_tokens tokens), so perf_analyzer alone stops at "input
tokens contains dynamic shape", and ``--shape tokens:1,1`` alone is not enough either: it then
fills both optional inputs (``tokens`` and ``text``) with random data, which the server refuses
("expected one input, 'tokens' or 'text', got 2"; random int64 ids are out of the vocabulary
too). The shipped data file :data:`DATA` gives the shape and the data: one stream of 20 steps,
each a ``tokens`` tensor of shape ``[1, 1]`` holding one id of the bundled model's vocabulary
(the text "the time traveller f"). With no ``--sequence-length`` every sequence is exactly
those 20 steps (start, 18 continues, end); ``--sequence-length`` would vary it by ±20%.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc

from protos.lstmserve.v1 import lstm_serve_pb2 as pb
from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc

from .common import ROOT, SectionSkipped

VENV = ROOT / ".pa"
TRITONCLIENT = "tritonclient[grpc]==2.51.0"
CUDA_RUNTIME = "nvidia-cuda-runtime-cu12"
LIBB64 = "libb64-0d"
# The shipped --input-data file, named relative to the repository root (perf_analyzer runs there,
# so the command line recorded is the documented one).
DATA = Path("benchmarks") / "perf_analyzer_tokens.json"
# What the documented command is shown with: lstm-serve's default port, the bundled model.
DOC_MODEL = "timemachine"
DOC_TARGET = "127.0.0.1:50051"
DOC_CONCURRENCY = 16


def _steps(data: Path) -> list[dict[str, Any]]:
    """The one stream of a perf_analyzer ``--input-data`` file."""
    streams = json.loads((ROOT / data).read_text())["data"]
    return list(streams[0])


# Requests per sequence: the steps of the data file (perf_analyzer's default when the file is
# given and --sequence-length is not).
SEQUENCE_LENGTH = len(_steps(DATA))
# A 2-core machine runs the server and perf_analyzer side by side: its default 10% spread
# between three windows is rarely met there, so 25% (perf_analyzer still needs three windows
# in a row within it).
STABILITY_PERCENT = 25


def _libb64_present() -> bool:
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "libb64.so.0d" in out.stdout


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    print(f"[bench]   $ {' '.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _last_line(proc: subprocess.CompletedProcess[str]) -> str:
    return ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1]


def ensure() -> tuple[Path, dict[str, str]]:
    """The perf_analyzer binary and the environment to run it in, installing what is missing
    (pip into ``.pa/``; ``libb64-0d`` with apt-get, as root only). Raises
    :class:`SectionSkipped` with the reason when it cannot be made to run."""
    binary = VENV / "bin" / "perf_analyzer"
    if not binary.exists():
        if not (VENV / "bin" / "pip").exists():
            proc = _run([sys.executable, "-m", "venv", str(VENV)], 300)
            if proc.returncode != 0:
                raise SectionSkipped(f"cannot create {VENV}: {_last_line(proc)}")
        proc = _run([str(VENV / "bin" / "pip"), "install", "-q", TRITONCLIENT, CUDA_RUNTIME], 1800)
        if proc.returncode != 0 or not binary.exists():
            raise SectionSkipped(f"pip install {TRITONCLIENT} failed: {_last_line(proc)}")
    if not _libb64_present():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise SectionSkipped(
                f"perf_analyzer needs libb64.so.0d: install the Debian package {LIBB64} as root"
            )
        proc = _run(["apt-get", "install", "-y", "-q", LIBB64], 600)
        if proc.returncode != 0:
            _run(["apt-get", "update", "-q"], 600)
            proc = _run(["apt-get", "install", "-y", "-q", LIBB64], 600)
        if proc.returncode != 0:
            raise SectionSkipped(f"apt-get install {LIBB64} failed: {_last_line(proc)}")
    libs = glob.glob(str(VENV / "lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
    if not libs:
        raise SectionSkipped(f"{CUDA_RUNTIME} is not in {VENV} (libcudart.so.12 missing)")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([libs[0], *filter(None, [env.get("LD_LIBRARY_PATH")])])
    proc = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=60, env=env
    )
    if proc.returncode != 0:
        raise SectionSkipped(f"perf_analyzer does not run here: {_last_line(proc)}")
    return binary, env


def model_name(target: str) -> str:
    """The served model's name (what perf_analyzer's ``-m`` takes)."""
    with grpc.insecure_channel(target) as ch:
        return str(pb_grpc.LstmServeServiceStub(ch).GetModelInfo(pb.GetModelInfoRequest()).name)


def command(
    model: str = DOC_MODEL,
    target: str = DOC_TARGET,
    concurrency: int = DOC_CONCURRENCY,
    data: Path = DATA,
) -> list[str]:
    """The perf_analyzer command a Triton user types (README.md, benchmarks/README.md), run from
    the repository root; section 13 runs it at each concurrency, adding only its measurement
    window, stability percentage and CSV output (:func:`run`)."""
    return [
        "perf_analyzer",
        "-m",
        model,
        "-i",
        "grpc",
        "-u",
        target,
        "--streaming",
        "--input-data",
        str(data),
        "--concurrency-range",
        str(concurrency),
    ]


def documented_command() -> str:
    """:func:`command` as one shell line, the way the READMEs show it."""
    return shlex.join(command())


def write_data(path: Path, vocab: int, seed: int = 0) -> Path:
    """The ``--input-data`` file for a model of ``vocab`` tokens: the shipped :data:`DATA` when
    all its ids are in the vocabulary (the bundled model's are), otherwise ``path`` written with
    a stream of as many random valid ids (a model with a smaller vocabulary)."""
    steps = _steps(DATA)
    if all(0 <= i < vocab for st in steps for i in st["tokens"]["content"]):
        return DATA
    rng = random.Random(seed)
    steps = [
        {"tokens": {"content": [rng.randrange(1, vocab)], "shape": [1, 1]}}
        for _ in range(SEQUENCE_LENGTH)
    ]
    path.write_text(json.dumps({"data": [steps]}))
    return path


def run(
    binary: Path,
    env: dict[str, str],
    target: str,
    model: str,
    concurrency: int,
    data: Path,
    *,
    window_ms: int = 5000,
) -> dict[str, Any]:
    """perf_analyzer at one concurrency; its infer/s and client latencies (ms), or ``error``."""
    with tempfile.TemporaryDirectory(prefix="pa-") as tmp:
        out = Path(tmp) / f"pa-c{concurrency}.csv"
        cmd = [
            str(binary),
            *command(model, target, concurrency, data)[1:],
            "-p",
            str(window_ms),
            "--stability-percentage",
            str(STABILITY_PERCENT),
            "-f",
            str(out),
        ]
        row: dict[str, Any] = {"concurrency": concurrency, "command": " ".join(cmd[1:])}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
        if proc.returncode != 0 or not out.exists():
            text = (proc.stdout + proc.stderr).strip().splitlines()
            row["error"] = next((t for t in reversed(text) if t.strip()), "no output")
            return row
        with out.open() as f:
            rec = next(csv.DictReader(f))
    row["infer_per_s"] = float(rec["Inferences/Second"])
    for p in ("p50", "p90", "p99"):
        row[f"{p}_ms"] = float(rec[f"{p} latency"]) / 1000.0
    # What perf_analyzer splits the server's time into (µs per request, from ModelStatistics).
    row["server_compute_infer_us"] = float(rec["Server Compute Infer"])
    return row
