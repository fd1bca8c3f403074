"""KServe v2 over HTTP/REST: a protocol adapter over :class:`~server.kserve.KServeServicer`.

The routes are KServe's "Open Inference Protocol" HTTP binding as Triton, KServe, OpenVINO Model
Server and MLServer serve it, with Triton's binary tensor data extension (what
``tritonclient.http`` sends by default) and its model repository extension::

    GET  /v2/health/live | /v2/health/ready          200, or 400 when not live / not ready
    GET  /v2                                          server metadata
    GET  /v2/models/NAME[/versions/V]                 model metadata
    GET  /v2/models/NAME[/versions/V]/ready           200, or 400
    GET  /v2/models/NAME[/versions/V]/config          the model configuration (Triton's)
    GET  /v2/models[/NAME[/versions/V]]/stats         inference statistics
    POST /v2/models/NAME[/versions/V]/infer           inference
    POST /v2/repository/index                         the repository's models
    POST /v2/repository/models/NAME/load | unload     explicit model control

Every route becomes the protobuf request of the matching KServe gRPC RPC, which runs through the
servicer's own decorated method with a :class:`RestContext` in place of gRPC's: the same
credential check (and the same open health routes), data plane, sequences, rate limits, quotas,
request metrics and inference statistics, and the same status; only the status travels as an
HTTP code (:data:`HTTP_STATUS`) and a JSON ``{"error": MESSAGE}`` body. No model logic here.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from aiohttp import web
from google.protobuf import descriptor as D
from google.protobuf.message import Message

from protos.inference import grpc_service_pb2 as kpb

from .errors import InvalidArgument, ServeError
from .kserve import OPEN_RPCS, KServeServicer
from .servicer import status_for

log = logging.getLogger(__name__)

# The header of Triton's binary tensor data extension: the JSON part's length in the body; the
# tensors' bytes follow it, in input (or output) order, each ``binary_data_size`` long.
HEADER_LENGTH = "Inference-Header-Content-Length"

# The HTTP code for each status the servicer gives, as Triton's HTTP front end maps its errors
# (INVALID_ARGUMENT 400, NOT_FOUND 404, UNAVAILABLE 503, INTERNAL 500) and, for the codes Triton
# has no case for, as the HTTP meaning goes: a busy session or a session of another model
# (FAILED_PRECONDITION) conflicts with the request, as does a taken id or a lost race.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# JSON tensor data: the InferTensorContents field each datatype's values go in.
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_NUMPY = {
    "BOOL": "?",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}


class RestAbort(grpc.aio.AbortError):
    """How :meth:`RestContext.abort` ends a call: the status the servicer chose, and its message.

    An ``AbortError``, because that is what :func:`server.servicer.guarded` lets pass untouched
    (any other exception from ``abort`` would read as a call that had ended)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RestContext:
    """What the servicers read of ``grpc.aio.ServicerContext``, for one HTTP request: its
    ``authorization`` header as metadata, the client certificate's common name (under mutual
    TLS) as the auth context, no deadline."""

    def __init__(self, request: web.Request) -> None:
        self._request = request

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        value = self._request.headers.get("authorization")
        return () if value is None else (("authorization", value),)

    def auth_context(self) -> dict[str, list[bytes]]:
        transport = self._request.transport
        cert = transport.get_extra_info("peercert") if transport is not None else None
        if not cert:
            return {}
        names = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
        return {"x509_common_name": [n.encode() for n in names]} if names else {}

    def time_remaining(self) -> float | None:
        return None

    def cancelled(self) -> bool:
        # A client that goes away cancels the handler (handler_cancellation), as gRPC does.
        return False

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise RestAbort(code, details)


def error(status: int, message: str, **headers: str) -> web.Response:
    """``{"error": message}`` with ``status`` (Triton's and KServe's error body)."""
    return web.json_response({"error": message}, status=status, headers=headers or None)


