"""A small Python client over the generated stubs, and the ``lstm-client`` CLI.

``lstm-client generate --target HOST:PORT --prompt TEXT --max-tokens N`` prints only the
continuation, as it arrives. ``step`` prints the next-token distribution's top tokens (on an
ephemeral session unless ``--session``); ``step --features FILE.csv|-`` feeds a sequence model
rows of feature values (scaled here as the model says unless ``--scaled``) and prints each
row's outputs in the data's units, ``health`` exits 0 only when the server is SERVING
(the container's HEALTHCHECK), ``info`` describes the model. ``models`` lists the repository's
models and the state of each version (``--json`` for machine-readable output); ``models load
NAME`` / ``models unload NAME`` load or retire a model (a server in ``--model-control-mode
explicit``). ``--model NAME`` / ``--model-version V`` on ``generate``, ``step``, ``info`` and
``create`` name the model a request is for (default: the server's default model, its newest
serving version); on a request for an existing session they name the model it must be pinned to.

Exit codes: 0 success; 1 the server answered with an error (``lstm-client: error: CODE:
message``); 2 a bad argument (``lstm-client: error: ...``, one line, before any call);
130 interrupted. Never a traceback.

The library checks its arguments the same way: a bad value raises :class:`ValueError` before
any RPC; everything the server refuses raises :class:`grpc.RpcError`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import queue
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

# gRPC's C core logs some failures itself, straight to stderr (a TLS handshake refused:
# "E1204 ... ssl_transport_security.cc:... Handshake failed ..."), beside the one-line error
# lstm-client prints for the same failure. It reads GRPC_VERBOSITY once, as grpc is imported,
# so the lstm-client process (the console script, or python -m server.client) sets it to NONE
# here unless the user set it; a program importing this module as a library keeps its own.
if __name__ == "__main__" or Path(sys.argv[0]).name == "lstm-client":
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.lstmserve.v1 import lstm_serve_pb2 as pb
from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc

SESSION_HEADER = "lstm-session-id"
TOKEN_ENV = "LSTM_SERVE_TOKEN"
TLS_CA_ENV = "LSTM_SERVE_TLS_CA"
PROG = "lstm-client"

# ``output=`` of step and step_stream: a name, or the pb.StepOutput value (older callers).
OUTPUTS: dict[str, int] = {
    "last": pb.STEP_OUTPUT_LAST_LOGITS,
    "all": pb.STEP_OUTPUT_ALL_LOGITS,
    "top_k": pb.STEP_OUTPUT_TOP_K,
}
_OUTPUT_VALUES = frozenset(pb.StepOutput.values())
_UINT64 = 2**64
# A gRPC target with a resolver scheme (dns:///h:p, unix:/path, ipv4:..., xds:///...) is taken
# as given; anything else must be HOST:PORT (a bare host would silently mean port 443).
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:")
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d+)$")
_SCHEMES = ("dns", "unix", "unix-abstract", "ipv4", "ipv6", "vsock", "xds", "google-c2p")
_VERSION = re.compile(r"[0-9]+")
SESSION_ACTIONS = ("list", "get", "close", "reset")
VOCAB_PREVIEW = 12  # tokens `lstm-client info` shows
_MIB = 2**20


@dataclass(frozen=True)
class ModelVersionStatus:
    """One version of a model, as :meth:`LstmClient.list_models` reports it."""

    version: str
    state: str  # "LOADING", "READY", "RETIRING" or "UNAVAILABLE"
    reason: str  # why it is not serving (a failed load, retired), or ""
    sessions: int  # sessions pinned to it on this server
    memory_bytes: int  # the model file plus its live sessions' state


@dataclass(frozen=True)
class ModelStatus:
    """A model of the repository: its version policy and every version's state."""

    name: str
    version_policy: str  # e.g. "latest 1", "all", "specific 1,3"
    is_default: bool  # the model that requests naming none use
    versions: tuple[ModelVersionStatus, ...]

    @classmethod
    def from_pb(cls, m: Any) -> ModelStatus:
        return cls(
            name=str(m.name),
            version_policy=str(m.version_policy),
            is_default=bool(m.is_default),
            versions=tuple(
                ModelVersionStatus(
                    version=str(v.version),
                    state=str(v.state),
                    reason=str(v.reason),
                    sessions=int(v.sessions),
                    memory_bytes=int(v.memory_bytes),
                )
                for v in m.versions
            ),
        )


@dataclass(frozen=True)
class ModelList:
    """What :meth:`LstmClient.list_models` returns: the server's model control mode ("none",
    "poll" or "explicit") and every model. ``dataclasses.asdict`` gives plain JSON types."""

    model_control_mode: str
    models: tuple[ModelStatus, ...]

    @classmethod
    def from_pb(cls, resp: Any) -> ModelList:
        return cls(str(resp.model_control_mode), tuple(ModelStatus.from_pb(m) for m in resp.models))

    def get(self, name: str) -> ModelStatus | None:
        """The model called ``name``, or None."""
        return next((m for m in self.models if m.name == name), None)

    @property
    def default(self) -> ModelStatus | None:
        """The default model, or None (a server that lists none as default)."""
        return next((m for m in self.models if m.is_default), None)


@dataclass(frozen=True)
class SessionSummary:
    """A session as :meth:`LstmClient.list_sessions` (and ``lstm-client sessions``) reports it:
    GetSession's fields as plain values."""

    session_id: str
    model_name: str  # the model and version it is pinned to
    model_version: str
    steps: int  # tokens fed since it was created or last reset
    created_unix_s: float
    last_used_unix_s: float
    idle_timeout_s: float  # the idle timeout in force
    state_bytes: int
    busy: bool  # a request is using it
    has_next_distribution: bool  # Generate may continue it with an empty prompt

    @classmethod
    def from_pb(cls, m: Any) -> SessionSummary:
        """From a ``SessionSummary`` or a ``GetSessionResponse`` message."""
        return cls(**{f.name: getattr(m, f.name) for f in fields(cls)})


