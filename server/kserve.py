"""KServe v2 / Triton gRPC (``inference.GRPCInferenceService``): a second thin servicer.

It sits beside :class:`~server.servicer.LstmServeServiceServicer` on the same port and over the
same :class:`~server.dataplane.Plane` (read from that servicer at every call, so it follows the
plane an :class:`~server.app.App` or a front end sets there), with the same authenticator and
request metrics. No model logic lives here: tensors and parameters become plane calls.

Sequences follow Triton's sequence batcher. The request parameters ``sequence_id`` (uint64 or
string; 0 or "" for none), ``sequence_start`` and ``sequence_end`` map onto sessions whose ids
this module derives from the sequence id (:func:`sequence_session_id`):

* start: a fresh zero state (the session is created, or reset when it exists);
* neither: continues the sequence; an unknown one is INVALID_ARGUMENT, as in Triton;
* end: the session is freed after a successful step (a failed one leaves it as it was);
* no sequence id: the step runs on a zero state in an ephemeral session (Triton would refuse
  such a request to a sequence model; here it is the stateless way in).

Errors map as Triton's do where Triton defines the case (server/README.md has the table); a
ModelStreamInfer request that fails is answered with ``error_message`` and the stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import re
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np

from contract.model import KIND_SEQUENCE
from protos.inference import grpc_service_pb2 as kpb
from protos.inference import grpc_service_pb2_grpc as kpb_grpc

from .dataplane import (
    OUTPUT_ALL,
    OUTPUT_LAST,
    READY,
    RETIRING,
    Caller,
    ModelInfo,
    ModelRef,
    ModelStatus,
    Plane,
    StepResult,
)
from .decode import UNDECODABLE, SparseLog, add_checked
from .errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    ResourceExhausted,
    ServeError,
    Unavailable,
)
from .metrics import InferStats, ModelInferStats
from .sequence import feature_rows
from .servicer import CALLER, LstmServeServiceServicer, guarded, status_for

log = logging.getLogger(__name__)

KSERVE_SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "lstm-serve"
EXTENSIONS = ("model_configuration", "model_repository", "sequence", "statistics")
PLATFORM = "onnxruntime_onnx"
INPUT_TOKENS = "tokens"
INPUT_TEXT = "text"
OUTPUT_LOGITS = "logits"
# A sequence model's tensors: features FP32 [1, T, F] in, outputs FP32 [1, T, O] out (every
# fed row's outputs: a forecaster's client wants one per row, unlike a token model's client,
# which wants the next token's logits only).
INPUT_FEATURES = "features"
OUTPUT_OUTPUTS = "outputs"
SEQUENCE_PREFIX = "kserve-seq-"
_PLAIN_ID = re.compile(r"[A-Za-z0-9_-]{3,115}")
# The RPCs open to every client, as grpc.health.v1 is (server/README.md): a load balancer's
# probes carry no credential. Every other RPC of the service checks the caller first.
OPEN_RPCS = frozenset({"ServerLive", "ServerReady", "ModelReady"})
# An error message is bounded whatever it quotes: grpc refuses trailers over 8 KiB, and the
# client would get RESOURCE_EXHAUSTED instead of the real code.
MAX_MESSAGE_CHARS = 1024


class UnknownModel(ServeError):
    """A model name (or version) this server does not serve."""


def sequence_session_id(sequence_id: int | str) -> str:
    """The session id (16-128 of ``[A-Za-z0-9_-]``) that holds sequence ``sequence_id``.

    Integer ids and string ids never share a session: ``kserve-seq-`` then ``n`` and 20
    digits, ``s-`` and the string when it is 3-115 such characters, else ``h-`` and 32 hex
    digits of its SHA-256.
    """
    if isinstance(sequence_id, int):
        return f"{SEQUENCE_PREFIX}n{sequence_id:020d}"
    if _PLAIN_ID.fullmatch(sequence_id):
        return f"{SEQUENCE_PREFIX}s-{sequence_id}"
    digest = hashlib.sha256(sequence_id.encode()).hexdigest()[:32]
    return f"{SEQUENCE_PREFIX}h-{digest}"


@dataclass(frozen=True)
class _Sequence:
    """A request's sequence parameters; ``session_id`` "" for none."""

    label: str  # the id as the client gave it, for messages
    session_id: str
    start: bool
    end: bool


