"""``lstm-serve --topology single``: the engine and gRPC in one child of the supervisor (the
default on hosts with at most 2 available cores). Real processes, real channels.

The single process must keep what the split promises where it applies: exact interleaved
sessions, the ports reserved by the supervisor, SIGHUP reloading the tokens file, metrics, and
a process that dies taking the server down with a non-zero exit rather than half alive.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from protos.lstmserve.v1 import lstm_serve_pb2 as pb
from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc

from .conftest import Reference

V = 28
ATOL = 1e-5
TOKEN = "token-of-alice-0123456789"


def test_single_process_serves_interleaved_sessions_exactly(serve, reference: Reference):
    srv = serve("--topology", "single", "--metrics-port", "0", "--prefill-chunk-tokens", "5")
    assert any("one process (engine and gRPC) pid" in x for x in srv.lines), "".join(srv.lines)
    assert srv.frontend_pids == []
    # Exactly two processes: the supervisor and the one serving.
    kids = Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read_text().split()
    assert [int(k) for k in kids] == [srv.engine_pid]
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    n = 16
    plans = [
        [[rng.randrange(V) for _ in range(rng.choice([1, 1, 2, 3, 7]))] for _ in range(6)]
        for _ in range(n)
    ]
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LstmServeServiceStub(ch)
        sids = [stub.CreateSession(pb.CreateSessionRequest()).session_id for _ in range(n)]
        results: list[list[np.ndarray]] = [[] for _ in range(n)]

        def run(i: int) -> None:
            for chunk in plans[i]:
                r = stub.Step(
                    pb.StepRequest(
                        session_id=sids[i], token_ids=chunk, output=pb.STEP_OUTPUT_ALL_LOGITS
                    ),
                    timeout=30,
                )
                results[i].append(np.asarray(r.logits, np.float32).reshape(len(chunk), V))

        with ThreadPoolExecutor(n) as pool:
            for f in [pool.submit(run, i) for i in range(n)]:
                f.result(timeout=120)
    for i, chunks in enumerate(plans):
        state = reference.zeros()
        for chunk, got in zip(chunks, results[i], strict=True):
            want, state = reference.feed(chunk, state)
            np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=f"seed {seed} s{i}")
    text = srv.metrics()
    m = re.search(r'lstm_serve_requests_total\{code="OK",method="Step"\} (\S+)', text)
    assert m and float(m.group(1)) == sum(len(p) for p in plans), text
    assert srv.stop() == 0


def test_single_process_reloads_tokens_on_sighup(serve, tmp_path: Path):
    tokens = tmp_path / "tokens"
    tokens.write_text("")
    srv = serve("--topology", "single", "--auth-tokens", str(tokens), "--metrics-port", "-1")
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LstmServeServiceStub(ch)
        creds = (("authorization", f"Bearer {TOKEN}"),)

        def create() -> grpc.StatusCode:
            try:
                stub.CreateSession(pb.CreateSessionRequest(), metadata=creds, timeout=10)
            except grpc.RpcError as e:
                return e.code()
            return grpc.StatusCode.OK

        assert create() == grpc.StatusCode.UNAUTHENTICATED
        tokens.write_text(f"alice {TOKEN}\n")
        os.kill(srv.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while create() != grpc.StatusCode.OK:
            assert time.monotonic() < deadline, "the tokens file was not read again"
            time.sleep(0.1)


def test_kill_9_of_the_single_process_stops_the_server_non_zero(serve):
    srv = serve("--topology", "single", "--metrics-port", "-1")
    os.kill(srv.engine_pid, signal.SIGKILL)
    try:
        code = srv.proc.wait(10)
    except subprocess.TimeoutExpired:
        code = None
    assert code is not None and code != 0, "".join(srv.lines)
    assert any("the server process exited" in x for x in srv.lines), "".join(srv.lines)


def test_a_taken_port_is_refused_before_the_single_process_starts(serve):
    first = serve("--topology", "single", "--metrics-port", "-1")
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "--topology",
            "single",
            "--port",
            str(first.port),
            "--metrics-port",
            "-1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "LSTM_SERVE_PROVIDER": "cpu"},
    )
    assert second.returncode == 1, second.stdout + second.stderr
    assert "already in use" in second.stderr and "--port" in second.stderr, second.stderr