class LstmClient:
    """Blocking client. Every method raises :class:`ValueError` for a bad argument (before any
    RPC) and :class:`grpc.RpcError` on a non-OK status."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        token: str | None = None,
    ) -> None:
        """``target`` is HOST:PORT (or a gRPC URI such as ``unix:/path``); ``timeout`` is each
        call's deadline in seconds (a stream's: the whole stream's); ``tls_ca`` (PEM file) turns
        TLS on; ``tls_cert``/``tls_key`` add a client certificate (mutual TLS); ``token`` is
        sent as ``authorization: Bearer TOKEN``."""
        check_target(target)
        if timeout is not None and not (_is_number(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if tls_ca or tls_cert:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca),
                private_key=_read(tls_key),
                certificate_chain=_read(tls_cert),
            )
            self.channel = grpc.secure_channel(target, creds)
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.LstmServeServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout
        self._auth: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )

    def _md(self, session_id: str = "") -> tuple[tuple[str, str], ...]:
        # Every call that names a session carries its id as metadata too, so an L7 proxy in
        # front of several replicas (nginx: hash $http_lstm_session_id) sends it where the
        # session lives.
        route = ((SESSION_HEADER, session_id),) if session_id else ()
        return self._auth + route

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> LstmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create_session(
        self,
        idle_timeout_s: float = 0.0,
        session_id: str = "",
        *,
        model: str = "",
        model_version: str | int = "",
    ) -> str:
        """A new session; ``session_id`` chooses its id (16-128 of [A-Za-z0-9_-]);
        ``idle_timeout_s`` > 0 overrides the server's idle timeout, 0 keeps it. ``model`` /
        ``model_version`` choose the model it is pinned to for its whole life (default: the
        server's default model, its newest serving version); :meth:`get_session` tells which."""
        return str(
            self._create_session(idle_timeout_s, session_id, model, model_version).session_id
        )

    def _create_session(
        self, idle_timeout_s: float, session_id: str, model: str, model_version: str | int
    ) -> Any:
        _check_non_negative("idle_timeout_s", idle_timeout_s)
        fields = _model_fields(model, model_version)
        req = pb.CreateSessionRequest(
            idle_timeout_s=idle_timeout_s, session_id=session_id, **fields
        )
        return self.stub.CreateSession(req, timeout=self.timeout, metadata=self._md(session_id))

    def close_session(self, session_id: str) -> None:
        self.stub.CloseSession(
            pb.CloseSessionRequest(session_id=session_id),
            timeout=self.timeout,
            metadata=self._md(session_id),
        )

    def reset_session(self, session_id: str) -> None:
        self.stub.ResetSession(
            pb.ResetSessionRequest(session_id=session_id),
            timeout=self.timeout,
            metadata=self._md(session_id),
        )

    def get_session(self, session_id: str) -> Any:
        return self.stub.GetSession(
            pb.GetSessionRequest(session_id=session_id),
            timeout=self.timeout,
            metadata=self._md(session_id),
        )

    def list_sessions(self, page_size: int = 0) -> list[SessionSummary]:
        """Every session of the caller's principal the server holds (not the ephemeral ones of
        step streams), ordered by id, as :class:`SessionSummary`; fetched ``page_size`` at a
        time (0: the server's page size, 1000)."""
        _check_int("page_size", page_size, low=0)
        out: list[SessionSummary] = []
        token = ""
        while True:
            resp = self.stub.ListSessions(
                pb.ListSessionsRequest(page_size=page_size, page_token=token),
                timeout=self.timeout,
                metadata=self._md(),
            )
            out += [SessionSummary.from_pb(m) for m in resp.sessions]
            token = resp.next_page_token
            if not token:
                return out

    def export_session(self, session_id: str) -> bytes:
        """The session's record (state, counters, model identity) as bytes."""
        return bytes(
            self.stub.ExportSession(
                pb.ExportSessionRequest(session_id=session_id),
                timeout=self.timeout,
                metadata=self._md(session_id),
            ).record
        )

    def import_session(self, record: bytes, session_id: str = "") -> str:
        """A new session from :meth:`export_session`'s bytes; its id."""
        return str(
            self.stub.ImportSession(
                pb.ImportSessionRequest(record=record, session_id=session_id),
                timeout=self.timeout,
                metadata=self._md(session_id),
            ).session_id
        )

    def fork_session(self, session_id: str, new_session_id: str = "") -> str:
        """A copy of the session under a new id (the original is unchanged); the copy's id."""
        return str(
            self.stub.ForkSession(
                pb.ForkSessionRequest(session_id=session_id, new_session_id=new_session_id),
                timeout=self.timeout,
                metadata=self._md(session_id),
            ).session_id
        )

    def model_info(self, model: str = "", model_version: str | int = "") -> Any:
        """A ``GetModelInfoResponse``: ``model`` (default: the server's default model), version
        ``model_version`` (default: its newest serving version)."""
        req = pb.GetModelInfoRequest(**_model_fields(model, model_version))
        return self.stub.GetModelInfo(req, timeout=self.timeout, metadata=self._md())

    def list_models(self) -> ModelList:
        """Every model of the server's repository and the state of each version, as a
        :class:`ModelList` (plain dataclasses, not protobuf messages)."""
        resp = self.stub.ListModels(
            pb.ListModelsRequest(), timeout=self.timeout, metadata=self._md()
        )
        return ModelList.from_pb(resp)

    def load_model(self, name: str) -> ModelStatus:
        """Load (or reload) model ``name``'s versions under its version policy; its status
        afterwards. The server must run with ``--model-control-mode explicit``
        (FAILED_PRECONDITION otherwise) and, with ``--auth-tokens``, the caller must be an admin
        principal (PERMISSION_DENIED otherwise); NOT_FOUND for a model the repository lacks."""
        req = pb.LoadModelRequest(model_name=_model_name(name, required=True))
        resp = self.stub.LoadModel(req, timeout=self.timeout, metadata=self._md())
        return ModelStatus.from_pb(resp.model)

    def unload_model(self, name: str) -> ModelStatus:
        """Retire every version of model ``name`` (no new sessions; pinned ones go on until they
        end or the server's drain time passes); its status afterwards. The same conditions as
        :meth:`load_model`."""
        req = pb.UnloadModelRequest(model_name=_model_name(name, required=True))
        resp = self.stub.UnloadModel(req, timeout=self.timeout, metadata=self._md())
        return ModelStatus.from_pb(resp.model)

    def step(
        self,
        session_id: str,
        *,
        text: str = "",
        token_ids: Sequence[int] = (),
        output: str | int = "last",
        top_k: int = 0,
        request_id: str = "",
        model: str = "",
        model_version: str | int = "",
        features: Any = None,
    ) -> Any:
        """Feed ``text`` or ``token_ids`` (a token model) or ``features`` (a sequence model:
        ``[T, F]`` numbers, already scaled; exactly one of the three) to a session; a
        ``StepResponse``.

        ``output``: ``"last"`` (the last position's logits, or outputs), ``"all"`` (every fed
        position's), ``"top_k"`` (the ``top_k`` most probable next tokens, no logits; token
        models only). A sequence model's rows come back in ``.outputs`` (a ``FloatTensor``:
        ``shape`` and row-major ``values``). ``model`` / ``model_version``, when given, are what
        the session must be pinned to (FAILED_PRECONDITION otherwise, and nothing is fed).
        :meth:`step_features` scales and unscales for you."""
        fields = _step_fields(text, token_ids, output, top_k, request_id, features)
        fields.update(_model_fields(model, model_version))
        req = pb.StepRequest(session_id=session_id, **fields)
        return self.stub.Step(req, timeout=self.timeout, metadata=self._md(session_id))

    def step_features(
        self,
        rows: Any,
        *,
        session_id: str = "",
        scaled: bool = False,
        model: str = "",
        model_version: str | int = "",
        chunk_rows: int = 0,
    ) -> FeatureSteps:
        """Feed a sequence model rows of feature values ``[T, F]`` and get every row's outputs
        back in the data's units (:class:`FeatureSteps`).

        ``rows`` are raw values (the model's ``scaling`` from GetModelInfo is applied here)
        unless ``scaled``. With ``session_id`` the session advances (unary Steps); without, an
        ephemeral session over one StepStream, freed afterwards. ``chunk_rows``: rows per step
        (0 = the server's max_prompt_tokens). :class:`ValueError` for rows of the wrong width
        or a token model (before anything is fed)."""
        meta = self.sequence_model(session_id, model=model, model_version=model_version)
        x = _feature_matrix(rows, meta)
        if not scaled:
            x = meta.scale(x)
        chunk = chunk_rows or meta.max_rows
        _check_int("chunk_rows", chunk, low=1)
        parts: list[np.ndarray] = []
        steps = 0
        sid = session_id
        if session_id:
            for i in range(0, len(x), chunk):
                r = self.step(session_id, features=x[i : i + chunk], output="all")
                parts.append(_rows(r.outputs))
                steps = int(r.steps)
        else:
            with self.step_stream(model=meta.name, model_version=meta.version) as s:
                for i in range(0, len(x), chunk):
                    r = s.step(features=x[i : i + chunk], output="all")
                    parts.append(_rows(r.outputs))
                    steps = int(r.steps)
                sid = s.session_id
        out = np.concatenate(parts) if parts else np.zeros((0, len(meta.output_names)))
        return FeatureSteps(sid, meta.output_names, meta.unscale(out), steps)

    def sequence_model(
        self, session_id: str = "", *, model: str = "", model_version: str | int = ""
    ) -> SequenceModel:
        """What a sequence model takes and gives (names, scaling, the row limit): the model
        ``session_id`` is pinned to, else ``model`` (default: the server's default model).
        :class:`ValueError` when it is a token model."""
        if session_id:
            info = self.get_session(session_id)
            model, model_version = info.model_name, info.model_version
        m = self.model_info(model, model_version)
        if m.kind != pb.MODEL_KIND_SEQUENCE:
            raise ValueError(
                f"model {m.name!r} version {m.version} is a token model (text in, logits out); "
                "features need a sequence model (name one with --model / model=)"
            )
        return SequenceModel.from_pb(m)

    def step_stream(
        self, session_id: str = "", *, model: str = "", model_version: str | int = ""
    ) -> StepStream:
        """A :class:`StepStream`: many steps over one StepStream RPC. With ``session_id`` it
        attaches to that session (which outlives the stream); without, the server makes an
        ephemeral session that the stream owns and frees when it closes. Use it with ``with``
        (or call :meth:`StepStream.close`). ``model`` / ``model_version``: the ephemeral
        session's model (default: the server's default model, its newest serving version), or
        the one the attached session must be pinned to; the first step carries them."""
        return StepStream(self, session_id, model=model, model_version=model_version)

    def generate(
        self,
        prompt: str,
        max_tokens: int,
        *,
        session_id: str = "",
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 0.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        model: str = "",
        model_version: str | int = "",
    ) -> Iterator[Any]:
        """Yield ``GenerateResponse`` messages as they arrive (cancel by closing the iterator).

        Arguments are checked here, before the call starts: ``max_tokens`` >= 1,
        ``temperature`` >= 0 (0 = greedy), ``top_k`` >= 0 (0 = off), ``top_p`` in [0, 1]
        (0 = off), ``seed`` in [0, 2**64). ``model`` / ``model_version``: the ephemeral
        session's model (default: the server's default model, its newest serving version), or
        with ``session_id`` the one that session must be pinned to."""
        _check_int("max_tokens", max_tokens, low=1)
        _check_non_negative("temperature", temperature)
        _check_int("top_k", top_k, low=0)
        if not (_is_number(top_p) and 0.0 <= top_p <= 1.0):
            raise ValueError(f"top_p must be in [0, 1], got {top_p!r}")
        if seed is not None:
            _check_int("seed", seed, low=0, high=_UINT64 - 1)
        if isinstance(stop, str):
            raise ValueError("stop must be a sequence of strings, not one string")
        req = pb.GenerateRequest(
            session_id=session_id,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop=list(stop),
            **_model_fields(model, model_version),
        )
        if seed is not None:
            req.seed = seed
        return self._generate(req)

    def _generate(self, req: Any) -> Iterator[Any]:
        call = self.stub.Generate(req, timeout=self.timeout, metadata=self._md(req.session_id))
        try:
            yield from call
        finally:
            call.cancel()

    def generate_text(self, prompt: str, max_tokens: int, **kw: Any) -> str:
        return "".join(r.text for r in self.generate(prompt, max_tokens, **kw))

    def health(self, service: str = "") -> int:
        """The health status enum value (``health_pb2.HealthCheckResponse.SERVING`` = 1)."""
        resp = self.health_stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self.timeout
        )
        return int(resp.status)


