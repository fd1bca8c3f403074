"""The suite is hermetic: it passes while ``make serve`` runs (the default ports are taken)."""

from __future__ import annotations

import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.conftest import port_in_use


def test_the_default_ports_are_held_by_make_serve_while_the_suite_runs(beside_make_serve):
    grpc_port, metrics_port, http_port = beside_make_serve.ports
    assert port_in_use(grpc_port) and port_in_use(metrics_port) and port_in_use(http_port)
    if beside_make_serve.proc is None:
        return  # a developer's own make serve (or something else) holds them: nothing to ask it
    assert beside_make_serve.proc.poll() is None, "make serve's command exited during the suite"
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        assert b"lstm_serve_" in r.read()


def test_a_real_lstm_serve_started_by_a_test_takes_free_ports(beside_make_serve, serve):
    s = serve()
    assert s.port and s.metrics_port
    assert s.port not in beside_make_serve.ports
    assert s.metrics_port not in beside_make_serve.ports
    assert not any("KServe v2 HTTP/REST" in line for line in s.lines), "HTTP is off unless asked"
