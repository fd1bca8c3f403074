"""``lstm-serve`` as it runs for users: a supervisor, one engine process, N front-end processes
on one port. Real processes, real channels, kill -9 for real.

The isolation invariant holds across front ends (sessions live in the engine), a front end that
dies is replaced while the others serve, and an engine that dies takes the whole server down
with a non-zero exit instead of leaving it half alive.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.lstmserve.v1 import lstm_serve_pb2 as pb
from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc

from .conftest import Reference

V = 28
ATOL = 1e-5


def frontend_of(channel: grpc.Channel) -> str:
    """Which front end serves this channel (GetModelInfo's trailing metadata says)."""
    _, call = pb_grpc.LstmServeServiceStub(channel).GetModelInfo.with_call(
        pb.GetModelInfoRequest(), timeout=10
    )
    return dict(call.trailing_metadata())["lstm-serve-frontend"]


def channels_on_two_frontends(target: str, tries: int = 40) -> tuple[grpc.Channel, grpc.Channel]:
    """Two channels that the kernel's SO_REUSEPORT hashing put on different front ends."""
    opts = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own per channel
    seen: dict[str, grpc.Channel] = {}
    for _ in range(tries):
        ch = grpc.insecure_channel(target, options=opts)
        fe = frontend_of(ch)
        if fe not in seen:
            seen[fe] = ch
            if len(seen) == 2:
                a, b = seen.values()
                return a, b
        else:
            ch.close()
    raise AssertionError(f"{tries} connections all landed on front end(s) {sorted(seen)}")


def health(target: str) -> int | None:
    """The health status, or None when nothing answers."""
    with grpc.insecure_channel(target) as ch:
        try:
            return (
                health_pb2_grpc.HealthStub(ch)
                .Check(health_pb2.HealthCheckRequest(), timeout=2)
                .status
            )
        except grpc.RpcError:
            return None


def test_interleaved_sessions_across_two_frontends_match_in_process(serve, reference: Reference):
    srv = serve("--frontends", "2", "--metrics-port", "0", "--prefill-chunk-tokens", "5")
    a, b = channels_on_two_frontends(srv.target)
    stubs = [pb_grpc.LstmServeServiceStub(a), pb_grpc.LstmServeServiceStub(b)]
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    n_sessions = 24
    sids = [stubs[i % 2].CreateSession(pb.CreateSessionRequest()).session_id for i in range(24)]
    plans = [
        [[rng.randrange(V) for _ in range(rng.choice([1, 1, 2, 3, 7, 13]))] for _ in range(8)]
        for _ in range(n_sessions)
    ]
    results: list[list[np.ndarray]] = [[] for _ in range(n_sessions)]

    def run(i: int) -> None:
        local = random.Random(seed + i)
        for k, chunk in enumerate(plans[i]):
            # Each session alternates between the two front ends, step by step; odd sessions
            # use a stream on one of them for their second half.
            stub = stubs[(i + k) % 2]
            r = stub.Step(
                pb.StepRequest(
                    session_id=sids[i], token_ids=chunk, output=pb.STEP_OUTPUT_ALL_LOGITS
                )
            )
            results[i].append(np.asarray(r.logits, np.float32).reshape(len(chunk), V))
            time.sleep(local.random() * 0.002)

    gen_sid = stubs[0].CreateSession(pb.CreateSessionRequest()).session_id
    with ThreadPoolExecutor(n_sessions + 1) as pool:
        gen = pool.submit(
            lambda: list(
                stubs[1].Generate(
                    pb.GenerateRequest(session_id=gen_sid, prompt="the time", max_tokens=200)
                )
            )
        )
        for f in [pool.submit(run, i) for i in range(n_sessions)]:
            f.result(timeout=120)
        msgs = gen.result(timeout=120)
    for i, chunks in enumerate(plans):
        state = reference.zeros()
        for chunk, got in zip(chunks, results[i], strict=True):
            want, state = reference.feed(chunk, state)
            np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=f"seed {seed} s{i}")
        info = stubs[i % 2].GetSession(pb.GetSessionRequest(session_id=sids[i]))
        assert info.steps == sum(len(c) for c in chunks), f"seed {seed} s{i}"
    fed = [VOCAB_INDEX[c] for c in "the time"]
    assert [t for m in msgs for t in m.token_ids] == reference.greedy(fed, 200)
    # One scrape shows both front ends' requests (shipped to the engine with each heartbeat).
    want_steps = sum(len(p) for p in plans)
    deadline = time.monotonic() + 30  # heartbeats every 0.5 s; generous on a loaded machine
    while time.monotonic() < deadline:
        text = srv.metrics()
        m = re.search(r'lstm_serve_requests_total\{code="OK",method="Step"\} (\S+)', text)
        if m and float(m.group(1)) == want_steps:
            break
        time.sleep(0.2)
    assert m and float(m.group(1)) == want_steps, f"seed {seed}: {text}"
    assert re.search(r'lstm_serve_batch_size_count\{model="[^"]+",version="\d+"\} (\S+)', text)
    for ch in (a, b):
        ch.close()
    assert srv.stop() == 0


