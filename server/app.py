"""The one module that wires the server's pieces together from :class:`~server.settings.Settings`.

* :func:`build_core`: the engine side (model, state pool, sessions, engine loop, data plane,
  metrics). The engine process (:mod:`server.engine_host`) serves it to the front ends.
* :func:`grpc_server`: a gRPC server with our service, health and (optionally) reflection;
  each front end (:mod:`server.frontend`) runs one over a remote data plane; and beside it
  :func:`http_server`, KServe v2 over HTTP/REST (``--http-port``) over the same servicers.
* :class:`App`: both in one process (the core behind a local gRPC server). ``lstm-serve`` runs
  the multi-process topology (:mod:`server.supervisor`); App is for embedding the server in a
  Python process: the integration tests use it to read the engine's state and drive its clock.

Start-up of an App: the gRPC server (health NOT_SERVING) comes up first, the model
loads in a worker thread, then health turns SERVING. Drain (:meth:`App.drain`): health
NOT_SERVING, new requests UNAVAILABLE, in-flight ones get ``drain_grace_s`` to finish, then
everything stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from contract.model import KIND_SEQUENCE

from .auth import Authenticator
from .batch import StatePool
from .dataplane import DataPlane, Limits
from .decode import add_health, add_servicer
from .durable import Durable
from .engine import Engine
from .errors import Unauthenticated
from .kserve import KSERVE_SERVICE_NAME, KServeServicer, add_kserve_servicer
from .metrics import ModelInfoStats, PrometheusMetrics, RequestStats, SchedulerStats
from .models import Models, Version, run_periodically
from .rest import Rest, RestServer
from .runtime import ModelRuntime, bundled_model_path, check_model_source
from .sequence import SequencePlane
from .servicer import SERVICE_NAME, LstmServeServiceServicer, QuietPeerGone
from .sessions import SessionStore
from .settings import ENV_PREFIX, Settings
from .state import ModelIdentity, open_store

log = logging.getLogger("lstm_serve")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Core:
    """The engine side of a server, built by :func:`build_core`: the models (each loaded
    version with its engine, sessions and data plane) behind one plane."""

    settings: Settings
    models: Models
    requests: RequestStats
    registry: CollectorRegistry
    metrics: PrometheusMetrics | None = None
    metrics_port: int | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    # The default model's newest version (what requests naming no model use; tests read these).
    @property
    def plane(self) -> Models:
        return self.models

    @property
    def runtime(self) -> ModelRuntime:
        return self.models.default().runtime

    @property
    def store(self) -> SessionStore:
        return self.models.default().store

    @property
    def engine(self) -> Engine:
        return self.models.default().engine

    @property
    def scheduler_stats(self) -> SchedulerStats:
        return self.models.default().stats

    def describe(self) -> str:
        loaded = sorted(self.models.versions.values(), key=lambda v: (v.name, v.number))
        default = self.models.default().runtime.describe()
        others = [f"{v.name} v{v.version}" for v in loaded if v is not self.models.default()]
        return default + (f" (also loaded: {', '.join(others)})" if others else "")

    def start_metrics(self, processes: Callable[[], list[tuple[str, int]]] | None = None) -> None:
        """Serve ``/metrics`` (when ``metrics_port >= 0``): every counter of the server.

        ``processes``: the server's processes as ``(name, pid)`` when scraped, for their memory
        and CPU (:class:`~server.metrics.ProcessMetrics`); by default this one, as ``server``.
        Raises :class:`OSError` naming the port and its flag when the port cannot be bound.
        """
        import os

        from .metrics import ProcessMetrics

        s, models = self.settings, self.models
        if s.metrics_port < 0:
            return

        def loaded() -> list[ModelInfoStats]:
            return [
                ModelInfoStats(
                    v.name,
                    v.version,
                    v.runtime.provider,
                    v.state,
                    len(v.store),
                    v.memory_bytes(),
                )
                for v in list(models.versions.values())
            ]

        def ended() -> dict[str, int]:
            # Every reason, zeros included (a Counter sum would drop them).
            total = dict(models.ended_unloaded)
            for v in list(models.versions.values()):
                for reason, n in v.store.stats.ended.items():
                    total[reason] = total.get(reason, 0) + n
            return total

        self.metrics = PrometheusMetrics(
            requests=self.requests,
            schedulers=lambda: [
                (v.name, v.version, v.stats) for v in list(models.versions.values())
            ],
            models=loaded,
            sessions_active=lambda: sum(len(v.store) for v in list(models.versions.values())),
            state_bytes=lambda: sum(v.store.state_bytes for v in list(models.versions.values())),
            sessions_ended=ended,
            registry=self.registry,
        )
        me = os.getpid()
        ProcessMetrics(processes or (lambda: [("server", me)]), registry=self.registry)
        try:
            self.metrics_port = self.metrics.start_http(s.host, s.metrics_port)
        except OSError as e:
            raise port_error(e, "metrics", s.host, s.metrics_port, "metrics_port") from e

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await self.models.stop()
        if self.models.durable_store is not None:
            await self.models.durable_store.close()
        if self.metrics is not None:
            self.metrics.stop_http()


def bundled_repository() -> Path:
    """``server/model_repo``: the repository served when neither --model nor
    --model-repository is given."""
    return bundled_model_path().parents[2]


async def build_core(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    clock: Callable[[], float] = time.monotonic,
    requests: RequestStats | None = None,
) -> Core:
    """Load the models (in a worker thread) and start their engines. Raises
    :class:`ModelLoadError` when the default model cannot be served."""
    s = settings
    loop = asyncio.get_running_loop()
    limits = Limits(s.max_prompt_tokens, s.max_new_tokens, s.max_sessions, s.max_batch_size)
    durable_store = open_store(s.state_store) if s.state_store != "memory" else None

    def load(path: str) -> ModelRuntime:
        runtime = ModelRuntime(
            path,
            provider=s.provider,
            intra_op_threads=s.intra_op_threads,
            expected_sha256=s.model_sha256 if path == s.model else "",
        )
        runtime.smoke_test()
        return runtime

    def build(runtime: ModelRuntime) -> Version:
        spec = runtime.spec
        # The pool's last-output row is V wide for a token model, O for a sequence model.
        pool = StatePool(spec.num_layers, spec.hidden_size, runtime.output_width, s.max_sessions)
        store = SessionStore(
            pool,
            max_sessions=s.max_sessions,
            idle_timeout_s=s.idle_timeout_s,
            eviction=s.eviction,
            clock=clock,
            durable=durable_store is not None,
        )
        planes: list[DataPlane] = []
        stats = SchedulerStats()  # per version: the metrics carry model and version labels
        engine = Engine(
            runtime,
            pool,
            max_batch_size=s.max_batch_size,
            max_queue_delay_s=s.max_queue_delay_ms / 1000.0,
            max_queue_size=s.max_queue_size,
            prefill_chunk_tokens=s.prefill_chunk_tokens,
            inline_max_rows=s.inline_max_rows,
            stream_chunk_tokens=s.stream_chunk_tokens,
            stats=stats,
            open_requests=lambda: planes[0].in_flight if planes else 1,
        )
        durable = None
        if durable_store is not None:
            identity = ModelIdentity(runtime.name, runtime.version, runtime.checksum)
            durable = Durable(durable_store, identity)
        # The plane is chosen once per version by the model's kind, so neither kind's steps
        # test it again.
        plane_type = SequencePlane if runtime.kind == KIND_SEQUENCE else DataPlane
        plane = plane_type(
            runtime,
            store,
            engine,
            limits,
            durable,
            max_sessions_per_principal=s.max_sessions_per_principal,
            rate_limit_rps=s.rate_limit_rps,
            expose_build_info=s.expose_build_info,
        )
        plane.owned_by = models.owned_by
        plane.sessions_of = models.sessions_of
        plane._buckets = models.buckets
        planes.append(plane)
        engine.start()
        return Version(runtime.name, runtime.version, runtime, store, engine, plane, stats)

    models = Models(
        load=load,
        build=build,
        repository=None if s.model else Path(s.model_repository or bundled_repository()),
        single=s.model,
        default_model=s.default_model,
        control_mode=s.model_control_mode,
        version_drain_s=s.version_drain_s,
        admins=s.admins(),
        auth=bool(s.auth_tokens),
        durable_store=durable_store,
        clock=clock,
    )
    try:
        await models.start()
    except BaseException:
        await models.stop()
        if durable_store is not None:
            await durable_store.close()
        raise
    core = Core(
        settings=s,
        models=models,
        requests=requests if requests is not None else RequestStats(),
        registry=registry if registry is not None else CollectorRegistry(),
    )
    core.tasks.append(
        loop.create_task(
            run_periodically(models.tick, lambda: min(1.0, s.idle_timeout_s / 4), "housekeeping")
        )
    )
    if models.control_mode == "poll":
        core.tasks.append(
            loop.create_task(
                run_periodically(models.scan, lambda: s.repository_poll_s, "repository scan")
            )
        )
    return core


def grpc_server(
    settings: Settings,
    servicer: LstmServeServiceServicer,
    health_servicer: health.aio.HealthServicer,
    *,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, int]:
    """Our service, health and (with ``--reflection``) reflection on ``host:port``;
    ``(server, bound port)``. Requests over ``settings.max_message_bytes()`` get
    RESOURCE_EXHAUSTED from grpc; undecodable ones INVALID_ARGUMENT (:mod:`server.decode`).

    ``reuse_port``: several front-end processes share the port (SO_REUSEPORT; the kernel
    spreads connections over them). Off otherwise, so that a second server on a taken port fails
    instead of silently sharing it. Raises :class:`OSError` when the port cannot be bound.
    """
    s = settings
    servicer.authenticator = Authenticator(s.auth_tokens, client_certs=bool(s.tls_client_ca))
    cygrpc_log = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, QuietPeerGone) for f in cygrpc_log.filters):
        cygrpc_log.addFilter(QuietPeerGone())
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_receive_message_length", s.max_message_bytes()),
            # A backstop: responses are bounded by the request limits and the model (the
            # largest, an all-logits Step, is max_prompt_tokens * V * 4 bytes).
            ("grpc.max_send_message_length", 64 << 20),
        ]
    )
    add_servicer(servicer, server)
    # KServe v2 / Triton beside it, over the same plane (servicer.plane) and authenticator;
    # its ServerReady and ModelReady follow the health service.
    serving = health_servicer.serving if isinstance(health_servicer, Health) else None
    servicer.kserve = KServeServicer(servicer, idle_timeout_s=s.idle_timeout_s, serving=serving)
    add_kserve_servicer(servicer.kserve, server)
    # Open to every client; undecodable requests get INVALID_ARGUMENT (server/decode.py).
    add_health(health_servicer, servicer, server)
    if s.reflection:
        names: tuple[str, ...] = (SERVICE_NAME, KSERVE_SERVICE_NAME, health.SERVICE_NAME)
        names += (reflection.SERVICE_NAME, REFLECTION_V1)
        server.add_generic_rpc_handlers(_reflection(names, servicer))
    try:
        if s.tls_cert:
            port = server.add_secure_port(f"{s.host}:{s.port}", server_credentials(s))
        else:
            port = server.add_insecure_port(f"{s.host}:{s.port}")
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {s.host}:{s.port}")
    return server, port


def server_credentials(settings: Settings) -> grpc.ServerCredentials:
    """TLS from ``--tls-cert``/``--tls-key``; with ``--tls-client-ca``, client certificates
    signed by that CA are required (mutual TLS)."""

    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    ca = read(settings.tls_client_ca) if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(read(settings.tls_key), read(settings.tls_cert))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


async def http_server(
    settings: Settings, servicer: LstmServeServiceServicer, *, reuse_port: bool = False
) -> RestServer | None:
    """KServe v2 over HTTP/REST on ``host:http_port`` (None when ``http_port`` is -1), over the
    KServe servicer :func:`grpc_server` made for ``servicer`` (so: same authenticator, plane and
    metrics); the gRPC port's TLS and message size limit. ``reuse_port`` as for
    :func:`grpc_server`. Raises :class:`OSError` naming the port and its flag."""
    s = settings
    if s.http_port < 0:
        return None
    rest = RestServer(Rest(lambda: servicer.kserve, s.max_message_bytes()))
    try:
        await rest.start(
            s.host,
            s.http_port,
            ssl_context=http_ssl_context(s) if s.tls_cert else None,
            reuse_port=reuse_port,
        )
    except OSError as e:
        raise port_error(e, "HTTP", s.host, s.http_port, "http_port") from e
    return rest


def port_error(e: OSError, serving: str, host: str, port: int, setting: str) -> OSError:
    """``e`` (binding ``host:port`` failed) as one line for ``lstm-serve: error:`` that says
    which port and how to change it: the setting's flag and environment variable."""
    what = "already in use" if e.errno == errno.EADDRINUSE else e.strerror
    flag, env = "--" + setting.replace("_", "-"), ENV_PREFIX + setting.upper()
    err = OSError(
        f"cannot serve {serving} on {host}:{port}: {what} "
        f"(choose another port with {flag} / {env}; -1: none)"
    )
    err.errno = e.errno
    return err


