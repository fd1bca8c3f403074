"""Serving statistics as plain dataclasses, and the one class that exposes them to Prometheus.

The hot path only adds to integers and numpy bucket arrays (vectorised for a whole batch); the
Prometheus objects are built at scrape time by :class:`PrometheusMetrics`, a custom collector on
its own :class:`~prometheus_client.CollectorRegistry` (tests pass their own), served on its own
HTTP port, which answers ``/metrics`` and 404 for every other path. Every name has the
``lstm_serve_`` prefix and base units; no label ever carries a session id. The registry also
holds prometheus-client's ``process_*`` metrics (CPU, memory, open files) of the process that
serves it: the engine process in ``lstm-serve``; :class:`ProcessMetrics` adds the resident memory
and CPU time of every process of the server (supervisor, engine, each front end).

The request counts are also served under the gRPC ecosystem's names (``grpc_server_*``, as
go-grpc-prometheus and py-grpc-prometheus name them, codes spelled as Go spells them), so stock
gRPC dashboards and alerts work unchanged.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import socket
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

PREFIX = "lstm_serve_"

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

# gRPC status code names (grpc.StatusCode.X.name, what RequestStats records) as Go's
# codes.Code.String() spells them: the `grpc_code` values of go-grpc-prometheus, which stock
# dashboards and alert rules match (e.g. grpc_code=~"Unknown|Internal|Unavailable|...").
GRPC_CODE_NAMES = {
    "OK": "OK",
    "CANCELLED": "Canceled",
    "UNKNOWN": "Unknown",
    "INVALID_ARGUMENT": "InvalidArgument",
    "DEADLINE_EXCEEDED": "DeadlineExceeded",
    "NOT_FOUND": "NotFound",
    "ALREADY_EXISTS": "AlreadyExists",
    "PERMISSION_DENIED": "PermissionDenied",
    "RESOURCE_EXHAUSTED": "ResourceExhausted",
    "FAILED_PRECONDITION": "FailedPrecondition",
    "ABORTED": "Aborted",
    "OUT_OF_RANGE": "OutOfRange",
    "UNIMPLEMENTED": "Unimplemented",
    "INTERNAL": "Internal",
    "UNAVAILABLE": "Unavailable",
    "DATA_LOSS": "DataLoss",
    "UNAUTHENTICATED": "Unauthenticated",
}

_METHODS: dict[str, tuple[str, str]] | None = None


def grpc_method_labels(method: str) -> tuple[str, str]:
    """``(grpc_service, grpc_type)`` of an RPC recorded under its bare name (``Step``,
    ``ModelInfer``, ``Check``), from the services' descriptors: ``lstmserve.v1.LstmServeService``,
    KServe's ``inference.GRPCInferenceService`` and ``grpc.health.v1.Health``; ``grpc_type`` is
    ``unary``, ``client_stream``, ``server_stream`` or ``bidi_stream``. A name none of them has
    is ``("unknown", "unknown")``. The services share no method name
    (tests/unit/test_monitoring_assets.py); were one shared, the first service listed wins."""
    global _METHODS
    if _METHODS is None:
        # Imported here: the generated modules are only needed when a scrape turns names into
        # labels, and importing them at module level would tie every user of the stats to them.
        from grpc_health.v1 import health_pb2

        from protos.inference import grpc_service_pb2
        from protos.lstmserve.v1 import lstm_serve_pb2

        table: dict[str, tuple[str, str]] = {}
        for module in (lstm_serve_pb2, grpc_service_pb2, health_pb2):
            for service in module.DESCRIPTOR.services_by_name.values():
                for m in service.methods:
                    kind = {
                        (False, False): "unary",
                        (True, False): "client_stream",
                        (False, True): "server_stream",
                        (True, True): "bidi_stream",
                    }[(m.client_streaming, m.server_streaming)]
                    table.setdefault(m.name, (service.full_name, kind))
        _METHODS = table
    return _METHODS.get(method, ("unknown", "unknown"))


@dataclass
class Histogram:
    """Cumulative-ready bucket counts; ``observe_many`` takes a whole batch's values at once."""

    bounds: tuple[float, ...]
    counts: np.ndarray = field(init=False)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = np.zeros(len(self.bounds) + 1, np.int64)  # last = +Inf
        self._edges = np.asarray(self.bounds, np.float64)

    def observe(self, value: float) -> None:
        # bisect on the tuple: a numpy call per observation costs ~10x more on the hot path.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def observe_many(self, values: np.ndarray) -> None:
        if values.size:
            idx = np.searchsorted(self._edges, values, side="left")
            self.counts += np.bincount(idx, minlength=self.counts.size)
            self.total += float(values.sum())

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def buckets(self) -> list[tuple[str, float]]:
        cum = np.cumsum(self.counts)
        out = [(repr(float(b)), float(n)) for b, n in zip(self.bounds, cum[:-1], strict=True)]
        out.append(("+Inf", float(cum[-1])))
        return out


