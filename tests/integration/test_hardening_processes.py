"""Hardening of ``lstm-serve``'s processes (issue 19): a port another server holds is a start
error (gRPC and metrics), never a shared port, and /metrics shows every process's memory and CPU.

Real ``lstm-serve`` processes on free ports, real connections.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos.lstmserve.v1 import lstm_serve_pb2 as pb
from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from server.supervisor import StartError, reserve_port

from .conftest import ROOT, Reference, Served

ATOL = 1e-5
V = 28


def second_server(model: Path, *flags: str, timeout: float = 30) -> tuple[int, str, str]:
    """Start another ``lstm-serve`` that is expected to fail: ``(exit code, stdout, stderr)``.

    One that is still running after ``timeout`` (it started) is stopped, and the test fails.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "--model", str(model), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "LSTM_SERVE_PROVIDER": "cpu"},
        cwd=ROOT,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"the second server started instead of failing:\n{out}\n{err}")
    return proc.returncode, out, err


def one_error_line(out: str, err: str) -> str:
    """The one ``lstm-serve: error:`` line (and no traceback anywhere)."""
    assert "Traceback" not in out + err, out + err
    errors = [x for x in err.splitlines() if x.startswith("lstm-serve: error:")]
    assert len(errors) == 1, err
    return errors[0]


def answers(target: str) -> bool:
    with grpc.insecure_channel(target) as ch:
        try:
            pb_grpc.LstmServeServiceStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=2)
            return True
        except grpc.RpcError:
            return False


