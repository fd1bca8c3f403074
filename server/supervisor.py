"""``lstm-serve``'s parent process: starts the engine and the front ends and watches them.

Two topologies (``--topology``; ``auto`` picks single on hosts with at most 2 available cores,
where it measured cheaper and faster, and split elsewhere):

* single: one child (:mod:`server.single`) runs the engine and gRPC (and HTTP) together, on the
  reserved ports; its death stops the server (exit 1), as the engine's does below.
* split (vLLM v1's split between API-server processes and an engine-core process)::

    supervisor ── engine process (model, state pool, sessions, engine loop; /metrics)
               ├─ front end 0 ─┐
               ├─ front end 1 ─┼─ gRPC on one port (SO_REUSEPORT), a Unix socket to the engine
               └─ ...         ─┘

* The port is reserved first (:func:`reserve_port`: a port another process holds is a start
  error; 0 picks a free one), and so is the KServe v2 HTTP port (``--http-port``) when it is on;
  the engine starts (it loads the model); then every front end binds those ports.
* A front end that dies is started again on the same port; the engine ends the requests and
  streams it had open as soon as its connection closes.
* If the engine dies, everything stops and ``lstm-serve`` exits non-zero: the front ends see it
  within 0.1 s, turn health NOT_SERVING, fail their open requests with UNAVAILABLE and exit.
* SIGTERM/SIGINT drains through both layers: the front ends first (health NOT_SERVING, new
  requests UNAVAILABLE, ``drain_grace_s`` for the open ones), then the engine; exit 0.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .runtime import check_model_source
from .settings import Settings

log = logging.getLogger("lstm_serve")

POLL_S = 0.1
START_TIMEOUT_S = 120.0
RESTART_BACKOFF_S = 0.5


class StartError(RuntimeError):
    """A process did not come up; the message is the reason it gave."""


PORT_FLAG = "--port / LSTM_SERVE_PORT"
HTTP_PORT_FLAG = "--http-port / LSTM_SERVE_HTTP_PORT"


def reserve_port(host: str, port: int, flag: str = PORT_FLAG) -> tuple[list[socket.socket], int]:
    """Hold ``host:port`` for this server's front ends alone: ``(held sockets, port)``.

    The front ends bind with SO_REUSEPORT so that they share the port, and the kernel lets any
    other SO_REUSEPORT socket of the same user (another ``lstm-serve``, any gRPC server) share it
    too. So first each address ``host`` resolves to is bound here WITHOUT SO_REUSEPORT (only
    SO_REUSEADDR, so that connections of a previous run in TIME_WAIT do not count), which fails
    with EADDRINUSE whenever another socket listens on the port (SO_REUSEPORT or not) or holds it
    without SO_REUSEADDR. The socket then turns SO_REUSEADDR off and SO_REUSEPORT on and stays
    bound, never listening (it gets no connections), until the server stops: our front ends bind
    beside it, while another server's reservation fails, even while a dead front end is being
    replaced and nobody listens. No window between the check and the front ends' binds. Port 0:
    the port the kernel picks for the first address (the front ends then all bind that one).
    What this cannot stop: a program of the same user that binds the port later WITH
    SO_REUSEPORT without checking first (the kernel lets it join).

    Raises :class:`StartError` with a one-line reason naming the port and ``flag`` (the
    setting that chose it: the gRPC port's, or the HTTP port's).
    """
    if not hasattr(socket, "SO_REUSEPORT"):
        return [], port  # no sharing to guard against: the front ends cannot share a port either
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as e:
        raise StartError(f"cannot listen on {host}:{port}: {e} (--host / LSTM_SERVE_HOST)") from e
    addrs = list(dict.fromkeys((family, addr) for family, _, _, _, addr in infos))
    for _ in range(5 if port == 0 else 1):
        held: list[socket.socket] = []
        chosen = port
        try:
            for family, addr in addrs:
                s = socket.socket(family, socket.SOCK_STREAM)
                held.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((addr[0], chosen, *addr[2:]))
                chosen = s.getsockname()[1]
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            return held, chosen
        except OSError as e:
            for s in held:
                s.close()
            if e.errno == errno.EADDRINUSE and port == 0:
                continue  # the kernel's pick for one address is taken on another: pick again
            if e.errno == errno.EADDRINUSE:
                raise StartError(
                    f"port {port} on {host} is already in use by another process "
                    f"(choose another with {flag})"
                ) from e
            raise StartError(
                f"cannot listen on {host}:{chosen}: {e.strerror} (--host / LSTM_SERVE_HOST, {flag})"
            ) from e
    raise StartError(f"found no free port on {host} for every address (give one with {flag})")


class _Child:
    """One child process whose stdout carries a one-line ready report, then is forwarded."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.argv = argv
        self.proc: subprocess.Popen[str] | None = None

    def start(
        self, ready_prefix: str, failed_prefix: str, stop: threading.Event | None = None
    ) -> list[str]:
        """Start it and wait for its ready line; the words after the prefix.

        Gives up (killing it, :class:`StartError`) when it exits, reports failure, stays silent
        past :data:`START_TIMEOUT_S` or ``stop`` is set meanwhile (SIGTERM during start-up): a
        child that never prints its line must not hold ``lstm-serve`` forever."""
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=False,
        )
        assert self.proc.stdout is not None
        report: queue.Queue[tuple[str, str]] = queue.Queue()
        _pump(self.proc.stdout, ready_prefix, failed_prefix, report)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                kind, rest = report.get(timeout=POLL_S)
                break
            except queue.Empty:
                if time.monotonic() > deadline:
                    self.kill()
                    raise StartError(
                        f"{self.name} did not report ready within {START_TIMEOUT_S:.0f} s"
                    ) from None
                if stop is not None and stop.is_set():
                    self.kill()
                    raise StartError(f"stopped while {self.name} was starting") from None
        if kind == "ready":
            return rest.split()
        if kind == "failed":
            self.proc.wait(10)
            raise StartError(rest.strip())
        self.kill()
        raise StartError(f"{self.name} exited before it was ready (code {self.proc.poll()})")

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _pump(
    stream: IO[str], ready_prefix: str, failed_prefix: str, report: queue.Queue[tuple[str, str]]
) -> None:
    """Forward a child's stdout to ours (so its pipe never fills), except its one ready or
    failed line, which goes to ``report`` as ("ready" | "failed", the rest of the line); an
    end of output before either is ("exited", "")."""

    def pump() -> None:
        reported = False
        for line in stream:
            if not reported and line.startswith((ready_prefix, failed_prefix)):
                ready = line.startswith(ready_prefix)
                prefix = ready_prefix if ready else failed_prefix
                report.put(("ready" if ready else "failed", line[len(prefix) :].rstrip("\n")))
                reported = True
                continue
            print(line, end="", flush=True)
        if not reported:
            report.put(("exited", ""))

    threading.Thread(target=pump, daemon=True).start()