R = TypeVar("R")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]


def _code(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, UnknownModel):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, QuotaExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED  # the caller's own quota: a retry won't help
    if isinstance(error, ResourceExhausted):
        return grpc.StatusCode.UNAVAILABLE  # Triton's answer when its queue is full
    return status_for(error)


def _bound(error: ServeError) -> None:
    """Cut ``error``'s message to :data:`MAX_MESSAGE_CHARS` (a backstop: each echo of a
    client's string is bounded where it is written, :func:`_q`)."""
    text = str(error)
    if len(text) > MAX_MESSAGE_CHARS:
        error.args = (text[:MAX_MESSAGE_CHARS] + "...",)


def _wrap(method: Handler[R], *, authenticate: bool) -> Handler[R]:
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: KServeServicer, request: Any, context: grpc.aio.ServicerContext) -> R:
        async def call() -> R:
            try:
                if authenticate:
                    # First, before the request's bytes are even looked at: UNAUTHENTICATED.
                    CALLER.set(self.base.caller_of(context))
                if request is UNDECODABLE:
                    raise self.undecodable(name)
                return await method(self, request, context)
            except ServeError as e:
                _bound(e)
                raise

        return await guarded(name, context, call, _code, self.base.record_request)

    wrapper.authenticates = authenticate  # type: ignore[attr-defined]
    return wrapper


def rpc(method: Handler[R]) -> Handler[R]:
    """Check the caller's credential (UNAUTHENTICATED without a valid one, when authentication
    is on) before anything else, map errors to status codes and record the call
    (lstm_serve_requests_total). The handler reads the caller from :data:`CALLER`."""
    if method.__name__ in OPEN_RPCS:
        raise TypeError(f"{method.__name__} is open to every client: decorate it with open_rpc")
    return _wrap(method, authenticate=True)


def open_rpc(method: Handler[R]) -> Handler[R]:
    """:func:`rpc` without the credential check, for the health RPCs (:data:`OPEN_RPCS`) only."""
    if method.__name__ not in OPEN_RPCS:
        raise TypeError(f"{method.__name__} is not in OPEN_RPCS: decorate it with rpc")
    return _wrap(method, authenticate=False)


def _clip(text: str, limit: int = 64) -> str:
    """At most ``limit`` characters of a client's string (``...`` marks a cut)."""
    return text[:limit] + ("..." if len(text) > limit else "")


def _q(text: str) -> str:
    """A client's string in a message: quoted, at most 64 characters of it."""
    return f"'{text[:64]}'" + ("..." if len(text) > 64 else "")


def _shape(shape: list[int]) -> str:
    """A client's tensor shape in a message: at most 8 dimensions of it."""
    if len(shape) <= 8:
        return str(shape)
    return "[" + ", ".join(str(d) for d in shape[:8]) + f", ... ({len(shape)} dimensions)]"


def _statistics(name: str, version: str, s: InferStats) -> Any:
    """One model version's ModelStatistics entry."""
    duration = kpb.StatisticDuration
    return kpb.ModelStatistics(
        name=name,
        version=version,
        last_inference=s.last_inference_ms,
        inference_count=s.success_count,
        execution_count=s.success_count,
        inference_stats=kpb.InferStatistics(
            success=duration(count=s.success_count, ns=s.success_ns),
            fail=duration(count=s.fail_count, ns=s.fail_ns),
            queue=duration(count=s.success_count, ns=0),
            compute_input=duration(count=s.success_count, ns=s.compute_input_ns),
            compute_infer=duration(count=s.success_count, ns=s.compute_infer_ns),
            compute_output=duration(count=s.success_count, ns=s.compute_output_ns),
        ),
    )


