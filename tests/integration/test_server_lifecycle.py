"""Sessions over time: idle eviction, disconnects, cancellation, health, reflection, metrics,
and SIGTERM drain of a real ``lstm-serve`` process."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from protos.lstmserve.v1 import lstm_serve_pb2 as pb

from .conftest import ManualClock, Reference, ServerThread


def _wait(cond, timeout: float = 30.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_idle_sessions_expire_with_an_injected_clock(start_server, stub_for):
    clock = ManualClock()
    srv = start_server(clock=clock, idle_timeout_s=60)
    stub = stub_for(srv)
    old = stub.CreateSession(pb.CreateSessionRequest()).session_id
    short = stub.CreateSession(pb.CreateSessionRequest(idle_timeout_s=5)).session_id
    clock.advance(10)
    kept = stub.CreateSession(pb.CreateSessionRequest()).session_id
    with pytest.raises(grpc.RpcError) as e:
        stub.Step(pb.StepRequest(session_id=short, text="a"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    stub.Step(pb.StepRequest(session_id=old, text="a"))  # 10 s idle < 60 s: still there
    clock.advance(59)
    stub.GetSession(pb.GetSessionRequest(session_id=old))  # GetSession does not count as use
    clock.advance(2)
    # The periodic sweep ends them without anyone asking.
    _wait(lambda: srv.on_loop(lambda: len(srv.app.store)) == 0, what="sweep")
    ended = srv.on_loop(lambda: dict(srv.app.store.stats.ended))
    assert ended["expired"] == 3
    for sid in (old, kept):
        with pytest.raises(grpc.RpcError) as e:
            stub.GetSession(pb.GetSessionRequest(session_id=sid))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_idle_timeout_real_time(start_server, stub_for):
    srv = start_server(idle_timeout_s=0.3)
    stub = stub_for(srv)
    sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
    _wait(lambda: srv.on_loop(lambda: len(srv.app.store)) == 0, what="expiry")
    with pytest.raises(grpc.RpcError) as e:
        stub.Step(pb.StepRequest(session_id=sid, text="a"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_ephemeral_stream_session_is_freed_on_disconnect_and_on_end(start_server, stub_for):
    srv = start_server()
    stub = stub_for(srv)
    live = lambda: srv.on_loop(lambda: len(srv.app.store))  # noqa: E731
    gate = threading.Event()

    def requests():
        yield pb.StepStreamRequest(text="hello")
        gate.wait(10)

    call = stub.StepStream(requests())
    first = next(call)
    assert len(first.session_id) == 32 and first.steps == 5
    assert live() == 1
    call.cancel()  # the client goes away mid-stream
    _wait(lambda: live() == 0, what="disconnect cleanup")
    gate.set()
    # A stream that ends normally frees its session as well.
    out = list(
        stub.StepStream(iter([pb.StepStreamRequest(text="ab"), pb.StepStreamRequest(text="c")]))
    )
    assert [r.steps for r in out] == [2, 3] and out[0].session_id == out[1].session_id
    _wait(lambda: live() == 0, what="end cleanup")
    ended = srv.on_loop(lambda: dict(srv.app.store.stats.ended))
    # A vanished client reads as end-of-stream first on the server, so either reason may count.
    assert ended["disconnected"] + ended["closed"] == 2, ended


def test_attached_stream_leaves_session_open(start_server, stub_for, reference: Reference):
    srv = start_server()
    stub = stub_for(srv)
    sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
    reqs = [
        pb.StepStreamRequest(session_id=sid, token_ids=[2, 3]),
        pb.StepStreamRequest(token_ids=[4]),
    ]
    out = list(stub.StepStream(iter(reqs)))
    assert out[-1].steps == 3
    info = stub.GetSession(pb.GetSessionRequest(session_id=sid))
    assert info.steps == 3
    want, _ = reference.feed([2, 3, 4], reference.zeros())
    np.testing.assert_allclose(np.asarray(out[-1].logits), want[-1], atol=1e-5, rtol=0)


def test_cancelled_generate_stops_and_restores_the_session(start_server, stub_for, reference):
    srv = start_server(max_new_tokens=100000)
    stub = stub_for(srv)
    sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
    stub.Step(pb.StepRequest(session_id=sid, token_ids=[5, 6]))
    call = stub.Generate(pb.GenerateRequest(session_id=sid, prompt="abc", max_tokens=100000))
    next(call)
    decoded = lambda: srv.on_loop(lambda: srv.app.scheduler_stats.tokens["decode"])  # noqa: E731
    _wait(lambda: decoded() > 50, what="generation running")
    call.cancel()
    _wait(
        lambda: srv.on_loop(lambda: srv.app.engine.running_generations) == 0,
        what="generation dropped",
    )
    # Nothing of it is left in the engine (no waiting for a while to see nothing happen).
    _wait(
        lambda: srv.on_loop(lambda: not srv.app.engine.planner.has_work()),
        what="the engine to drop the generation",
    )
    before = decoded()
    # The session is free and exactly as before the cancelled request.
    info = stub.GetSession(pb.GetSessionRequest(session_id=sid))
    assert info.steps == 2 and not info.busy
    got = stub.Step(pb.StepRequest(session_id=sid, token_ids=[7]))
    want, _ = reference.feed([5, 6, 7], reference.zeros())
    np.testing.assert_allclose(np.asarray(got.logits), want[-1], atol=1e-5, rtol=0)
    # That step was a model call whose one row was its token [7]: a generation still fed would
    # have had a row of its own in it.
    assert decoded() == before + 1  # no more model time for it


def test_deadline_exceeded_generate_frees_ephemeral_session(start_server, stub_for):
    # A deadline long enough to reach the server however loaded this machine is, for a
    # generation no machine finishes within it.
    n = 10**9
    srv = start_server(max_new_tokens=n)
    stub = stub_for(srv)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(prompt="abc", max_tokens=n), timeout=3))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # It was cut off while it generated.
    assert srv.on_loop(lambda: srv.app.scheduler_stats.tokens["decode"]) > 0
    _wait(lambda: srv.on_loop(lambda: len(srv.app.store)) == 0, what="cleanup")
    assert srv.on_loop(lambda: srv.app.engine.running_generations) == 0
    assert srv.on_loop(lambda: srv.app.store.stats.ended["disconnected"]) == 1


def _health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as ch:
        return (
            health_pb2_grpc.HealthStub(ch)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            .status
        )


def test_health_not_serving_while_loading_then_serving_then_draining(
    model_path, stub_for, monkeypatch
):
    import server.app as app_module

    release = threading.Event()
    real = app_module.ModelRuntime

    def slow_runtime(*args, **kw):
        release.wait(10)
        return real(*args, **kw)

    monkeypatch.setattr(app_module, "ModelRuntime", slow_runtime)
    from .conftest import make_settings

    srv = ServerThread(make_settings(model_path)).start(wait_ready=False)
    try:
        NOT, OK = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING
        assert _health(srv.target) == NOT
        assert _health(srv.target, "lstmserve.v1.LstmServeService") == NOT
        stub = stub_for(srv)
        with pytest.raises(grpc.RpcError) as e:
            stub.CreateSession(pb.CreateSessionRequest())
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in e.value.details()
        release.set()
        srv.call(srv.app.ready())
        assert _health(srv.target) == OK
        assert _health(srv.target, "lstmserve.v1.LstmServeService") == OK
        # Draining: NOT_SERVING and new work refused while an in-flight request finishes.
        sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
        gate = threading.Event()

        def reqs():
            yield pb.StepStreamRequest(session_id=sid, text="a")
            gate.wait(10)
            yield pb.StepStreamRequest(text="b")

        call = stub.StepStream(reqs())
        assert next(call).steps == 1
        fut = asyncio.run_coroutine_threadsafe(srv.app.drain(5), srv.loop)
        _wait(lambda: _health(srv.target) == NOT, what="NOT_SERVING on drain")
        with pytest.raises(grpc.RpcError) as e:
            stub.CreateSession(pb.CreateSessionRequest())
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in e.value.details()
        gate.set()
        assert next(call).steps == 2  # the in-flight stream still works
        assert list(call) == []
        assert fut.result(10) is True
        srv.stopped = True
        srv.loop.call_soon_threadsafe(srv.loop.stop)
    finally:
        release.set()
        srv.stop()


def _reflection_services(target: str, version: str = "v1alpha") -> set[str]:
    with grpc.insecure_channel(target) as ch:
        if version == "v1alpha":
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            call = stub.ServerReflectionInfo
        else:  # the same messages on the v1 path
            call = ch.stream_stream(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        resp = next(call(iter([req]), timeout=10))
        return {s.name for s in resp.list_services_response.service}


@pytest.mark.parametrize("version", ["v1alpha", "v1"])
def test_reflection_lists_the_services(start_server, version):
    names = _reflection_services(start_server(reflection=True).target, version)
    assert {
        "lstmserve.v1.LstmServeService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


def test_reflection_is_off_by_default(shared_server):
    with pytest.raises(grpc.RpcError) as e:
        _reflection_services(shared_server.target)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_metrics_endpoint_exposes_every_metric(shared_server, stub_for):
    stub = stub_for(shared_server)
    sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
    stub.Step(pb.StepRequest(session_id=sid, text="the time traveller"))
    list(stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=20)))
    with pytest.raises(grpc.RpcError):
        stub.Step(pb.StepRequest(session_id="nope", text="a"))
    list(stub.StepStream(iter([pb.StepStreamRequest(text="ab")])))
    stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
    keep = stub.CreateSession(pb.CreateSessionRequest()).session_id
    port = shared_server.app.metrics_port
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    fams = {f.name: f for f in text_string_to_metric_families(body)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples
    }

    def value(metric: str, **labels: str) -> float:
        return samples[(metric, tuple(sorted(labels.items())))]

    assert value("lstm_serve_requests_total", method="Step", code="OK") >= 1
    assert value("lstm_serve_requests_total", method="Step", code="NOT_FOUND") >= 1
    assert value("lstm_serve_requests_total", method="Generate", code="OK") >= 1
    assert value("lstm_serve_request_duration_seconds_count", method="Step") >= 2
    assert value("lstm_serve_request_duration_seconds_sum", method="Generate") > 0
    mv = {"model": "model", "version": "1"}  # the scheduler's metrics are per model version
    assert value("lstm_serve_batch_size_count", **mv) >= 20
    assert value("lstm_serve_batch_size_sum", **mv) >= value("lstm_serve_batch_size_count", **mv)
    assert value("lstm_serve_queue_wait_seconds_count", **mv) >= 2
    assert 0 < value("lstm_serve_model_call_duration_seconds_sum", **mv) < 60
    assert value("lstm_serve_tokens_processed_total", phase="prefill", **mv) >= len(
        "the time traveller"
    )
    assert value("lstm_serve_tokens_processed_total", phase="decode", **mv) >= 20
    assert value("lstm_serve_sessions_active") >= 1
    assert (
        value("lstm_serve_session_state_bytes")
        == value("lstm_serve_sessions_active") * 2 * 2 * 24 * 4
    )
    assert value("lstm_serve_sessions_ended_total", reason="closed") >= 2
    for reason in ("expired", "evicted", "disconnected"):
        assert ("lstm_serve_sessions_ended_total", (("reason", reason),)) in samples
    info = value(
        "lstm_serve_model_info",
        name="model",
        version="1",
        provider="CPUExecutionProvider",
        state="READY",
    )
    assert info == 1
    assert value("lstm_serve_model_sessions", model="model", version="1") == value(
        "lstm_serve_sessions_active"
    )
    weights = shared_server.app.core.models.default().runtime.location.path.stat().st_size
    assert value("lstm_serve_model_memory_bytes", model="model", version="1") == (
        weights + value("lstm_serve_session_state_bytes")
    )
    assert "lstm_serve_queue_depth" in fams
    assert keep not in body  # never a session id in a label
    assert sid not in body


def test_sigterm_drains_in_flight_generate_and_exits_zero(model_path: Path):
    env = {**os.environ, "LSTM_SERVE_PROVIDER": "cpu", "LSTM_SERVE_DRAIN_GRACE_S": "20"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "--model",
            str(model_path),
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--max-new-tokens",
            "100000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        target = None
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.search(r"--target (\S+)", line)
            if m:
                target = m.group(1)
                break
        assert target, "server never announced its address"
        ch = grpc.insecure_channel(target)
        from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc

        stub = pb_grpc.LstmServeServiceStub(ch)
        n = 15000
        call = stub.Generate(pb.GenerateRequest(prompt="the", max_tokens=n))
        first = next(call)
        proc.send_signal(signal.SIGTERM)
        _wait(
            lambda: _health(target) == health_pb2.HealthCheckResponse.NOT_SERVING,
            what="NOT_SERVING",
        )
        with pytest.raises(grpc.RpcError) as e:
            stub.CreateSession(pb.CreateSessionRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(call)  # the in-flight generation completes
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == n
        ch.close()
        assert proc.wait(30) == 0
        err = proc.stderr.read() if proc.stderr else ""
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
