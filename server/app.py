"""The one module that wires the server together from :class:`~server.settings.Settings`.

Start-up: the gRPC server (health NOT_SERVING, reflection) and the metrics endpoint come up
first, the model loads in a worker thread, then health turns SERVING. Drain (SIGTERM/SIGINT or
:meth:`App.drain`): health NOT_SERVING, new requests UNAVAILABLE, in-flight ones get
``drain_grace_s`` to finish, then everything stops.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc

from .batch import StatePool
from .dataplane import DataPlane, Limits
from .engine import Engine
from .metrics import ModelInfoStats, PrometheusMetrics, RequestStats, SchedulerStats
from .runtime import ModelRuntime, resolve_model
from .servicer import SERVICE_NAME, LstmServeServicer
from .sessions import SessionStore
from .settings import Settings

log = logging.getLogger("lstm_serve")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class App:
    """A running server. ``await start()``, ``await ready()``, ``await drain()``."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings.validate()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.clock = clock
        self.requests = RequestStats()
        self.scheduler_stats = SchedulerStats()
        self.servicer = LstmServeServicer(self.requests)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics: PrometheusMetrics | None = None
        self.metrics_port: int | None = None
        self.runtime: ModelRuntime | None = None
        self.plane: DataPlane | None = None
        self.engine: Engine | None = None
        self.store: SessionStore | None = None
        self._load: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        """Bind the ports and begin loading the model (see :meth:`ready`)."""
        s = self.settings
        resolve_model(s.model)  # a missing model is reported before anything listens
        server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 16 << 20)]
        )
        pb_grpc.add_LstmServeServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            self.port = server.add_insecure_port(f"{s.host}:{s.port}")
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {s.host}:{s.port}")
        await self._set_health(NOT_SERVING)
        await server.start()
        self.server = server
        self._load = asyncio.get_running_loop().create_task(self._load_model())

    async def _set_health(self, status: int) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def _load_model(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        runtime = await loop.run_in_executor(
            None,
            lambda: ModelRuntime(s.model, provider=s.provider, intra_op_threads=s.intra_op_threads),
        )
        spec = runtime.spec
        pool = StatePool(spec.num_layers, spec.hidden_size, spec.vocab_size, s.max_sessions)
        store = SessionStore(
            pool,
            max_sessions=s.max_sessions,
            idle_timeout_s=s.idle_timeout_s,
            eviction=s.eviction,
            clock=self.clock,
        )
        plane: DataPlane | None = None
        engine = Engine(
            runtime,
            pool,
            max_batch_size=s.max_batch_size,
            max_queue_delay_s=s.max_queue_delay_ms / 1000.0,
            max_queue_size=s.max_queue_size,
            prefill_chunk_tokens=s.prefill_chunk_tokens,
            inline_max_rows=s.inline_max_rows,
            stream_chunk_tokens=s.stream_chunk_tokens,
            stats=self.scheduler_stats,
            open_requests=lambda: plane.in_flight if plane is not None else 1,
        )
        limits = Limits(s.max_prompt_tokens, s.max_new_tokens, s.max_sessions, s.max_batch_size)
        plane = DataPlane(runtime, store, engine, limits)
        engine.start()
        if s.metrics_port >= 0:
            self.metrics = PrometheusMetrics(
                requests=self.requests,
                scheduler=self.scheduler_stats,
                model=ModelInfoStats(runtime.name, runtime.version, runtime.provider),
                sessions_active=lambda: len(store),
                state_bytes=lambda: store.state_bytes,
                sessions_ended=lambda: dict(store.stats.ended),
                registry=self.registry,
            )
            self.metrics_port = self.metrics.start_http(s.host, s.metrics_port)
        self.runtime, self.store, self.engine, self.plane = runtime, store, engine, plane
        self._sweeper = loop.create_task(self._sweep(store))
        self.servicer.plane = plane
        await self._set_health(SERVING)
        log.info("loaded %s", runtime.describe())

    async def ready(self) -> None:
        """Wait for the model; re-raises a load failure (ModelLoadError, OSError)."""
        assert self._load is not None, "start() first"
        await asyncio.shield(self._load)

    async def _sweep(self, store: SessionStore) -> None:
        interval = min(1.0, self.settings.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(interval)
            n = store.expire_idle()
            if n:
                log.debug("expired %d idle sessions", n)

    async def drain(self, grace: float | None = None) -> bool:
        """Refuse new work, let in-flight requests finish (up to ``grace`` s), stop everything.

        Returns True when every in-flight request finished within the grace period.
        """
        grace = self.settings.drain_grace_s if grace is None else grace
        await self._set_health(NOT_SERVING)
        await self.health.enter_graceful_shutdown()
        clean = True
        if self.plane is not None:
            self.plane.draining = True
            clean = await self.plane.wait_idle(grace)
        if self._load is not None and not self._load.done():
            self._load.cancel()
        if self.server is not None:
            # Whatever is still open (idle streams) is cancelled now.
            await self.server.stop(0.5 if clean else 0)
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.engine is not None:
            await self.engine.stop()
        if self.metrics is not None:
            self.metrics.stop_http()
        self._stopped.set()
        return clean

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve(settings: Settings, announce: Callable[[App], None] | None = None) -> int:
    """Run until SIGTERM/SIGINT, then drain; 0 on a clean exit. ``announce`` runs when ready."""
    app = App(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    try:
        ready = loop.create_task(app.ready())
        stopping = loop.create_task(stop.wait())
        await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            ready.result()  # raises a load failure
            if announce is not None:
                announce(app)
        await stopping
        log.info("draining (grace %.1f s)", settings.drain_grace_s)
    finally:
        clean = await app.drain()
    log.info("stopped%s", "" if clean else " (grace period ran out; requests were cancelled)")
    return 0