class Supervisor:
    """Runs the topology for ``settings`` until a signal or the engine's death."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.validate()
        self.topology = self.settings.resolved_topology()
        self.rundir = Path(tempfile.mkdtemp(prefix="lstm-serve-"))
        self.socket = str(self.rundir / "engine.sock")
        self.engine: _Child | None = None
        self.frontends: list[_Child] = []
        self.port = 0
        self._port_guard: list[socket.socket] = []  # see reserve_port
        self.http_port: int | None = None  # KServe v2 HTTP/REST; None: off (--http-port -1)
        self.metrics_port: int | None = None
        self.describe = ""
        self.restarts = 0
        self._stop = threading.Event()

    def request_stop(self) -> None:
        self._stop.set()

    def forward(self, sig: int) -> None:
        """Send ``sig`` to every process serving gRPC (SIGHUP: reload the tokens file)."""
        for fe in self.frontends:
            fe.signal(sig)
        if self.topology == "single" and self.engine is not None:
            self.engine.signal(sig)

    def _single_argv(self) -> list[str]:
        http_port = -1 if self.http_port is None else self.http_port
        ss = dataclasses.replace(self.settings, port=self.port, http_port=http_port)
        return [sys.executable, "-m", "server.single", "--settings-json", ss.to_json()]

    def _engine_argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "server.engine_host",
            "--settings-json",
            self.settings.to_json(),
            "--socket",
            self.socket,
        ]

    def _frontend_argv(self, index: int, port: int) -> list[str]:
        http_port = -1 if self.http_port is None else self.http_port
        fs = dataclasses.replace(self.settings, port=port, http_port=http_port, metrics_port=-1)
        return [
            sys.executable,
            "-m",
            "server.frontend",
            "--settings-json",
            fs.to_json(),
            "--socket",
            self.socket,
            "--engine-pid",
            str(self.engine.pid if self.engine else 0),
            "--index",
            str(index),
        ]

    def start(self) -> None:
        """Engine, then the front ends; raises :class:`StartError` (everything stopped)."""
        # A missing model or repository is reported before anything starts.
        check_model_source(self.settings.model, self.settings.model_repository)
        # And a port someone else holds, before the model loads.
        self._port_guard, self.port = reserve_port(self.settings.host, self.settings.port)
        if self.settings.http_port >= 0:
            # The HTTP port is held the same way, for the same reasons.
            try:
                held, self.http_port = reserve_port(
                    self.settings.host, self.settings.http_port, HTTP_PORT_FLAG
                )
            except StartError:
                for s in self._port_guard:
                    s.close()
                raise
            self._port_guard += held
        try:
            if self.topology == "single":
                # The one process serves gRPC itself, on the reserved port.
                self.engine = _Child("server", self._single_argv())
            else:
                self.engine = _Child("engine", self._engine_argv())
            words = self.engine.start("ENGINE READY", "ENGINE FAILED", self._stop)
            metrics_port = int(words[0])
            self.metrics_port = metrics_port if metrics_port >= 0 else None
            self.describe = " ".join(words[1:])
            if self.topology == "split":
                for i in range(self.settings.frontend_count()):
                    self._start_frontend(i, self.port)
        except BaseException:
            self.stop_all(grace=0)
            raise

    def _start_frontend(self, index: int, port: int) -> int:
        child = _Child(f"front end {index}", self._frontend_argv(index, port))
        words = child.start("FRONTEND READY", "FRONTEND FAILED", self._stop)
        if index < len(self.frontends):
            self.frontends[index] = child
        else:
            self.frontends.append(child)
        return int(words[0])

    def watch(self, on_event: Callable[[str], None] | None = None) -> int:
        """Until a stop request (drain; 0) or the engine's death (stop; 1). Restarts front ends."""
        assert self.engine is not None
        while not self._stop.wait(POLL_S):
            code = self.engine.poll()
            if code is not None:
                log.error("the %s process exited (code %s): stopping", self.engine.name, code)
                self.stop_all(grace=3.0)
                return 1
            for i, fe in enumerate(self.frontends):
                if fe.poll() is not None and not self._stop.is_set():
                    log.warning("front end %d exited (code %s): starting another", i, fe.poll())
                    time.sleep(RESTART_BACKOFF_S)
                    try:
                        self._start_frontend(i, self.port)
                        self.restarts += 1
                        if on_event is not None:
                            on_event(f"restarted front end {i}")
                    except StartError as e:
                        log.error("front end %d did not start again: %s", i, e)
        self.stop_all(grace=self.settings.drain_grace_s)
        return 0

    def stop_all(self, grace: float) -> None:
        """Front ends first (they drain), then the engine; kills what outlives its grace."""
        for fe in self.frontends:
            fe.signal(signal.SIGTERM)
        for fe in self.frontends:
            if fe.wait(grace + 2.0) is None:
                fe.kill()
        if self.engine is not None:
            self.engine.signal(signal.SIGTERM)
            if self.engine.wait(grace + 5.0) is None:
                self.engine.kill()
        for s in self._port_guard:
            s.close()
        self._port_guard = []
        shutil.rmtree(self.rundir, ignore_errors=True)


def run(settings: Settings, announce: Callable[[Supervisor], None] | None = None) -> int:
    """``lstm-serve``: start, announce, watch; the exit code."""
    sup = Supervisor(settings)
    previous = {
        sig: signal.signal(sig, lambda *_: sup.request_stop())
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    # SIGHUP: the front ends read the tokens file again.
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: sup.forward(signal.SIGHUP))
    try:
        sup.start()
        if announce is not None:
            announce(sup)
        code = sup.watch()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped (exit %d)", code)
    return code