_END = None  # tells the request iterator that the client has no more steps


class StepStream:
    """Steps over one StepStream RPC, one request and its response at a time::

        with client.step_stream() as s:          # an ephemeral session, freed on close
            s.step(text="the time")
            top = s.step(text=" trav", output="top_k", top_k=3).top

    ``session_id`` is the attached session's id, or (once the first step has answered) the
    ephemeral one's. Not thread-safe: one caller steps at a time. A server error raises
    :class:`grpc.RpcError` and ends the stream (the server closes it); a bad argument raises
    :class:`ValueError` and sends nothing. :meth:`close` ends the stream and waits until the
    server has finished with it, so an ephemeral session is gone when it returns.
    """

    def __init__(
        self,
        client: LstmClient,
        session_id: str = "",
        *,
        model: str = "",
        model_version: str | int = "",
    ) -> None:
        self._model: dict[str, Any] | None = _model_fields(model, model_version)
        self.session_id = session_id
        self._attach = session_id
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        # gRPC reads the request iterator on its own thread; it blocks on the queue between
        # steps and ends when close() puts _END.
        self._call = client.stub.StepStream(
            self._feed(), timeout=client.timeout, metadata=client._md(session_id)
        )

    def _feed(self) -> Iterator[Any]:
        while (req := self._requests.get()) is not _END:
            yield req

    def step(
        self,
        *,
        text: str = "",
        token_ids: Sequence[int] = (),
        output: str | int = "last",
        top_k: int = 0,
        request_id: str = "",
        features: Any = None,
    ) -> Any:
        """Feed ``text``, ``token_ids`` or ``features`` (exactly one); the
        ``StepStreamResponse``. The arguments mean what they mean in :meth:`LstmClient.step`."""
        if self._closed:
            raise ValueError("this step stream is closed")
        fields = _step_fields(text, token_ids, output, top_k, request_id, features)
        # The server binds the stream to the first message's session_id (and model); later
        # ones leave them empty.
        req = pb.StepStreamRequest(session_id=self._attach, **fields, **(self._model or {}))
        self._attach, self._model = "", None
        self._requests.put(req)
        try:
            resp = next(self._call)
        except StopIteration:
            self._end()
            raise grpc.RpcError("the server ended the step stream") from None
        except BaseException:
            self._end()  # an error status (or an interrupt) ends the stream
            raise
        if not self.session_id:
            self.session_id = str(resp.session_id)
        return resp

    def _end(self) -> None:
        if not self._closed:
            self._closed = True
            self._requests.put(_END)

    def close(self) -> None:
        """Half-close the stream and wait for the server's status (idempotent). Raises
        :class:`grpc.RpcError` if the stream ends with an error (e.g. its deadline)."""
        if self._closed:
            return
        self._end()
        for _ in self._call:  # no more responses come: this waits for the final status
            pass

    def cancel(self) -> None:
        """End the stream at once, without waiting for the server."""
        self._end()
        self._call.cancel()

    def __enter__(self) -> StepStream:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.cancel()  # an error is already on its way up: don't wait or mask it


