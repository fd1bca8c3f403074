"""Section 14: a live rollout under load (issue 17), against a real ``lstm-serve`` in poll mode.

The server serves a temporary model repository built from the bundled model, ``timemachine``
version 1 (``model.onnx``), with ``--model-control-mode poll --repository-poll-s 0.5``. The
bundled int8 file is staged beside it as version 2 the way ``lstm-export`` publishes one:
complete in ``REPO/timemachine/.tmp-2`` (a dot folder the server ignores), then ``os.replace``
to ``REPO/timemachine/2`` in one step. In one run:

1. :mod:`benchmarks.rollout_load` (a separate process) creates ``streams`` named sessions on v1
   and drives one StepStream each (one token per message, closed loop) through a steady window
   and then a second window; the publish happens here as the second opens. Steps/s, p50 and p99
   of both windows, p99(during) / p99(steady) (target <= 1.5) and the errors (target 0). At the
   end each session must still be pinned to v1 (``GetSession``'s ``model_version``).
2. From the publish (the ``os.replace``), ``CreateSession`` every ``probe_s`` (10 ms) until a
   reply's ``model_version`` is "2": the seconds to the first request served by the new version
   (the server's own "loaded in" time from its log beside it, to split detection from loading).
3. Memory per loaded version: ``ListModels``' ``memory_bytes`` against the weights file's size
   plus sessions x ``GetModelInfo.state_bytes_per_session``, the Prometheus gauges
   ``lstm_serve_model_memory_bytes`` / ``lstm_serve_model_sessions`` beside them, and the
   resident memory of the server's processes (supervisor, engine, front ends; from ``/proc``)
   before the publish, once v2 served, at the end of the window and after v1 was unloaded.

The probe's own sessions on v1 are closed at once, so v1's session count stays the load's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from . import server_bench as sb
from .common import ROOT, ModelUnderTest, SectionSkipped, percentiles_ms, ratio

MODEL = "timemachine"
P99_TARGET = 1.5  # p99(during) / p99(steady)
_PIDS = re.compile(r"engine pid (\d+), \d+ front end\(s\) pid ([\d,]+)")
_SINGLE = re.compile(r"one process \(engine and gRPC\) pid (\d+)")
_METRICS = re.compile(r"metrics on http://(\S+?)/metrics")
_LOADED = re.compile(r"model (\S+) version (\S+) loaded in ([\d.]+) s")
_GAUGE = re.compile(r"^lstm_serve_model_(sessions|memory_bytes)\{([^}]*)\}\s+(\S+)")


# --- the repository ----------------------------------------------------------------------------


def build_repository(repo: Path, v1: Path, v2: Path) -> tuple[Path, Path]:
    """``REPO/timemachine/1/model.onnx`` from ``v1``; ``v2`` staged complete in
    ``REPO/timemachine/.tmp-2/model.onnx``. Returns (staged folder, its final name)."""
    (repo / MODEL / "1").mkdir(parents=True)
    shutil.copyfile(v1, repo / MODEL / "1" / "model.onnx")
    staged = repo / MODEL / ".tmp-2"
    staged.mkdir()
    shutil.copyfile(v2, staged / "model.onnx")
    return staged, repo / MODEL / "2"


# --- reading the server ------------------------------------------------------------------------


def roles(log: list[str], supervisor: int) -> dict[int, str]:
    """pid -> role from the server's "engine pid N, K front end(s) pid A,B" line."""
    out = {supervisor: "supervisor"}
    for line in log:
        if m := _SINGLE.search(line):
            out[int(m.group(1))] = "server"
        m = _PIDS.search(line)
        if m:
            out[int(m.group(1))] = "engine"
            for pid in m.group(2).split(","):
                out[int(pid)] = "front end"
    return out


def metrics_url(log: list[str]) -> str | None:
    for line in log:
        m = _METRICS.search(line)
        if m:
            return f"http://{m.group(1)}/metrics"
    return None