def _index_rows(models: list[ModelStatus], ready_only: bool) -> list[Any]:
    """RepositoryIndex rows: one per version; a retiring version shows as Triton's UNLOADING
    (it still serves the sessions pinned to it)."""
    rows = []
    for m in models:
        for v in m.versions:
            if ready_only and v.state != "READY":
                continue
            state, reason = v.state, v.reason
            if state == RETIRING:
                state = "UNLOADING"
                reason = reason or f"retiring: serves the {v.sessions} session(s) pinned to it"
            rows.append(
                kpb.RepositoryIndexResponse.ModelIndex(
                    name=m.name, version=v.version, state=state, reason=reason
                )
            )
    return rows


def _param(p: Any) -> bool | int | str | float | None:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def _sequence(parameters: Any) -> _Sequence:
    raw = _param(parameters["sequence_id"]) if "sequence_id" in parameters else None
    start = bool(_param(parameters["sequence_start"])) if "sequence_start" in parameters else False
    end = bool(_param(parameters["sequence_end"])) if "sequence_end" in parameters else False
    if raw is None or raw == 0 or raw == "":
        return _Sequence("", "", start, end)
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise InvalidArgument("sequence_id must be an unsigned integer or a string")
    if isinstance(raw, int) and not 0 < raw < 1 << 64:
        raise InvalidArgument(f"sequence_id {raw} is not an unsigned 64-bit integer")
    return _Sequence(str(raw), sequence_session_id(raw), start, end)


