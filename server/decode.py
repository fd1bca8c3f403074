"""Registers ``lstmserve.v1.LstmServeService``: request bytes that do not parse get
INVALID_ARGUMENT.

With the generated ``add_LstmServeServiceServicer_to_server`` grpc deserializes with
``FromString``, and bytes that are not a valid message raise inside grpc: the client gets
UNKNOWN (INTERNAL on a stream) and the server logs a traceback per request, a cheap way to flood
the log. Here every method's deserializer returns :data:`UNDECODABLE` instead, and:

* a unary request never reaches the servicer: the call is counted (INVALID_ARGUMENT, and in
  ``lstm_serve_undecodable_requests_total``), logged at most once per :data:`LOG_INTERVAL_S`
  (no traceback) and answered INVALID_ARGUMENT "request is not a valid StepRequest";
* a stream's messages are deserialized one by one as the servicer reads them, so the servicer
  gets a context (and request iterator) whose reads raise :class:`~server.errors.InvalidArgument`
  for such a message: its one error decorator then ends the call like any other bad argument.

An unauthenticated caller (with ``--auth-tokens``) gets UNAUTHENTICATED first, as for any call.

:func:`add_checked` does the same for the KServe service (whose servicer answers UNDECODABLE
itself) and :func:`add_health` for ``grpc.health.v1.Health`` (open to every client: no
credential is checked there).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from protos.lstmserve.v1 import lstm_serve_pb2 as pb

from .errors import InvalidArgument, ServeError
from .servicer import LstmServeServiceServicer, status_for

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0


class _Undecodable:
    def __repr__(self) -> str:
        return "UNDECODABLE"


UNDECODABLE: Any = _Undecodable()
"""What a deserializer returns for bytes that are not a valid message."""


class SparseLog:
    """Logs one line per ``interval_s`` at most, with how many it left out meanwhile."""

    def __init__(
        self, interval_s: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._next = float("-inf")
        self._skipped = 0

    def undecodable(self, method: str, message: str) -> None:
        now = self.clock()
        if now < self._next:
            self._skipped += 1
            return
        more = f" ({self._skipped} more since the last such line)" if self._skipped else ""
        log.warning(
            "%s: request is not a valid %s; answered INVALID_ARGUMENT%s", method, message, more
        )
        self._next = now + self.interval_s
        self._skipped = 0


def _deserializer(message_class: Any) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError:
            return UNDECODABLE

    return deserialize


class _Reads:
    """The servicer's context for a streaming call, whose ``read()`` checks each message."""

    def __init__(self, context: Any, check: Callable[[Any], Any]) -> None:
        self._context = context
        self._check = check

    async def read(self) -> Any:
        return self._check(await self._context.read())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def add_servicer(
    servicer: LstmServeServiceServicer,
    server: grpc.aio.Server,
    *,
    sparse_log: SparseLog | None = None,
) -> None:
    """Register every method of ``lstmserve.v1.LstmServeService`` on ``server`` (the generated
    ``add_LstmServeServiceServicer_to_server``, with the deserializers described above).

    Counts go to ``servicer.requests`` as it is at the time of the call (a front end swaps it
    for a fresh one at every heartbeat).
    """
    service = pb.DESCRIPTOR.services_by_name["LstmServeService"]
    logger = sparse_log if sparse_log is not None else SparseLog()
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        name, message = method.name, method.input_type.name
        behavior = getattr(servicer, name)
        if not inspect.iscoroutinefunction(behavior):
            # grpc.aio calls an async-generator handler differently; ours all write to the context.
            raise TypeError(f"{name}: expected a coroutine function")

        def reject(name: str = name, message: str = message) -> InvalidArgument:
            servicer.requests.record_undecodable(name)
            logger.undecodable(name, message)
            return InvalidArgument(f"request is not a valid {message}")

        if method.client_streaming:
            handlers[name] = _handler(method, pb, _streaming(behavior, reject))
        else:
            handlers[name] = _handler(method, pb, _unary(servicer, name, behavior, reject))
    _register(server, service, handlers)