@dataclass
class RequestStats:
    """Per RPC method: completed calls by status code name, and their durations; and requests
    whose bytes were not a valid message (:mod:`server.decode`; each also ends its call, counted
    in ``counts`` as INVALID_ARGUMENT)."""

    counts: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    durations: dict[str, Histogram] = field(default_factory=dict)
    undecodable: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def record(self, method: str, code: str, seconds: float) -> None:
        self.counts[(method, code)] += 1
        hist = self.durations.get(method)
        if hist is None:
            hist = self.durations[method] = Histogram(LATENCY_BUCKETS)
        hist.observe(seconds)

    def record_undecodable(self, method: str) -> None:
        self.undecodable[method] += 1

    # Front-end processes count their own requests and ship what they counted since their last
    # heartbeat to the engine process, which adds it here and serves the sum: one scrape shows
    # every process, and the counters stay monotonic when a front end is replaced.

    def to_wire(self) -> list[Any]:
        return [
            [[m, c, n] for (m, c), n in self.counts.items()],
            [[m, h.counts.tolist(), h.total] for m, h in self.durations.items()],
            [[m, n] for m, n in self.undecodable.items()],
        ]

    @classmethod
    def from_wire(cls, data: list[Any]) -> RequestStats:
        out = cls()
        for m, c, n in data[0]:
            out.counts[(m, c)] += int(n)
        for m, counts, total in data[1]:
            hist = out.durations[m] = Histogram(LATENCY_BUCKETS)
            hist.counts += np.asarray(counts, np.int64)
            hist.total = float(total)
        for m, n in data[2] if len(data) > 2 else ():
            out.undecodable[m] += int(n)
        return out

    def merge(self, other: RequestStats) -> None:
        for key, n in other.counts.items():
            self.counts[key] += n
        for m, h in other.durations.items():
            mine = self.durations.get(m)
            if mine is None:
                mine = self.durations[m] = Histogram(LATENCY_BUCKETS)
            mine.counts += h.counts
            mine.total += h.total
        for m, n in other.undecodable.items():
            self.undecodable[m] += n


@dataclass
class SchedulerStats:
    """What the engine measures per model call."""

    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    queue_wait: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    model_call: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    tokens: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    queue_depth: int = 0


class StoreStats:
    """Duration of each call to the durable session store (:mod:`server.durable`), by operation
    (``get``, ``put``: one batch of commits, ``delete``), failures included. One per process
    (:data:`STORE_STATS`): the store lives in the engine process, which serves the metrics.
    ``enabled`` is set once a :class:`~server.durable.Durable` uses it; until then (no
    ``--state-store``) the metric family has no series."""

    OPS = ("get", "put", "delete")

    def __init__(self) -> None:
        self.enabled = False
        self.durations = {op: Histogram(LATENCY_BUCKETS) for op in self.OPS}

    def observe(self, op: str, seconds: float) -> None:
        self.durations[op].observe(seconds)


STORE_STATS = StoreStats()


@dataclass
class InferStats:
    """One model's counts since start (this process): Triton's ModelStatistics fields.

    ``compute_input``: request parsing; ``compute_infer``: the plane calls (engine queue and
    model time included: the plane does not split them); ``compute_output``: the response.
    Every request runs alone from the client's view, so executions equal inferences.
    """

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0
    last_inference_ms: int = 0

    # Front ends ship what they counted since their last heartbeat to the engine, which adds
    # it up, so ModelStatistics answers for the whole server whichever front end it reaches.

    def to_wire(self) -> list[int]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    @classmethod
    def from_wire(cls, data: list[int]) -> InferStats:
        return cls(*(int(x) for x in data))

    def merge(self, other: InferStats) -> None:
        for f in dataclasses.fields(self):
            if f.name == "last_inference_ms":
                self.last_inference_ms = max(self.last_inference_ms, other.last_inference_ms)
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class ModelInferStats:
    """:class:`InferStats` per model version (KServe ModelStatistics answers per version)."""

    def __init__(self) -> None:
        self.by_version: dict[tuple[str, str], InferStats] = {}

    def of(self, name: str, version: str) -> InferStats:
        stats = self.by_version.get((name, version))
        if stats is None:
            stats = self.by_version[(name, version)] = InferStats()
        return stats

    def to_wire(self) -> list[Any]:
        return [[n, v, s.to_wire()] for (n, v), s in self.by_version.items()]

    @classmethod
    def from_wire(cls, data: list[Any]) -> ModelInferStats:
        out = cls()
        for name, version, fields in data:
            out.of(str(name), str(version)).merge(InferStats.from_wire(fields))
        return out

    def merge(self, other: ModelInferStats) -> None:
        for (name, version), stats in other.by_version.items():
            self.of(name, version).merge(stats)


