"""Sections 3-7: the real server, started here as a subprocess on 127.0.0.1 with port 0.

The server runs as ``python -m server.cli`` (the ``lstm-serve`` entry point) with its metrics
endpoint off; its port is read from its "gRPC listening on" line and readiness from the
standard health service. Load comes from ``benchmarks.loadgen`` processes (never this process),
started together on one shared monotonic-clock window; their raw samples are merged here.
``lstm-serve`` is several processes (a supervisor, the engine, the front ends): memory
(section 7) and CPU are summed over the whole process tree from ``/proc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import ROOT, ModelUnderTest, SectionSkipped, percentiles_ms

_LISTEN = re.compile(r"gRPC listening on \S*?:(\d+)")
_METRICS = re.compile(r"metrics on (http://\S+?)/metrics")


def server_available() -> str | None:
    """None when the server can be started here, else the reason it cannot."""
    try:
        from server import cli  # noqa: F401
    except Exception as e:
        return f"server not importable: {type(e).__name__}: {e}"
    try:
        from protos.lstmserve.v1 import lstm_serve_pb2_grpc  # noqa: F401
    except Exception as e:
        return f"generated protos not importable: {e}"
    return None


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    port: int
    log: list[str]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        """The server's process and every descendant (engine, front ends)."""
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            try:
                for task in Path(f"/proc/{pid}/task").iterdir():
                    kids = (task / "children").read_text().split()
                    todo.extend(int(k) for k in kids)
            except OSError:
                continue
        return out

    def rss_by_pid(self) -> dict[int, int]:
        """Resident bytes of each of the server's processes (those still running)."""
        out = {}
        for pid in self.pids():
            try:
                text = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("VmRSS:"):
                    out[pid] = int(line.split()[1]) * 1024
        return out

    def rss_bytes(self) -> int:
        return sum(self.rss_by_pid().values())

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server's processes (all their threads)."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
        return total / ticks


def running_server(
    model_path: str,
    *,
    extra: Sequence[str] = (),
    startup_timeout: float = 60.0,
    source: Path | None = None,
) -> contextlib.AbstractContextManager[ServerProcess]:
    """Start ``lstm-serve`` on the model, wait until health says SERVING; stop it on exit.

    ``source`` runs the server from another tree holding ``server/``, ``protos/`` and
    ``export/`` (e.g. ``git worktree add /tmp/base HEAD~3``), to compare engine versions under
    the same load; default: this checkout.
    """
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "-1",
        "--model",
        model_path,
        "--log-level",
        "WARNING",
        "--drain-grace-s",
        "1",
        *extra,
    ]
    return _running(cmd, startup_timeout, source)