def check_target(target: str) -> None:
    """Raise :class:`ValueError` unless ``target`` is HOST:PORT (port 1-65535) or a gRPC URI
    with a known scheme (``dns:``, ``unix:``, ``ipv4:``, ...)."""
    if not isinstance(target, str) or not target or any(c.isspace() for c in target):
        raise ValueError(f"target must be HOST:PORT, got {target!r}")
    m = _HOST_PORT.match(target)
    if m is not None:
        if not 1 <= int(m.group(2)) <= 65535:
            raise ValueError(f"target port must be in 1..65535, got {target!r}")
        return
    if _SCHEME.match(target) and target.split(":", 1)[0] in _SCHEMES:
        return
    raise ValueError(f"target must be HOST:PORT (e.g. 127.0.0.1:50051), got {target!r}")


def output_value(output: str | int) -> int:
    """The ``pb.StepOutput`` value of ``output``: ``"last"``, ``"all"``, ``"top_k"`` or a
    ``pb.StepOutput`` value. :class:`ValueError` for anything else."""
    if isinstance(output, str):
        if output in OUTPUTS:
            return OUTPUTS[output]
    elif isinstance(output, int) and not isinstance(output, bool) and output in _OUTPUT_VALUES:
        return int(output)
    names = ", ".join(repr(n) for n in OUTPUTS)
    raise ValueError(f"output must be one of {names} (or a pb.StepOutput value), got {output!r}")


def _step_fields(
    text: str,
    token_ids: Sequence[int],
    output: str | int,
    top_k: int,
    request_id: str,
    features: Any = None,
) -> dict[str, Any]:
    value = output_value(output)
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    if isinstance(token_ids, str | bytes):
        raise ValueError("token_ids must be a sequence of integers, not a string")
    ids = list(token_ids)
    if features is not None:
        if text or ids:
            raise ValueError("give exactly one of text, token_ids and features")
        if not isinstance(request_id, str):
            raise ValueError(f"request_id must be a string, got {type(request_id).__name__}")
        x = np.asarray(features, np.float32)
        if x.ndim != 2 or x.shape[0] < 1:
            raise ValueError(f"features must be rows [T, F] with T >= 1, got shape {x.shape}")
        tensor = pb.FloatTensor(shape=x.shape, values=x.ravel().tolist())
        return {"features": tensor, "output": value, "request_id": request_id}
    if bool(text) == bool(ids):
        raise ValueError("give exactly one of text and token_ids (non-empty)")
    for t in ids:
        _check_int("token_ids", t, low=0)
    _check_int("top_k", top_k, low=0)
    if value == pb.STEP_OUTPUT_TOP_K and top_k < 1:
        raise ValueError('output="top_k" needs top_k >= 1')
    if not isinstance(request_id, str):
        raise ValueError(f"request_id must be a string, got {type(request_id).__name__}")
    return {
        "text": text,
        "token_ids": ids,
        "output": value,
        "top_k": top_k,
        "request_id": request_id,
    }


