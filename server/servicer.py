"""Thin gRPC (grpc.aio) servicer: protobuf <-> plain Python over :class:`DataPlane`.

No model logic lives here. :func:`rpc` is the one place where domain errors become status codes
(and where request counts and durations are recorded); anything unexpected is logged with its
traceback here and reaches the client only as INTERNAL with a short message.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np

from contract.model import KIND_SEQUENCE
from protos.lstmserve.v1 import lstm_serve_pb2 as pb
from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc

from .auth import Authenticator
from .dataplane import (
    ANONYMOUS,
    OUTPUT_ALL,
    OUTPUT_LAST,
    OUTPUT_TOP_K,
    Caller,
    GenerateParams,
    ModelInfo,
    ModelRef,
    ModelStatus,
    Plane,
    SessionInfo,
    StepResult,
)
from .errors import (
    Aborted,
    AlreadyExists,
    Busy,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServeError,
    Unauthenticated,
    Unavailable,
)
from .metrics import RequestStats
from .sequence import feature_rows

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LstmServeService"].full_name

_CODES: dict[type[ServeError], grpc.StatusCode] = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    Busy: grpc.StatusCode.FAILED_PRECONDITION,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    Aborted: grpc.StatusCode.ABORTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}

_OUTPUTS: dict[int, str] = {
    pb.STEP_OUTPUT_UNSPECIFIED: OUTPUT_LAST,
    pb.STEP_OUTPUT_LAST_LOGITS: OUTPUT_LAST,
    pb.STEP_OUTPUT_ALL_LOGITS: OUTPUT_ALL,
    pb.STEP_OUTPUT_TOP_K: OUTPUT_TOP_K,
}


def _output(value: int) -> str:
    """The data plane's output for a StepOutput value; an out-of-range one (a raw client may
    send any int) is INVALID_ARGUMENT naming it."""
    output = _OUTPUTS.get(value)
    if output is None:
        raise InvalidArgument(f"unknown output {value}")
    return output


_FINISH: dict[str, Any] = {"length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP}

R = TypeVar("R")
# The current call's caller, set by :func:`rpc` for the handler it wraps (one task per call).
CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("caller", default=ANONYMOUS)
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]


def status_for(error: BaseException) -> grpc.StatusCode:
    """The gRPC status code for a domain error (INTERNAL for anything else)."""
    for cls in type(error).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.INTERNAL


async def guarded(
    name: str,
    context: grpc.aio.ServicerContext,
    call: Callable[[], Awaitable[R]],
    status_of: Callable[[ServeError], grpc.StatusCode],
    record: Callable[[str, str, float], None],
) -> R:
    """Run one RPC's ``call``: domain errors become ``status_of(error)``, anything unexpected is
    logged with its traceback and reaches the client as INTERNAL, a reply to a call that has
    ended is not sent, and the call's code and duration go to ``record``. The one place, for
    every service (:func:`rpc` here, :func:`server.kserve.rpc`)."""
    t0 = time.perf_counter()
    code = "OK"
    try:
        result = await call()
        if _ended(context):
            # The client is gone or out of time: gRPC would fail to send the reply and log
            # the failure as an error with a traceback.
            raise asyncio.CancelledError()
        return result
    except ServeError as e:
        status = status_of(e)
        code = status.name
        await _abort(context, status, str(e))
        raise  # abort raises; this keeps type checkers honest
    except asyncio.CancelledError:
        code = "CANCELLED"
        raise
    except grpc.aio.AbortError:
        raise
    except Exception:
        code = "INTERNAL"
        log.exception("%s failed", name)
        await _abort(context, grpc.StatusCode.INTERNAL, f"internal error in {name}; see server log")
        raise
    finally:
        record(name, code, time.perf_counter() - t0)


def rpc(method: Handler[R]) -> Handler[R]:
    """Map errors to status codes and record the call's code and duration (:func:`guarded`);
    the caller (principal, deadline) is known to the handler as :data:`CALLER`."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(
        self: LstmServeServiceServicer, request: Any, context: grpc.aio.ServicerContext
    ) -> R:
        async def call() -> R:
            CALLER.set(self.caller_of(context))  # UNAUTHENTICATED is mapped like any error
            return await method(self, request, context)

        # Looked up when the call ends, not now: a front end's heartbeat swaps ``requests`` for a
        # fresh object (shipping the old one), and a count recorded into the shipped one is lost.
        return await guarded(name, context, call, status_for, self.record_request)

    return wrapper


