"""``make scale-test``: replicas behind a session-affine proxy, for real, on loopback.

nginx (Debian's package) hashes the ``lstm-session-id`` header over three ``lstm-serve``
replicas that share one Redis store (Debian's ``redis-server``), all as plain processes here.
32 sessions step through nginx with random chunks; a third of the way in, one replica is
killed with -9. Every session must go on through the others with every logits row equal to
in-process ONNX Runtime fed the same tokens (0 mismatches) and no acknowledged step lost.

A step whose call failed (the replica died under it) may or may not have been committed: the
client reads the session's step count to learn which, as any client without request ids must
(issue 13 adds idempotent retries), and retries only what was not applied.

Prints a summary and writes ``--out`` (JSON): steps/s through the proxy, mismatches, retries,
and the failover time (kill -9 to the first successful step of an affected session on another
replica). Exit 0 only when every check passes. Bounded: every wait has a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.client import LstmClient  # noqa: E402
from tests.reference import Reference  # noqa: E402
from tests.state_services import (  # noqa: E402
    ServiceError,
    find_program,
    nginx_proxy,
    redis_server,
)

MODEL = ROOT / "server" / "model_repo" / "timemachine" / "1" / "model.onnx"
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,  # nginx answers a reset upstream stream with INTERNAL
}


def log(msg: str) -> None:
    print(f"scale-test: {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Replica:
    def __init__(self, index: int, store: str, workdir: Path) -> None:
        self.index = index
        self.port = free_port()
        self.metrics_port = free_port()
        self.log_path = workdir / f"replica{index}.log"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server.cli",
                "--port",
                str(self.port),
                "--metrics-port",
                str(self.metrics_port),
                "--state-store",
                store,
                "--frontends",
                "1",
                "--provider",
                "cpu",
                "--drain-grace-s",
                "2",
            ],
            cwd=ROOT,
            stdout=open(self.log_path, "w"),  # noqa: SIM115 (closed with the process)
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"replica {self.index} exited: {self.log_path.read_text()[-2000:]}"
                )
            if "gRPC listening on" in self.log_path.read_text():
                return
            time.sleep(0.1)
        raise SystemExit(f"replica {self.index} did not start in time")

    def sessions_active(self) -> int:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        m = re.search(r"^lstm_serve_sessions_active (\S+)$", text, re.M)
        return int(float(m.group(1))) if m else -1

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Session:
    """One client-side session: its id, its reference state and what it has fed."""

    def __init__(self, sid: str, ref: Reference) -> None:
        self.sid = sid
        self.state = ref.zeros()
        self.steps = 0
        self.calls = 0
        self.mismatches = 0
        self.retries = 0
        self.failures: list[float] = []  # monotonic times of failed calls
        self.recovered_at: float | None = None


def drive(
    target: str,
    session: Session,
    ref: Reference,
    n_steps: int,
    rng: random.Random,
    kill_time: list[float],
    deadline: float,
) -> None:
    with LstmClient(target, timeout=10) as client:
        for _ in range(n_steps):
            chunk = [rng.randrange(1, 28) for _ in range(rng.choice([1, 1, 2, 3, 5]))]
            want, after = ref.feed(chunk, session.state)
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"session {session.sid}: out of time")
                try:
                    r = client.step(session.sid, token_ids=chunk, output=2)
                except grpc.RpcError as e:
                    if e.code() not in RETRYABLE:
                        raise
                    session.retries += 1
                    session.failures.append(time.monotonic())
                    time.sleep(0.05)
                    # Was it committed before the failure? The step count says.
                    with contextlib.suppress(grpc.RpcError):
                        if client.get_session(session.sid).steps == session.steps + len(chunk):
                            session.state = after
                            session.steps += len(chunk)
                            session.calls += 1
                            break
                    continue
                got = np.asarray(r.logits, np.float32).reshape(len(chunk), -1)
                if not np.allclose(got, want, atol=1e-4, rtol=0):
                    session.mismatches += 1
                session.state = after
                session.steps += len(chunk)
                session.calls += 1
                if kill_time and session.failures and session.recovered_at is None:
                    session.recovered_at = time.monotonic()
                break


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scale-test", description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=32)
    p.add_argument("--steps", type=int, default=60, help="steps per session")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="JSON summary")
    p.add_argument("--timeout", type=float, default=300.0, help="whole run, seconds")
    a = p.parse_args(argv)
    deadline = time.monotonic() + a.timeout
    try:  # scripts/system-deps.sh installs what is missing, or says how
        find_program("redis-server")
        find_program("nginx")
    except ServiceError as e:
        raise SystemExit(f"scale-test: {e}") from None
    ref = Reference(MODEL)
    workdir = Path(tempfile.mkdtemp(prefix="lstm-scale-"))
    replicas: list[Replica] = []
    try:
        try:
            redis_cm = redis_server()
            redis_url = redis_cm.__enter__()
        except ServiceError as e:
            raise SystemExit(f"scale-test: {e}") from None
        try:
            store = redis_url.rsplit("/", 1)[0] + "/0"
            replicas = [Replica(i, store, workdir) for i in range(a.replicas)]
            for r in replicas:
                r.wait_ready(deadline)
            log(f"redis {store}, {a.replicas} replicas on ports {[r.port for r in replicas]}")
            upstreams = [f"127.0.0.1:{r.port}" for r in replicas]
            with nginx_proxy(upstreams, workdir) as target:
                return run(target, replicas, ref, a, deadline)
        finally:
            for r in replicas:
                r.stop()
            redis_cm.__exit__(None, None, None)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(target: str, replicas: list[Replica], ref: Reference, a, deadline: float) -> int:
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    with LstmClient(target, timeout=10) as client:
        sids = [
            client.create_session(session_id=f"scale-{seed:08x}-{i:04d}") for i in range(a.sessions)
        ]
    sessions = [Session(sid, ref) for sid in sids]
    kill_time: list[float] = []
    victim = replicas[0]
    spread: list[int] = []

    def killer() -> None:
        # A third of the way in (by steps acknowledged), kill -9 one replica's whole process
        # tree: its supervisor (the engine and front ends die with it).
        third = a.sessions * a.steps // 3
        while sum(s.calls for s in sessions) < third:
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        spread.extend(r.sessions_active() for r in replicas)
        kill_time.append(time.monotonic())
        os.kill(victim.proc.pid, signal.SIGKILL)
        log(f"kill -9 replica 0 (pid {victim.proc.pid}); sessions held per replica {spread}")

    t0 = time.monotonic()
    threading.Thread(target=killer, daemon=True).start()
    with ThreadPoolExecutor(len(sessions)) as pool:
        futures = [
            pool.submit(
                drive, target, s, ref, a.steps, random.Random(rng.random()), kill_time, deadline
            )
            for s in sessions
        ]
        errors = [f.exception() for f in futures]
    wall = time.monotonic() - t0
    errors = [e for e in errors if e is not None]
    # The store agrees with the clients: every acknowledged step is there, none twice.
    lost = 0
    with LstmClient(target, timeout=10) as client:
        for s in sessions:
            with contextlib.suppress(grpc.RpcError):
                if client.get_session(s.sid).steps != s.steps:
                    lost += 1
    mismatches = sum(s.mismatches for s in sessions)
    recovered = [s.recovered_at - kill_time[0] for s in sessions if s.recovered_at and kill_time]
    affected = sum(1 for s in sessions if s.failures)
    summary = {
        "seed": seed,
        "sessions": a.sessions,
        "steps_per_session": a.steps,
        "replicas": a.replicas,
        "sessions_held_per_replica_before_kill": spread,
        "killed": bool(kill_time),
        "steps_acknowledged": sum(s.steps for s in sessions),
        "calls_per_s": round(a.sessions * a.steps / wall, 1),
        "wall_s": round(wall, 2),
        "mismatches": mismatches,
        "sessions_with_lost_or_extra_steps": lost,
        "errors": [f"{type(e).__name__}: {e}"[:200] for e in errors],
        "sessions_affected_by_the_kill": affected,
        "retries": sum(s.retries for s in sessions),
        "failover_s_first": round(min(recovered), 3) if recovered else None,
        "failover_s_last": round(max(recovered), 3) if recovered else None,
    }
    print(json.dumps(summary, indent=1), flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(summary, indent=1) + "\n")
    ok = (
        not errors
        and mismatches == 0
        and lost == 0
        and bool(kill_time)
        and affected > 0
        and sum(1 for n in spread if n > 0) >= 2
    )
    log("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
