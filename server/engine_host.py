"""The engine process: the model, the state pool, the sessions and the engine loop, served to
the front ends over a Unix domain socket (:mod:`server.ipc`).

The model loop never waits for gRPC: no gRPC runs in this process. Its event loop does the
socket I/O and the data plane's bookkeeping; the engine thread runs the iterations. Any front
end may serve any session, since sessions live here. A front end whose connection ends (it
exited or was killed) has its requests cancelled and its streams ended at once, which puts
their sessions back as they were.

Started by the supervisor (:mod:`server.supervisor`) as ``python -m server.engine_host``;
it prints one line ``ENGINE READY`` on stdout once the model is loaded and the socket is bound,
and serves ``/metrics`` for the whole server (the front ends ship their request counts here
with every heartbeat, see :class:`~server.metrics.RequestStats`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from . import ipc
from .app import Core, build_core
from .dataplane import Caller, GenerateParams, ModelRef, SessionInfo, StepResult, Stream
from .errors import NotFound
from .metrics import ModelInferStats, RequestStats
from .sequence import feature_rows
from .settings import Settings, settings_from_json

log = logging.getLogger("lstm_serve.engine")

Handler = Callable[["_Frontend", "Caller", list[Any]], Awaitable[Any]]


def step_payload(r: StepResult) -> list[Any]:
    logits = None if r.logits is None else ipc.f32(r.logits)
    positions = 0 if r.logits is None else int(r.logits.shape[0])
    top = [list(t) for t in r.top]
    return [r.session_id, logits, positions, top, r.tokens_consumed, r.steps, r.model_version]


def _features(payload: list[Any] | None) -> np.ndarray | None:
    """:func:`server.ipc.features_payload`'s inverse (a front end's bytes: checked again)."""
    return None if payload is None else feature_rows(payload[0], payload[1])


def _session_payload(i: SessionInfo) -> list[Any]:
    """A :class:`SessionInfo` on the wire (the front end rebuilds it positionally)."""
    return [
        i.session_id,
        i.steps,
        i.created_unix_s,
        i.last_used_unix_s,
        i.idle_timeout_s,
        i.state_bytes,
        i.busy,
        i.has_next_distribution,
        i.model_name,
        i.model_version,
    ]


class _Frontend:
    """What the engine knows of one front end: its connection, open requests and streams."""

    def __init__(self) -> None:
        self.conn: ipc.Connection | None = None
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.streams: dict[int, Stream] = {}
        # Which front end it is (its heartbeats say): the per-process metrics.
        self.index = -1
        self.pid = 0


class EngineHost:
    """Serves a :class:`Core` on a Unix socket at ``path``."""

    def __init__(self, core: Core, path: str) -> None:
        self.core = core
        self.plane = core.plane
        self.path = path
        self.frontends: set[_Frontend] = set()
        # The KServe service's inference counts, shipped by the front ends (ModelStatistics).
        self.infer_stats = ModelInferStats()
        self._server: asyncio.AbstractServer | None = None
        self._handlers: dict[str, Handler] = {
            ipc.CREATE: self._create,
            ipc.CLOSE: self._close,
            ipc.RESET: self._reset,
            ipc.GET: self._get,
            ipc.LIST_SESSIONS: self._list_sessions,
            ipc.STEP: self._step,
            ipc.STREAM_STEP: self._stream_step,
            ipc.STREAM_CLOSE: self._stream_close,
            ipc.MODEL_INFO: self._model_info,
            ipc.EXPORT: self._export,
            ipc.IMPORT: self._import,
            ipc.FORK: self._fork,
            ipc.LIST_MODELS: self._list_models,
            ipc.LOAD_MODEL: self._load_model,
            ipc.UNLOAD_MODEL: self._unload_model,
            ipc.PING: self._ping,
            ipc.INFER_STATS: self._infer_stats,
        }

    def _connection(self) -> ipc.Connection:
        fe = _Frontend()
        conn = ipc.Connection(
            functools.partial(self._dispatch, fe), functools.partial(self._lost, fe)
        )
        fe.conn = conn
        self.frontends.add(fe)
        return conn

    def processes(self) -> list[tuple[str, int]]:
        """Every process of the server as ``(name, pid)``, for the per-process metrics: the
        supervisor (this process's parent), the engine, and each connected front end that has
        said who it is (its first heartbeat, sent as it connects). Called on the metrics thread.
        """
        fes = sorted((fe.index, fe.pid) for fe in list(self.frontends) if fe.pid)
        return [
            ("supervisor", os.getppid()),
            ("engine", os.getpid()),
            *((f"frontend-{index}", pid) for index, pid in fes),
        ]

    async def start(self) -> None:
        self._server = await asyncio.get_running_loop().create_unix_server(
            self._connection, self.path
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for fe in list(self.frontends):
            await self._forget(fe, "closed")
            if fe.conn is not None:
                fe.conn.close()

    # --- dispatch ------------------------------------------------------------------------------

    def _dispatch(self, fe: _Frontend, msg: list[Any]) -> None:
        try:
            rid, op = msg[0], msg[1]
            if op == ipc.HEARTBEAT:
                self.core.requests.merge(RequestStats.from_wire(msg[2]))
                if len(msg) > 3 and msg[3] is not None:
                    self.infer_stats.merge(ModelInferStats.from_wire(msg[3]))
                if len(msg) > 4 and msg[4] is not None:
                    fe.index, fe.pid = int(msg[4][0]), int(msg[4][1])
                return
            if op == ipc.CANCEL:
                task = fe.tasks.get(rid)
                if task is not None:
                    task.cancel()
                elif rid in fe.streams:
                    # A StepStream open that completed here while its front-end call was being
                    # cancelled: the front end never learnt of the stream (its id is the open's
                    # request id), so nothing would ever close it and its session would stay
                    # attached. Close it now.
                    stream = fe.streams.pop(rid)
                    asyncio.get_running_loop().create_task(stream.close("disconnected"))
                return
            principal, left = msg[2]
            caller = Caller(str(principal), None if left is None else time.monotonic() + left)
            if op == ipc.GENERATE:
                coro: Awaitable[None] = self._generate(fe, rid, caller, msg[3:])
            elif op == ipc.STREAM_OPEN:
                coro = self._unary(
                    fe, rid, functools.partial(self._stream_open, rid), caller, msg[3:]
                )
            else:
                handler = self._handlers.get(op)
                if handler is None:
                    self._send(fe, rid, ipc.ERROR, ["InvalidArgument", f"unknown op {op!r}"])
                    return
                coro = self._unary(fe, rid, handler, caller, msg[3:])
        except Exception:  # a malformed message must not stop the engine for everyone
            log.exception("bad message from a front end")
            return
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        fe.tasks[rid] = task
        task.add_done_callback(functools.partial(_forget_task, fe.tasks, rid))

    @staticmethod
    def _send(fe: _Frontend, rid: int, kind: int, payload: Any) -> None:
        if fe.conn is not None:
            fe.conn.send([rid, kind, payload])

    async def _unary(
        self,
        fe: _Frontend,
        rid: int,
        handler: Handler,
        caller: Caller,
        args: list[Any],
    ) -> None:
        try:
            result = await handler(fe, caller, args)
        except asyncio.CancelledError:
            return  # the front end asked for it and expects no reply
        except Exception as e:
            if not isinstance(e, ipc.ServeError):
                log.exception("engine request %s failed", getattr(handler, "__name__", "?"))
            self._send(fe, rid, ipc.ERROR, ipc.error_payload(e))
            return
        self._send(fe, rid, ipc.RESULT, result)

    # --- handlers --------------------------------------------------------------------------------

    async def _ping(self, fe: _Frontend, caller: Caller, args: list[Any]) -> Any:
        """``[not draining, the session store answers]``: the front ends ping every second and
        set their health (and KServe's ServerReady) to SERVING only when both hold."""
        return [not self.plane.draining, await self.plane.store_reachable()]

    async def _infer_stats(self, fe: _Frontend, caller: Caller, args: list[Any]) -> Any:
        return self.infer_stats.to_wire()

    async def _create(self, fe: _Frontend, caller: Caller, args: list[Any]) -> Any:
        model = ModelRef(args[2], args[3])
        i = await self.plane.create_session(float(args[0]), args[1], caller=caller, model=model)
        return [i.session_id, i.idle_timeout_s, i.state_bytes, i.model_name, i.model_version]

    async def _list_models(self, fe: _Frontend, caller: Caller, args: list[Any]) -> Any:
        mode, models = await self.plane.list_models()
        return [mode, [ipc.status_payload(m) for m in models]]

    async def _load_model(self, fe: _Frontend, caller: Caller, args: list[Any]) -> Any:
        return ipc.status_payload(await self.plane.load_model(args[0], caller=caller))

    async def _unload_model(self, fe: _Frontend, caller: Caller, args: list[Any]) -> Any:
        return ipc.status_payload(await self.plane.unload_model(args[0], caller=caller))

    async def _export(self, fe: _Frontend, caller: Caller, args: list[Any]) -> Any:
        return await self.plane.export_session(args[0], caller=caller)

    async def _import(self, fe: _Frontend, caller: Caller, args: list[Any]) -> Any:
        return await self.plane.import_session(args[0], args[1], caller=caller)

    async def _fork(self, fe: _Frontend, caller: Caller, args: list[Any]) -> Any:
        return await self.plane.fork_session(args[0], args[1], caller=caller)

    async def _close(self, fe: _Frontend, caller: Caller, args: list[Any]) -> Any:
        await self.plane.close_session(args[0], caller=caller)

    async def _reset(self, fe: _Frontend, caller: Caller, args: list[Any]) -> Any:
        await self.plane.reset_session(args[0], caller=caller)

    async def _get(self, fe: _Frontend, caller: Caller, args: list[Any]) -> Any:
        return _session_payload(await self.plane.get_session(args[0], caller=caller))

    async def _list_sessions(self, fe: _Frontend, caller: Caller, args: list[Any]) -> Any:
        page, token = await self.plane.list_sessions(int(args[0]), str(args[1]), caller=caller)
        return [[_session_payload(i) for i in page], token]

    async def _step(self, fe: _Frontend, caller: Caller, args: list[Any]) -> Any:
        sid, text, token_ids, output, top_k, request_id, name, version, features = args
        r = await self.plane.step(
            sid,
            text=text,
            token_ids=token_ids,
            output=output,
            top_k=top_k,
            caller=caller,
            request_id=request_id,
            model=ModelRef(name, version),
            features=_features(features),
        )
        return step_payload(r)

    async def _stream_open(
        self, stream_id: int, fe: _Frontend, caller: Caller, args: list[Any]
    ) -> Any:
        # The stream's id is its open request's id (unique on this front end's connection), so
        # a CANCEL of that request that arrives after the open completed finds the stream.
        stream = await self.plane.open_stream(
            args[0], caller=caller, model=ModelRef(args[1], args[2])
        )
        fe.streams[stream_id] = stream
        return [stream_id, stream.session_id]

    async def _stream_step(self, fe: _Frontend, caller: Caller, args: list[Any]) -> Any:
        stream_id, text, token_ids, output, top_k, request_id, features = args
        stream = fe.streams.get(stream_id)
        if stream is None:
            raise NotFound("this stream has ended")
        r = await stream.step(
            text=text,
            token_ids=token_ids,
            output=output,
            top_k=top_k,
            caller=caller,
            request_id=request_id,
            features=_features(features),
        )
        return step_payload(r)

    async def _stream_close(self, fe: _Frontend, caller: Caller, args: list[Any]) -> Any:
        stream = fe.streams.pop(args[0], None)
        if stream is not None:
            await stream.close(args[1])

    async def _model_info(self, fe: _Frontend, caller: Caller, args: list[Any]) -> Any:
        m = await self.plane.model_info(ModelRef(args[0], args[1]))
        lim, sc = m.limits, m.scaling
        return [
            m.name,
            m.version,
            m.provider,
            list(m.vocab),
            m.num_layers,
            m.hidden_size,
            m.preprocess,
            m.unk_id,
            m.config_json,
            [lim.max_prompt_tokens, lim.max_new_tokens, lim.max_sessions, lim.max_batch_size],
            m.state_bytes_per_session,
            m.kind,
            list(m.feature_names),
            list(m.output_names),
            None if sc is None else sc.to_dict(),
        ]

    async def _generate(self, fe: _Frontend, rid: int, caller: Caller, args: list[Any]) -> None:
        sid, prompt, max_tokens, temperature, top_k, top_p, seed, stop, request_id = args[:9]
        model = ModelRef(args[9], args[10])
        params = GenerateParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=tuple(stop),
        )
        chunks = self.plane.generate(
            sid, prompt, params, caller=caller, request_id=request_id, model=model
        )
        try:
            async with contextlib.aclosing(chunks):
                async for ch in chunks:
                    self._send(
                        fe,
                        rid,
                        ipc.CHUNK,
                        [
                            ch.session_id,
                            ch.text,
                            ch.token_ids,
                            ch.generated_tokens,
                            ch.prompt_tokens,
                            ch.finish_reason,
                        ],
                    )
        except asyncio.CancelledError:
            return
        except Exception as e:
            if not isinstance(e, ipc.ServeError):
                log.exception("generate failed")
            self._send(fe, rid, ipc.ERROR, ipc.error_payload(e))
            return
        self._send(fe, rid, ipc.END, None)

    # --- front ends that go away -------------------------------------------------------------

    def _lost(self, fe: _Frontend) -> None:
        asyncio.get_running_loop().create_task(self._forget(fe, "disconnected"))

    async def _forget(self, fe: _Frontend, reason: str) -> None:
        if fe not in self.frontends:
            return
        self.frontends.discard(fe)
        if fe.tasks or fe.streams:
            log.warning(
                "a front end went away: cancelling %d request(s), ending %d stream(s)",
                len(fe.tasks),
                len(fe.streams),
            )
        for task in list(fe.tasks.values()):
            task.cancel()
        for stream in list(fe.streams.values()):
            await stream.close(reason)
        fe.streams.clear()


def _forget_task(tasks: dict[int, asyncio.Task[None]], rid: int, _task: object) -> None:
    tasks.pop(rid, None)


async def run(settings: Settings, path: str) -> int:
    stop = ipc.stop_on_signals()
    core = await build_core(settings)
    host = EngineHost(core, path)
    await host.start()
    core.start_metrics(host.processes)
    metrics_port = core.metrics_port if core.metrics_port is not None else -1
    print(f"ENGINE READY {metrics_port} {core.describe()}", flush=True)
    log.info("engine: %s", core.describe())
    try:
        await stop.wait()
    finally:
        # The front ends have drained already (the supervisor stops them first); whatever is
        # still open gets the grace period.
        core.plane.draining = True
        await core.plane.wait_idle(settings.drain_grace_s)
        await host.stop()
        await core.stop()
    return 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m server.engine_host")
    p.add_argument("--settings-json", required=True)
    p.add_argument("--socket", required=True, help="path of the Unix socket to listen on")
    a = p.parse_args(argv)
    ipc.die_with_parent()
    settings = settings_from_json(a.settings_json)
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s",
    )
    try:
        sys.exit(ipc.run_loop(run(settings, a.socket)))
    except Exception as e:  # a load failure: one line for the supervisor to repeat
        print(f"ENGINE FAILED {type(e).__name__}: {e}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