@dataclass(frozen=True)
class SequenceModel:
    """A sequence model as GetModelInfo describes it: what to send and what comes back."""

    name: str
    version: str
    feature_names: tuple[str, ...]
    output_names: tuple[str, ...]
    feature_mean: tuple[float, ...]
    feature_std: tuple[float, ...]
    output_mean: tuple[float, ...]
    output_std: tuple[float, ...]
    max_rows: int  # rows one step may carry (the server's max_prompt_tokens)

    @classmethod
    def from_pb(cls, m: Any) -> SequenceModel:
        f, o = len(m.feature_names), len(m.output_names)
        sc = m.scaling
        return cls(
            m.name,
            m.version,
            tuple(m.feature_names),
            tuple(m.output_names),
            tuple(sc.feature_mean) or (0.0,) * f,
            tuple(sc.feature_std) or (1.0,) * f,
            tuple(sc.output_mean) or (0.0,) * o,
            tuple(sc.output_std) or (1.0,) * o,
            int(m.max_prompt_tokens) or 1,
        )

    def scale(self, x: np.ndarray) -> np.ndarray:
        """Raw feature values to what the model reads: ``(x - mean) / std`` per feature."""
        mean = np.asarray(self.feature_mean)
        return ((np.asarray(x, np.float64) - mean) / np.asarray(self.feature_std)).astype(
            np.float32
        )

    def unscale(self, y: np.ndarray) -> np.ndarray:
        """The model's outputs in the data's units: ``y * std + mean`` per output."""
        return np.asarray(y, np.float64) * np.asarray(self.output_std) + np.asarray(
            self.output_mean
        )


@dataclass(frozen=True)
class FeatureSteps:
    """What :meth:`LstmClient.step_features` returns: ``outputs`` ``[T, O]`` in the data's
    units (float64), named by ``output_names``; ``steps``: rows the session has been fed."""

    session_id: str
    output_names: tuple[str, ...]
    outputs: np.ndarray
    steps: int


def _rows(tensor: Any) -> np.ndarray:
    """A ``FloatTensor`` of rows as a ``[rows, cols]`` array."""
    return np.asarray(tensor.values, np.float32).reshape([int(d) for d in tensor.shape])


def _feature_matrix(rows: Any, meta: SequenceModel) -> np.ndarray:
    x = np.asarray(rows, np.float64)
    if x.ndim == 1 and len(meta.feature_names) == 1:
        x = x[:, None]
    f = len(meta.feature_names)
    if x.ndim != 2 or x.shape[1] != f or x.shape[0] < 1:
        raise ValueError(
            f"model {meta.name!r} takes rows of {f} feature(s) {list(meta.feature_names)}; "
            f"got an array of shape {x.shape}"
        )
    return x


def read_feature_csv(lines: Iterator[str], feature_names: Sequence[str]) -> Iterator[list[float]]:
    """Rows of feature values from CSV lines: ``F`` numbers a line, an optional first line
    of feature names (in any order: the columns are reordered to the model's), blank lines
    and lines starting with ``#`` skipped. :class:`ValueError` naming the line for anything
    else. Lazy, so rows from a pipe are stepped as they arrive."""
    import csv

    f = len(feature_names)
    order: list[int] | None = None
    first = True
    for lineno, cells in enumerate(csv.reader(lines), start=1):
        cells = [c.strip() for c in cells]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        if first:
            first = False
            if not all(_is_float(c) for c in cells):
                if sorted(cells) != sorted(feature_names):
                    raise ValueError(
                        f"CSV line {lineno}: the header {cells} does not name the model's "
                        f"features {list(feature_names)}"
                    )
                order = [cells.index(n) for n in feature_names]
                continue
        if len(cells) != f:
            raise ValueError(
                f"CSV line {lineno}: {len(cells)} value(s), the model takes {f} "
                f"({', '.join(feature_names)})"
            )
        try:
            values = [float(c) for c in cells]
        except ValueError:
            raise ValueError(f"CSV line {lineno}: not a number in {cells}") from None
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"CSV line {lineno}: values must be finite, got {cells}")
        yield values if order is None else [values[i] for i in order]


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _model_name(name: object, *, required: bool = False) -> str:
    if not isinstance(name, str):
        raise ValueError(f"model must be a string (a model name), got {type(name).__name__}")
    if required and not name:
        raise ValueError("model name must not be empty")
    if name != name.strip() or "/" in name or "\x00" in name:
        raise ValueError(f"model must be a model name (a repository folder), got {name!r}")
    return name


def _model_version(version: object) -> str:
    if isinstance(version, int) and not isinstance(version, bool):
        if version < 0:
            raise ValueError(f"model_version must be a version number >= 0, got {version}")
        return str(version)
    if isinstance(version, str) and (not version or _VERSION.fullmatch(version)):
        return version
    raise ValueError(f"model_version must be a version number (e.g. '3') or '', got {version!r}")