def _bytes_elements(raw: bytes) -> list[bytes]:
    """A raw BYTES tensor: each element is a 4-byte little-endian length, then its bytes."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise InvalidArgument("malformed BYTES tensor data")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > len(raw):
            raise InvalidArgument("malformed BYTES tensor data")
        out.append(raw[i : i + n])
        i += n
    return out


class KServeServicer(kpb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over ``base.plane`` (None while the model loads).

    ``idle_timeout_s``: the server's session idle timeout, reported as the sequence batcher's
    ``max_sequence_idle_microseconds`` (an idle sequence is freed like any idle session).
    """

    def __init__(
        self,
        base: LstmServeServiceServicer,
        *,
        idle_timeout_s: float,
        serving: Callable[[], bool] | None = None,
    ) -> None:
        self.base = base
        self.idle_timeout_s = idle_timeout_s
        # Whether grpc.health.v1 says SERVING (model loaded, not draining, the session store
        # answers): ServerReady and ModelReady follow it. None: the plane alone decides.
        self.serving = serving
        self.stats = ModelInferStats()
        self._sparse_log = SparseLog()

    # --- helpers -------------------------------------------------------------------------------

    def _plane(self) -> Plane:
        plane = self.base.plane
        if plane is None:
            raise Unavailable("the model is still loading; retry shortly")
        return plane

    async def _model(self, plane: Plane, name: str = "", version: str = "") -> ModelInfo:
        # Cheap on every request: each version's plane builds its info once, and a front end's
        # RemotePlane caches the engine's answers.
        return await plane.model_info(ModelRef(name, version))

    async def _check_model(self, name: str, version: str) -> tuple[Plane, ModelInfo]:
        plane = self._plane()
        if not name:
            raise UnknownModel("Request for unknown model: '' is not found")
        try:
            info = await self._model(plane, name, version)
        except NotFound:
            raise UnknownModel(
                f"Request for unknown model: {_q(name)} is not found"
                if not version
                else f"Request for unknown model: {_q(name)} version {_q(version)} is not found"
            ) from None
        return plane, info

    def _ready(self) -> bool:
        plane = self.base.plane
        if plane is None or plane.draining:
            return False
        return self.serving is None or self.serving()

    # --- health and metadata -------------------------------------------------------------------
    # Health is open to every client, as grpc.health.v1 is (open_rpc, OPEN_RPCS); the rest needs
    # a credential when authentication is on (rpc checks it before anything else).

    @open_rpc
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return kpb.ServerLiveResponse(live=True)

    @open_rpc
    async def ServerReady(self, request: Any, context: Any) -> Any:
        return kpb.ServerReadyResponse(ready=self._ready())

    @open_rpc
    async def ModelReady(self, request: Any, context: Any) -> Any:
        if not self._ready():
            return kpb.ModelReadyResponse(ready=False)
        try:
            await self._check_model(request.name, request.version)
        except (UnknownModel, Unavailable):  # unknown, or no version ready
            return kpb.ModelReadyResponse(ready=False)
        return kpb.ModelReadyResponse(ready=True)

    @rpc
    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version(SERVER_NAME)
        except PackageNotFoundError:
            v = "0"
        return kpb.ServerMetadataResponse(name=SERVER_NAME, version=v, extensions=EXTENSIONS)

    @rpc
    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        plane, info = await self._check_model(request.name, request.version)
        versions = [info.version]
        if not request.version:  # every loaded version of the model, as Triton lists them
            _, models = await plane.list_models()
            loaded = [
                v.version
                for m in models
                if m.name == info.name
                for v in m.versions
                if v.state in (READY, RETIRING)
            ]
            versions = loaded or versions
        tensor = kpb.ModelMetadataResponse.TensorMetadata
        if info.kind == KIND_SEQUENCE:
            inputs = [
                tensor(name=INPUT_FEATURES, datatype="FP32", shape=[1, -1, len(info.feature_names)])
            ]
            outputs = [
                tensor(name=OUTPUT_OUTPUTS, datatype="FP32", shape=[1, -1, len(info.output_names)])
            ]
        else:
            inputs = [
                tensor(name=INPUT_TOKENS, datatype="INT64", shape=[1, -1]),
                tensor(name=INPUT_TEXT, datatype="BYTES", shape=[1, 1]),
            ]
            outputs = [tensor(name=OUTPUT_LOGITS, datatype="FP32", shape=[1, len(info.vocab)])]
        return kpb.ModelMetadataResponse(
            name=info.name, versions=versions, platform=PLATFORM, inputs=inputs, outputs=outputs
        )

    @rpc
    async def ModelConfig(self, request: Any, context: Any) -> Any:
        _, info = await self._check_model(request.name, request.version)
        if info.kind == KIND_SEQUENCE:
            inputs = [
                kpb.ModelInput(
                    name=INPUT_FEATURES,
                    data_type=kpb.TYPE_FP32,
                    dims=[1, -1, len(info.feature_names)],
                )
            ]
            outputs = [
                kpb.ModelOutput(
                    name=OUTPUT_OUTPUTS,
                    data_type=kpb.TYPE_FP32,
                    dims=[1, -1, len(info.output_names)],
                )
            ]
        else:
            inputs = [
                kpb.ModelInput(
                    name=INPUT_TOKENS, data_type=kpb.TYPE_INT64, dims=[1, -1], optional=True
                ),
                kpb.ModelInput(
                    name=INPUT_TEXT, data_type=kpb.TYPE_STRING, dims=[1, 1], optional=True
                ),
            ]
            outputs = [
                kpb.ModelOutput(
                    name=OUTPUT_LOGITS, data_type=kpb.TYPE_FP32, dims=[1, len(info.vocab)]
                )
            ]
        config = kpb.ModelConfig(
            name=info.name,
            platform=PLATFORM,
            backend=SERVER_NAME,
            max_batch_size=0,
            input=inputs,
            output=outputs,
            sequence_batching=kpb.ModelSequenceBatching(
                max_sequence_idle_microseconds=round(self.idle_timeout_s * 1e6)
            ),
            model_transaction_policy=kpb.ModelTransactionPolicy(decoupled=False),
        )
        return kpb.ModelConfigResponse(config=config)

    @rpc
    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        # One entry per model version that has served inferences (Triton answers per version):
        # of the named model (and version), or of every model when no name is given.
        plane = self._plane()
        if request.name:
            await self._check_model(request.name, request.version)
        totals = await self._totals(plane)
        entries = [
            _statistics(name, version, s)
            for (name, version), s in sorted(totals.by_version.items())
            if (not request.name or name == request.name)
            and (not request.version or version == request.version)
        ]
        if request.name and not entries:
            # A served model that has not run yet: zero counts, as Triton reports it.
            _, info = await self._check_model(request.name, request.version)
            entries.append(_statistics(info.name, info.version, InferStats()))
        return kpb.ModelStatisticsResponse(model_stats=entries)

    async def _totals(self, plane: Plane) -> ModelInferStats:
        """This process's counts, plus, in a front end, what every front end shipped to the
        engine (this one's not yet shipped counts are its own ``stats``)."""
        shipped = getattr(plane, "infer_stats", None)
        total = ModelInferStats()
        if shipped is not None:
            total.merge(ModelInferStats.from_wire(await shipped()))
        total.merge(self.stats)
        return total

    def take_stats(self) -> ModelInferStats:
        """What this process counted since the last call (a front end's heartbeat ships it)."""
        stats, self.stats = self.stats, ModelInferStats()
        return stats

    # --- inference -----------------------------------------------------------------------------

    @rpc
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        return await self._infer(request, CALLER.get())

    @rpc
    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> None:
        """Requests run concurrently (each in its own task) except that requests of one
        sequence run in the order they came; responses are written as they complete."""
        caller = CALLER.get()
        write = asyncio.Lock()
        tails: dict[str, asyncio.Task[None]] = {}
        tasks: set[asyncio.Task[None]] = set()

        async def one(request: Any, before: asyncio.Task[None] | None) -> None:
            if before is not None:
                await asyncio.wait([before])
            try:
                response = kpb.ModelStreamInferResponse(
                    infer_response=await self._infer(request, caller)
                )
            except ServeError as e:
                _bound(e)
                response = kpb.ModelStreamInferResponse(error_message=str(e))
            except Exception:
                log.exception("ModelStreamInfer request failed")
                response = kpb.ModelStreamInferResponse(
                    error_message="internal error in ModelStreamInfer; see server log"
                )
            async with write:
                await context.write(response)

        try:
            async for request in request_iterator:
                key = self._sequence_key(request)
                task = asyncio.create_task(one(request, tails.get(key) if key else None))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                if key:
                    tails[key] = task
                    task.add_done_callback(functools.partial(_forget, tails, key))
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    def undecodable(self, method: str) -> InvalidArgument:
        """Count and (sparsely) log a request whose bytes do not parse; the error to answer."""
        message = f"{method}Request"
        self.base.requests.record_undecodable(method)
        self._sparse_log.undecodable(method, message)
        return InvalidArgument(f"request is not a valid {message}")

    @staticmethod
    def _sequence_key(request: Any) -> str:
        if request is UNDECODABLE:
            return ""
        try:
            return _sequence(request.parameters).session_id
        except InvalidArgument:
            return ""

    async def _infer(self, request: Any, caller: Caller) -> Any:
        """One inference; counts it (success or failure) when the model is ours."""
        if request is UNDECODABLE:  # a message of a ModelStreamInfer stream
            raise self.undecodable("ModelStreamInfer")
        t0 = time.perf_counter_ns()
        plane, info = await self._check_model(request.model_name, request.model_version)
        try:
            ids, text, raw, features = self._inputs(request)
            sequence = _sequence(request.parameters)
            t1 = time.perf_counter_ns()
            result = await self._run(
                plane, info, sequence, ids, text, caller, request.model_version, features
            )
            t2 = time.perf_counter_ns()
            response = self._response(request, info, result, raw, features is not None)
        except BaseException:
            # A failed request counts under the version it named, else the newest one.
            failed = self.stats.of(info.name, info.version)
            failed.fail_count += 1
            failed.fail_ns += time.perf_counter_ns() - t0
            raise
        t3 = time.perf_counter_ns()
        # Counted under the version that computed it (a sequence stays on its own version).
        s = self.stats.of(info.name, result.model_version or info.version)
        s.success_count += 1
        s.success_ns += t3 - t0
        s.compute_input_ns += t1 - t0
        s.compute_infer_ns += t2 - t1
        s.compute_output_ns += t3 - t2
        s.last_inference_ms = time.time_ns() // 1_000_000
        return response

    def _inputs(self, request: Any) -> tuple[list[int], str, bool, np.ndarray | None]:
        """``(token ids, text, raw, features)``: exactly one of the three inputs (features
        ``[T, F]`` float32 for a sequence model, whose plane checks them); raw when the request
        carried ``raw_input_contents``. Raises InvalidArgument."""
        inputs = list(request.inputs)
        raw_contents = list(request.raw_input_contents)
        raw = bool(raw_contents)
        if raw and len(raw_contents) != len(inputs):
            raise InvalidArgument(
                f"expected {len(inputs)} raw_input_contents (one per input), "
                f"got {len(raw_contents)}"
            )
        if len(inputs) != 1:
            raise InvalidArgument(
                f"expected one input, '{INPUT_TOKENS}' or '{INPUT_TEXT}' (a token model) or "
                f"'{INPUT_FEATURES}' (a sequence model), got {len(inputs)}"
            )
        tensor = inputs[0]
        wanted = OUTPUT_OUTPUTS if tensor.name == INPUT_FEATURES else OUTPUT_LOGITS
        for out in request.outputs:
            if out.name != wanted:
                raise InvalidArgument(f"unexpected inference output {_q(out.name)}")
        shape = list(tensor.shape)
        if tensor.name == INPUT_TOKENS:
            if tensor.datatype != "INT64":
                raise InvalidArgument(
                    f"inference input '{INPUT_TOKENS}' data-type is {_q(tensor.datatype)}, "
                    "model expects 'INT64'"
                )
            if len(shape) != 2 or shape[0] != 1 or shape[1] < 1:
                raise InvalidArgument(
                    f"inference input '{INPUT_TOKENS}' has shape {_shape(shape)}; "
                    "expected [1, T], T >= 1"
                )
            if raw:
                data = raw_contents[0]
                if len(data) != 8 * shape[1]:
                    raise InvalidArgument(
                        f"inference input '{INPUT_TOKENS}' has {len(data)} bytes of data; "
                        f"shape {_shape(shape)} needs {8 * shape[1]}"
                    )
                ids = np.frombuffer(data, "<i8").tolist()
            else:
                ids = list(tensor.contents.int64_contents)
                if len(ids) != shape[1]:
                    raise InvalidArgument(
                        f"inference input '{INPUT_TOKENS}' has {len(ids)} values; "
                        f"shape {_shape(shape)} needs {shape[1]}"
                    )
            return ids, "", raw, None
        if tensor.name == INPUT_TEXT:
            if tensor.datatype != "BYTES":
                raise InvalidArgument(
                    f"inference input '{INPUT_TEXT}' data-type is {_q(tensor.datatype)}, "
                    "model expects 'BYTES'"
                )
            if shape != [1, 1]:
                raise InvalidArgument(
                    f"inference input '{INPUT_TEXT}' has shape {_shape(shape)}; expected [1, 1]"
                )
            elements = (
                _bytes_elements(raw_contents[0]) if raw else list(tensor.contents.bytes_contents)
            )
            if len(elements) != 1:
                raise InvalidArgument(
                    f"inference input '{INPUT_TEXT}' has {len(elements)} elements; expected 1"
                )
            try:
                text = elements[0].decode()
            except UnicodeDecodeError:
                raise InvalidArgument(f"inference input '{INPUT_TEXT}' is not UTF-8") from None
            return [], text, raw, None
        if tensor.name == INPUT_FEATURES:
            if tensor.datatype != "FP32":
                raise InvalidArgument(
                    f"inference input '{INPUT_FEATURES}' data-type is {_q(tensor.datatype)}, "
                    "model expects 'FP32'"
                )
            if len(shape) != 3 or shape[0] != 1:
                raise InvalidArgument(
                    f"inference input '{INPUT_FEATURES}' has shape {_shape(shape)}; "
                    "expected [1, T, F]"
                )
            data = raw_contents[0] if raw else tensor.contents.fp32_contents
            try:
                return [], "", raw, feature_rows(shape[1:], data)
            except InvalidArgument as e:
                raise InvalidArgument(f"inference input '{INPUT_FEATURES}': {e}") from None
        raise InvalidArgument(f"unexpected inference input {_q(tensor.name)}")

    async def _run(
        self,
        plane: Plane,
        info: ModelInfo,
        seq: _Sequence,
        ids: list[int],
        text: str,
        caller: Caller,
        version: str = "",
        features: np.ndarray | None = None,
    ) -> StepResult:
        # Sessions are pinned to the version they start on; a request that names no version
        # continues a sequence on whatever version it started on.
        pinned = ModelRef(info.name, version)
        # A sequence model answers every fed row; a token model the last position's logits.
        output = OUTPUT_LAST if features is None else OUTPUT_ALL
        if not seq.session_id:
            stream = await plane.open_stream(caller=caller, model=pinned)  # a zero state
            try:
                return await stream.step(
                    text=text, token_ids=ids, output=output, caller=caller, features=features
                )
            finally:
                await stream.close()
        sid = seq.session_id
        if seq.start:
            try:
                await plane.create_session(0.0, sid, caller=caller, model=pinned)
            except AlreadyExists:
                # A new sequence under a reused id starts on the version new sequences get now,
                # not on the one the old sequence was pinned to: end that one, start afresh.
                with contextlib.suppress(NotFound):
                    await plane.close_session(sid, caller=caller)
                await plane.create_session(0.0, sid, caller=caller, model=pinned)
        try:
            result = await plane.step(
                sid,
                text=text,
                token_ids=ids,
                output=output,
                caller=caller,
                model=pinned,
                features=features,
            )
        except NotFound:
            raise InvalidArgument(
                f"inference request for sequence {_clip(seq.label)} to model {_q(info.name)} must "
                "specify the START flag on the first request of the sequence"
            ) from None
        if seq.end:
            with contextlib.suppress(NotFound):
                await plane.close_session(sid, caller=caller)
        return result

    # --- model repository extension ----------------------------------------------------------

    @rpc
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        _, models = await self._plane().list_models()
        return kpb.RepositoryIndexResponse(models=_index_rows(models, request.ready))

    @rpc
    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        await self._plane().load_model(request.model_name, caller=CALLER.get())
        return kpb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        await self._plane().unload_model(request.model_name, caller=CALLER.get())
        return kpb.RepositoryModelUnloadResponse()

    @staticmethod
    def _response(
        request: Any, info: ModelInfo, result: StepResult, raw: bool, sequence: bool = False
    ) -> Any:
        assert result.logits is not None
        if sequence:
            logits = result.logits  # every fed row's outputs: [1, T, O]
            out = kpb.ModelInferResponse.InferOutputTensor(
                name=OUTPUT_OUTPUTS, datatype="FP32", shape=[1, *logits.shape]
            )
        else:
            logits = result.logits[-1:]
            out = kpb.ModelInferResponse.InferOutputTensor(
                name=OUTPUT_LOGITS, datatype="FP32", shape=[1, logits.shape[1]]
            )
        response = kpb.ModelInferResponse(
            model_name=info.name,
            model_version=result.model_version or info.version,
            id=request.id,
            outputs=[out],
        )
        if raw:
            response.raw_output_contents.append(logits.astype("<f4", copy=False).tobytes())
        else:
            response.outputs[0].contents.fp32_contents.extend(logits.ravel().tolist())
        return response


def _forget(tails: dict[str, asyncio.Task[None]], key: str, task: asyncio.Task[None]) -> None:
    if tails.get(key) is task:
        del tails[key]


def add_kserve_servicer(servicer: KServeServicer, server: grpc.aio.Server) -> None:
    """Register ``inference.GRPCInferenceService`` on ``server``; request bytes that do not
    parse reach the servicer as :data:`server.decode.UNDECODABLE` (INVALID_ARGUMENT). Every
    RPC of the service must be decorated with :func:`rpc` (or, for :data:`OPEN_RPCS`,
    :func:`open_rpc`): a handler that checks no credential cannot be registered by mistake."""
    service = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        if not hasattr(getattr(servicer, method.name), "authenticates"):
            raise TypeError(f"KServeServicer.{method.name} is not decorated with rpc")
    add_checked(servicer, service, kpb, server)