def _ended(context: grpc.aio.ServicerContext) -> bool:
    left = context.time_remaining()
    return context.cancelled() or (left is not None and left <= 0)


class QuietPeerGone(logging.Filter):
    """Drops gRPC's error line for a reply that could not be sent because the call had ended
    (the client's deadline passed or it went away just as the reply was ready): the race no
    server can close, already counted as CANCELLED, not worth a traceback in the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("ExecuteBatchError raised in core")


async def _abort(context: grpc.aio.ServicerContext, status: grpc.StatusCode, message: str) -> None:
    """Send ``status`` and end the call; quietly give up when the call has ended already."""
    try:
        await context.abort(status, message)
    except grpc.aio.AbortError:
        raise
    except Exception:
        # The call ended before the status could be sent (the client's deadline passed or it
        # went away): gRPC has told the client already, and would log this as an error.
        raise asyncio.CancelledError() from None


def _model(request: Any) -> ModelRef:
    """The model a request names (its ``model_name`` / ``model_version`` fields)."""
    return ModelRef(request.model_name, request.model_version)


def _status_pb(m: ModelStatus) -> Any:
    return pb.ModelStatus(
        name=m.name,
        version_policy=m.version_policy,
        is_default=m.is_default,
        versions=[
            pb.ModelVersionStatus(
                version=v.version,
                state=v.state,
                reason=v.reason,
                sessions=v.sessions,
                memory_bytes=v.memory_bytes,
            )
            for v in m.versions
        ],
    )


def _kind_fields(m: ModelInfo) -> dict[str, Any]:
    """GetModelInfoResponse's fields for the model's kind."""
    if m.kind != KIND_SEQUENCE:
        return {"kind": pb.MODEL_KIND_TOKEN_LM}
    sc = m.scaling
    scaling = None
    if sc is not None:
        scaling = pb.Scaling(
            feature_mean=sc.feature_mean,
            feature_std=sc.feature_std,
            output_mean=sc.output_mean,
            output_std=sc.output_std,
        )
    return {
        "kind": pb.MODEL_KIND_SEQUENCE,
        "num_features": len(m.feature_names),
        "num_outputs": len(m.output_names),
        "feature_names": list(m.feature_names),
        "output_names": list(m.output_names),
        "scaling": scaling,
    }


def _session_fields(i: SessionInfo) -> dict[str, Any]:
    """GetSessionResponse's (and SessionSummary's) fields."""
    return {
        "session_id": i.session_id,
        "steps": i.steps,
        "created_unix_s": i.created_unix_s,
        "last_used_unix_s": i.last_used_unix_s,
        "idle_timeout_s": i.idle_timeout_s,
        "state_bytes": i.state_bytes,
        "busy": i.busy,
        "has_next_distribution": i.has_next_distribution,
        "model_name": i.model_name,
        "model_version": i.model_version,
    }


def _features(request: Any) -> np.ndarray | None:
    """A Step(Stream)Request's features (a sequence model's input), None when it has none."""
    if not request.HasField("features"):
        return None
    f = request.features
    return feature_rows(f.shape, f.values)


def _step_fields(result: StepResult, outputs: bool = False) -> dict[str, Any]:
    """A StepResponse's (and StepStreamResponse's) fields; ``outputs``: the step fed features,
    so its rows are a sequence model's outputs, not logits."""
    fields: dict[str, Any] = {
        "session_id": result.session_id,
        "tokens_consumed": result.tokens_consumed,
        "steps": result.steps,
    }
    if result.logits is not None:
        if outputs:
            rows = result.logits
            fields["outputs"] = pb.FloatTensor(shape=rows.shape, values=rows.ravel().tolist())
        else:
            fields["logits"] = result.logits.ravel().tolist()
        fields["positions"] = result.logits.shape[0]
    if result.top:
        fields["top"] = [
            pb.TokenProbability(token_id=i, token=t, probability=p) for i, t, p in result.top
        ]
    return fields