def batch_totals(srv: ServerProcess) -> tuple[float, float] | None:
    """``(sum, count)`` of the server's ``lstm_serve_batch_size`` histogram (every model and
    version), None when it serves no metrics (``--metrics-port -1``) or does not answer."""
    url = next((m.group(1) for line in srv.log if (m := _METRICS.search(line))), None)
    if url is None:
        return None
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("lstm_serve_batch_size_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("lstm_serve_batch_size_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def mean_batch(
    before: tuple[float, float] | None, after: tuple[float, float] | None
) -> float | None:
    """Mean rows per model call between two :func:`batch_totals`."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def running_null_server(vocab: int) -> contextlib.AbstractContextManager[ServerProcess]:
    """Start :mod:`benchmarks.null_server` (the gRPC floor) the same way."""
    cmd = [sys.executable, "-m", "benchmarks.null_server", "--vocab", str(vocab)]
    return _running(cmd, 30.0)


@contextlib.contextmanager
def _running(
    cmd: list[str], startup_timeout: float, source: Path | None = None
) -> Iterator[ServerProcess]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(source), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        cmd,
        cwd=source or ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    log: list[str] = []
    port_box: list[int] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line.rstrip())
            m = _LISTEN.search(line)
            if m and not port_box:
                port_box.append(int(m.group(1)))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        if not ready.wait(startup_timeout) or not port_box:
            tail = " | ".join(log[-5:])
            raise SectionSkipped(f"server did not start: {tail or 'no output'}")
        srv = ServerProcess(proc, port_box[0], log)
        _wait_serving(srv.target, startup_timeout)
        yield srv
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_serving(target: str, timeout: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise SectionSkipped(f"server at {target} never reported SERVING")


@dataclass(frozen=True)
class LoadSpec:
    mode: str  # a loadgen --mode: "generate", "stream" or "stream-named"
    concurrency: int
    duration: float
    warmup: float
    max_tokens: int = 128
    client_procs: int = 1
    lead: float = 2.5  # seconds for the loadgen processes to start and connect before the window
    service: str = "lstmserve.v1.LstmServeService"  # what an older server calls it (A/B runs)
    model: str = ""  # stream-features: the sequence model's name
    features: int = 1  # stream-features: F, the numbers in a row


def drive(
    srv: ServerProcess, spec: LoadSpec, vocab: int, profile_to: Path | None = None
) -> dict[str, Any]:
    """Run loadgen process(es) against ``srv`` and merge what they measured.

    With ``profile_to`` (a file), py-spy samples the server over the window and the row gets a
    ``profile`` summary (see :mod:`benchmarks.profiling`); the sampling costs the server a little
    CPU, so profiled rows are marked and kept out of the record's figures.
    """
    procs = max(1, min(spec.client_procs, spec.concurrency))
    shares = [
        spec.concurrency // procs + (1 if i < spec.concurrency % procs else 0) for i in range(procs)
    ]
    # Far enough ahead that every loadgen has imported grpc and connected before it opens.
    start_ns = time.monotonic_ns() + int(spec.lead * 1e9)
    with tempfile.TemporaryDirectory(prefix="bench-loadgen-") as tmp:
        running = []
        for i, share in enumerate(shares):
            out = Path(tmp, f"{i}.npz")
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.loadgen",
                "--target",
                srv.target,
                "--mode",
                spec.mode,
                "--concurrency",
                str(share),
                "--duration",
                str(spec.duration),
                "--warmup",
                str(spec.warmup),
                "--start-ns",
                str(start_ns),
                "--max-tokens",
                str(spec.max_tokens),
                "--vocab",
                str(vocab),
                "--seed",
                str(1_000_000 * i),
                "--out",
                str(out),
                "--service",
                spec.service,
                "--model",
                spec.model,
                "--features",
                str(spec.features),
            ]
            p = subprocess.Popen(
                cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            running.append((p, out))
        # The server's CPU over exactly the measured window, sampled here at its edges.
        ws = start_ns + int(spec.warmup * 1e9)
        spy = None
        if profile_to is not None:
            from . import profiling

            # Attached now, while the loadgens start: py-spy holds the process still for a
            # moment as it attaches, which must not fall inside the window. The samples
            # therefore include the warm-up's load as well.
            spy = profiling.start(srv.proc.pid, spec.lead + spec.warmup + spec.duration, profile_to)
        time.sleep(max(0.0, (ws - time.monotonic_ns()) / 1e9))
        srv_cpu0, srv_t0 = srv.cpu_s(), time.monotonic_ns()
        time.sleep(max(0.0, (ws + int(spec.duration * 1e9) - time.monotonic_ns()) / 1e9))
        srv_cpu1, srv_t1 = srv.cpu_s(), time.monotonic_ns()
        limit = spec.lead + spec.warmup + spec.duration + 30
        results = []
        for p, out in running:
            try:
                stdout, stderr = p.communicate(timeout=limit)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
                raise SectionSkipped(f"load generator ran past {limit:.0f} s") from None
            if p.returncode != 0:
                msg = (stderr.strip().splitlines() or ["no output"])[-1]
                raise SectionSkipped(f"load generator failed: {msg}")
            raw = np.load(out)
            results.append((json.loads(stdout.strip().splitlines()[-1]), raw))
        if spy is not None:
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
    window = results[0][0]["window_s"]
    tokens = sum(r["tokens"] for r, _ in results)
    if tokens == 0:
        tail = " | ".join(line for line in srv.log[-4:] if line.strip())
        raise SectionSkipped(
            f"{spec.mode} at {spec.concurrency}: nothing completed in the window (server "
            f"stalled or failing); server log: {tail or 'empty'}"
        )
    errors: dict[str, int] = {}
    for r, _ in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    row: dict[str, Any] = {
        "concurrency": spec.concurrency,
        "window_s": window,
        "client_procs": procs,
        "client_cpu_fraction_per_proc": [r["client_cpu_fraction"] for r, _ in results],
        # Cores the server process used over the window (all its threads; 1.0 = one core busy).
        "server_cpu_cores": (srv_cpu1 - srv_cpu0) / ((srv_t1 - srv_t0) / 1e9),
        "errors": errors,
    }
    if profile_to is not None:
        from . import profiling

        row["profiled"] = True
        if profile_to.is_file():
            row["profile"] = profiling.summarise(profile_to)
            row["profile_raw"] = str(profile_to)
        else:
            row["profile"] = "py-spy not installed or it could not attach"
    if spec.mode == "generate":
        row["tokens_per_s"] = tokens / window
        row["calls_done"] = sum(r["calls_done"] for r, _ in results)
        itl = np.concatenate([raw["itl_ns"] for _, raw in results])
        ttft = np.concatenate([raw["ttft_ns"] for _, raw in results])
        row["itl"] = percentiles_ms(itl)
        row["ttft"] = percentiles_ms(ttft)
    else:
        row["steps_per_s"] = tokens / window
        rtt = np.concatenate([raw["rtt_ns"] for _, raw in results])
        row["rtt"] = percentiles_ms(rtt)
    return row


def memory(
    srv: ServerProcess, model: ModelUnderTest, sessions: int, warm: int = 500
) -> dict[str, Any]:
    """Section 7: RSS growth for ``sessions`` idle sessions / their raw state bytes."""
    return asyncio.run(_memory(srv, model, sessions, warm))


async def _memory(
    srv: ServerProcess, model: ModelUnderTest, sessions: int, warm: int
) -> dict[str, Any]:
    import grpc

    from protos.lstmserve.v1 import lstm_serve_pb2 as pb
    from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LstmServeServiceStub(ch)
        sem = asyncio.Semaphore(64)

        async def bounded(call: Any, req: Any) -> Any:
            # The call is made inside the semaphore: grpc.aio starts an RPC as soon as the call
            # object exists, so building them all first would put thousands in flight at once.
            async with sem:
                return await call(req)

        async def create(n: int) -> list[str]:
            req = pb.CreateSessionRequest()
            rs = await asyncio.gather(*(bounded(stub.CreateSession, req) for _ in range(n)))
            return [r.session_id for r in rs]

        async def step(ids: list[str]) -> None:
            await asyncio.gather(
                *(bounded(stub.Step, pb.StepRequest(session_id=i, token_ids=[1])) for i in ids)
            )

        # Warm the allocator, gRPC's buffers and the session table's code paths first, so the
        # growth measured below is the sessions' own.
        ids = await create(warm)
        await step(ids)
        await asyncio.gather(
            *(bounded(stub.CloseSession, pb.CloseSessionRequest(session_id=i)) for i in ids)
        )
        await asyncio.sleep(0.5)
        base = srv.rss_bytes()
        ids = await create(sessions)
        await asyncio.sleep(0.5)
        after_create = srv.rss_bytes()
        await step(ids)
        await asyncio.sleep(0.5)
        after_step = srv.rss_bytes()
    raw = sessions * model.state_bytes
    grown = after_step - base
    return {
        "sessions": sessions,
        "state_bytes_per_session": model.state_bytes,
        "raw_state_bytes": raw,
        "rss_base_bytes": base,
        "rss_after_create_bytes": after_create,
        "rss_after_one_step_each_bytes": after_step,
        "growth_after_create_bytes": after_create - base,
        "growth_bytes": grown,
        "ratio_after_create": (after_create - base) / raw,
        "ratio": grown / raw,
        "bytes_per_session_beyond_1_5x_state": (grown - 1.5 * raw) / sessions,
        "bytes_per_session": grown / sessions,
    }


def create_scaling(srv: ServerProcess, small: int, large: int, probes: int) -> dict[str, Any]:
    """CreateSession latency with ``small`` and then ``large`` sessions already held.

    Sessions are created 64 at a time up to each size; then ``probes`` creates are timed one
    by one (each closed again, so the table stays at that size), and their p50/p99 reported.
    """
    return asyncio.run(_create_scaling(srv, small, large, probes))


async def _create_scaling(
    srv: ServerProcess, small: int, large: int, probes: int
) -> dict[str, Any]:
    import grpc

    from protos.lstmserve.v1 import lstm_serve_pb2 as pb
    from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LstmServeServiceStub(ch)
        sem = asyncio.Semaphore(64)

        async def one(_: int) -> None:
            async with sem:
                await stub.CreateSession(pb.CreateSessionRequest())

        async def fill_to(n: int, have: int) -> None:
            await asyncio.gather(*(one(i) for i in range(n - have)))

        async def probe() -> list[int]:
            out = []
            for _ in range(probes):
                t0 = time.perf_counter_ns()
                r = await stub.CreateSession(pb.CreateSessionRequest())
                out.append(time.perf_counter_ns() - t0)
                await stub.CloseSession(pb.CloseSessionRequest(session_id=r.session_id))
            return out

        rows = []
        have = 0
        for n in (small, large):
            t0 = time.perf_counter()
            await fill_to(n, have)
            fill_s = time.perf_counter() - t0
            have = n
            lat = np.asarray(await probe())
            rows.append(
                {
                    "sessions": n,
                    "fill_s": round(fill_s, 2),
                    "fill_per_s": round((n - (rows[-1]["sessions"] if rows else 0)) / fill_s, 1),
                    **percentiles_ms(lat),
                }
            )
    return {"rows": rows, "probes": probes, "rss_bytes": srv.rss_bytes()}
