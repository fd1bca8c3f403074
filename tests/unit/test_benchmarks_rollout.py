"""Section 14's pieces that need no server: the stamped samples fed through the load
generator's own step loop, the repository's staged publish, and the figures' arithmetic."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from benchmarks.loadgen import _stream_steps
from benchmarks.rollout import (
    build_repository,
    interval_stats,
    load_seconds,
    memory_rows,
    metrics_url,
    parse_gauges,
    roles,
    timeline,
    verdicts,
    worst,
)
from benchmarks.rollout_load import StampedList, stamped_samples, windows
from contract.repository import model_names, versions


class FakeCall:
    """A StepStream call that answers every write after ``delay_s``, counting steps."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.steps = 0
        self.first: object = None

    async def write(self, req: object) -> None:
        if self.first is None:
            self.first = req
        self.steps += 1

    async def read(self) -> SimpleNamespace:
        await asyncio.sleep(self.delay_s)
        return SimpleNamespace(steps=self.steps)

    async def done_writing(self) -> None:
        pass

    def cancel(self) -> None:
        pass


def test_loadgen_steps_are_stamped_as_they_complete() -> None:
    s = stamped_samples()
    call = FakeCall(0.002)
    start = time.monotonic_ns()
    ws, we = start + int(0.02e9), start + int(0.08e9)
    acked = asyncio.run(_stream_steps(call, "sid-1", s, (ws, we), 28))
    assert isinstance(s.rtt_ns, StampedList)
    assert acked == call.steps  # the last answer's count
    assert call.first.session_id == "sid-1"  # type: ignore[attr-defined]
    assert 0 < len(s.rtt_ns) == len(s.rtt_ns.at) == s.tokens < call.steps
    at = np.asarray(s.rtt_ns.at)
    assert (np.diff(at) > 0).all()
    # Counted only inside the window: started after it opened, done before it closed.
    assert (at - np.asarray(s.rtt_ns) >= ws).all() and (at <= we + int(0.001e9)).all()


def test_windows_follow_each_other_after_the_gap() -> None:
    (ws1, we1), (ws2, we2) = windows(1_000, warmup=1.0, window=2.0, gap=0.5)
    assert (ws1, we1) == (1_000 + 10**9, 1_000 + 3 * 10**9)
    assert (ws2 - we1, we2 - ws2) == (int(0.5e9), 2 * 10**9)


def test_the_staged_version_is_invisible_until_renamed(tmp_path: Path) -> None:
    v1, v2 = tmp_path / "a.onnx", tmp_path / "b.onnx"
    v1.write_bytes(b"one")
    v2.write_bytes(b"two!")
    repo = tmp_path / "repo"
    staged, final = build_repository(repo, v1, v2)
    assert model_names(repo) == ["timemachine"]
    assert versions(repo / "timemachine") == [1]
    os.replace(staged, final)
    assert versions(repo / "timemachine") == [1, 2]
    assert (final / "model.onnx").read_bytes() == b"two!"


def test_server_log_and_metrics_parsing() -> None:
    log = [
        "lstm-serve: engine pid 101, 2 front end(s) pid 102,103",
        "lstm-serve: gRPC listening on 127.0.0.1:5555",
        "lstm-serve: metrics on http://127.0.0.1:9999/metrics",
        "2026-12-04 10:00:00,000 INFO lstm_serve.models: model timemachine version 2 loaded in "
        "0.41 s (CPUExecutionProvider)",
    ]
    assert roles(log, 100) == {100: "supervisor", 101: "engine", 102: "front end", 103: "front end"}
    assert metrics_url(log) == "http://127.0.0.1:9999/metrics"
    assert load_seconds(log, "timemachine", "2") == 0.41
    assert load_seconds(log, "timemachine", "1") is None
    text = "\n".join(
        [
            "# HELP lstm_serve_model_sessions Sessions held per loaded model version.",
            'lstm_serve_model_sessions{model="timemachine",version="1"} 16.0',
            'lstm_serve_model_memory_bytes{model="timemachine",version="1"} 3393001.0',
            'lstm_serve_model_sessions{model="other",version="1"} 3.0',
        ]
    )
    assert parse_gauges(text, "timemachine") == {"1": {"sessions": 16.0, "memory_bytes": 3393001.0}}


def test_figures() -> None:
    rtt = np.array([1, 2, 3, 100], np.int64) * 1_000_000
    at = np.array([0, 1, 2, 3], np.int64) * 250_000_000
    mid = interval_stats(rtt, at, 250_000_000, 500_000_000)
    assert mid["steps"] == 2 and mid["seconds"] == 0.25 and mid["steps_per_s"] == 8.0
    assert mid["max_ms"] == 3.0
    assert worst(rtt, at, 0, 2) == [{"at_s": 0.5, "ms": 3.0}, {"at_s": 0.75, "ms": 100.0}]
    rows = timeline(rtt, at, 0, 0.5)
    assert [r["from_s"] for r in rows] == [0.0, 0.5]
    assert rows[1]["max_ms"] == 100.0 and rows[0]["steps_per_s"] == 4.0
    listed = {
        "1": {"state": "RETIRING", "sessions": 16, "memory_bytes": 1000 + 16 * 4096},
        "2": {"state": "READY", "sessions": 0, "memory_bytes": 500},
        "3": {"state": "UNAVAILABLE", "sessions": 0, "memory_bytes": 0},
    }
    mem = memory_rows(listed, {"1": 1000, "2": 500}, {"1": 4096, "2": 4096}, {"error": "x"})
    assert [(r["version"], r["difference_bytes"]) for r in mem] == [("1", 0), ("2", 0)]
    assert mem[0]["prometheus_memory_bytes"] is None
    v = verdicts(1.6, 0, True, 0.7)
    assert v["p99_during_vs_steady"]["met"] is False and v["errors"]["met"] is True
    assert verdicts(None, 2, False, None)["p99_during_vs_steady"]["met"] is None