def http_ssl_context(settings: Settings) -> ssl.SSLContext:
    """:func:`server_credentials` for the HTTP port: ``--tls-cert``/``--tls-key``, and with
    ``--tls-client-ca`` a client certificate signed by that CA is required (its common name is
    the principal when no token is sent, as on gRPC)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca:
        context.load_verify_locations(settings.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


# grpcio-reflection serves grpc.reflection.v1alpha only; v1 is the same messages on another
# path (newer tools such as grpcurl ask for v1 first), so the same servicer answers both.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _reflection(
    names: tuple[str, ...], servicer: LstmServeServiceServicer
) -> tuple[grpc.GenericRpcHandler, ...]:
    """Reflection on both paths, behind the same credential check as our services: with
    ``--auth-tokens`` (or mutual TLS) a caller without a valid credential gets UNAUTHENTICATED
    before any service is listed."""
    from grpc_reflection.v1alpha import reflection_pb2 as rpb

    reflector = reflection.aio.ReflectionServicer(names)

    async def info(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            servicer.caller_of(context)
        except Unauthenticated as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        async for response in reflector.ServerReflectionInfo(request_iterator, context):
            yield response

    handler = grpc.stream_stream_rpc_method_handler(
        info,
        request_deserializer=rpb.ServerReflectionRequest.FromString,
        response_serializer=rpb.ServerReflectionResponse.SerializeToString,
    )
    return tuple(
        grpc.method_handlers_generic_handler(path, {"ServerReflectionInfo": handler})
        for path in (reflection.SERVICE_NAME, REFLECTION_V1)
    )


# How often a server's readiness is checked again (App: the session store; a front end: the
# engine's answer to PING, which includes the store's).
HEALTH_POLL_S = 1.0
# grpc.health.v1 answers for these: the server as a whole and each of its services.
HEALTH_NAMES = ("", SERVICE_NAME, KSERVE_SERVICE_NAME)


class Health(health.aio.HealthServicer):
    """``grpc.health.v1.Health`` as :func:`set_health` sets it; KServe's ServerReady and
    ModelReady read it back (:meth:`serving`), so both protocols give one answer."""

    def serving(self) -> bool:
        return self._server_status.get("") == SERVING


async def set_health(health_servicer: health.aio.HealthServicer, status: int) -> None:
    """Every name of :data:`HEALTH_NAMES` to ``status`` (SERVING or NOT_SERVING)."""
    for name in HEALTH_NAMES:
        await health_servicer.set(name, status)


class App:
    """A server in this process. ``await start()``, ``await ready()``, ``await drain()``."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        reuse_port: bool = False,
    ) -> None:
        self.settings = settings.validate()
        # True under the supervisor, which holds the ports reserved (supervisor.reserve_port).
        self.reuse_port = reuse_port
        self.registry = registry if registry is not None else CollectorRegistry()
        self.clock = clock
        self.requests = RequestStats()
        self.servicer = LstmServeServiceServicer(self.requests)
        self.health = Health()
        self._health_follow: asyncio.Task[None] | None = None
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.rest: RestServer | None = None
        self.http_port: int | None = None  # None: no HTTP (--http-port -1)
        self.core: Core | None = None
        self._load: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    # The engine side, once loaded (tests read these).
    @property
    def runtime(self) -> ModelRuntime | None:
        return self.core.runtime if self.core else None

    @property
    def engine(self) -> Engine | None:
        return self.core.engine if self.core else None

    @property
    def store(self) -> SessionStore | None:
        return self.core.store if self.core else None

    @property
    def plane(self) -> Models | None:
        return self.core.plane if self.core else None

    @property
    def metrics_port(self) -> int | None:
        return self.core.metrics_port if self.core else None

    @property
    def scheduler_stats(self) -> SchedulerStats | None:
        return self.core.scheduler_stats if self.core else None

    async def start(self) -> None:
        """Bind the ports and begin loading the model (see :meth:`ready`)."""
        # A missing model or repository is reported before anything starts.
        check_model_source(self.settings.model, self.settings.model_repository)
        server, self.port = grpc_server(
            self.settings, self.servicer, self.health, reuse_port=self.reuse_port
        )
        try:
            self.rest = await http_server(self.settings, self.servicer, reuse_port=self.reuse_port)
        except OSError:
            await server.stop(None)
            raise
        self.http_port = self.rest.port if self.rest is not None else None
        await set_health(self.health, NOT_SERVING)
        await server.start()
        self.server = server
        self._load = asyncio.get_running_loop().create_task(self._load_model())

    async def _load_model(self) -> None:
        core = await build_core(
            self.settings,
            registry=self.registry,
            clock=self.clock,
            requests=self.requests,
        )
        core.start_metrics()
        self.core = core
        self.servicer.plane = core.plane
        status = SERVING if await core.models.store_reachable() else NOT_SERVING
        await set_health(self.health, status)
        if core.models.durable_store is not None:
            self._health_follow = asyncio.get_running_loop().create_task(
                self._follow_store(core, status)
            )
        log.info("loaded %s", core.describe())

    async def _follow_store(self, core: Core, status: int) -> None:
        """Health (and KServe's ServerReady) NOT_SERVING while the durable session store does
        not answer (every create would fail UNAVAILABLE), SERVING again once it does."""
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            now = SERVING if await core.models.store_reachable() else NOT_SERVING
            if now != status:
                status = now
                await set_health(self.health, status)

    async def ready(self) -> None:
        """Wait for the model; re-raises a load failure (ModelLoadError, OSError)."""
        assert self._load is not None, "start() first"
        await asyncio.shield(self._load)

    async def drain(self, grace: float | None = None) -> bool:
        """Refuse new work, let in-flight requests finish (up to ``grace`` s), stop everything.

        Returns True when every in-flight request finished within the grace period.
        """
        grace = self.settings.drain_grace_s if grace is None else grace
        if self._health_follow is not None:
            self._health_follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_follow
        await set_health(self.health, NOT_SERVING)
        await self.health.enter_graceful_shutdown()
        clean = True
        if self.core is not None:
            self.core.plane.draining = True
            clean = await self.core.plane.wait_idle(grace)
        if self._load is not None and not self._load.done():
            self._load.cancel()
        if self.server is not None:
            # Whatever is still open (idle streams) is cancelled now.
            await self.server.stop(0.5 if clean else 0)
        if self.rest is not None:
            await self.rest.stop()
        if self.core is not None:
            await self.core.stop()
        self._stopped.set()
        return clean

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
