"""The gRPC-convention request metrics, the state store latency, and the monitoring assets'
wiring (deploy/grafana, deploy/prometheus, compose, k8s) checked offline. The assets against a
real Prometheus and server: tests/integration/test_monitoring.py; the rules' own unit tests:
`make monitoring-check` (promtool test rules)."""

from __future__ import annotations

import asyncio
import glob
import json
from pathlib import Path
from typing import Any

import grpc
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server import durable as durable_module
from server import metrics
from server.durable import Durable
from server.metrics import (
    GRPC_CODE_NAMES,
    PrometheusMetrics,
    RequestStats,
    StoreStats,
    grpc_method_labels,
)
from server.state.record import ModelIdentity

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _scrape(
    requests: RequestStats, store: StoreStats | None = None
) -> dict[tuple[Any, ...], float]:
    m = PrometheusMetrics(
        requests=requests,
        schedulers=lambda: [],
        models=lambda: [],
        sessions_active=lambda: 0,
        state_bytes=lambda: 0,
        sessions_ended=lambda: {},
        registry=CollectorRegistry(),
        store=store if store is not None else StoreStats(),
    )
    out = {}
    for fam in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for s in fam.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def test_every_method_of_every_service_has_its_service_and_type() -> None:
    from grpc_health.v1 import health_pb2

    from protos.inference import grpc_service_pb2
    from protos.lstmserve.v1 import lstm_serve_pb2

    seen: dict[str, str] = {}
    for module in (lstm_serve_pb2, grpc_service_pb2, health_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                # Requests are recorded under the bare method name: no two services may share one.
                assert m.name not in seen, f"{m.name} in {seen.get(m.name)} and {service.full_name}"
                seen[m.name] = service.full_name
                assert grpc_method_labels(m.name)[0] == service.full_name
    assert grpc_method_labels("Step") == ("lstmserve.v1.LstmServeService", "unary")
    assert grpc_method_labels("StepStream") == ("lstmserve.v1.LstmServeService", "bidi_stream")
    assert grpc_method_labels("Generate") == ("lstmserve.v1.LstmServeService", "server_stream")
    assert grpc_method_labels("ModelInfer") == ("inference.GRPCInferenceService", "unary")
    assert grpc_method_labels("Watch") == ("grpc.health.v1.Health", "server_stream")
    assert grpc_method_labels("Nope") == ("unknown", "unknown")


def test_every_status_code_has_its_go_name() -> None:
    assert set(GRPC_CODE_NAMES) == {c.name for c in grpc.StatusCode}
    assert GRPC_CODE_NAMES["CANCELLED"] == "Canceled"  # Go's spelling
    assert GRPC_CODE_NAMES["NOT_FOUND"] == "NotFound"


def test_request_stats_are_served_under_the_grpc_names() -> None:
    r = RequestStats()
    for method, code, seconds in [
        ("Step", "OK", 0.002),
        ("Step", "OK", 0.004),
        ("Step", "NOT_FOUND", 0.001),
        ("Generate", "CANCELLED", 1.5),
        ("ModelInfer", "OK", 0.01),
    ]:
        r.record(method, code, seconds)
    got = _scrape(r)
    step = (("grpc_method", "Step"), ("grpc_service", "lstmserve.v1.LstmServeService"))
    unary = (("grpc_type", "unary"),)
    assert got[("grpc_server_handled_total", ("grpc_code", "OK"), *step, *unary)] == 2
    assert got[("grpc_server_handled_total", ("grpc_code", "NotFound"), *step, *unary)] == 1
    assert got[("grpc_server_started_total", *step, *unary)] == 3
    assert got[("grpc_server_handling_seconds_count", *step, *unary)] == 3
    assert got[("grpc_server_handling_seconds_bucket", *step, *unary, ("le", "0.0025"))] == 2
    gen = (
        ("grpc_method", "Generate"),
        ("grpc_service", "lstmserve.v1.LstmServeService"),
        ("grpc_type", "server_stream"),
    )
    assert got[("grpc_server_handled_total", ("grpc_code", "Canceled"), *gen)] == 1
    infer = (
        ("grpc_method", "ModelInfer"),
        ("grpc_service", "inference.GRPCInferenceService"),
        ("grpc_type", "unary"),
    )
    assert got[("grpc_server_handled_total", ("grpc_code", "OK"), *infer)] == 1
    # The project's own families are still there.
    assert got[("lstm_serve_requests_total", ("code", "NOT_FOUND"), ("method", "Step"))] == 1


class _Store:
    async def get(self, key: str) -> None:
        await asyncio.sleep(0)
        return None

    async def delete(self, keys: list[str]) -> None:
        return None

    async def put(self, writes: list[Any]) -> list[bool]:
        return [True for _ in writes]


def test_store_latency_is_observed_and_served_once_a_store_is_used(monkeypatch: Any) -> None:
    stats = StoreStats()
    # No --state-store: the family has no series.
    assert not any(
        k[0].startswith("lstm_serve_state_store") for k in _scrape(RequestStats(), stats)
    )
    monkeypatch.setattr(metrics, "STORE_STATS", stats)
    monkeypatch.setattr(durable_module, "STORE_STATS", stats)
    durable = Durable(_Store(), ModelIdentity("m", "1", "0" * 64))  # type: ignore[arg-type]
    assert stats.enabled

    async def run() -> None:
        assert await durable.load("s" * 16) is None
        await durable.delete("s" * 16)

    asyncio.run(run())
    assert stats.durations["get"].count == 1 and stats.durations["delete"].count == 1
    got = _scrape(RequestStats(), stats)
    assert got[("lstm_serve_state_store_duration_seconds_count", ("op", "get"))] == 1
    assert got[("lstm_serve_state_store_duration_seconds_count", ("op", "put"))] == 0


# --- assets ----------------------------------------------------------------------------------


def test_dashboard_is_provisioned_against_the_provisioned_datasource() -> None:
    dash = json.loads((DEPLOY / "grafana/dashboards/lstm-serve.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    targets = [t for p in dash["panels"] for t in p.get("targets", [])]
    assert targets and all(t["datasource"]["uid"] == "${datasource}" for t in targets)
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert source["uid"] == "prometheus"
    exprs = " ".join(t["expr"] for t in targets)
    for needed in (
        "grpc_server_handled_total",
        "grpc_code",
        "grpc_server_handling_seconds_bucket",
        "lstm_serve_batch_size",
        "lstm_serve_sessions_active",
        "lstm_serve_state_store_duration_seconds_bucket",
        "lstm_serve_process_resident_memory_bytes",
    ):
        assert needed in exprs, needed


def test_compose_provisions_grafana_and_the_rules() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    grafana = services["grafana"]
    image, _, tag = grafana["image"].partition(":")
    assert image == "grafana/grafana" and tag and tag != "latest"
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/lstm-serve.yaml").read_text()
    )["providers"][0]
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    # Prometheus finds the rules at the same place relative to its config in both layouts.
    prom_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (pattern,) = config["rule_files"]
    assert prom_mounts["/etc/prometheus/prometheus.yml"] == "./prometheus.yml"
    assert prom_mounts["/etc/prometheus/" + pattern.split("/")[0]] == "./" + pattern.split("/")[0]
    assert glob.glob(str(DEPLOY / pattern)) == [str(DEPLOY / "prometheus/lstm-serve.rules.yml")]


def test_k8s_pods_are_annotated_for_scraping_on_the_metrics_port() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s/lstm-serve.yaml").read_text()))
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    template = sts["spec"]["template"]
    notes = template["metadata"]["annotations"]
    (container,) = [c for c in template["spec"]["containers"] if c["name"] == "lstm-serve"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/port"] == str(ports["metrics"])
    assert notes["prometheus.io/path"] == "/metrics"