class LstmServeServiceServicer(pb_grpc.LstmServeServiceServicer):
    """``lstmserve.v1.LstmServeService``. ``plane`` is None while the model loads (UNAVAILABLE)."""

    def __init__(self, requests: RequestStats) -> None:
        self.plane: Plane | None = None
        self.requests = requests
        # Which front-end process this is (empty in a single-process server); GetModelInfo
        # returns it as trailing metadata, so a client (a test) can tell front ends apart.
        self.frontend_id = ""
        self.authenticator = Authenticator()
        # The KServe v2 servicer beside this one, when grpc_server added it.
        self.kserve: Any = None

    def record_request(self, method: str, code: str, seconds: float) -> None:
        self.requests.record(method, code, seconds)

    def caller_of(self, context: grpc.aio.ServicerContext) -> Caller:
        """Who calls (:class:`Unauthenticated` without a valid credential when authentication
        is on) and until when (the client's deadline, if it set one)."""
        principal = ""
        if self.authenticator.enabled:
            principal = self.authenticator.principal(
                context.invocation_metadata() or (), context.auth_context() or {}
            )
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + max(0.0, remaining)
        return Caller(principal, deadline)

    def _dp(self) -> Plane:
        if self.plane is None:
            raise Unavailable("the model is still loading; retry shortly")
        return self.plane

    @rpc
    async def CreateSession(self, request: Any, context: Any) -> Any:
        info = await self._dp().create_session(
            request.idle_timeout_s, request.session_id, caller=CALLER.get(), model=_model(request)
        )
        return pb.CreateSessionResponse(
            session_id=info.session_id,
            idle_timeout_s=info.idle_timeout_s,
            state_bytes=info.state_bytes,
            model_name=info.model_name,
            model_version=info.model_version,
        )

    @rpc
    async def CloseSession(self, request: Any, context: Any) -> Any:
        await self._dp().close_session(request.session_id, caller=CALLER.get())
        return pb.CloseSessionResponse()

    @rpc
    async def ResetSession(self, request: Any, context: Any) -> Any:
        await self._dp().reset_session(request.session_id, caller=CALLER.get())
        return pb.ResetSessionResponse()

    @rpc
    async def GetSession(self, request: Any, context: Any) -> Any:
        i = await self._dp().get_session(request.session_id, caller=CALLER.get())
        return pb.GetSessionResponse(**_session_fields(i))

    @rpc
    async def ListSessions(self, request: Any, context: Any) -> Any:
        page, token = await self._dp().list_sessions(
            request.page_size, request.page_token, caller=CALLER.get()
        )
        return pb.ListSessionsResponse(
            sessions=[pb.SessionSummary(**_session_fields(i)) for i in page],
            next_page_token=token,
        )

    @rpc
    async def Step(self, request: Any, context: Any) -> Any:
        features = _features(request)
        result = await self._dp().step(
            request.session_id,
            text=request.text,
            token_ids=request.token_ids,
            output=_output(request.output),
            top_k=request.top_k,
            caller=CALLER.get(),
            request_id=request.request_id,
            model=_model(request),
            features=features,
        )
        return pb.StepResponse(**_step_fields(result, features is not None))

    @rpc
    async def StepStream(self, request_iterator: Any, context: Any) -> None:
        plane = self._dp()
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        stream = await plane.open_stream(first.session_id, caller=CALLER.get(), model=_model(first))
        reason = "disconnected"
        try:
            req = first
            sid = stream.session_id
            while True:
                if req.session_id and req.session_id != sid:
                    raise InvalidArgument(
                        f"this stream is bound to session {sid}; got session_id {req.session_id}"
                    )
                features = _features(req)
                result = await stream.step(
                    text=req.text,
                    token_ids=req.token_ids,
                    output=_output(req.output),
                    top_k=req.top_k,
                    request_id=req.request_id,
                    features=features,
                )
                await context.write(
                    pb.StepStreamResponse(**_step_fields(result, features is not None))
                )
                req = await context.read()
                if req is grpc.aio.EOF:
                    # grpc.aio reports a client that vanishes between messages as end-of-stream
                    # first (the cancellation lands after), so such a stream counts as closed.
                    reason = "closed"
                    return
        except ServeError:
            reason = "closed"
            raise
        finally:
            await stream.close(reason)

    @rpc
    async def Generate(self, request: Any, context: Any) -> None:
        params = GenerateParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            seed=request.seed if request.HasField("seed") else None,
            stop=tuple(request.stop),
        )
        chunks = self._dp().generate(
            request.session_id,
            request.prompt,
            params,
            caller=CALLER.get(),
            request_id=request.request_id,
            model=_model(request),
        )
        async with contextlib.aclosing(chunks):
            async for ch in chunks:
                await context.write(
                    pb.GenerateResponse(
                        session_id=ch.session_id,
                        text=ch.text,
                        token_ids=ch.token_ids,
                        finish_reason=_FINISH.get(ch.finish_reason or "", 0),
                        generated_tokens=ch.generated_tokens,
                        prompt_tokens=ch.prompt_tokens,
                    )
                )

    @rpc
    async def ExportSession(self, request: Any, context: Any) -> Any:
        record = await self._dp().export_session(request.session_id, caller=CALLER.get())
        return pb.ExportSessionResponse(record=record)

    @rpc
    async def ImportSession(self, request: Any, context: Any) -> Any:
        sid = await self._dp().import_session(
            request.record, request.session_id, caller=CALLER.get()
        )
        return pb.ImportSessionResponse(session_id=sid)

    @rpc
    async def ForkSession(self, request: Any, context: Any) -> Any:
        sid = await self._dp().fork_session(
            request.session_id, request.new_session_id, caller=CALLER.get()
        )
        return pb.ForkSessionResponse(session_id=sid)

    @rpc
    async def GetModelInfo(self, request: Any, context: Any) -> Any:
        m = await self._dp().model_info(_model(request))
        if self.frontend_id:
            context.set_trailing_metadata((("lstm-serve-frontend", self.frontend_id),))
        return pb.GetModelInfoResponse(
            name=m.name,
            version=m.version,
            provider=m.provider,
            vocab=list(m.vocab),
            num_layers=m.num_layers,
            hidden_size=m.hidden_size,
            preprocess=m.preprocess,
            unk_id=m.unk_id,
            config_json=m.config_json,
            max_prompt_tokens=m.limits.max_prompt_tokens,
            max_new_tokens=m.limits.max_new_tokens,
            max_sessions=m.limits.max_sessions,
            max_batch_size=m.limits.max_batch_size,
            state_bytes_per_session=m.state_bytes_per_session,
            **_kind_fields(m),
        )

    @rpc
    async def ListModels(self, request: Any, context: Any) -> Any:
        mode, models = await self._dp().list_models()
        return pb.ListModelsResponse(
            models=[_status_pb(m) for m in models], model_control_mode=mode
        )

    @rpc
    async def LoadModel(self, request: Any, context: Any) -> Any:
        status = await self._dp().load_model(request.model_name, caller=CALLER.get())
        return pb.LoadModelResponse(model=_status_pb(status))

    @rpc
    async def UnloadModel(self, request: Any, context: Any) -> Any:
        status = await self._dp().unload_model(request.model_name, caller=CALLER.get())
        return pb.UnloadModelResponse(model=_status_pb(status))
