"""The monitoring assets against the real thing: a real Prometheus (Debian's package, unpacked by
scripts/system-deps.sh into .cache/prometheus) scrapes a real ``lstm-serve`` (durable SQLite store,
one front end) under a short load, loads deploy/prometheus/lstm-serve.rules.yml, and every PromQL
expression of the Grafana dashboard (deploy/grafana/dashboards/lstm-serve.json) and of the rules
is evaluated through Prometheus's HTTP API: each must return data and none may error.

Alert expressions are ``<series> <comparison> <threshold>`` (the rules file's convention, checked
here): the series is what must return data, since a healthy server fires no alert.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from protos.lstmserve.v1 import lstm_serve_pb2 as pb
from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc

from .conftest import ROOT, Served

PROM_DIR = Path(os.environ.get("LSTM_SERVE_PROMETHEUS_DIR") or ROOT / ".cache" / "prometheus")
PROMETHEUS = PROM_DIR / "usr" / "bin" / "prometheus"
CONFIG = ROOT / "deploy" / "prometheus.yml"
RULES = ROOT / "deploy" / "prometheus" / "lstm-serve.rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "lstm-serve.json"
JOB = "lstm-serve"  # deploy/prometheus.yml's job name, which the rules expect
# What Grafana would put in for the dashboard's variables (longest names first).
GRAFANA_VARIABLES = {
    "$__rate_interval": "30s",
    "${datasource}": "prometheus",
    "$job": JOB,
}
LOAD_S = 12.0
ALERT = re.compile(r"^(?P<series>.*?\S)\s*(==|!=|>=|<=|>|<)\s*(-?[0-9.e+]+)\s*$", re.S)


def dashboard_expressions() -> list[tuple[str, str]]:
    """``(where, PromQL)`` of every query target of the dashboard, variables filled in."""
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    out = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                expr = target["expr"]
                for name, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(name, value)
                assert "$" not in expr, f"unknown dashboard variable in {expr!r}"
                out.append((f"dashboard {panel['title']!r} {target['refId']}", expr))

    walk(dash["panels"])
    return out


def rule_expressions() -> list[tuple[str, str]]:
    """``(where, PromQL)`` of every recording rule, and the series each alert compares."""
    out = []
    for group in yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                out.append((f"record {rule['record']}", rule["expr"]))
                out.append((f"recorded {rule['record']}", rule["record"]))
            else:
                m = ALERT.match(rule["expr"])
                assert m, f"alert {rule['alert']}: expr is not '<series> <op> <number>'"
                out.append((f"alert {rule['alert']} (its series)", m.group("series")))
                out.append((f"alert {rule['alert']}", rule["expr"]))
    return out


def test_the_assets_have_expressions() -> None:
    where = [w for w, _ in dashboard_expressions() + rule_expressions()]
    assert sum(w.startswith("dashboard") for w in where) >= 10
    assert sum(w.startswith("alert") for w in where) >= 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}/api/v1/"

    def get(self, path: str, **params: str) -> Any:
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # 400/422: a bad query, with Prometheus's reason
            body = json.load(e)
        return body

    def query(self, expr: str) -> Any:
        return self.get("query", query=expr)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    """Factory: ``prometheus(metrics_port)`` starts Prometheus with deploy/prometheus.yml (1 s
    scrapes and rule evaluations, the target moved to the server's metrics port, the rules)."""
    if not PROMETHEUS.is_file():
        pytest.fail(
            f"no {PROMETHEUS}: run `bash scripts/system-deps.sh` (unpacks Debian's prometheus)",
            pytrace=False,
        )
    procs: list[subprocess.Popen[bytes]] = []

    def start(metrics_port: int) -> Prometheus:
        config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        (job,) = [c for c in config["scrape_configs"] if c["job_name"] == JOB]
        job["scrape_interval"] = "1s"
        job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
        config["rule_files"] = [str(RULES)]
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        port = _free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        procs.append(
            subprocess.Popen(
                [
                    str(PROMETHEUS),
                    f"--config.file={path}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        prom = Prometheus(port)
        deadline = time.monotonic() + 20
        while True:
            try:
                up = prom.query(f'up{{job="{JOB}"}}')["data"]["result"]
                if up and up[0]["value"][1] == "1":
                    return prom
            except OSError:
                pass
            if procs[-1].poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    "Prometheus did not scrape the server: "
                    + (tmp_path / "prometheus.log").read_text()[-3000:]
                )
            time.sleep(0.25)

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def load(target: str, seconds: float) -> int:
    """Sessions created, stepped, looked up, closed; unknown sessions (NotFound, a store get);
    ephemeral Generates. Returns the RPCs sent."""
    sent = 0
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.LstmServeServiceStub(ch)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            sid = stub.CreateSession(pb.CreateSessionRequest(), timeout=10).session_id
            for text in ("the ", "time ", "machine"):
                stub.Step(pb.StepRequest(session_id=sid, text=text), timeout=10)
            stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10)
            with pytest.raises(grpc.RpcError) as e:
                stub.Step(pb.StepRequest(session_id="no-such-session-000", text="a"), timeout=10)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            for _ in stub.Generate(pb.GenerateRequest(prompt="the", max_tokens=16), timeout=10):
                pass
            stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10)
            sent += 8
            time.sleep(0.05)
    return sent


@pytest.mark.timeout(120)
def test_every_dashboard_and_rule_expression_returns_data(
    serve: Callable[..., Served], prometheus: Callable[[int], Prometheus], tmp_path: Path
) -> None:
    t0 = time.monotonic()
    srv = serve("--state-store", f"sqlite:///{tmp_path / 'sessions.db'}", "--frontends", "1")
    prom = prometheus(srv.metrics_port)
    sent: list[int] = []
    worker = threading.Thread(target=lambda: sent.append(load(srv.target, LOAD_S)))
    worker.start()
    worker.join(LOAD_S + 30)
    assert sent and sent[0] > 0, "the load did not finish"
    # The front end ships its counts with its heartbeat: wait until Prometheus has them all.
    deadline = time.monotonic() + 10
    while True:
        got = prom.query(f'sum(grpc_server_handled_total{{job="{JOB}"}})')["data"]["result"]
        if got and float(got[0]["value"][1]) >= sent[0]:
            break
        assert time.monotonic() < deadline, f"Prometheus saw {got} of {sent[0]} RPCs"
        time.sleep(0.5)
    time.sleep(2.5)  # two more rule evaluations over the last scrape

    failures = []
    expressions = dashboard_expressions() + rule_expressions()
    for where, expr in expressions:
        body = prom.query(expr)
        if body.get("status") != "success":
            failures.append(f"{where}: {body.get('errorType')}: {body.get('error')}\n  {expr}")
            continue
        if body.get("warnings"):
            failures.append(f"{where}: warnings {body['warnings']}\n  {expr}")
        result = body["data"]["result"]
        if where.startswith("alert ") and "(its series)" not in where:
            continue  # the comparison itself: evaluated without error is all it must do
        values = [float(s["value"][1]) for s in result]
        if not values:
            failures.append(f"{where}: no data\n  {expr}")
        elif all(v != v for v in values):  # NaN: a quantile or ratio over nothing
            failures.append(f"{where}: only NaN {result}\n  {expr}")
    # Prometheus evaluated every rule itself, without error.
    groups = prom.get("rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    in_file = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    assert len(rules) == sum(len(g["rules"]) for g in in_file)
    for r in rules:
        if r.get("health") != "ok":
            failures.append(f"rule {r['name']}: health {r.get('health')}: {r.get('lastError')}")
    assert not failures, "\n".join(failures)
    assert len(expressions) > 20
    assert time.monotonic() - t0 < 90