def test_one_stream_session_used_through_another_frontend(serve, reference: Reference):
    srv = serve("--frontends", "2", "--metrics-port", "-1")
    a, b = channels_on_two_frontends(srv.target)
    sa, sb = pb_grpc.LstmServeServiceStub(a), pb_grpc.LstmServeServiceStub(b)
    sid = sa.CreateSession(pb.CreateSessionRequest()).session_id
    # A stream attached to the session on front end A, unary steps on front end B in between.
    gate = threading.Event()
    chunks_a = [[3, 4], [5], [6, 7, 8]]
    chunks_b = [[9], [10, 11]]

    def requests():
        for i, c in enumerate(chunks_a):
            yield pb.StepStreamRequest(session_id=sid if i == 0 else "", token_ids=c)
            gate.wait()
            gate.clear()

    call = sa.StepStream(requests())
    state = reference.zeros()
    for i, got in enumerate(call):
        want, state = reference.feed(chunks_a[i], state)
        np.testing.assert_allclose(got.logits, want[-1], atol=ATOL, rtol=0)
        if i < len(chunks_b):
            r = sb.Step(pb.StepRequest(session_id=sid, token_ids=chunks_b[i]))
            want, state = reference.feed(chunks_b[i], state)
            np.testing.assert_allclose(r.logits, want[-1], atol=ATOL, rtol=0)
        gate.set()
    assert sb.GetSession(pb.GetSessionRequest(session_id=sid)).steps == 9


def test_kill_9_of_a_frontend_the_others_serve_and_it_is_replaced(serve):
    srv = serve("--frontends", "2", "--metrics-port", "-1")
    victim = srv.frontend_pids[0]
    os.kill(victim, signal.SIGKILL)
    # Meanwhile new connections are served (by the survivor, then by either): a few of them,
    # however long this machine takes.
    deadline = time.monotonic() + 60
    served = 0
    while served < 5 and time.monotonic() < deadline:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.LstmServeServiceStub(ch)
            try:
                sid = stub.CreateSession(pb.CreateSessionRequest(), timeout=5).session_id
                stub.Step(pb.StepRequest(session_id=sid, text="the"), timeout=5)
                served += 1
            except grpc.RpcError as e:  # only a connection that landed on the dead one
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
    assert served >= 5
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any("starting another" in x for x in srv.lines):
        time.sleep(0.1)
    assert any("front end 0 exited" in x and "starting another" in x for x in srv.lines), "".join(
        srv.lines
    )
    # Two front ends again, once the replacement has started (however long that takes here).
    while True:
        try:
            a, b = channels_on_two_frontends(srv.target)
            break
        except AssertionError:
            assert time.monotonic() < deadline, "".join(srv.lines)
            time.sleep(0.2)
    a.close()
    b.close()
    assert srv.proc.poll() is None
    assert srv.stop() == 0


def test_kill_9_of_the_engine_stops_the_server_non_zero_within_5_s(serve):
    srv = serve("--frontends", "2", "--metrics-port", "-1")
    ch = grpc.insecure_channel(srv.target)
    stub = pb_grpc.LstmServeServiceStub(ch)
    call = stub.Generate(pb.GenerateRequest(prompt="the", max_tokens=4000))
    next(call)
    assert health(srv.target) == health_pb2.HealthCheckResponse.SERVING
    # A health Watch on each front end's own connection: what each tells its watchers, in
    # order, with no polling (a stream never moves to another connection).
    fronts = channels_on_two_frontends(srv.target)
    watches = [
        health_pb2_grpc.HealthStub(c).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        for c in fronts
    ]
    assert [next(w).status for w in watches] == [health_pb2.HealthCheckResponse.SERVING] * 2
    t0 = time.monotonic()
    os.kill(srv.engine_pid, signal.SIGKILL)
    try:
        code = srv.proc.wait(5)
    except subprocess.TimeoutExpired:
        code = None
    assert code is not None and code != 0, f"still running after {time.monotonic() - t0:.1f} s"
    # Each front end saw the engine go by itself (not only when the supervisor stopped it) ...
    deadline = time.monotonic() + 10  # the pump thread reads what the processes wrote
    for i in range(2):
        said = f"[frontend {i}]: the engine process is gone"
        while not any(said in x for x in srv.lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(said in x for x in srv.lines), "".join(srv.lines)
    # ... and told its watchers NOT_SERVING before it went (while it failed what was open),
    # never SERVING again.
    for i, w in enumerate(watches):
        after: list[int] = []
        with contextlib.suppress(grpc.RpcError):  # the front end went: the stream ends
            after.extend(m.status for m in w)
        assert after and set(after) == {health_pb2.HealthCheckResponse.NOT_SERVING}, (i, after)
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    for c in (ch, *fronts):
        c.close()


VOCAB = ["<unk>", " ", *"abcdefghijklmnopqrstuvwxyz"]
VOCAB_INDEX = {t: i for i, t in enumerate(VOCAB)}