class Checker:
    """Creates a session on one fresh connection and steps it on another, over and over, on a
    thread; every step's logits are compared with the reference. A connection that lands on some
    other server (one sharing the port) answers NOT_FOUND or wrong logits: an error here."""

    def __init__(self, target: str, reference: Reference) -> None:
        self.target = target
        self.reference = reference
        self.done = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._n = 0

    def _channel(self) -> grpc.Channel:
        # A connection of its own per channel (no shared subchannel), so the kernel's
        # SO_REUSEPORT spreading applies to each.
        self._n += 1
        opts = [("grpc.use_local_subchannel_pool", 1), ("test.nonce", self._n)]
        return grpc.insecure_channel(self.target, options=opts)

    def _run(self) -> None:
        k = 0
        while not self._stop.is_set():
            k += 1
            tokens = [k % V, (3 * k) % V, (7 * k + 1) % V]
            try:
                with self._channel() as a, self._channel() as b:
                    sid = (
                        pb_grpc.LstmServeServiceStub(a)
                        .CreateSession(pb.CreateSessionRequest(), timeout=10)
                        .session_id
                    )
                    r = pb_grpc.LstmServeServiceStub(b).Step(
                        pb.StepRequest(
                            session_id=sid, token_ids=tokens, output=pb.STEP_OUTPUT_ALL_LOGITS
                        ),
                        timeout=10,
                    )
                got = np.asarray(r.logits, np.float32).reshape(len(tokens), V)
                want, _ = self.reference.feed(tokens, self.reference.zeros())
                if not np.allclose(got, want, atol=ATOL, rtol=0):
                    self.errors.append(f"step {k}: wrong logits")
                self.done += 1
            except grpc.RpcError as e:
                self.errors.append(f"step {k}: {e.code()} {e.details()}")

    def __enter__(self) -> Checker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def wait_for(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        start = self.done
        while self.done < start + n and time.monotonic() < deadline:
            time.sleep(0.05)


def test_a_second_server_on_the_same_port_exits_1_and_the_first_serves_on(
    serve, model_path: Path, reference: Reference
):
    first = serve("--frontends", "2")
    with Checker(first.target, reference) as checker:
        checker.wait_for(5)
        code, out, err = second_server(model_path, "--port", str(first.port), "--metrics-port", "0")
        checker.wait_for(10)
    assert code == 1, out + err
    line = one_error_line(out, err)
    assert str(first.port) in line and "--port" in line and "LSTM_SERVE_PORT" in line, line
    assert "already in use" in line, line
    assert checker.done >= 15 and not checker.errors, checker.errors[:5]
    assert first.proc.poll() is None
    assert first.stop() == 0


def test_the_port_stays_held_while_a_dead_frontend_is_replaced(
    serve, model_path: Path, reference: Reference
):
    # One front end: killed, nothing listens on the port until its replacement binds it. A
    # server that only checked the port at start would let another server take it meanwhile.
    first = serve("--frontends", "1", "--metrics-port", "-1")
    os.kill(first.frontend_pids[0], signal.SIGKILL)
    code, out, err = second_server(model_path, "--port", str(first.port), "--metrics-port", "-1")
    assert code == 1, out + err
    assert str(first.port) in one_error_line(out, err)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not answers(first.target):
        time.sleep(0.1)
    with Checker(first.target, reference) as checker:
        checker.wait_for(5)
    assert checker.done >= 5 and not checker.errors, checker.errors[:5]
    assert first.stop() == 0


def test_a_second_server_on_the_same_metrics_port_exits_1_and_the_first_serves_on(
    serve, model_path: Path, reference: Reference
):
    first = serve("--frontends", "1")
    with Checker(first.target, reference) as checker:
        checker.wait_for(3)
        code, out, err = second_server(
            model_path, "--port", "0", "--metrics-port", str(first.metrics_port), timeout=60
        )
        checker.wait_for(5)
    assert code == 1, out + err
    line = one_error_line(out, err)
    assert str(first.metrics_port) in line, line
    assert "--metrics-port" in line and "LSTM_SERVE_METRICS_PORT" in line, line
    assert "already in use" in line, line
    assert checker.done >= 8 and not checker.errors, checker.errors[:5]
    assert "lstm_serve_sessions_active" in first.metrics()
    assert first.stop() == 0


def _time_wait_on(port: int) -> bool:
    """A TCP connection whose local port is ``port`` is in TIME_WAIT (/proc/net/tcp: state 06)."""
    with open("/proc/net/tcp", encoding="ascii") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return any(int(r[1].split(":")[1], 16) == port and r[3] == "06" for r in rows)


def test_the_reservation_ignores_time_wait_and_lets_only_reuseport_sockets_beside_it():
    # A server that stopped a moment ago leaves its connections in TIME_WAIT on the port: a
    # restart must not take that for another server.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server side closes first: its end waits in TIME_WAIT
    client.settimeout(30)
    assert client.recv(1) == b""  # its FIN arrived
    client.close()
    # The condition the test is about, waited for rather than slept on: a connection on the
    # port in TIME_WAIT.
    deadline = time.monotonic() + 30
    while not _time_wait_on(port):
        assert time.monotonic() < deadline, f"no connection on port {port} in TIME_WAIT"
        time.sleep(0.01)
    with pytest.raises(StartError, match=f"port {port} on 127.0.0.1 is already in use"):
        reserve_port("127.0.0.1", port)  # the listener still holds it
    listener.close()
    held, got = reserve_port("127.0.0.1", port)
    try:
        assert got == port
        with pytest.raises(StartError, match="--port / LSTM_SERVE_PORT"):
            reserve_port("127.0.0.1", port)
        # Our front ends (SO_REUSEPORT, same user) bind and listen beside the reservation.
        fe = socket.socket()
        fe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        fe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        fe.bind(("127.0.0.1", port))
        fe.listen()
        fe.close()
        # Nobody listens now, and still no other server gets the port.
        with pytest.raises(StartError):
            reserve_port("127.0.0.1", port)
    finally:
        for s in held:
            s.close()
    for s in reserve_port("127.0.0.1", port)[0]:  # free again
        s.close()


SERIES = re.compile(
    r"^lstm_serve_process_(resident_memory_bytes|cpu_seconds_total)"
    r'\{pid="(\d+)",process="([^"]+)"\} (\S+)$',
    re.M,
)


def per_process(srv: Served) -> dict[str, dict[str, tuple[int, float]]]:
    """{metric: {process: (pid, value)}} from one scrape."""
    out: dict[str, dict[str, tuple[int, float]]] = {}
    for metric, pid, process, value in SERIES.findall(srv.metrics()):
        out.setdefault(metric, {})[process] = (int(pid), float(value))
    return out


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_metrics_show_memory_and_cpu_of_every_process_and_a_replaced_frontend(serve):
    srv = serve("--frontends", "2", "--metrics-port", "0")
    want = {
        "supervisor": srv.proc.pid,
        "engine": srv.engine_pid,
        "frontend-0": srv.frontend_pids[0],
        "frontend-1": srv.frontend_pids[1],
    }
    got = per_process(srv)
    for metric in ("resident_memory_bytes", "cpu_seconds_total"):
        assert {p: pid for p, (pid, _) in got.get(metric, {}).items()} == want, got
    for process, (_, rss) in got["resident_memory_bytes"].items():
        assert 10e6 < rss < 4e9, (process, rss)
    for process, (_, cpu) in got["cpu_seconds_total"].items():
        assert 0 < cpu < 3600, (process, cpu)

    victim = srv.frontend_pids[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = per_process(srv)
        fe0 = got.get("resident_memory_bytes", {}).get("frontend-0")
        if fe0 is not None and fe0[0] != victim:
            break
        time.sleep(0.2)
    assert fe0 is not None and fe0[0] != victim, got
    replacement = fe0[0]
    assert parent_of(replacement) == srv.proc.pid  # a front end the supervisor started
    assert fe0[1] > 10e6
    assert got["cpu_seconds_total"]["frontend-0"][0] == replacement
    pids = {pid for series in got.values() for pid, _ in series.values()}
    assert victim not in pids
    assert {"supervisor", "engine", "frontend-0", "frontend-1"} == set(got["cpu_seconds_total"])
    assert srv.stop() == 0
