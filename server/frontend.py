"""A front-end process: the gRPC service over a data plane that lives in the engine process.

:class:`RemotePlane` has the interface the servicer uses (:class:`server.dataplane.Plane`) and
forwards every call to the engine over its Unix socket (:mod:`server.ipc`); a cancelled call
(client gone, deadline) sends ``CANCEL``, which makes the engine abandon the request and put the
session back as it was. Several front ends share one port (SO_REUSEPORT) and one engine.

If the engine process goes away (its connection ends, or its pid is gone), the front end turns
health NOT_SERVING, fails every open request with UNAVAILABLE and exits non-zero: never a
half-alive server.

Started by the supervisor as ``python -m server.frontend``; prints ``FRONTEND READY PORT`` once
it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncGenerator
from typing import Any

import numpy as np

from contract.model import Scaling

from . import ipc
from .app import (
    HEALTH_POLL_S,
    NOT_SERVING,
    SERVING,
    Health,
    grpc_server,
    http_server,
    set_health,
)
from .dataplane import (
    ANONYMOUS,
    ANY_MODEL,
    Admission,
    Caller,
    GenerateChunk,
    GenerateParams,
    Limits,
    ModelInfo,
    ModelRef,
    ModelStatus,
    SessionInfo,
    StepResult,
    VersionStatus,
)
from .errors import Unavailable
from .metrics import RequestStats
from .servicer import LstmServeServiceServicer
from .settings import Settings, settings_from_json

log = logging.getLogger("lstm_serve.frontend")

ENGINE_GONE = "the engine process is not running; retry shortly or on another replica"


def _ctx(caller: Caller) -> list[Any]:
    """A request's context on the wire: the principal, and the seconds its client has left."""
    left = None if caller.deadline is None else max(0.0, caller.deadline - time.monotonic())
    return [caller.principal, left]


def step_result(payload: list[Any]) -> StepResult:
    sid, logits, positions, top, consumed, steps, version = payload
    arr = None
    if logits is not None:
        arr = np.frombuffer(logits, np.float32).reshape(positions, -1)
    top_ = [(int(i), t, float(p)) for i, t, p in top]
    return StepResult(sid, arr, top_, consumed, steps, version)


def _status(r: list[Any]) -> ModelStatus:
    name, policy, rows, is_default = r
    return ModelStatus(name, policy, tuple(VersionStatus(*row) for row in rows), is_default)