def _handler(method: Any, messages: Any, behavior: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """``behavior`` as the handler of ``method`` (a protobuf method descriptor whose messages
    are in the module ``messages``), with a deserializer that returns :data:`UNDECODABLE` for
    bytes that do not parse."""
    kw: dict[str, Any] = {
        "request_deserializer": _deserializer(getattr(messages, method.input_type.name)),
        "response_serializer": getattr(messages, method.output_type.name).SerializeToString,
    }
    if method.client_streaming:
        factory = (
            grpc.stream_stream_rpc_method_handler
            if method.server_streaming
            else grpc.stream_unary_rpc_method_handler
        )
    else:
        factory = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
    return factory(behavior, **kw)


def _register(server: grpc.aio.Server, service: Any, handlers: dict[str, Any]) -> None:
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


def _unary(
    servicer: LstmServeServiceServicer,
    name: str,
    behavior: Callable[[Any, Any], Awaitable[Any]],
    reject: Callable[[], InvalidArgument],
) -> Callable[[Any, Any], Awaitable[Any]]:
    async def handle(request: Any, context: Any) -> Any:
        if request is not UNDECODABLE:
            return await behavior(request, context)
        t0 = time.perf_counter()
        try:
            servicer.caller_of(context)  # UNAUTHENTICATED comes first, as for any call
            error: ServeError = reject()
        except ServeError as e:
            error = e
        status = status_for(error)
        servicer.requests.record(name, status.name, time.perf_counter() - t0)
        await context.abort(status, str(error))

    return handle


def _streaming(
    behavior: Callable[[Any, Any], Awaitable[Any]], reject: Callable[[], InvalidArgument]
) -> Callable[[Any, Any], Awaitable[Any]]:
    def check(message: Any) -> Any:
        if message is UNDECODABLE:
            raise reject()
        return message

    async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for message in requests:
            yield check(message)

    async def handle(request_iterator: Any, context: Any) -> Any:
        return await behavior(checked(request_iterator), _Reads(context, check))

    return handle


def add_checked(servicer: Any, service: Any, messages: Any, server: grpc.aio.Server) -> None:
    """Register every method of ``service`` (a protobuf service descriptor whose messages are
    in the module ``messages``) with deserializers that return :data:`UNDECODABLE` for bytes
    that do not parse; the servicer's methods must handle it (the KServe servicer answers
    INVALID_ARGUMENT, or an ``error_message`` inside its stream, as Triton does)."""
    handlers = {m.name: _handler(m, messages, getattr(servicer, m.name)) for m in service.methods}
    _register(server, service, handlers)


def add_health(
    health_servicer: Any,
    servicer: LstmServeServiceServicer,
    server: grpc.aio.Server,
    *,
    sparse_log: SparseLog | None = None,
) -> None:
    """Register ``grpc.health.v1.Health`` (``health_servicer``'s Check and Watch) on ``server``
    in place of ``health_pb2_grpc.add_HealthServicer_to_server``: request bytes that do not
    parse get INVALID_ARGUMENT "request is not a valid HealthCheckRequest", counted in
    ``lstm_serve_undecodable_requests_total`` (``servicer.requests``, method ``Check`` or
    ``Watch``) and logged at most once per :data:`LOG_INTERVAL_S`, without a traceback."""
    service = health_pb2.DESCRIPTOR.services_by_name["Health"]
    logger = sparse_log if sparse_log is not None else SparseLog()
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        name, message = method.name, method.input_type.name
        behavior = getattr(health_servicer, name)

        async def handle(
            request: Any,
            context: Any,
            name: str = name,
            message: str = message,
            behavior: Callable[[Any, Any], Awaitable[Any]] = behavior,
        ) -> Any:
            if request is not UNDECODABLE:
                return await behavior(request, context)
            servicer.requests.record_undecodable(name)
            logger.undecodable(name, message)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid {message}"
            )

        handlers[name] = _handler(method, health_pb2, handle)
    _register(server, service, handlers)