def _model_fields(model: object, model_version: object) -> dict[str, Any]:
    """The ``model_name`` / ``model_version`` fields of a request; ValueError for bad ones."""
    return {"model_name": _model_name(model), "model_version": _model_version(model_version)}


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_int(name: str, value: object, *, low: int, high: int = 2**31 - 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")


def _check_non_negative(name: str, value: object) -> None:
    if not (_is_number(value) and value >= 0):  # type: ignore[operator]
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


# -- the command line ------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (its default prints the whole usage block)."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see {self.prog} --help)"
        self.exit(2, f"{PROG}: error: {message}{hint}\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        d = action.default
        # Identity, not ==: 0 and 0.0 equal False but are defaults worth showing.
        empty = (
            d is None
            or d is False
            or d is argparse.SUPPRESS
            or (isinstance(d, str | list) and not d)
        )
        if "default" in text or action.required or empty:
            return text
        return super()._get_help_string(action)


def _arg_type(check: Any, kind: type = int) -> Any:
    """An argparse type: ``kind(text)``, then ``check`` (which raises ValueError)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        try:
            check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _target(text: str) -> str:
    try:
        check_target(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("target ")) from None
    return text


def _cli_model(text: str) -> str:
    try:
        return _model_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("model ")) from None


def _cli_version(text: str) -> str:
    try:
        return _model_version(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("model_version ")) from None


def _range(low: float, high: float | None = None) -> Any:
    def check(v: float) -> None:
        if not math.isfinite(v) or v < low or (high is not None and v > high):
            span = f">= {low:g}" if high is None else f"in [{low:g}, {high:g}]"
            raise ValueError(f"must be {span}, got {v:g}")

    return check


def _positive(v: float) -> None:
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"must be > 0, got {v:g}")


def _int_range(low: int, high: int | None = None) -> Any:
    def check(v: int) -> None:
        if v < low or (high is not None and v > high):
            span = f">= {low}" if high is None else f"in {low}..{high}"
            raise ValueError(f"must be {span}, got {v}")

    return check


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Talk to an lstm-serve server. Exit codes: 0 ok, 1 the server refused "
        "(CODE: message), 2 a bad argument, 130 interrupted.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, formatter_class=_Help)
        sp.add_argument(
            "--target", type=_target, default="127.0.0.1:50051", help="HOST:PORT of the server"
        )
        sp.add_argument(
            "--timeout",
            type=_arg_type(_positive, float),
            default=None,
            help="deadline in seconds (default: none)",
        )
        sp.add_argument(
            "--tls-ca",
            default=os.environ.get(TLS_CA_ENV) or None,
            help=f"PEM CA bundle: connect with TLS (default: ${TLS_CA_ENV}; a container's "
            "HEALTHCHECK picks it up this way)",
        )
        sp.add_argument("--tls-cert", default=None, help="PEM client certificate (mutual TLS)")
        sp.add_argument("--tls-key", default=None, help="PEM key of --tls-cert")
        sp.add_argument(
            "--token",
            default=os.environ.get(TOKEN_ENV) or None,
            help=f"bearer token (default: ${TOKEN_ENV})",
        )
        return sp

    def model_flags(sp: argparse.ArgumentParser, what: str, session: bool = False) -> None:
        # With --session, a request naming a model only checks that the session is pinned to
        # it (FAILED_PRECONDITION otherwise).
        pinned = "; with --session: the model it must be pinned to" if session else ""
        either = ", or with --session: the session's" if session else ""
        sp.add_argument(
            "--model",
            type=_cli_model,
            default="",
            help=f"the model {what}{pinned} (default: the server's default model{either})",
        )
        sp.add_argument(
            "--model-version",
            type=_cli_version,
            default="",
            help=f"the version of --model (default: its newest serving version{either})",
        )

    non_negative_int = _arg_type(_int_range(0))
    g = command("generate", "print a generated continuation of a prompt")
    g.add_argument("--prompt", required=True)
    g.add_argument(
        "--max-tokens",
        type=_arg_type(_int_range(1)),
        default=100,
        help="tokens to generate",
    )
    g.add_argument(
        "--temperature",
        type=_arg_type(_range(0.0), float),
        default=0.0,
        help="0 = greedy",
    )
    g.add_argument("--top-k", type=non_negative_int, default=0, help="0 = off")
    g.add_argument("--top-p", type=_arg_type(_range(0.0, 1.0), float), default=0.0, help="0 = off")
    g.add_argument(
        "--seed",
        type=_arg_type(_int_range(0, _UINT64 - 1)),
        default=None,
        help="sampling seed (default: random)",
    )
    g.add_argument(
        "--stop", action="append", default=[], help="stop string (repeatable; default: none)"
    )
    g.add_argument("--session", default="", help="continue this session (default: ephemeral)")
    model_flags(g, "to generate with", session=True)
    s = command(
        "step",
        "feed text to a session and print the top next tokens, or (--features) feed a sequence "
        "model rows of features and print each row's outputs",
    )
    given = s.add_mutually_exclusive_group(required=True)
    given.add_argument("--text", help="text for a token model")
    given.add_argument(
        "--features",
        metavar="FILE.csv|-",
        help="CSV rows of feature values for a sequence model (F numbers a line, an optional "
        "header of feature names; '-' reads stdin and steps each row as it arrives)",
    )
    s.add_argument(
        "--scaled",
        action="store_true",
        help="--features are already scaled (default: scale them as the model's info says)",
    )
    s.add_argument("--json", action="store_true", help="--features: print JSON lines")
    s.add_argument(
        "--session",
        default="",
        help="step this session (default: an ephemeral one, freed afterwards)",
    )
    s.add_argument(
        "--top-k",
        type=_arg_type(_int_range(1)),
        default=5,
        help="how many of the most probable next tokens to print",
    )
    model_flags(s, "of the ephemeral session", session=True)
    json_help = "print JSON instead of text"
    command("health", "exit 0 only when the server is SERVING").add_argument(
        "--json", action="store_true", help=json_help
    )
    i = command("info", "describe a served model")
    model_flags(i, "to describe")
    i.add_argument("--json", action="store_true", help=json_help + " (vocab and config whole)")
    c = command("create", "create a session and print its id")
    c.add_argument("--session-id", default="", help="the id to use (default: the server picks)")
    c.add_argument(
        "--idle-timeout-s",
        type=_arg_type(_range(0.0), float),
        default=0.0,
        help="close it after this many idle seconds (0 = the server's setting)",
    )
    model_flags(c, "to pin the session to")
    e = command("export", "write a session's record to a file")
    e.add_argument("--session", required=True)
    e.add_argument("--out", required=True, help="file to write the record to")
    m = command("import", "create a session from an exported record")
    m.add_argument("--record", required=True, help="file written by export")
    m.add_argument("--session-id", default="", help="the new id (default: the record's)")
    f = command("fork", "copy a session under a new id")
    f.add_argument("--session", required=True)
    f.add_argument("--new-session-id", default="", help="the copy's id (default: the server picks)")
    ms = command(
        "models",
        "list the models and their versions' states; 'models load NAME' / 'models unload NAME' "
        "load or retire one (a server in --model-control-mode explicit)",
    )
    ms.add_argument(
        "action",
        nargs="?",
        choices=("list", "load", "unload"),
        default="list",
        metavar="ACTION",
        help="list, load NAME or unload NAME",
    )
    ms.add_argument("name", nargs="?", default="", metavar="NAME", help="the model to (un)load")
    ms.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ss = command(
        "sessions",
        "list your sessions ('sessions list'), or describe, close or reset one ('sessions get "
        "ID', 'sessions close ID', 'sessions reset ID')",
    )
    ss.add_argument(
        "action",
        nargs="?",
        choices=SESSION_ACTIONS,
        default="list",
        metavar="ACTION",
        help="list, get ID, close ID or reset ID",
    )
    ss.add_argument("session", nargs="?", default="", metavar="ID", help="the session")
    ss.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "models":  # as argparse reports a usage error: one line, exit 2
        see = f" (see {PROG} models --help)"
        if args.action == "list" and args.name:
            _fail(f"unrecognized arguments: {args.name}{see}", 2)
        if args.action != "list" and not args.name:
            _fail(f"models {args.action} needs the model's NAME{see}", 2)
    if args.command == "sessions":
        see = f" (see {PROG} sessions --help)"
        if args.action == "list" and args.session:
            _fail(f"unrecognized arguments: {args.session}{see}", 2)
        if args.action != "list" and not args.session:
            _fail(f"sessions {args.action} needs the session's ID{see}", 2)
    try:
        with LstmClient(
            args.target,
            timeout=args.timeout,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            token=args.token,
        ) as client:
            code = _run(client, args)
    except grpc.RpcError as e:
        code_ = e.code() if hasattr(e, "code") else None
        details = e.details() if hasattr(e, "details") else str(e)
        name = code_.name if code_ is not None else "UNKNOWN"
        _fail(f"{name}: {details}", 1)
    except ValueError as e:  # the library's own argument checks: a usage error
        _fail(" ".join(str(e).split()), 2)
    except BrokenPipeError:
        # The reader went away (lstm-client generate ... | head -c 20): it had what it wanted,
        # so exit 0 without a word. Python's advice: point stdout at devnull, or the flush at
        # exit fails again and prints "Exception ignored ... BrokenPipeError".
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
    except OSError as e:  # --tls-ca/--record/--out that cannot be read or written
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        _fail(f"{e.strerror or e}{where}", 1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code)


def _fail(message: str, code: int) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(code)


def _run(client: LstmClient, args: argparse.Namespace) -> int:
    # --model / --model-version (on the commands that have them) as keyword arguments.
    model: dict[str, Any] = {
        "model": getattr(args, "model", ""),
        "model_version": getattr(args, "model_version", ""),
    }
    if args.command == "generate":
        for resp in client.generate(
            args.prompt,
            args.max_tokens,
            session_id=args.session,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=args.stop,
            **model,
        ):
            sys.stdout.write(resp.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    if args.command == "step" and args.features is not None:
        return _step_features(client, args, model)
    if args.command == "step":
        if args.session:
            resp = client.step(
                args.session, text=args.text, output="top_k", top_k=args.top_k, **model
            )
            label = args.session
        else:
            # An ephemeral session owned by the stream: the server frees it when the stream
            # closes, so a one-off step leaves nothing behind.
            with client.step_stream(**model) as stream:
                resp = stream.step(text=args.text, output="top_k", top_k=args.top_k)
            label = "(ephemeral)"
        print(f"session {label} steps={resp.steps}")
        for t in resp.top:
            print(f"{t.token!r}\t{t.token_id}\t{t.probability:.4f}")
        return 0
    if args.command == "health":
        status = client.health()
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        print(json.dumps({"status": name}) if args.json else name)
        return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1
    if args.command == "info":
        info = model_info_dict(client.model_info(**model))
        print(json.dumps(info, indent=2) if args.json else format_model_info(info))
        return 0
    if args.command == "sessions":
        return _sessions(client, args)
    if args.command == "create":
        created = client._create_session(args.idle_timeout_s, args.session_id, **model)
        print(created.session_id)
        # stdout stays the id alone (sid=$(lstm-client create)); the pin goes to stderr.
        print(f"model {created.model_name} version {created.model_version}", file=sys.stderr)
        return 0
    if args.command == "models":
        if args.action == "list":
            listed = client.list_models()
            if args.json:
                print(json.dumps(asdict(listed), indent=2))
            else:
                print(format_models(listed.models, listed.model_control_mode))
            return 0
        change = client.load_model if args.action == "load" else client.unload_model
        changed = change(args.name)
        print(json.dumps(asdict(changed), indent=2) if args.json else format_models([changed]))
        return 0
    if args.command == "export":
        record = client.export_session(args.session)
        with open(args.out, "wb") as out:
            out.write(record)
        print(f"wrote {len(record)} bytes to {args.out}")
        return 0
    if args.command == "import":
        with open(args.record, "rb") as src:
            print(client.import_session(src.read(), args.session_id))
        return 0
    if args.command == "fork":
        print(client.fork_session(args.session, args.new_session_id))
        return 0
    return 2


def _step_features(client: LstmClient, args: argparse.Namespace, model: dict[str, Any]) -> int:
    """``step --features``: rows from the CSV, stepped in chunks as they are read (one row at
    a time from stdin, so a pipe's rows are answered as they come), each row's outputs printed
    in the data's units: a header and tab-separated lines, or JSON lines with ``--json``."""
    meta = client.sequence_model(args.session, **model)
    src = sys.stdin if args.features == "-" else open(args.features, encoding="utf-8")  # noqa: SIM115
    chunk = 1 if args.features == "-" else meta.max_rows
    names = meta.output_names
    printed = 0
    stream = (
        None if args.session else client.step_stream(model=meta.name, model_version=meta.version)
    )

    def flush(rows: list[list[float]]) -> None:
        nonlocal printed
        x = np.asarray(rows, np.float64)
        x = x.astype(np.float32) if args.scaled else meta.scale(x)
        if stream is None:
            r = client.step(args.session, features=x, output="all")
        else:
            r = stream.step(features=x, output="all")
        for row in meta.unscale(_rows(r.outputs)).tolist():
            if args.json:
                print(json.dumps({"row": printed, **dict(zip(names, row, strict=True))}))
            else:
                print(f"{printed}\t" + "\t".join(f"{v:.8g}" for v in row))
            printed += 1
        sys.stdout.flush()

    try:
        if not args.json:
            print("row\t" + "\t".join(names))
        pending: list[list[float]] = []
        for values in read_feature_csv(iter(src), meta.feature_names):
            pending.append(values)
            if len(pending) >= chunk:
                flush(pending)
                pending = []
        if pending:
            flush(pending)
        if stream is not None:
            stream.close()
    except BaseException:
        if stream is not None:
            stream.cancel()
        raise
    finally:
        if src is not sys.stdin:
            src.close()
    if printed == 0:
        raise ValueError(f"{args.features}: no rows of features")
    return 0


def _sessions(client: LstmClient, args: argparse.Namespace) -> int:
    sid = args.session
    if args.action == "list":
        listed = client.list_sessions()
        if args.json:
            print(json.dumps([asdict(x) for x in listed], indent=2))
        else:
            print(format_sessions(listed))
    elif args.action == "get":
        got = SessionSummary.from_pb(client.get_session(sid))
        print(json.dumps(asdict(got), indent=2) if args.json else format_session(got))
    elif args.action == "close":
        client.close_session(sid)
        print(f"closed {sid}")
    else:
        client.reset_session(sid)
        print(f"reset {sid}")
    return 0


def _utc(unix_s: float) -> str:
    return datetime.datetime.fromtimestamp(unix_s, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_sessions(sessions: Sequence[SessionSummary], now: float | None = None) -> str:
    """``sessions`` as the table ``lstm-client sessions list`` prints: oldest first, idle
    seconds since the last use, creation time in UTC."""
    if not sessions:
        return "no sessions"
    now = time.time() if now is None else now
    head = ("SESSION", "MODEL", "VERSION", "STEPS", "IDLE_S", "TIMEOUT_S", "BUSY", "CREATED")
    rows = [head]
    for x in sorted(sessions, key=lambda x: (x.created_unix_s, x.session_id)):
        rows.append(
            (
                x.session_id,
                x.model_name,
                x.model_version,
                str(x.steps),
                f"{max(0.0, now - x.last_used_unix_s):.0f}",
                f"{x.idle_timeout_s:g}",
                "yes" if x.busy else "no",
                _utc(x.created_unix_s),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    right = {3, 4, 5}
    out = [
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]
    out.append(f"({len(sessions)} session{'s' if len(sessions) != 1 else ''})")
    return "\n".join(out)


def format_session(x: SessionSummary, now: float | None = None) -> str:
    """One session as ``lstm-client sessions get`` prints it."""
    now = time.time() if now is None else now
    idle = max(0.0, now - x.last_used_unix_s)
    lines = [
        ("session", x.session_id),
        ("model", f"{x.model_name} version {x.model_version}"),
        ("steps", str(x.steps)),
        ("created", _utc(x.created_unix_s)),
        ("last used", f"{_utc(x.last_used_unix_s)} ({idle:.0f} s ago)"),
        ("idle timeout", f"{x.idle_timeout_s:g} s"),
        ("state", f"{x.state_bytes} bytes"),
        ("busy", "yes" if x.busy else "no"),
        ("can continue", "yes" if x.has_next_distribution else "no (no token fed yet)"),
    ]
    return "\n".join(f"{k:<13}{v}" for k, v in lines)


def model_info_dict(m: Any) -> dict[str, Any]:
    """A ``GetModelInfoResponse`` as plain JSON types: the vocabulary as a list, the config
    parsed (left as a string if it is not JSON), the limits grouped."""
    try:
        config: Any = json.loads(m.config_json) if m.config_json else {}
    except ValueError:
        config = m.config_json
    return {
        "name": m.name,
        "version": m.version,
        "provider": m.provider,
        "num_layers": m.num_layers,
        "hidden_size": m.hidden_size,
        "vocab_size": len(m.vocab),
        "vocab": list(m.vocab),
        "unk_id": m.unk_id,
        "preprocess": m.preprocess,
        "state_bytes_per_session": m.state_bytes_per_session,
        "limits": {
            "max_prompt_tokens": m.max_prompt_tokens,
            "max_new_tokens": m.max_new_tokens,
            "max_sessions": m.max_sessions,
            "max_batch_size": m.max_batch_size,
        },
        "config": config,
    }


def format_model_info(info: dict[str, Any]) -> str:
    """:func:`model_info_dict` as ``lstm-client info`` prints it: a line per fact, the
    vocabulary's first tokens only (``--json`` has it whole)."""
    vocab: list[str] = info["vocab"]
    preview = " ".join(json.dumps(t) for t in vocab[:VOCAB_PREVIEW])
    more = f" ... ({len(vocab) - VOCAB_PREVIEW} more)" if len(vocab) > VOCAB_PREVIEW else ""
    limits = " ".join(f"{k}={v}" for k, v in info["limits"].items())
    state = info["state_bytes_per_session"]
    lines = [
        ("model", f"{info['name']} version {info['version']}"),
        ("provider", info["provider"]),
        ("layers", f"{info['num_layers']} x LSTM, hidden size {info['hidden_size']}"),
        ("vocabulary", f"{len(vocab)} tokens: {preview}{more}"),
        ("unknown id", str(info["unk_id"])),
        ("preprocess", info["preprocess"] or "(none)"),
        ("state", f"{state} bytes per session ({state / 1024:.1f} KiB)"),
        ("limits", limits),
    ]
    return "\n".join(f"{k:<11}{v}" for k, v in lines)


def format_models(models: Sequence[ModelStatus], control_mode: str = "") -> str:
    """``models`` as the table ``lstm-client models`` prints: a row per version (``*`` marks
    the default model), memory in MiB, the reason last when there is one."""
    head = ("MODEL", "POLICY", "VERSION", "STATE", "SESSIONS", "MEMORY_MIB", "REASON")
    rows: list[tuple[str, tuple[str, ...]]] = []  # (the default's mark, the cells)
    for m in models:
        mark = "*" if m.is_default else " "
        for v in m.versions or (None,):
            if v is None:  # a model whose versions the server does not list
                rows.append((mark, (m.name, m.version_policy, "-", "-", "-", "-", "")))
                continue
            cells = (
                m.name,
                m.version_policy,
                v.version,
                v.state,
                str(v.sessions),
                f"{v.memory_bytes / _MIB:.2f}",
                " ".join(v.reason.split()),  # one line per row, whatever the reason holds
            )
            rows.append((mark, cells))
    table = [(" ", head), *rows]
    widths = [max(len(cells[i]) for _, cells in table) for i in range(len(head))]
    right = {4, 5}  # numbers align right

    def line(mark: str, cells: tuple[str, ...]) -> str:
        padded = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return f"{mark} " + "  ".join(padded).rstrip()

    out = [line(mark, cells) for mark, cells in table]
    notes = ["* = the default model"] if any(m.is_default for m in models) else []
    if control_mode:
        notes.append(f"model control mode: {control_mode}")
    if notes:
        out.append("(" + "; ".join(notes) + ")")
    return "\n".join(out)


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


if __name__ == "__main__":
    main()
