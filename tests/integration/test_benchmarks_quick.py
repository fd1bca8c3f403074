"""``python -m benchmarks.run --quick`` works end to end (whether it is fast is not tested here).

It runs as a subprocess exactly as ``make bench-quick`` does, starting the real server on
127.0.0.1 with a port of its own and load-generator processes against it. The test checks that
it exits 0, prints the table, writes the JSON with every summary key and the plots, and that
each summary figure is either a finite number of the right sign or null with a reason, and
that the server figures were really measured (the engine-overhead section too: its engine
iterated, every generation advanced).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.run import SUMMARY_KEYS
from benchmarks.server_bench import server_available

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = (
    "p1_generate64_vs_inprocess",
    "p2_step_overhead_ms_p50",
    "step_stream16_steps_per_s",
    "p4_ort_vs_torch_b1",
    "p5_train_scratch_vs_d2l",
    "p5_train_torch_vs_d2l",
    "p6_session_memory_ratio",
    "engine_overhead_vs_model_b1",
    "engine_overhead_vs_model_b64",
    "engine_overhead_vs_model_b256",
    "frontends2_vs_1_generate64",
    "frontends2_vs_1_stream16",
    "store_sqlite_vs_memory_stream16",
    "store_redis_vs_memory_stream16",
    "store_redis_step_p50_ms",
    "failover_s",
    "create_session_large_vs_small_p50",
    "perf_analyzer_seq_c16_infer_per_s",
    "kserve_vs_lstmserve_stream16",
)
# Section 13 (perf_analyzer over KServe v2): full runs only; null in quick ones, saying why.
KSERVE_KEYS = ("perf_analyzer_seq_c16_infer_per_s", "kserve_vs_lstmserve_stream16")
SERVER_KEYS = (
    "p1_generate64_vs_inprocess",
    "p2_step_overhead_ms_p50",
    "step_stream16_steps_per_s",
    "p6_session_memory_ratio",
    "frontends2_vs_1_generate64",
    "frontends2_vs_1_stream16",
    "store_sqlite_vs_memory_stream16",
    "create_session_large_vs_small_p50",
)
# Section 11 with a throwaway Redis (null only when none could be started, with that reason).
REDIS_KEYS = ("store_redis_vs_memory_stream16", "store_redis_step_p50_ms")
# In process (the engine with a fake model): measured whenever server/ imports.
ENGINE_KEYS = (
    "engine_overhead_vs_model_b1",
    "engine_overhead_vs_model_b64",
    "engine_overhead_vs_model_b256",
)


@pytest.fixture(scope="module")
def quick_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    data["_out"] = str(out)
    return proc, data


def test_summary_has_every_key(quick_run: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    _, data = quick_run
    summary, reasons = data["summary"], data["summary_reasons"]
    assert set(REQUIRED) <= set(summary)
    assert set(SUMMARY_KEYS) == set(summary)
    for key, value in summary.items():
        if value is None:
            assert reasons.get(key), f"{key} is null without a reason"
        else:
            assert isinstance(value, float) and math.isfinite(value), (key, value)
            assert key not in reasons
            # Everything but the step overhead (a difference of two latencies) is a positive
            # rate or ratio.
            if key != "p2_step_overhead_ms_p50":
                assert value > 0, (key, value)


def test_sections_ran_or_say_why(quick_run: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    _, data = quick_run
    sections = data["sections"]
    for key in (
        "inprocess_ort",
        "torch_eager",
        "generate",
        "stream",
        "no_batching",
        "int8",
        "memory",
        "training",
        "engine_overhead",
        "frontends",
        "state_stores",
    ):
        assert key in sections
        assert not sections[key].get("failed"), sections[key]
        assert "skipped" in sections[key] or "elapsed_s" in sections[key], key
    ort = sections["inprocess_ort"]
    assert [r["batch"] for r in ort["rows"]] == [1, 8, 32, 64, 128, 256]
    for row in ort["rows"]:
        assert row["tokens_per_s"] > 0 and row["p50_ms"] <= row["p99_ms"]
    assert data["meta"]["model"]["source"]
    eng = sections["engine_overhead"]
    if "rows" in eng:
        # The engine really iterated, every generation in every call, and produced tokens.
        assert [r["batch"] for r in eng["rows"]] == [1, 64, 256]
        for row in (r for rnd in eng["rounds"] for r in rnd):
            assert row["iterations"] > 0 and row["rows_per_iteration"] == row["batch"]
            assert row["drained_min_per_generation"] > 0
            assert row["us_per_iteration"] > 0 and row["model_call_us"] > 0
    for key in ENGINE_KEYS:
        assert (data["summary"][key] is None) == ("rows" not in eng), key
    assert data["meta"]["machine"]["cores"] >= 1


def test_server_sections_measure_the_real_server(
    quick_run: tuple[subprocess.CompletedProcess[str], dict],
) -> None:
    _, data = quick_run
    why = server_available()
    if why is not None:
        for key in SERVER_KEYS:
            assert data["summary"][key] is None and data["summary_reasons"][key]
        pytest.skip(why)
    for key in SERVER_KEYS:
        assert data["summary"][key] is not None, data["summary_reasons"].get(key)
    for row in data["sections"]["generate"]["rows"]:
        assert row["errors"] == {}, row
        assert row["tokens_per_s"] > 0 and row["itl"]["n"] > 0
    fe = data["sections"]["frontends"]
    assert {r["frontends"] for r in fe["generate"]} == {1, 2}
    for row in fe["generate"] + fe["stream"]:
        assert row["errors"] == {}, row
        assert row["server_cpu_cores"] > 0
    mem = data["sections"]["memory"]
    assert mem["raw_state_bytes"] == mem["sessions"] * mem["state_bytes_per_session"]


def test_table_and_plots(quick_run: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    proc, data = quick_run
    assert "## summary" in proc.stdout
    for key in REQUIRED:
        assert key in proc.stdout
    plots = data["meta"]["plots"]
    assert "throughput.png" in plots
    for name in plots:
        head = (Path(data["_out"]) / name).read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n", name


def test_state_stores_section(quick_run: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    """Section 11: named sessions on every store, every acknowledged step read back (the load
    generator counts STEPS_MISMATCH otherwise), and the scale test left out of quick runs."""
    proc, data = quick_run
    summary, reasons = data["summary"], data["summary_reasons"]
    # The scale test needs nginx and three replicas: full runs only, and the summary says so.
    assert summary["failover_s"] is None and "quick" in reasons["failover_s"]
    st = data["sections"]["state_stores"]
    if server_available() is not None:
        pytest.skip(server_available())
    stores = {"memory", "sqlite"} | ({"redis"} if "redis_skipped" not in st else set())
    assert set(st["stores"]) == stores
    assert st["stores"]["sqlite"].startswith("sqlite:////")
    assert {(r["store"], r["concurrency"]) for r in st["rows"]} == {
        (name, c) for name in stores for c in (1, 16)
    }
    for row in st["rows"]:
        assert row["errors"] == {}, row
        assert row["steps_per_s"] > 0 and row["rtt"]["n"] > 0
    for key in REDIS_KEYS:
        if "redis" in stores:
            assert summary[key] is not None, reasons.get(key)
        else:
            assert summary[key] is None and "Redis" in reasons[key]
    assert "11. State stores" in proc.stdout


def test_kserve_section_is_full_runs_only(
    quick_run: tuple[subprocess.CompletedProcess[str], dict],
) -> None:
    _, data = quick_run
    assert "quick" in data["sections"]["kserve_perf_analyzer"]["skipped"]
    for key in KSERVE_KEYS:
        assert data["summary"][key] is None and "quick" in data["summary_reasons"][key]