def message_json(message: Message) -> dict[str, Any]:
    """A protobuf message as Triton's HTTP front end writes it: proto field names, 64-bit
    integers as JSON numbers (``json_format`` would write strings), enum values by name, every
    singular scalar (defaults included), set messages, non-empty lists and maps."""
    out: dict[str, Any] = {}
    for f in message.DESCRIPTOR.fields:
        value = getattr(message, f.name)
        entry = f.message_type
        if entry is not None and entry.GetOptions().map_entry:
            if value:
                field = entry.fields_by_name["value"]
                out[f.name] = {str(k): _value(field, v) for k, v in value.items()}
        elif f.is_repeated:
            if value:
                out[f.name] = [_value(f, v) for v in value]
        elif f.has_presence:
            if message.HasField(f.name):
                out[f.name] = _value(f, value)
        else:
            out[f.name] = _value(f, value)
    return out


def _value(f: Any, value: Any) -> Any:  # a FieldDescriptor (upb or Python)
    if f.message_type is not None:
        return message_json(value)
    if f.enum_type is not None:
        known = f.enum_type.values_by_number.get(value)
        return known.name if known is not None else value
    if f.type == D.FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value


def _parse(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise InvalidArgument(f"{what} is not UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"{what} is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidArgument(f"{what} is nested too deeply") from None


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def _parameters(target: Any, params: Any, what: str) -> None:
    """JSON parameters into a protobuf ``map<string, InferParameter>``."""
    for key, value in _object(params, what).items():
        p = target[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int) and -(1 << 63) <= value < 1 << 63:
            p.int64_param = value
        elif isinstance(value, int) and 0 <= value < 1 << 64:
            p.uint64_param = value
        elif isinstance(value, float):
            p.double_param = value
        elif isinstance(value, str):
            p.string_param = value
        else:
            raise InvalidArgument(
                f"{what} {key!r} must be a boolean, a 64-bit integer, a number or a string"
            )


def _flat(data: Any) -> list[Any]:
    """Tensor data as KServe allows it, flat or nested row-major: the values in order."""
    out: list[Any] = []
    stack = [iter(data if isinstance(data, list) else [data])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _json_values(name: str, datatype: str, data: Any) -> tuple[str, list[Any]]:
    """``(contents field, values)`` for an input's JSON ``data``; InvalidArgument when a value
    does not fit ``datatype``."""
    field = _CONTENTS.get(datatype)
    if field is None:
        raise InvalidArgument(
            f"input '{name[:64]}': datatype {datatype[:16]!r} has no JSON form; send it as "
            "binary data"
        )
    values = _flat(data)
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise InvalidArgument(f"input '{name[:64]}': BYTES data must be JSON strings")
        return field, [v.encode() for v in values]
    if datatype == "BOOL":
        ok = all(isinstance(v, bool) for v in values)
    elif datatype.startswith(("INT", "UINT")):
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    else:
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not ok:
        raise InvalidArgument(f"input '{name[:64]}': data does not match datatype {datatype}")
    return field, values


def infer_request(
    name: str, version: str, body: bytes, header_length: str | None
) -> tuple[Any, bool]:
    """The ModelInferRequest an HTTP inference body describes, and whether the response's
    outputs go as binary data when the request names none (``binary_data_output``).

    ``header_length``: the ``Inference-Header-Content-Length`` header (None: all JSON). Raises
    :class:`InvalidArgument` with what is wrong."""
    binary = b""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise InvalidArgument(
                f"{HEADER_LENGTH} must be an integer in 0..{len(body)} (the body's length), "
                f"got {header_length[:32]!r}"
            )
        body, binary = body[:n], body[n:]
    header = _object(_parse(body, "the inference request"), "the inference request")
    request = kpb.ModelInferRequest(model_name=name, model_version=version)
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument("the inference request's 'id' must be a string")
    request.id = request_id
    params = dict(_object(header.get("parameters", {}), "the inference request's 'parameters'"))
    binary_output = params.pop("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise InvalidArgument("parameter 'binary_data_output' must be a boolean")
    _parameters(request.parameters, params, "parameter")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("the inference request needs 'inputs', a non-empty list")
    offset, raw, typed = 0, [], 0
    for i, spec in enumerate(inputs):
        spec = _object(spec, f"inputs[{i}]")
        tensor = request.inputs.add()
        tname, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
        if not isinstance(tname, str) or not isinstance(datatype, str):
            raise InvalidArgument(f"inputs[{i}] needs a 'name' and a 'datatype' (strings)")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and -(1 << 63) <= d < 1 << 63
            for d in shape
        ):
            raise InvalidArgument(f"input '{tname[:64]}' needs a 'shape', a list of integers")
        tensor.name, tensor.datatype = tname, datatype
        tensor.shape.extend(shape)
        tparams = dict(_object(spec.get("parameters", {}), f"input '{tname[:64]}' parameters"))
        if "shared_memory_region" in tparams:
            raise InvalidArgument("shared-memory tensors are not supported; send the data")
        size = tparams.pop("binary_data_size", None)
        _parameters(tensor.parameters, tparams, f"input '{tname[:64]}' parameter")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidArgument(
                    f"input '{tname[:64]}': binary_data_size must be a non-negative integer"
                )
            if offset + size > len(binary):
                raise InvalidArgument(
                    f"input '{tname[:64]}': binary_data_size {size} runs past the "
                    f"{len(binary)} bytes of binary data"
                )
            raw.append(binary[offset : offset + size])
            offset += size
        elif "data" in spec:
            field, values = _json_values(tname, datatype, spec["data"])
            try:
                getattr(tensor.contents, field).extend(values)
            except (TypeError, ValueError):
                raise InvalidArgument(
                    f"input '{tname[:64]}': a value is out of range for {datatype}"
                ) from None
            typed += 1
        else:
            raise InvalidArgument(f"input '{tname[:64]}' has neither 'data' nor binary_data_size")
    if offset != len(binary):
        raise InvalidArgument(
            f"{len(binary) - offset} bytes of binary data follow the inputs' binary_data_size"
        )
    if raw and typed:
        raise InvalidArgument("the inputs must all be JSON data or all binary data, not both")
    request.raw_input_contents.extend(raw)
    outputs = header.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidArgument("the inference request's 'outputs' must be a list")
    for i, spec in enumerate(outputs):
        spec = _object(spec, f"outputs[{i}]")
        oname = spec.get("name")
        if not isinstance(oname, str):
            raise InvalidArgument(f"outputs[{i}] needs a 'name' (a string)")
        oparams = dict(_object(spec.get("parameters", {}), f"output '{oname[:64]}' parameters"))
        for unsupported in ("classification", "shared_memory_region"):
            if unsupported in oparams:
                raise InvalidArgument(f"output parameter {unsupported!r} is not supported")
        out = request.outputs.add(name=oname)
        _parameters(out.parameters, oparams, f"output '{oname[:64]}' parameter")
    return request, binary_output


def infer_response(request: Any, binary_output: bool, response: Any) -> web.Response:
    """A ModelInferResponse as HTTP: outputs as JSON ``data``, or as binary data after the JSON
    header for the outputs that asked for it (``binary_data``; with no outputs named, the
    request's ``binary_data_output``)."""
    binary = {o.name: bool(o.parameters["binary_data"].bool_param) for o in request.outputs}
    raw = list(response.raw_output_contents)
    header: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id:
        header["id"] = response.id
    chunks: list[bytes] = []
    outputs = []
    for i, out in enumerate(response.outputs):
        tensor: dict[str, Any] = {
            "name": out.name,
            "datatype": out.datatype,
            "shape": list(out.shape),
        }
        # Typed contents: the model's one output, FP32 logits.
        data = raw[i] if raw else np.asarray(out.contents.fp32_contents, "<f4").tobytes()
        if binary.get(out.name, binary_output):
            tensor["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            tensor["data"] = np.frombuffer(data, _NUMPY[out.datatype]).tolist()
        outputs.append(tensor)
    header["outputs"] = outputs
    text = json.dumps(header).encode()
    if not chunks:
        return web.Response(body=text, content_type="application/json")
    return web.Response(
        body=text + b"".join(chunks),
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(text))},
    )


Build = Callable[[], Awaitable[Any]]


class Rest:
    """The routes over ``kserve()``: the servicer of the gRPC server beside (looked up at every
    request, since it is made with that server)."""

    def __init__(self, kserve: Callable[[], KServeServicer | None], max_body_bytes: int) -> None:
        self.kserve = kserve
        self.max_body_bytes = max_body_bytes

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._errors])
        model = "/v2/models/{name}"
        version = model + "/versions/{version}"
        routes = [
            web.get("/v2/health/live", self.live),
            web.get("/v2/health/ready", self.ready),
            web.get("/v2", self.server_metadata),
            web.get("/v2/models/stats", self.stats),
            web.post("/v2/repository/index", self.index),
            web.post("/v2/repository/models/{name}/load", self.load),
            web.post("/v2/repository/models/{name}/unload", self.unload),
        ]
        for base in (model, version):
            routes += [
                web.get(base, self.model_metadata),
                web.get(base + "/ready", self.model_ready),
                web.get(base + "/config", self.model_config),
                web.get(base + "/stats", self.stats),
                web.post(base + "/infer", self.infer),
            ]
        app.add_routes(routes)
        return app

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """aiohttp's own refusals (no such route, wrong method, body too large) as JSON, and
        never a traceback: anything unexpected is logged here and answered 500."""
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return error(
                413,
                f"request body over the server's limit of {self.max_body_bytes} bytes "
                "(--max-prompt-tokens / --max-record-bytes)",
            )
        except web.HTTPMethodNotAllowed as e:
            return error(
                405,
                f"{request.method} is not allowed on {request.path[:128]}",
                Allow=",".join(sorted(e.allowed_methods)),
            )
        except web.HTTPNotFound:
            return error(404, f"no route {request.path[:128]}")
        except web.HTTPException as e:
            return error(e.status, e.reason)
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path[:128])
            return error(500, "internal error; see server log")

    async def _call(self, name: str, http: web.Request, build: Build) -> Any:
        """``KServeServicer.<name>`` on the request ``build`` makes, or :class:`RestAbort`.

        The credential is checked before ``build`` reads the body (UNAUTHENTICATED first, as on
        gRPC); a body that does not parse is INVALID_ARGUMENT. Both are counted in the request
        metrics under ``name``, as the servicer counts everything else."""
        kserve = self.kserve()
        if kserve is None:
            raise RestAbort(grpc.StatusCode.UNAVAILABLE, "the server is starting; retry shortly")
        context = RestContext(http)
        t0 = time.perf_counter()
        try:
            if name not in OPEN_RPCS:
                kserve.base.caller_of(context)
            request = await build()
        except ServeError as e:
            code = status_for(e)
            kserve.base.record_request(name, code.name, time.perf_counter() - t0)
            raise RestAbort(code, str(e)[:1024]) from None
        return await getattr(kserve, name)(request, context)

    async def _answer(
        self, name: str, http: web.Request, build: Build, reply: Callable[[Any], web.Response]
    ) -> web.Response:
        try:
            return reply(await self._call(name, http, build))
        except RestAbort as e:
            extra = (
                {"WWW-Authenticate": "Bearer"} if e.code == grpc.StatusCode.UNAUTHENTICATED else {}
            )
            return error(HTTP_STATUS.get(e.code, 500), e.message, **extra)

    async def _json(self, name: str, http: web.Request, request: Any) -> web.Response:
        async def build() -> Any:
            return request

        return await self._answer(name, http, build, lambda r: web.json_response(message_json(r)))

    async def _flag(self, name: str, http: web.Request, request: Any, key: str) -> web.Response:
        """Health: 200 when the response's ``key`` is true, else 400 (Triton's and KServe's
        answer: "a 4xx status code indicates false"); no body."""

        async def build() -> Any:
            return request

        return await self._answer(
            name, http, build, lambda r: web.Response(status=200 if getattr(r, key) else 400)
        )

    @staticmethod
    def _model(http: web.Request) -> tuple[str, str]:
        return http.match_info.get("name", ""), http.match_info.get("version", "")

    # --- routes --------------------------------------------------------------------------------

    async def live(self, http: web.Request) -> web.Response:
        return await self._flag("ServerLive", http, kpb.ServerLiveRequest(), "live")

    async def ready(self, http: web.Request) -> web.Response:
        return await self._flag("ServerReady", http, kpb.ServerReadyRequest(), "ready")

    async def model_ready(self, http: web.Request) -> web.Response:
        name, version = self._model(http)
        request = kpb.ModelReadyRequest(name=name, version=version)
        return await self._flag("ModelReady", http, request, "ready")

    async def server_metadata(self, http: web.Request) -> web.Response:
        return await self._json("ServerMetadata", http, kpb.ServerMetadataRequest())

    async def model_metadata(self, http: web.Request) -> web.Response:
        name, version = self._model(http)
        request = kpb.ModelMetadataRequest(name=name, version=version)
        return await self._json("ModelMetadata", http, request)

    async def model_config(self, http: web.Request) -> web.Response:
        # Triton answers with the configuration itself, not wrapped in {"config": ...}.
        name, version = self._model(http)

        async def build() -> Any:
            return kpb.ModelConfigRequest(name=name, version=version)

        return await self._answer(
            "ModelConfig", http, build, lambda r: web.json_response(message_json(r.config))
        )

    async def stats(self, http: web.Request) -> web.Response:
        name, version = self._model(http)
        request = kpb.ModelStatisticsRequest(name=name, version=version)
        return await self._json("ModelStatistics", http, request)

    async def index(self, http: web.Request) -> web.Response:
        async def build() -> Any:
            body = await http.read()
            spec = _object(_parse(body, "the request"), "the request") if body.strip() else {}
            ready = spec.get("ready", False)
            if not isinstance(ready, bool):
                raise InvalidArgument("'ready' must be a boolean")
            return kpb.RepositoryIndexRequest(ready=ready)

        # Triton answers with the list itself.
        return await self._answer(
            "RepositoryIndex",
            http,
            build,
            lambda r: web.json_response([message_json(m) for m in r.models]),
        )

    async def load(self, http: web.Request) -> web.Response:
        return await self._control("RepositoryModelLoad", http, kpb.RepositoryModelLoadRequest)

    async def unload(self, http: web.Request) -> web.Response:
        return await self._control("RepositoryModelUnload", http, kpb.RepositoryModelUnloadRequest)

    async def _control(self, name: str, http: web.Request, message: Any) -> web.Response:
        async def build() -> Any:
            # Triton's optional {"parameters": {...}}: read (it must be JSON) and, as on gRPC,
            # not used: a model loads from the repository as it is.
            body = await http.read()
            if body.strip():
                _object(_parse(body, "the request"), "the request")
            return message(model_name=http.match_info["name"])

        return await self._answer(name, http, build, lambda r: web.Response(status=200))

    async def infer(self, http: web.Request) -> web.Response:
        name, version = self._model(http)
        made: list[tuple[Any, bool]] = []  # (request, binary_data_output), once built

        async def build() -> Any:
            body = await http.read()
            made.append(infer_request(name, version, body, http.headers.get(HEADER_LENGTH)))
            return made[0][0]

        return await self._answer("ModelInfer", http, build, lambda r: infer_response(*made[0], r))


class RestServer:
    """The REST routes on ``host:port`` (aiohttp); :meth:`start`, then :meth:`stop`."""

    def __init__(self, rest: Rest) -> None:
        self.rest = rest
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> int:
        """Listen; the bound port. ``reuse_port``: several front ends share it (SO_REUSEPORT).
        Raises :class:`OSError` when the port cannot be bound."""
        runner = web.AppRunner(
            self.rest.application(),
            access_log=None,
            # A client that goes away cancels its request, as a cancelled gRPC call does (the
            # engine abandons it and restores the session).
            handler_cancellation=True,
            # Drain waits for the data plane to go idle first; this is for what is left.
            shutdown_timeout=0.5,
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """Stop listening; requests still open get half a second, then are cancelled."""
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()
