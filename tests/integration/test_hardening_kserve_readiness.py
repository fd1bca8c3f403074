"""Readiness follows the durable session store (issue 19): while the store does not answer,
every create would fail UNAVAILABLE, so grpc.health.v1 says NOT_SERVING (for "", our service
and KServe's) and KServe's ServerReady and ModelReady say false; SERVING again once it answers.

A real ``redis-server`` that the test stops and starts again on the same port; the server in
this process (App) and a real ``lstm-serve`` (the engine probes the store, the front ends learn
it from their pings and set their health).
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.inference import grpc_service_pb2 as kpb
from protos.inference import grpc_service_pb2_grpc as kpb_grpc
from protos.lstmserve.v1 import lstm_serve_pb2 as pb
from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.state_services import ServiceError, _free_port, _pings, _stop, find_redis_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
NAMES = ("", "lstmserve.v1.LstmServeService", "inference.GRPCInferenceService")
MODEL = "tiny"  # conftest's model_path: tiny/3/model.onnx


class Redis:
    """A ``redis-server`` on one port that can be stopped and started again."""

    def __init__(self, folder: str) -> None:
        self.exe = find_redis_server()
        self.folder = folder
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", self.folder, "--daemonize", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _pings(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise ServiceError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None


@pytest.fixture
def redis() -> Iterator[Redis]:
    with tempfile.TemporaryDirectory(prefix="lstm-serve-redis-") as folder:
        try:
            r = Redis(folder)
            r.start()
        except ServiceError as e:
            pytest.fail(str(e), pytrace=False)
        try:
            yield r
        finally:
            r.stop()


def _statuses(ch: grpc.Channel) -> dict[str, Any]:
    """What a load balancer sees: grpc.health.v1 for each name, KServe's readiness."""
    health = health_pb2_grpc.HealthStub(ch)
    kserve = kpb_grpc.GRPCInferenceServiceStub(ch)
    out: dict[str, Any] = {
        name: health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
        for name in NAMES
    }
    out["ServerReady"] = kserve.ServerReady(kpb.ServerReadyRequest(), timeout=10).ready
    out["ModelReady"] = kserve.ModelReady(kpb.ModelReadyRequest(name=MODEL), timeout=10).ready
    out["ServerLive"] = kserve.ServerLive(kpb.ServerLiveRequest(), timeout=10).live
    return out


READY = dict.fromkeys(NAMES, SERVING) | {"ServerReady": True, "ModelReady": True}
READY["ServerLive"] = True
# Alive all along: only readiness changes.
NOT_READY = dict.fromkeys(NAMES, NOT_SERVING) | {"ServerReady": False, "ModelReady": False}
NOT_READY["ServerLive"] = True


def _wait_for(ch: grpc.Channel, want: dict[str, Any]) -> float:
    """Seconds until the server's statuses are ``want`` (fails after 15 s)."""
    t0 = time.monotonic()
    got: dict[str, Any] = {}
    while time.monotonic() - t0 < 15:
        got = _statuses(ch)
        if got == want:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"still {got}, want {want}")


def _create_code(ch: grpc.Channel) -> grpc.StatusCode:
    try:
        pb_grpc.LstmServeServiceStub(ch).CreateSession(pb.CreateSessionRequest(), timeout=10)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _down_and_up(target: str, redis: Redis) -> None:
    with grpc.insecure_channel(target) as ch:
        assert _statuses(ch) == READY
        assert _create_code(ch) == grpc.StatusCode.OK
        watch = health_pb2_grpc.HealthStub(ch).Watch(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=60
        )
        assert next(watch).status == SERVING

        redis.stop()
        assert _create_code(ch) == grpc.StatusCode.UNAVAILABLE  # what readiness must say
        assert _wait_for(ch, NOT_READY) < 5
        assert next(watch).status == NOT_SERVING  # watchers are told
        assert _create_code(ch) == grpc.StatusCode.UNAVAILABLE

        redis.start()
        assert _wait_for(ch, READY) < 5
        assert next(watch).status == SERVING
        assert _create_code(ch) == grpc.StatusCode.OK
        watch.cancel()


def test_readiness_follows_the_session_store_in_process(start_server, redis):
    srv = start_server(state_store=redis.url)
    _down_and_up(srv.target, redis)


def test_readiness_follows_the_session_store_through_front_ends(serve, redis):
    srv = serve("--state-store", redis.url, "--frontends", "1", "--metrics-port", "-1")
    _down_and_up(srv.target, redis)
    out = "".join(srv.lines)
    assert "session store is unreachable" in out and "answers again" in out, out


def test_a_server_whose_store_is_down_at_start_is_not_ready_until_it_answers(start_server, redis):
    redis.stop()
    srv = start_server(state_store=redis.url)
    with grpc.insecure_channel(srv.target) as ch:
        assert _statuses(ch) == NOT_READY
        redis.start()
        assert _wait_for(ch, READY) < 5


def test_without_a_durable_store_every_name_is_serving(start_server):
    # inference.GRPCInferenceService is a name the health service knows (it was NOT_FOUND).
    srv = start_server()
    with grpc.insecure_channel(srv.target) as ch:
        assert _statuses(ch) == READY
