"""Fixtures for server integration tests: a real server on 127.0.0.1:0, real gRPC channels.

The server runs in this process on its own event loop thread (so tests can read its state and
drive its clock); the SIGTERM test starts a real ``lstm-serve`` subprocess instead.

The whole integration suite runs beside ``make serve`` (:func:`beside_make_serve`): the default
ports are held by a real server for its whole run, so a test that binds one fails at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from prometheus_client import CollectorRegistry

from export.graph import random_model
from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from server.app import App
from server.settings import Settings
from tests.reference import Reference

T = TypeVar("T")

VOCAB = ["<unk>", " ", *"abcdefghijklmnopqrstuvwxyz"]


class ManualClock:
    """A monotonic clock the test moves by hand (idle-timeout tests)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ServerThread:
    """An :class:`App` on its own event loop thread; ``target`` is ``127.0.0.1:PORT``."""

    def __init__(self, settings: Settings, clock: Callable[[], float] | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.registry = CollectorRegistry()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.app: App | None = None
        self.stopped = False

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def on_loop(self, fn: Callable[[], T], timeout: float = 10) -> T:
        """Run ``fn`` on the server's loop thread (the only safe place to read its state)."""

        async def run() -> T:
            return fn()

        return self.call(run(), timeout)

    def start(self, wait_ready: bool = True) -> ServerThread:
        self.thread.start()

        async def make() -> App:
            kw: dict[str, Any] = {"registry": self.registry}
            if self.clock is not None:
                kw["clock"] = self.clock
            app = App(self.settings, **kw)
            await app.start()
            return app

        self.app = self.call(make())
        if wait_ready:
            self.call(self.app.ready())
        return self

    @property
    def target(self) -> str:
        assert self.app is not None
        return f"127.0.0.1:{self.app.port}"

    def stop(self, grace: float = 2.0) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.app is not None:
            self.call(self.app.drain(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def make_settings(model: Path, **overrides: Any) -> Settings:
    base = dict(
        model=str(model),
        port=0,
        metrics_port=-1,
        intra_op_threads=1,
        provider="cpu",
        drain_grace_s=2.0,
    )
    base.update(overrides)
    return Settings(**base).validate()  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-layer random model in a repository layout NAME/VERSION/model.onnx."""
    import onnx

    path = tmp_path_factory.mktemp("repo") / "tiny" / "3" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(random_model(VOCAB, hidden_size=24, num_layers=2, seed=7), str(path))
    return path


@pytest.fixture
def start_server(model_path: Path) -> Iterator[Callable[..., ServerThread]]:
    """Factory: ``start_server(clock=None, wait_ready=True, **settings)``; stopped afterwards."""
    started: list[ServerThread] = []

    def start(
        clock: Callable[[], float] | None = None, wait_ready: bool = True, **overrides: Any
    ) -> ServerThread:
        srv = ServerThread(make_settings(model_path, **overrides), clock)
        started.append(srv)
        return srv.start(wait_ready)

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """One server for tests that do not disturb it (metrics port on, batching on)."""
    import onnx

    path = tmp_path_factory.mktemp("shared") / "model.onnx"
    onnx.save(random_model(VOCAB, hidden_size=24, num_layers=2, seed=7), str(path))
    srv = ServerThread(
        make_settings(path, metrics_port=0, max_prompt_tokens=64, max_new_tokens=500)
    )
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def stub_for() -> Iterator[Callable[[ServerThread], Any]]:
    channels: list[grpc.Channel] = []

    def make(srv: ServerThread) -> Any:
        ch = grpc.insecure_channel(srv.target)
        channels.append(ch)
        return pb_grpc.LstmServeServiceStub(ch)

    yield make
    for ch in channels:
        ch.close()


@pytest.fixture(scope="session")
def reference(model_path: Path) -> Reference:
    return Reference(model_path)


ROOT = Path(__file__).resolve().parents[2]


def port_in_use(port: int) -> bool:
    """Something listens on 127.0.0.1:``port``."""
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def make_serve_command() -> list[str]:
    """``make serve``'s command line, from the Makefile's ``SERVE_FLAGS`` (one source of truth)."""
    for line in (ROOT / "Makefile").read_text(encoding="utf-8").splitlines():
        if line.startswith("SERVE_FLAGS"):
            flags = shlex.split(line.split("=", 1)[1])
            return [sys.executable, "-m", "server.cli", *flags]
    raise AssertionError("the Makefile has no SERVE_FLAGS line")


class BesideServe:
    """The default ports, and the ``make serve`` this suite started on them (None: one was
    already running, e.g. in a developer's other terminal)."""

    def __init__(self) -> None:
        defaults = Settings()
        command = make_serve_command()
        # make serve also turns on HTTP (--http-port in SERVE_FLAGS): that port is held too.
        http = [int(command[command.index("--http-port") + 1])] if "--http-port" in command else []
        self.ports = (defaults.port, defaults.metrics_port, *http)
        self.proc: subprocess.Popen[bytes] | None = None


@pytest.fixture(scope="session", autouse=True)
def beside_make_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BesideServe]:
    """Every integration test runs while ``make serve`` holds the default gRPC and metrics ports.

    If nothing holds them, the same command ``make serve`` runs is started here on them; a test
    whose server reached for a default port then fails with "address in use" (or, for the
    SO_REUSEPORT gRPC port, shares it and answers wrongly) instead of passing by luck.
    """
    beside = BesideServe()
    if not any(port_in_use(p) for p in beside.ports):
        log = tmp_path_factory.mktemp("make-serve") / "serve.log"
        with log.open("wb") as out:
            beside.proc = subprocess.Popen(
                make_serve_command(),
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "LSTM_SERVE_PROVIDER": "cpu"},
                cwd=ROOT,
            )
        deadline = time.monotonic() + 90
        while not all(port_in_use(p) for p in beside.ports):
            if beside.proc.poll() is not None or time.monotonic() > deadline:
                beside.proc.kill()
                raise AssertionError(f"make serve's command did not start: {log.read_text()}")
            time.sleep(0.2)
    yield beside
    if beside.proc is not None:
        beside.proc.send_signal(signal.SIGTERM)
        try:
            beside.proc.wait(30)
        except subprocess.TimeoutExpired:
            beside.proc.kill()
            beside.proc.wait()


class Served:
    """A real ``lstm-serve`` subprocess; its port, pids and output lines."""

    def __init__(self, model: Path, *args: str) -> None:
        env = {**os.environ, "LSTM_SERVE_PROVIDER": "cpu"}
        # Free ports unless the test says otherwise (a later flag wins).
        ports = ["--port", "0", "--metrics-port", "0"]
        # A test that serves a repository (--model-repository) gives no single model.
        one = [] if "--model-repository" in args else ["--model", str(model)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", *one, *ports, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.lines: list[str] = []
        self.port = 0
        self.metrics_port = 0
        self.engine_pid = 0
        self.frontend_pids: list[int] = []
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 60
        for line in self.proc.stdout:
            self.lines.append(line)
            if m := re.search(r"engine pid (\d+), \d+ front end\(s\) pid ([\d,]+)", line):
                self.engine_pid = int(m.group(1))
                self.frontend_pids = [int(p) for p in m.group(2).split(",")]
            if m := re.search(r"one process \(engine and gRPC\) pid (\d+)", line):
                self.engine_pid = int(m.group(1))  # the single topology: no front ends
            if m := re.search(r"metrics on http://\S+:(\d+)/", line):
                self.metrics_port = int(m.group(1))
            if m := re.search(r"gRPC listening on \S*?:(\d+)", line):
                self.port = int(m.group(1))
            if line.startswith("try:") or time.monotonic() > deadline:
                break
        if not (self.port and self.engine_pid):
            # Not started as expected: stop it here, since no fixture holds it to stop later.
            self.stop()
            raise AssertionError("".join(self.lines))
        # Keep reading, so the pipe never fills and the test can look at later lines.
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()


@pytest.fixture
def serve(model_path: Path) -> Iterator[Callable[..., Served]]:
    """Factory: ``serve(*flags, model=None)`` starts a real ``lstm-serve``; stopped afterwards."""
    started: list[Served] = []

    def start(*args: str, model: Path | None = None) -> Served:
        s = Served(model or model_path, *args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def run_script(script: str, plan: Any) -> Any:
    """``script`` in a child interpreter (tritonclient brings gevent, which patches the
    process), given ``plan`` as JSON on stdin; what it prints as JSON."""
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script],
        input=json.dumps(plan),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)