def load_seconds(log: list[str], name: str, version: str) -> float | None:
    """The server's own "model NAME version V loaded in S s" (its INFO log)."""
    for line in log:
        m = _LOADED.search(line)
        if m and (m.group(1), m.group(2)) == (name, version):
            return float(m.group(3))
    return None


def parse_gauges(text: str, model: str) -> dict[str, dict[str, float]]:
    """``{version: {"sessions": n, "memory_bytes": b}}`` from a Prometheus exposition."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = _GAUGE.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if labels.get("model") != model:
            continue
        out.setdefault(labels.get("version", ""), {})[m.group(1)] = float(m.group(3))
    return out


def _scrape(url: str | None) -> dict[str, Any]:
    if url is None:
        return {"error": "no metrics endpoint in the server's log"}
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return parse_gauges(r.read().decode(), MODEL)
    except OSError as e:
        return {"error": f"{type(e).__name__}: {e}"}


def rss_by_role(srv: sb.ServerProcess, pid_roles: dict[int, str]) -> dict[str, int]:
    """Resident bytes of the server's process tree, summed per role, and ``total``."""
    out: dict[str, int] = {}
    for pid, rss in srv.rss_by_pid().items():
        role = pid_roles.get(pid, "other")
        out[role] = out.get(role, 0) + rss
    out["total"] = sum(out.values())
    return out


def _versions(stub: Any, pb: Any) -> dict[str, dict[str, Any]]:
    """ListModels for our model: ``{version: {state, sessions, memory_bytes}}``."""
    reply = stub.ListModels(pb.ListModelsRequest(), timeout=10)
    return {
        v.version: {"state": v.state, "sessions": v.sessions, "memory_bytes": v.memory_bytes}
        for m in reply.models
        if m.name == MODEL
        for v in m.versions
    }


def _snapshot(
    srv: sb.ServerProcess, pid_roles: dict[int, str], stub: Any, pb: Any, metrics: str | None
) -> dict[str, Any]:
    return {
        "t_ns": time.monotonic_ns(),
        "rss": rss_by_role(srv, pid_roles),
        "versions": _versions(stub, pb),
        "prometheus": _scrape(metrics),
    }


# --- the figures -------------------------------------------------------------------------------