class RemotePlane(Admission):
    """The data plane's interface, served by the engine process on the Unix socket ``path``."""

    def __init__(self, path: str, engine_pid: int = 0) -> None:
        self.path = path
        self.engine_pid = engine_pid
        self.conn: ipc.Connection | None = None
        self._rids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any] | asyncio.Queue[tuple[int, Any]]] = {}
        super().__init__()
        self.engine_alive = True
        self.lost = asyncio.Event()  # set when the engine is gone
        # (name, version) -> (expiry, info): a named version's info never changes; the newest
        # version of a model may, after a rollout, so that answer is kept for a second only.
        self._model_info: dict[tuple[str, str], tuple[float, ModelInfo]] = {}

    # --- plumbing ------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect to the engine's socket. Raises :class:`OSError` when nothing listens."""
        _, conn = await asyncio.get_running_loop().create_unix_connection(
            lambda: ipc.Connection(self._on_message, self.engine_died), self.path
        )
        self.conn = conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.on_lost = None
            self.conn.close()

    def _on_message(self, msg: list[Any]) -> None:
        rid, kind, payload = msg
        waiter = self._waiting.get(rid)
        if waiter is None:
            return  # cancelled meanwhile
        if isinstance(waiter, asyncio.Queue):
            waiter.put_nowait((kind, payload))
        elif not waiter.done():
            if kind == ipc.ERROR:
                waiter.set_exception(ipc.error_from(payload))
            else:
                waiter.set_result(payload)

    def engine_died(self) -> None:
        """Fail everything waiting for the engine; later calls fail at once."""
        if not self.engine_alive:
            return
        self.engine_alive = False
        self.lost.set()
        for waiter in list(self._waiting.values()):
            if isinstance(waiter, asyncio.Queue):
                waiter.put_nowait((ipc.ERROR, ["Unavailable", ENGINE_GONE]))
            elif not waiter.done():
                waiter.set_exception(Unavailable(ENGINE_GONE))
        self._waiting.clear()

    def _send(self, msg: list[Any]) -> None:
        if not self.engine_alive or self.conn is None:
            raise Unavailable(ENGINE_GONE)
        self.conn.send(msg)

    async def call(self, op: str, *args: Any, caller: Caller = ANONYMOUS) -> Any:
        """One request to the engine and its only reply; cancelling it cancels it there too."""
        rid = next(self._rids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            self._send([rid, op, _ctx(caller), *args])
            return await fut
        except asyncio.CancelledError:
            with contextlib.suppress(Unavailable):
                self._send([rid, ipc.CANCEL])
            raise
        finally:
            self._waiting.pop(rid, None)

    def heartbeat(
        self, stats: RequestStats, infer: list[int] | None = None, me: list[int] | None = None
    ) -> None:
        """Ship request counts (and the KServe service's inference counts) to the engine, and
        which front end this is (``me``: ``[index, pid]``, for the per-process metrics)."""
        with contextlib.suppress(Unavailable):
            self._send([0, ipc.HEARTBEAT, stats.to_wire(), infer, me])

    async def infer_stats(self) -> list[Any]:
        """The KServe inference counts every front end has shipped to the engine."""
        return list(await self.call(ipc.INFER_STATS))

    # --- admission (the same rules as the local data plane) --------------------------------------

    def _enter(self) -> None:
        if not self.engine_alive and not self.draining:
            raise Unavailable(ENGINE_GONE)
        self._admit()

    async def _unary(self, op: str, *args: Any, caller: Caller = ANONYMOUS) -> Any:
        self._enter()
        try:
            return await self.call(op, *args, caller=caller)
        finally:
            self.request_done()

    # --- the plane's interface -------------------------------------------------------------------

    async def model_info(self, model: ModelRef = ANY_MODEL) -> ModelInfo:
        key = (model.name, model.version)
        cached = self._model_info.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        r = await self._unary(ipc.MODEL_INFO, model.name, model.version)
        info = ModelInfo(
            name=r[0],
            version=r[1],
            provider=r[2],
            vocab=tuple(r[3]),
            num_layers=r[4],
            hidden_size=r[5],
            preprocess=r[6],
            unk_id=r[7],
            config_json=r[8],
            limits=Limits(*r[9]),
            state_bytes_per_session=r[10],
            kind=r[11],
            feature_names=tuple(r[12]),
            output_names=tuple(r[13]),
            scaling=None if r[14] is None else Scaling.from_dict(r[14], len(r[12]), len(r[13])),
        )
        self._model_info[key] = (now + (1e18 if model.version else 1.0), info)
        return info

    async def create_session(
        self,
        idle_timeout_s: float = 0.0,
        session_id: str = "",
        *,
        caller: Caller = ANONYMOUS,
        model: ModelRef = ANY_MODEL,
    ) -> SessionInfo:
        sid, timeout, state_bytes, name, version = await self._unary(
            ipc.CREATE, float(idle_timeout_s), session_id, model.name, model.version, caller=caller
        )
        return SessionInfo(sid, 0, 0.0, 0.0, timeout, state_bytes, False, False, name, version)

    async def list_models(self) -> tuple[str, list[ModelStatus]]:
        mode, rows = await self._unary(ipc.LIST_MODELS)
        return mode, [_status(r) for r in rows]

    async def load_model(self, name: str, *, caller: Caller = ANONYMOUS) -> ModelStatus:
        return _status(await self._unary(ipc.LOAD_MODEL, name, caller=caller))

    async def unload_model(self, name: str, *, caller: Caller = ANONYMOUS) -> ModelStatus:
        return _status(await self._unary(ipc.UNLOAD_MODEL, name, caller=caller))

    async def export_session(self, session_id: str, *, caller: Caller = ANONYMOUS) -> bytes:
        return bytes(await self._unary(ipc.EXPORT, session_id, caller=caller))

    async def import_session(
        self, data: bytes, session_id: str = "", *, caller: Caller = ANONYMOUS
    ) -> str:
        return str(await self._unary(ipc.IMPORT, data, session_id, caller=caller))

    async def fork_session(
        self, session_id: str, new_session_id: str = "", *, caller: Caller = ANONYMOUS
    ) -> str:
        return str(await self._unary(ipc.FORK, session_id, new_session_id, caller=caller))

    async def close_session(self, session_id: str, *, caller: Caller = ANONYMOUS) -> None:
        await self._unary(ipc.CLOSE, session_id, caller=caller)

    async def reset_session(self, session_id: str, *, caller: Caller = ANONYMOUS) -> None:
        await self._unary(ipc.RESET, session_id, caller=caller)

    async def get_session(self, session_id: str, *, caller: Caller = ANONYMOUS) -> SessionInfo:
        return SessionInfo(*await self._unary(ipc.GET, session_id, caller=caller))

    async def list_sessions(
        self, page_size: int = 0, page_token: str = "", *, caller: Caller = ANONYMOUS
    ) -> tuple[list[SessionInfo], str]:
        rows, token = await self._unary(
            ipc.LIST_SESSIONS, int(page_size), page_token, caller=caller
        )
        return [SessionInfo(*r) for r in rows], str(token)

    async def step(
        self,
        session_id: str,
        *,
        text: str = "",
        token_ids: Any = (),
        output: str = "last",
        top_k: int = 0,
        caller: Caller = ANONYMOUS,
        request_id: str = "",
        model: ModelRef = ANY_MODEL,
        features: np.ndarray | None = None,
    ) -> StepResult:
        return step_result(
            await self._unary(
                ipc.STEP,
                session_id,
                text,
                list(token_ids),
                output,
                top_k,
                request_id,
                model.name,
                model.version,
                ipc.features_payload(features),
                caller=caller,
            )
        )

    async def open_stream(
        self, session_id: str = "", *, caller: Caller = ANONYMOUS, model: ModelRef = ANY_MODEL
    ) -> RemoteStepStream:
        self._enter()
        try:
            stream_id, sid = await self.call(
                ipc.STREAM_OPEN, session_id, model.name, model.version, caller=caller
            )
        except BaseException:
            self.request_done()
            raise
        return RemoteStepStream(self, stream_id, sid, caller)

    async def generate(
        self,
        session_id: str,
        prompt: str,
        params: GenerateParams,
        *,
        caller: Caller = ANONYMOUS,
        request_id: str = "",
        model: ModelRef = ANY_MODEL,
    ) -> AsyncGenerator[GenerateChunk, None]:
        self._enter()
        rid = next(self._rids)
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._waiting[rid] = queue
        done = False
        try:
            self._send(
                [
                    rid,
                    ipc.GENERATE,
                    _ctx(caller),
                    session_id,
                    prompt,
                    params.max_tokens,
                    params.temperature,
                    params.top_k,
                    params.top_p,
                    params.seed,
                    list(params.stop),
                    request_id,
                    model.name,
                    model.version,
                ]
            )
            while True:
                kind, payload = await queue.get()
                if kind == ipc.END:
                    done = True
                    return
                if kind == ipc.ERROR:
                    done = True
                    raise ipc.error_from(payload)
                yield GenerateChunk(*payload)
        finally:
            self._waiting.pop(rid, None)
            if not done:
                with contextlib.suppress(Unavailable):
                    self._send([rid, ipc.CANCEL])
            self.request_done()


class RemoteStepStream:
    """A step stream held in the engine (``stream_id``); the same interface as the local one."""

    def __init__(
        self, plane: RemotePlane, stream_id: int, session_id: str, caller: Caller = ANONYMOUS
    ) -> None:
        self.plane = plane
        self.stream_id = stream_id
        self.session_id = session_id
        self.caller = caller
        self.closed = False

    async def step(
        self,
        *,
        text: str = "",
        token_ids: Any = (),
        output: str = "last",
        top_k: int = 0,
        caller: Caller | None = None,
        request_id: str = "",
        features: np.ndarray | None = None,
    ) -> StepResult:
        return step_result(
            await self.plane.call(
                ipc.STREAM_STEP,
                self.stream_id,
                text,
                list(token_ids),
                output,
                top_k,
                request_id,
                ipc.features_payload(features),
                caller=caller or self.caller,
            )
        )

    async def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self.closed = True
        try:
            with contextlib.suppress(Unavailable):
                await asyncio.shield(
                    self.plane.call(ipc.STREAM_CLOSE, self.stream_id, reason, caller=self.caller)
                )
        finally:
            self.plane.request_done()


class Frontend:
    """One front-end process: gRPC on the shared port over a :class:`RemotePlane`."""

    def __init__(self, settings: Settings, path: str, engine_pid: int, index: int) -> None:
        self.settings = settings
        self.plane = RemotePlane(path, engine_pid)
        self.servicer = LstmServeServiceServicer(RequestStats())
        self.servicer.plane = self.plane
        self.servicer.frontend_id = str(index)
        self.health = Health()
        self.engine_pid = engine_pid
        self.me = [index, os.getpid()]  # every heartbeat says who sends it

    async def run(self, stop: asyncio.Event) -> int:
        s = self.settings
        await self.plane.connect()
        self._heartbeat()  # the engine's metrics show this process from now on
        server, port = grpc_server(s, self.servicer, self.health, reuse_port=True)
        # KServe v2 over HTTP/REST (--http-port) on its own port, shared the same way.
        rest = await http_server(s, self.servicer, reuse_port=True)
        await set_health(self.health, NOT_SERVING)
        await server.start()
        loop = asyncio.get_running_loop()
        # The supervisor forwards SIGHUP: read the tokens file again.
        loop.add_signal_handler(signal.SIGHUP, self.servicer.authenticator.reload)
        watch = loop.create_task(self._watch())
        await self._wait_engine()
        status = await self._engine_ready(SERVING)
        await set_health(self.health, status)
        follow = loop.create_task(self._follow_engine(status))
        print(f"FRONTEND READY {port}", flush=True)
        stopping = loop.create_task(stop.wait())
        lost = loop.create_task(self.plane.lost.wait())
        await asyncio.wait({stopping, lost}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        lost.cancel()
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow
        await set_health(self.health, NOT_SERVING)
        await self.health.enter_graceful_shutdown()
        self.plane.draining = True
        if self.plane.lost.is_set():
            log.error("the engine process is gone: exiting")
            await asyncio.sleep(0.5)  # health checks in flight see NOT_SERVING
            await server.stop(0)
            if rest is not None:
                await rest.stop()
            code = 1
        else:
            clean = await self.plane.wait_idle(s.drain_grace_s)
            await server.stop(0.5 if clean else 0)
            if rest is not None:
                await rest.stop()
            code = 0
        watch.cancel()
        self._heartbeat()
        await asyncio.sleep(0.05)  # let the last heartbeat leave
        self.plane.close()
        return code

    def _heartbeat(self) -> None:
        self.plane.heartbeat(self._take_stats(), self._take_infer_stats(), self.me)

    def _take_stats(self) -> RequestStats:
        stats, self.servicer.requests = self.servicer.requests, RequestStats()
        return stats

    def _take_infer_stats(self) -> list[Any] | None:
        kserve = self.servicer.kserve
        return None if kserve is None else kserve.take_stats().to_wire()

    async def _engine_ready(self, unknown: int) -> int:
        """SERVING when the engine says it is ready (not draining, its session store answers),
        else NOT_SERVING; ``unknown`` when it does not answer in time."""
        try:
            ready = await asyncio.wait_for(self.plane.call(ipc.PING), 2 * ipc.ENGINE_TIMEOUT_S)
        except Exception:  # slow, gone (run() then ends) or failing: keep what it said last
            return unknown
        return SERVING if all(ready) else NOT_SERVING

    async def _follow_engine(self, status: int) -> None:
        """Health (and KServe's ServerReady) follows the engine's readiness, asked every
        :data:`HEALTH_POLL_S`."""
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            now = await self._engine_ready(status)
            if now != status:
                status = now
                await set_health(self.health, status)

    async def _wait_engine(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.plane.call(ipc.PING), ipc.ENGINE_TIMEOUT_S)
                return
            except TimeoutError:
                log.info("waiting for the engine")

    def _engine_running(self) -> bool:
        if self.engine_pid <= 0:
            return True
        try:
            os.kill(self.engine_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A dead child not yet reaped by the supervisor is a zombie: gone all the same.
        try:
            with open(f"/proc/{self.engine_pid}/stat", encoding="ascii") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    async def _watch(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(0.1)
            if not self._engine_running():
                self.plane.engine_died()
                return
            n += 1
            if n % int(ipc.HEARTBEAT_S / 0.1) == 0:
                self._heartbeat()


async def run(settings: Settings, path: str, engine_pid: int, index: int) -> int:
    stop = ipc.stop_on_signals()
    return await Frontend(settings, path, engine_pid, index).run(stop)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m server.frontend")
    p.add_argument("--settings-json", required=True)
    p.add_argument("--socket", required=True, help="path of the engine's Unix socket")
    p.add_argument("--engine-pid", type=int, default=0)
    p.add_argument("--index", type=int, default=0)
    a = p.parse_args(argv)
    ipc.die_with_parent()
    settings = settings_from_json(a.settings_json)
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s %(name)s[frontend {a.index}]: %(message)s",
    )
    try:
        sys.exit(ipc.run_loop(run(settings, a.socket, a.engine_pid, a.index)))
    except OSError as e:
        print(f"FRONTEND FAILED {e}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