@dataclass
class ModelInfoStats:
    """One loaded model version, as the metrics show it."""

    name: str
    version: str
    provider: str
    state: str = "READY"
    sessions: int = 0
    memory_bytes: int = 0


class PrometheusMetrics(Collector):
    """Turns the stats objects into Prometheus metrics at scrape time.

    ``sessions_active`` and ``state_bytes`` are callables read at scrape time; ``ended`` returns
    the sessions-ended counters by reason.
    """

    def __init__(
        self,
        *,
        requests: RequestStats,
        schedulers: Callable[[], Sequence[tuple[str, str, SchedulerStats]]],
        models: Callable[[], Sequence[ModelInfoStats]],
        sessions_active: Callable[[], int],
        state_bytes: Callable[[], int],
        sessions_ended: Callable[[], dict[str, int]],
        registry: CollectorRegistry | None = None,
        store: StoreStats | None = None,
    ) -> None:
        self.requests = requests
        # None: this process's store stats (the durable store is opened in the engine process).
        self.store = store if store is not None else STORE_STATS
        self._schedulers = schedulers
        self._models = models
        self._sessions_active = sessions_active
        self._state_bytes = state_bytes
        self._sessions_ended = sessions_ended
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(self)
        ProcessCollector(registry=self.registry)
        self._http: WSGIServer | None = None
        self.port: int | None = None

    def describe(self) -> list[Any]:
        # Empty: the metric set is only known at collect time; registering must not call collect
        # before the rest of the server exists.
        return []

    def collect(self) -> Iterator[Any]:
        p = PREFIX
        req = CounterMetricFamily(
            p + "requests",
            "Completed RPCs by method and gRPC status code.",
            labels=["method", "code"],
        )
        for (method, code), n in list(self.requests.counts.items()):
            req.add_metric([method, code], n)
        yield req
        dur = HistogramMetricFamily(
            p + "request_duration_seconds",
            "RPC duration (whole stream for streaming RPCs), seconds.",
            labels=["method"],
        )
        for method, hist in list(self.requests.durations.items()):
            dur.add_metric([method], hist.buckets(), hist.total)
        yield dur
        bad = CounterMetricFamily(
            p + "undecodable_requests",
            "Request messages whose bytes were not a valid protobuf message, by method.",
            labels=["method"],
        )
        for method, n in list(self.requests.undecodable.items()):
            bad.add_metric([method], n)
        yield bad
        yield from self._grpc_families()
        store = HistogramMetricFamily(
            p + "state_store_duration_seconds",
            "Calls to the durable session store by operation (get, put: one batch of commits, "
            "delete), failures included, seconds; none without --state-store.",
            labels=["op"],
        )
        if self.store.enabled:
            for op, hist in self.store.durations.items():
                store.add_metric([op], hist.buckets(), hist.total)
        yield store
        versions = list(self._schedulers())
        labels = ["model", "version"]
        for name, attr, text in (
            ("batch_size", "batch_size", "Rows (sessions) per model call."),
            ("queue_wait_seconds", "queue_wait", "Time a request waited for its first model call."),
            ("model_call_duration_seconds", "model_call", "ONNX Runtime call duration, seconds."),
        ):
            fam = HistogramMetricFamily(p + name, text, labels=labels)
            for model, version, s in versions:
                hist = getattr(s, attr)
                fam.add_metric([model, version], hist.buckets(), hist.total)
            yield fam
        tok = CounterMetricFamily(
            p + "tokens_processed",
            "Tokens fed to the model, by phase.",
            labels=["phase", *labels],
        )
        depth = GaugeMetricFamily(
            p + "queue_depth", "Requests waiting for the model.", labels=labels
        )
        for model, version, s in versions:
            for phase, n in list(s.tokens.items()):
                tok.add_metric([phase, model, version], n)
            depth.add_metric([model, version], s.queue_depth)
        yield tok
        yield depth
        yield GaugeMetricFamily(
            p + "sessions_active",
            "Sessions held (ephemeral included).",
            value=self._sessions_active(),
        )
        yield GaugeMetricFamily(
            p + "session_state_bytes",
            "Bytes of recurrent state held by live sessions.",
            value=self._state_bytes(),
        )
        ended = CounterMetricFamily(
            p + "sessions_ended", "Sessions ended, by reason.", labels=["reason"]
        )
        for reason, n in self._sessions_ended().items():
            ended.add_metric([reason], n)
        yield ended
        info = InfoMetricFamily(
            p + "model", "Each loaded model version (state READY or RETIRING).", labels=["state"]
        )
        sessions = GaugeMetricFamily(
            p + "model_sessions",
            "Sessions held per loaded model version.",
            labels=["model", "version"],
        )
        memory = GaugeMetricFamily(
            p + "model_memory_bytes",
            "Bytes held per loaded model version: the model file plus its sessions' state.",
            labels=["model", "version"],
        )
        for m in self._models():
            info.add_metric(
                [m.state], {"name": m.name, "version": m.version, "provider": m.provider}
            )
            sessions.add_metric([m.name, m.version], m.sessions)
            memory.add_metric([m.name, m.version], m.memory_bytes)
        yield info
        yield sessions
        yield memory

    def _grpc_families(self) -> Iterator[Any]:
        """The same request counts under go-grpc-prometheus's names and labels.

        ``grpc_server_started_total`` is counted when a call ends (the stats know calls only
        then), so it equals ``grpc_server_handled_total`` summed over codes: calls in flight are
        not in it."""
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        handled = CounterMetricFamily(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            labels=[*labels, "grpc_code"],
        )
        started = CounterMetricFamily(
            "grpc_server_started",
            "Total number of RPCs started on the server (counted when they end).",
            labels=labels,
        )
        per_method: dict[str, int] = defaultdict(int)
        for (method, code), n in list(self.requests.counts.items()):
            service, kind = grpc_method_labels(method)
            handled.add_metric([kind, service, method, GRPC_CODE_NAMES.get(code, code)], n)
            per_method[method] += n
        for method, n in per_method.items():
            service, kind = grpc_method_labels(method)
            started.add_metric([kind, service, method], n)
        seconds = HistogramMetricFamily(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level "
            "handled by the server (a whole stream for streaming RPCs).",
            labels=labels,
        )
        for method, hist in list(self.requests.durations.items()):
            service, kind = grpc_method_labels(method)
            seconds.add_metric([kind, service, method], hist.buckets(), hist.total)
        yield handled
        yield started
        yield seconds

    def start_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0 = a free port) in a daemon thread; the port.

        Every other path is 404 (prometheus-client's own server answers the metrics on any
        path); otherwise this is its ``start_wsgi_server``: a thread per request, no request log.
        """
        metrics = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Any) -> Any:
            if environ.get("PATH_INFO") == "/metrics":
                return metrics(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: the metrics are at /metrics\n"]

        family, _, _, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        server_class = type("MetricsServer", (_ThreadingWSGIServer,), {"address_family": family})
        self._http = make_server(str(addr[0]), port, app, server_class, handler_class=_QuietHandler)
        threading.Thread(target=self._http.serve_forever, name="metrics-http", daemon=True).start()
        self.port = int(self._http.server_port)
        return self.port

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up shutdown


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log: a scrape every few seconds would fill it."""