def window_stats(rtt: np.ndarray, steps: int, window_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {"steps": steps, "steps_per_s": steps / window_s if window_s else None}
    out.update(percentiles_ms(rtt))
    out["max_ms"] = float(rtt.max() / 1e6) if rtt.size else None
    return out


def interval_stats(rtt: np.ndarray, at: np.ndarray, t0: int, t1: int) -> dict[str, Any]:
    """Steps that completed in ``[t0, t1]`` (ns): their rate and latency."""
    sel = (at >= t0) & (at <= t1)
    span = (t1 - t0) / 1e9
    out: dict[str, Any] = {
        "seconds": span,
        "steps": int(sel.sum()),
        "steps_per_s": float(sel.sum() / span) if span > 0 else None,
    }
    out.update(percentiles_ms(rtt[sel]))
    out["max_ms"] = float(rtt[sel].max() / 1e6) if sel.any() else None
    return out


def worst(rtt: np.ndarray, at: np.ndarray, origin: int, n: int) -> list[dict[str, float]]:
    """The ``n`` slowest steps: when each completed (seconds since ``origin``) and its ms."""
    order = np.argsort(rtt)[::-1][:n]
    return [
        {"at_s": round(float(at[i] - origin) / 1e9, 3), "ms": round(float(rtt[i]) / 1e6, 2)}
        for i in sorted(order, key=lambda i: int(at[i]))
    ]


def timeline(rtt: np.ndarray, at: np.ndarray, origin: int, bucket_s: float) -> list[dict[str, Any]]:
    """Per ``bucket_s`` since ``origin`` (ns): steps/s, p99 and max of the steps completed in it."""
    if rtt.size == 0:
        return []
    idx = ((at - origin) // int(bucket_s * 1e9)).astype(np.int64)
    rows = []
    for b in range(int(idx.min()), int(idx.max()) + 1):
        sel = rtt[idx == b]
        rows.append(
            {
                "from_s": round(b * bucket_s, 3),
                "steps_per_s": round(sel.size / bucket_s, 1),
                "p99_ms": float(np.percentile(sel, 99) / 1e6) if sel.size else None,
                "max_ms": float(sel.max() / 1e6) if sel.size else None,
            }
        )
    return rows


def memory_rows(
    versions: dict[str, dict[str, Any]],
    weights: dict[str, int],
    state_bytes: dict[str, int],
    prometheus: dict[str, Any],
) -> list[dict[str, Any]]:
    """Each loaded version's ``memory_bytes`` against weights + sessions x state bytes."""
    rows = []
    for version, v in sorted(versions.items()):
        if v["state"] not in ("READY", "RETIRING"):
            continue
        per = state_bytes.get(version)
        expected = None if per is None else weights[version] + v["sessions"] * per
        prom = prometheus.get(version, {}) if "error" not in prometheus else {}
        rows.append(
            {
                "version": version,
                "state": v["state"],
                "sessions": v["sessions"],
                "memory_bytes": v["memory_bytes"],
                "weights_bytes": weights[version],
                "state_bytes_per_session": per,
                "expected_bytes": expected,
                "difference_bytes": None if expected is None else v["memory_bytes"] - expected,
                "prometheus_memory_bytes": prom.get("memory_bytes"),
                "prometheus_sessions": prom.get("sessions"),
            }
        )
    return rows


def verdicts(
    p99_ratio: float | None, errors: int, pinned_ok: bool, first_v2_s: float | None
) -> dict[str, dict[str, Any]]:
    return {
        "p99_during_vs_steady": {
            "value": p99_ratio,
            "target": f"<= {P99_TARGET:g}",
            "met": None if p99_ratio is None else p99_ratio <= P99_TARGET,
        },
        "errors": {"value": errors, "target": "== 0", "met": errors == 0},
        "sessions_stayed_on_v1": {"value": pinned_ok, "target": "all", "met": pinned_ok},
        "v2_served": {"value": first_v2_s, "target": "yes", "met": first_v2_s is not None},
    }


# --- the run -----------------------------------------------------------------------------------


def run(
    model: ModelUnderTest,
    flags: list[str],
    workdir: Path,
    *,
    streams: int,
    window: float,
    warmup: float,
    lead: float,
    gap: float = 0.5,
    poll_s: float = 0.5,
    probe_s: float = 0.01,
    v2_timeout_s: float = 60.0,
    source: Path | None = None,
) -> dict[str, Any]:
    if model.int8_path is None:
        raise SectionSkipped("no int8 model beside the fp32 one to publish as version 2")
    import grpc

    from protos.lstmserve.v1 import lstm_serve_pb2 as pb
    from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc

    repo = workdir / "repo"
    staged, final = build_repository(repo, Path(model.path), Path(model.int8_path))
    weights = {"1": Path(model.path).stat().st_size, "2": Path(model.int8_path).stat().st_size}
    server_flags = [
        *flags,
        "--model",
        "",
        "--model-repository",
        str(repo),
        "--model-control-mode",
        "poll",
        "--repository-poll-s",
        str(poll_s),
        # The metrics endpoint for the gauges, and INFO for the server's "loaded in" line (it
        # logs nothing per request at INFO).
        "--metrics-port",
        "0",
        "--log-level",
        "INFO",
    ]
    out: dict[str, Any] = {
        "server_flags": server_flags,
        "repository": {"1": Path(model.path).name, "2": Path(model.int8_path).name},
        "weights_bytes": weights,
        "streams": streams,
        "window_s": window,
        "gap_s": gap,
        "poll_s": poll_s,
        "probe_s": probe_s,
    }
    with (
        sb.running_server("", extra=server_flags, source=source) as srv,
        grpc.insecure_channel(srv.target) as ch,
    ):
        stub = pb_grpc.LstmServeServiceStub(ch)
        pid_roles = roles(srv.log, srv.proc.pid)
        metrics = metrics_url(srv.log)
        info1 = stub.GetModelInfo(pb.GetModelInfoRequest(model_name=MODEL), timeout=10)
        if info1.version != "1":
            raise SectionSkipped(f"the server serves version {info1.version!r}, not 1")
        state_bytes = {"1": int(info1.state_bytes_per_session)}

        start_ns = time.monotonic_ns() + int(lead * 1e9)
        ws1 = start_ns + int(warmup * 1e9)
        we1 = ws1 + int(window * 1e9)
        ws2 = we1 + int(gap * 1e9)
        we2 = ws2 + int(window * 1e9)
        raw = workdir / "rollout.npz"
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.rollout_load",
            "--target",
            srv.target,
            "--streams",
            str(streams),
            "--start-ns",
            str(start_ns),
            "--warmup",
            str(warmup),
            "--window",
            str(window),
            "--gap",
            str(gap),
            "--vocab",
            str(model.vocab_size),
            "--out",
            str(raw),
        ]
        load = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            # Server CPU over each window, sampled at its edges (as server_bench.drive does).
            _sleep_until(ws1)
            cpu0 = (srv.cpu_s(), time.monotonic_ns())
            _sleep_until(we1)
            cpu1 = (srv.cpu_s(), time.monotonic_ns())
            # In the gap: what held before the publish.
            before = _snapshot(srv, pid_roles, stub, pb, metrics)
            _sleep_until(ws2)
            cpu2 = (srv.cpu_s(), time.monotonic_ns())
            t_pub = time.monotonic_ns()
            os.replace(staged, final)
            first_v2, probes = _probe_v2(stub, pb, t_pub, probe_s, v2_timeout_s)
            after: dict[str, Any] | None = None
            if first_v2 is not None:
                after = _snapshot(srv, pid_roles, stub, pb, metrics)
                info2 = stub.GetModelInfo(
                    pb.GetModelInfoRequest(model_name=MODEL, model_version="2"), timeout=10
                )
                state_bytes["2"] = int(info2.state_bytes_per_session)
            _sleep_until(we2)
            cpu3 = (srv.cpu_s(), time.monotonic_ns())
            end = _snapshot(srv, pid_roles, stub, pb, metrics)
            stdout, stderr = load.communicate(timeout=60)
        finally:
            if load.poll() is None:
                load.kill()
                load.communicate()
        if load.returncode != 0:
            msg = (stderr.strip().splitlines() or ["no output"])[-1]
            raise SectionSkipped(f"the rollout load generator failed: {msg}")
        client = json.loads(stdout.strip().splitlines()[-1])
        # Its sessions are closed now: v1 (retiring) is unloaded at the next housekeeping tick.
        unloaded = _wait_unloaded(stub, pb, "1", 10.0)
        after_unload = _snapshot(srv, pid_roles, stub, pb, metrics) if unloaded else None
        out["server_load_s"] = load_seconds(srv.log, MODEL, "2")
        out["server_log_tail"] = [line for line in srv.log if "model" in line][-6:]

    arrays = np.load(raw)
    rtt1, at1, rtt2, at2 = (arrays[k] for k in ("rtt1", "at1", "rtt2", "at2"))
    w1, w2 = client["windows"]
    steady = window_stats(rtt1, w1["steps"], window)
    during = window_stats(rtt2, w2["steps"], window)
    steady["errors"], during["errors"] = w1["errors"], w2["errors"]
    steady["client_cpu_fraction"] = w1["client_cpu_fraction"]
    during["client_cpu_fraction"] = w2["client_cpu_fraction"]
    steady["server_cpu_cores"] = (cpu1[0] - cpu0[0]) / ((cpu1[1] - cpu0[1]) / 1e9)
    during["server_cpu_cores"] = (cpu3[0] - cpu2[0]) / ((cpu3[1] - cpu2[1]) / 1e9)
    out["steady"], out["during"] = steady, during
    t_v2 = None if first_v2 is None else t_pub + int(first_v2 * 1e9)
    if t_v2 is not None:
        # The steps that completed while v2 was being detected and loaded (publish -> served).
        out["publish_to_v2"] = interval_stats(rtt2, at2, t_pub, t_v2)
        if t_v2 < we2:
            out["after_v2"] = interval_stats(rtt2, at2, t_v2, we2)
    # Per quarter second: the steady window's spread is the noise the ratio must be read against.
    out["timeline_steady"] = timeline(rtt1, at1, ws1, 0.25)
    out["timeline_during"] = timeline(rtt2, at2, t_pub, 0.25)
    out["worst_steady"] = worst(rtt1, at1, ws1, 10)
    out["worst_during"] = worst(rtt2, at2, t_pub, 10)
    out["p99_during_vs_steady"] = ratio(during["p99_ms"], steady["p99_ms"])
    out["steps_during_vs_steady"] = ratio(during["steps_per_s"], steady["steps_per_s"])
    errors = sum(w1["errors"].values()) + sum(w2["errors"].values())
    errors += sum(client["check_errors"].values())
    out["errors"] = errors
    out["check_errors"] = client["check_errors"]
    out["versions_created"] = _count(client["versions_created"])
    out["versions_at_end"] = _count(client["versions_at_end"])
    pinned_ok = set(client["versions_created"]) == {"1"} and set(client["versions_at_end"]) == {"1"}
    out["first_v2_s"] = first_v2
    out["probes"] = probes
    if first_v2 is None:
        out["first_v2_missing"] = f"no CreateSession got version 2 within {v2_timeout_s:g} s"
    out["memory"] = {
        name: None
        if snap is None
        else memory_rows(snap["versions"], weights, state_bytes, snap["prometheus"])
        for name, snap in (("before_publish", before), ("after_v2", after), ("end_of_window", end))
    }
    snaps = {"before_publish": before, "after_v2": after, "end_of_window": end}
    snaps["after_v1_unloaded"] = after_unload
    out["rss"] = {k: None if v is None else v["rss"] for k, v in snaps.items()}
    out["seconds_since_publish"] = {
        k: None if v is None else (v["t_ns"] - t_pub) / 1e9 for k, v in snaps.items()
    }
    if after is not None:
        grown = after["rss"]["total"] - before["rss"]["total"]
        out["rss_growth_v2_bytes"] = grown
        out["rss_growth_v2_engine_bytes"] = after["rss"].get("engine", 0) - before["rss"].get(
            "engine", 0
        )
        out["rss_growth_v2_vs_weights"] = ratio(grown, weights["2"])
    out["verdicts"] = verdicts(out["p99_during_vs_steady"], errors, pinned_ok, first_v2)
    return out


def _sleep_until(t_ns: int) -> None:
    time.sleep(max(0.0, (t_ns - time.monotonic_ns()) / 1e9))


def _probe_v2(
    stub: Any, pb: Any, t_pub: int, every_s: float, timeout_s: float
) -> tuple[float | None, int]:
    """CreateSession every ``every_s`` from ``t_pub`` until a reply names version 2: the
    seconds from ``t_pub`` to that reply (None past ``timeout_s``), and the probes made. A
    session on v1 is closed at once."""
    import grpc

    n = 0
    while True:
        n += 1
        with contextlib.suppress(grpc.RpcError):
            r = stub.CreateSession(pb.CreateSessionRequest(model_name=MODEL), timeout=10)
            t = time.monotonic_ns()
            with contextlib.suppress(grpc.RpcError):
                stub.CloseSession(pb.CloseSessionRequest(session_id=r.session_id), timeout=10)
            if r.model_version == "2":
                return (t - t_pub) / 1e9, n
        if time.monotonic_ns() - t_pub > timeout_s * 1e9:
            return None, n
        _sleep_until(t_pub + int(n * every_s * 1e9))


def _wait_unloaded(stub: Any, pb: Any, version: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _versions(stub, pb).get(version, {}).get("state") == "UNAVAILABLE":
            return True
        time.sleep(0.1)
    return False


def _count(values: list[str | None]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        key = "none" if v is None else v
        out[key] = out.get(key, 0) + 1
    return out
