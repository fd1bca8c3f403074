"""Real services on free loopback ports: a throwaway ``redis-server``, and nginx (Debian's) as the
session-affine proxy that ``deploy/nginx/render.py`` configures.

Usable from pytest (the ``redis_url`` fixture) and from scripts (the scale test, benchmarks)::

    python -m tests.state_services      # starts one, prints its URL, stops on Ctrl-C

The server has no persistence (``--save "" --appendonly no``) and runs in a temporary folder,
so nothing is left behind. If ``redis-server`` is missing, ``scripts/system-deps.sh`` installs it
(root with apt-get, as in CI); otherwise the caller fails with its message naming the command.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SYSTEM_DEPS = Path(__file__).resolve().parents[1] / "scripts" / "system-deps.sh"
MISSING = (
    "redis-server not found: install the Debian package redis-server (apt-get install redis-server)"
)


class ServiceError(RuntimeError):
    """A service could not be found, installed or started."""


def find_program(name: str, install: bool = True) -> str:
    """Path of ``name`` (redis-server, nginx, ...: in /usr/sbin too, which a non-root PATH may
    lack), installed first by ``scripts/system-deps.sh`` when missing.

    That script is the one install step that ``make test`` and ``.ci/run`` share (apt-get as
    root); otherwise it names the command. Raises ServiceError with its message.
    """

    def which() -> str | None:
        return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")

    missing = f"{name} not found: install the Debian package ({SYSTEM_DEPS.name} names it)"
    path = which()
    if path:
        return path
    if not install:
        raise ServiceError(missing)
    done = subprocess.run(["bash", str(SYSTEM_DEPS)], capture_output=True, text=True)
    path = which()
    if done.returncode != 0 or not path:
        raise ServiceError(f"{missing}; {SYSTEM_DEPS.name}: {' '.join(done.stderr.split())}")
    return path


def find_redis_server(install: bool = True) -> str:
    """Path of ``redis-server`` (:func:`find_program`)."""
    try:
        return find_program("redis-server", install)
    except ServiceError as e:
        raise ServiceError(str(e).replace("redis-server not found", MISSING, 1)) from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server(timeout_s: float = 10.0) -> Iterator[str]:
    """Run a fresh ``redis-server`` on 127.0.0.1; yields ``redis://127.0.0.1:PORT/0``.

    Waits until it answers PING; stops it (SIGTERM, then SIGKILL) on exit. Raises ServiceError
    if it cannot be found or does not come up (with the end of its log).
    """
    exe = find_redis_server()
    with tempfile.TemporaryDirectory(prefix="lstm-serve-redis-") as tmp:
        # The free port may be taken between probing and binding; a second try covers that race.
        for _attempt in range(3):
            port = _free_port()
            log_path = os.path.join(tmp, f"redis-{port}.log")
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [
                        exe,
                        "--port", str(port),
                        "--bind", "127.0.0.1",
                        "--save", "",
                        "--appendonly", "no",
                        "--dir", tmp,
                        "--daemonize", "no",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
            deadline = time.monotonic() + timeout_s
            while proc.poll() is None and time.monotonic() < deadline and not _pings(port):
                time.sleep(0.02)
            if proc.poll() is None and _pings(port):
                break
            _stop(proc)
        else:
            with open(log_path, errors="replace") as f:
                tail = " | ".join(f.read().splitlines()[-5:])
            raise ServiceError(f"redis-server did not start: {tail}")
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            _stop(proc)


@contextlib.contextmanager
def nginx_proxy(replicas: list[str], workdir: Path, listen_port: int = 0) -> Iterator[str]:
    """nginx configured by ``deploy/nginx/render.py scale`` (hashing ``lstm-session-id``) in
    front of ``replicas`` (HOST:PORT each), listening on ``listen_port`` (0: a free one) with its
    files under ``workdir/nginx``; yields its HOST:PORT. Raises ServiceError when ``nginx -t``
    rejects the configuration."""
    import signal
    import sys

    binary = find_program("nginx")
    prefix = workdir / "nginx"
    prefix.mkdir()
    port = listen_port or _free_port()
    render = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "render.py"
    args = [sys.executable, str(render), "scale", "--prefix", str(prefix)]
    args += ["--listen", f"127.0.0.1:{port}"]
    for target in replicas:
        args += ["--replica", target]
    conf = prefix / "nginx.conf"
    conf.write_text(subprocess.run(args, check=True, capture_output=True, text=True).stdout)
    cmd = [binary, "-c", str(conf), "-p", str(prefix), "-e", str(prefix / "error.log")]
    test = subprocess.run([*cmd, "-t"], capture_output=True, text=True)
    if test.returncode != 0:
        raise ServiceError(f"nginx -t failed: {test.stderr.strip()}")
    proc = subprocess.Popen([*cmd, "-g", "daemon off;"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=0.5),
            ):
                break
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A running throwaway Redis for the whole test session. Fails (never skips) without one."""
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(redis_server())
        except ServiceError as e:
            pytest.fail(str(e), pytrace=False)
        yield url


if __name__ == "__main__":
    with redis_server() as url:
        print(url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