class ProcessMetrics(Collector):
    """``lstm_serve_process_resident_memory_bytes`` and ``lstm_serve_process_cpu_seconds_total``
    of each of the server's processes, labelled ``process`` (``supervisor``, ``engine``,
    ``frontend-N``) and ``pid`` (a replaced front end is a new series), read from
    ``/proc/PID/stat`` at scrape time.

    ``processes`` returns ``(name, pid)`` pairs when scraped; a pid that is gone by then (or a
    system without ``/proc``) is left out.
    """

    def __init__(
        self,
        processes: Callable[[], Sequence[tuple[str, int]]],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._processes = processes
        try:
            self._tick = float(os.sysconf("SC_CLK_TCK"))
            self._page = int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):  # not a POSIX system: nothing to read
            self._tick, self._page = 100.0, 4096
        if registry is not None:
            registry.register(self)

    def describe(self) -> list[Any]:
        return []

    def read(self, pid: int) -> tuple[int, float] | None:
        """``(resident bytes, CPU seconds: user + system)`` of ``pid``; None when gone."""
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                # After the command name (in parentheses, which may hold anything): field 3 on.
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            return None
        try:
            utime, stime, rss = int(fields[11]), int(fields[12]), int(fields[21])
        except (IndexError, ValueError):
            return None
        return rss * self._page, (utime + stime) / self._tick

    def collect(self) -> Iterator[Any]:
        labels = ["process", "pid"]
        rss = GaugeMetricFamily(
            PREFIX + "process_resident_memory_bytes",
            "Resident memory of each of the server's processes, bytes.",
            labels=labels,
        )
        cpu = CounterMetricFamily(
            PREFIX + "process_cpu_seconds",
            "User and system CPU time of each of the server's processes, seconds.",
            labels=labels,
        )
        for name, pid in list(self._processes()):
            got = self.read(pid)
            if got is None:
                continue
            rss.add_metric([name, str(pid)], got[0])
            cpu.add_metric([name, str(pid)], got[1])
        yield rss
        yield cpu
