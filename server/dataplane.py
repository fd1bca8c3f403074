"""The protocol-neutral core: sessions, steps and generations in plain Python types.

Transports (the gRPC servicer today; a KServe-v2 one would sit beside it) convert their messages
to these calls and map :mod:`server.errors` to their status codes. Every request that touches a
session holds it exclusively (:class:`~server.errors.Busy` for a second one) and, if it fails or
is cancelled, puts the session's state back as it was before the request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import msgpack
import numpy as np

from contract.model import KIND_TOKEN_LM, ModelSpec, Scaling

from .batch import SlotSnapshot
from .durable import Durable, session_record
from .engine import Engine, Generation, StepWork
from .errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    ResourceExhausted,
    Unavailable,
)
from .runtime import ModelRuntime
from .sessions import RECENT_REQUESTS, SESSION_ID, Remembered, Session, SessionStore
from .state.record import ModelIdentity, RecordError, Request, SessionRecord

MAX_STOPS = 8
MAX_STOP_CHARS = 64
# Bytes of request outcomes a durable record keeps (the newest first); an outcome that does not
# fit is kept as "applied" only, and a retry of it after a restart or failover is told so.
RECENT_RECORD_BYTES = 32 * 1024


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int
    max_new_tokens: int
    max_sessions: int
    max_batch_size: int


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    steps: int
    created_unix_s: float
    last_used_unix_s: float
    idle_timeout_s: float
    state_bytes: int
    busy: bool
    has_next_distribution: bool
    model_name: str = ""
    model_version: str = ""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    provider: str
    vocab: tuple[str, ...]
    num_layers: int
    hidden_size: int
    preprocess: str
    unk_id: int
    config_json: str
    limits: Limits
    state_bytes_per_session: int
    # The model kind ("token_lm" or "sequence"); the rest describe a sequence model only (a
    # token model's are empty): what a client sends (F features, in this order, scaled by
    # ``scaling``) and what it gets back (O outputs).
    kind: str = KIND_TOKEN_LM
    feature_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    scaling: Scaling | None = None


@dataclass(frozen=True)
class StepResult:
    session_id: str
    # The model's rows for the fed positions, float32: logits [positions, V] of a token model,
    # outputs [positions, O] of a sequence model (a transport names them by the input it sent);
    # None for top-k output.
    logits: np.ndarray | None
    top: list[tuple[int, str, float]]  # (token id, token text, probability), most probable first
    tokens_consumed: int
    steps: int
    model_version: str = ""  # the version that computed it ("" when recalled from a record)


@dataclass(frozen=True)
class GenerateParams:
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)


@dataclass(frozen=True)
class GenerateChunk:
    session_id: str
    text: str
    token_ids: list[int]
    generated_tokens: int
    prompt_tokens: int
    finish_reason: str | None  # "length" | "stop" on the last chunk


# ListSessions: the page size when the request names none, and the most one page holds.
SESSIONS_PAGE = 1000

OUTPUT_LAST = "last"
OUTPUT_ALL = "all"
OUTPUT_TOP_K = "top_k"

OutcomeT = TypeVar("OutcomeT", StepResult, GenerateChunk)


# --- request ids: what a retry is compared with, and the outcomes a durable record keeps -------


def _digest(*parts: object) -> bytes:
    return hashlib.sha256(msgpack.packb(parts, use_bin_type=True)).digest()[:16]


def step_digest(ids: np.ndarray, output: str, top_k: int) -> bytes:
    """A step's payload as a request id's retry must repeat it (text counts as its tokens; a
    StepStream message and a Step with the same payload are the same request; a sequence
    model's feature rows count as their float32 bytes)."""
    if ids.ndim == 2:
        return _digest("features", np.asarray(ids, "<f4").tobytes(), ids.shape[1], output)
    return _digest("step", np.asarray(ids, "<i8").tobytes(), output, int(top_k))


def generate_digest(ids: np.ndarray | None, params: GenerateParams) -> bytes:
    """A Generate's payload as a request id's retry must repeat it."""
    prompt = b"" if ids is None else np.asarray(ids, "<i8").tobytes()
    return _digest(
        "generate",
        prompt,
        int(params.max_tokens),
        float(params.temperature),
        int(params.top_k),
        float(params.top_p),
        params.seed,
        list(params.stop),
    )


def encode_outcome(outcome: object) -> bytes:
    """A remembered outcome as a durable record keeps it (b"" for anything else)."""
    if isinstance(outcome, StepResult):
        lg = outcome.logits
        return msgpack.packb(
            [
                "step",
                None if lg is None else np.ascontiguousarray(lg, "<f4").tobytes(),
                0 if lg is None else int(lg.shape[0]),
                [[int(i), t, float(p)] for i, t, p in outcome.top],
                outcome.tokens_consumed,
                outcome.steps,
            ],
            use_bin_type=True,
        )
    if isinstance(outcome, GenerateChunk):
        return msgpack.packb(
            [
                "generate",
                outcome.text,
                list(outcome.token_ids),
                outcome.generated_tokens,
                outcome.prompt_tokens,
                outcome.finish_reason,
            ],
            use_bin_type=True,
        )
    return b""


def decode_outcome(session_id: str, blob: bytes) -> StepResult | GenerateChunk:
    """:func:`encode_outcome`'s inverse. Raises ValueError (or msgpack's errors) on bad bytes."""
    item = msgpack.unpackb(blob, raw=False)
    if item[0] == "step":
        _, raw, positions, top, consumed, steps = item
        logits = None
        if raw is not None:
            logits = np.frombuffer(raw, "<f4").astype(np.float32).reshape(positions, -1)
        return StepResult(
            session_id, logits, [(int(i), t, float(p)) for i, t, p in top], consumed, steps
        )
    if item[0] == "generate":
        _, text, token_ids, generated, prompt_tokens, finish = item
        return GenerateChunk(session_id, text, list(token_ids), generated, prompt_tokens, finish)
    raise ValueError(f"unknown outcome kind {item[0]!r}")


@dataclass(frozen=True)
class Caller:
    """Who makes a request, and until when it may still change anything.

    ``principal``: the authenticated client ("" when authentication is off; then every client
    is the same principal). ``deadline``: ``time.monotonic()`` value after which the client has
    given up (None: no deadline); a request never commits a change after it.
    """

    principal: str = ""
    deadline: float | None = None

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


ANONYMOUS = Caller()


# A model version's state (server/models.py has the life cycle).
LOADING = "LOADING"
READY = "READY"
RETIRING = "RETIRING"
UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class ModelRef:
    """What a request names: a model (empty = the default one) and a version (empty = its
    newest READY one)."""

    name: str = ""
    version: str = ""

    def describe(self) -> str:
        return f"{self.name or '(default)'} version {self.version or '(newest)'}"


ANY_MODEL = ModelRef()


@dataclass(frozen=True)
class VersionStatus:
    version: str
    state: str
    reason: str = ""
    sessions: int = 0
    memory_bytes: int = 0


@dataclass(frozen=True)
class ModelStatus:
    name: str
    version_policy: str
    versions: tuple[VersionStatus, ...]
    is_default: bool


class Stream(Protocol):
    """A step stream, as a transport sees it (local :class:`StepStream` or a remote one)."""

    @property
    def session_id(self) -> str: ...

    async def step(
        self,
        *,
        text: str = "",
        token_ids: Sequence[int] = (),
        output: str = OUTPUT_LAST,
        top_k: int = 0,
        caller: Caller | None = None,
        request_id: str = "",
        features: np.ndarray | None = None,
    ) -> StepResult: ...

    async def close(self, reason: str = "closed") -> None: ...


class Plane(Protocol):
    """The data plane as a transport sees it: :class:`DataPlane` in this process, or
    :class:`server.frontend.RemotePlane` over the engine process. Raises :mod:`server.errors`."""

    draining: bool

    @property
    def in_flight(self) -> int: ...

    async def wait_idle(self, timeout: float) -> bool: ...

    async def model_info(self, model: ModelRef = ANY_MODEL) -> ModelInfo: ...

    async def create_session(
        self,
        idle_timeout_s: float = 0.0,
        session_id: str = "",
        *,
        caller: Caller = ANONYMOUS,
        model: ModelRef = ANY_MODEL,
    ) -> SessionInfo: ...

    async def close_session(self, session_id: str, *, caller: Caller = ANONYMOUS) -> None: ...

    async def reset_session(self, session_id: str, *, caller: Caller = ANONYMOUS) -> None: ...

    async def get_session(self, session_id: str, *, caller: Caller = ANONYMOUS) -> SessionInfo: ...

    async def list_sessions(
        self, page_size: int = 0, page_token: str = "", *, caller: Caller = ANONYMOUS
    ) -> tuple[list[SessionInfo], str]: ...

    async def step(
        self,
        session_id: str,
        *,
        text: str = "",
        token_ids: Sequence[int] = (),
        output: str = OUTPUT_LAST,
        top_k: int = 0,
        caller: Caller = ANONYMOUS,
        request_id: str = "",
        model: ModelRef = ANY_MODEL,
        features: np.ndarray | None = None,
    ) -> StepResult: ...

    async def open_stream(
        self, session_id: str = "", *, caller: Caller = ANONYMOUS, model: ModelRef = ANY_MODEL
    ) -> Stream: ...

    async def export_session(self, session_id: str, *, caller: Caller = ANONYMOUS) -> bytes: ...

    async def import_session(
        self, data: bytes, session_id: str = "", *, caller: Caller = ANONYMOUS
    ) -> str: ...

    async def fork_session(
        self, session_id: str, new_session_id: str = "", *, caller: Caller = ANONYMOUS
    ) -> str: ...

    def generate(
        self,
        session_id: str,
        prompt: str,
        params: GenerateParams,
        *,
        caller: Caller = ANONYMOUS,
        request_id: str = "",
        model: ModelRef = ANY_MODEL,
    ) -> AsyncGenerator[GenerateChunk, None]: ...

    async def list_models(self) -> tuple[str, list[ModelStatus]]: ...

    async def load_model(self, name: str, *, caller: Caller = ANONYMOUS) -> ModelStatus: ...

    async def unload_model(self, name: str, *, caller: Caller = ANONYMOUS) -> ModelStatus: ...


class Admission:
    """Counts the requests (and open streams) in flight, refuses new ones while draining, and
    lets the drain wait for the last to finish. Shared by the local and the remote plane."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def _admit(self) -> None:
        if self.draining:
            raise Unavailable("server is draining (shutting down); retry on another replica")
        self.in_flight += 1
        self._idle.clear()

    def request_done(self) -> None:
        """A request (or stream) that was admitted is over."""
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if ``timeout`` seconds passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False


class DataPlane(Admission):
    """Session lifecycle, Step, streams and Generate over an engine and a session store.

    The store owns sessions (ids, slots, busy flags); the engine owns their state and decides
    how each step runs. ``in_flight`` counts open requests (streams between messages included).
    """

    def __init__(
        self,
        runtime: ModelRuntime,
        store: SessionStore,
        engine: Engine,
        limits: Limits,
        durable: Durable | None = None,
        *,
        max_sessions_per_principal: int = 0,
        rate_limit_rps: float = 0.0,
        expose_build_info: bool = False,
    ) -> None:
        self.runtime = runtime
        self.expose_build_info = expose_build_info
        # A token model's spec; a sequence model's plane (server/sequence.py) overrides every
        # method that reads it.
        self.spec: ModelSpec = runtime.spec  # type: ignore[assignment]
        self.store = store
        self.engine = engine
        self.durable = durable
        self.max_sessions_per_principal = max_sessions_per_principal
        self.rate_limit_rps = rate_limit_rps
        self._buckets: dict[str, tuple[float, float]] = {}
        # The rate limit's clock (monotonic seconds; tests may set their own).
        self.clock: Callable[[], float] = time.monotonic
        # Sessions a principal holds, for the quota. Several versions' planes share one count
        # (and one rate-limit bucket) when the model repository sets them (server/models.py).
        self.owned_by: Callable[[str], int] = store.owned_by
        self._model_info: ModelInfo | None = None
        # A principal's sessions, for ListSessions: this plane's, or every loaded version's when
        # the model repository sets it (server/models.py), like ``owned_by``.
        self.sessions_of: Callable[[str], list[SessionInfo]] = self.sessions_here
        # Set when this plane's model version has been unloaded (server/models.py): a request
        # still reaching it (an open stream's next message) gets this error for its session.
        self.gone: Callable[[str], FailedPrecondition] | None = None
        self.model_identity = ModelIdentity(runtime.name, runtime.version, runtime.checksum)
        self.limits = limits
        super().__init__()
        self._table: tuple[str, ...] = ()
        if isinstance(self.spec, ModelSpec):
            # Token id -> text as the client sees it (the unknown token prints as nothing).
            self._table = tuple(
                "" if i == self.spec.unk_id else t for i, t in enumerate(self.spec.vocab)
            )

    # --- admission -----------------------------------------------------------------------------

    def _enter(self, caller: Caller, *, counted: bool = True) -> None:
        """Admit a request; ``counted``: it takes a token of the caller's rate limit (opening a
        step stream does not: each of its messages does, see :meth:`_rate`)."""
        if counted:
            self._rate(caller)
        self._admit()

    def _rate(self, caller: Caller) -> None:
        """Count one request (a unary call, a Generate, a StepStream message) against the
        caller's rate limit; :class:`ResourceExhausted` over it."""
        if self.rate_limit_rps > 0 and not self.draining:
            self._take_token(caller.principal)

    def _take_token(self, principal: str) -> None:
        # A token bucket per principal holding two seconds' worth of requests.
        rps = self.rate_limit_rps
        burst = max(1.0, 2.0 * rps)
        now = self.clock()
        tokens, last = self._buckets.get(principal, (burst, now))
        tokens = min(burst, tokens + (now - last) * rps)
        if tokens < 1.0:
            self._buckets[principal] = (tokens, now)
            raise ResourceExhausted(
                f"request rate over the limit for this principal (rate_limit_rps={rps:g}); "
                "retry later"
            )
        self._buckets[principal] = (tokens - 1.0, now)

    def _check_quota(self, caller: Caller) -> None:
        n = self.max_sessions_per_principal
        if n and self.owned_by(caller.principal) >= n:
            raise QuotaExceeded(
                f"session quota reached (max_sessions_per_principal={n}); close sessions first"
            )

    # --- sessions ------------------------------------------------------------------------------

    async def model_info(self) -> ModelInfo:
        """The model and the limits. ``config_json`` leaves out what the exporter recorded about
        the build (checkpoint and corpus SHA-256, library versions: facts for an attacker, not
        for a client) unless ``expose_build_info``. Built once: none of it changes."""
        if self._model_info is None:
            self._model_info = self._describe()
        return self._model_info

    def _describe_common(self) -> dict[str, Any]:
        """ModelInfo's fields that every model kind has."""

        def public(value: object) -> object:
            if not isinstance(value, dict):
                return value
            return {
                k: public(v)
                for k, v in value.items()
                if not (k == "versions" or k.endswith("sha256"))
            }

        s = self.runtime.spec
        config = dict(s.config) if self.expose_build_info else public(dict(s.config))
        return {
            "name": self.runtime.name,
            "version": self.runtime.version,
            "provider": self.runtime.provider,
            "num_layers": s.num_layers,
            "hidden_size": s.hidden_size,
            "config_json": json.dumps(config, sort_keys=True),
            "limits": self.limits,
            "state_bytes_per_session": s.state_bytes_per_session,
        }

    def _describe(self) -> ModelInfo:
        s = self.spec
        return ModelInfo(
            **self._describe_common(),
            vocab=s.vocab,
            preprocess=s.preprocess,
            unk_id=s.unk_id,
        )

    def _info(self, session: Session) -> SessionInfo:
        return SessionInfo(
            session_id=session.id,
            steps=session.steps,
            created_unix_s=session.created_wall,
            last_used_unix_s=session.last_used_wall(),
            idle_timeout_s=session.idle_timeout_s,
            state_bytes=self.engine.state_bytes_per_slot,
            busy=session.busy,
            has_next_distribution=self.engine.has_next(session.slot),
            model_name=self.runtime.name,
            model_version=self.runtime.version,
        )

    async def create_session(
        self, idle_timeout_s: float = 0.0, session_id: str = "", *, caller: Caller = ANONYMOUS
    ) -> SessionInfo:
        if not (idle_timeout_s >= 0 and math.isfinite(idle_timeout_s)):
            raise InvalidArgument(
                f"idle_timeout_s must be a finite number >= 0, got {idle_timeout_s}"
            )
        if session_id:
            self._check_new_id(session_id)
        self._enter(caller)
        try:
            self._check_quota(caller)
            session = self.store.create(
                idle_timeout_s or None, session_id=session_id, owner=caller.principal
            )
            await self._persist_new(session, caller)
            return self._info(session)
        finally:
            self.request_done()

    async def close_session(self, session_id: str, *, caller: Caller = ANONYMOUS) -> None:
        self._check_id(session_id)
        self._enter(caller)
        try:
            session = self._local(session_id, caller)
            if session is not None:
                self.store.close(session_id, owner=caller.principal)
            if self.durable is not None:
                if session is None:
                    record = await self.durable.load(session_id, caller.principal)
                    if record is None:
                        raise self._not_found(session_id, caller)
                await self.durable.delete(session_id, caller.principal)
            elif session is None:
                raise self._not_found(session_id, caller)
        finally:
            self.request_done()

    async def reset_session(self, session_id: str, *, caller: Caller = ANONYMOUS) -> None:
        self._check_id(session_id)
        self._enter(caller)
        try:
            session = await self.acquire(session_id, caller)
            snap = self.engine.snapshot(session.slot)
            self.engine.reset(session.slot)
            try:
                self._check_deadline(caller)
            except BaseException:
                self._restore(session, snap, None)
                raise
            await self._finish(session, snap, 0, caller=caller)
        finally:
            self.request_done()

    async def get_session(self, session_id: str, *, caller: Caller = ANONYMOUS) -> SessionInfo:
        self._check_id(session_id)
        self._enter(caller)
        try:
            session = self._local(session_id, caller)
            if self.durable is not None:
                # The store is the truth: another replica may have advanced the session since
                # this process last held it.
                record = await self.durable.load(session_id, caller.principal)
                # (A busy copy with no record may be a create that is still committing.)
                if (
                    record is None
                    and session is not None
                    and not (session.ephemeral or session.busy)
                ):
                    self.store.drop(session, "expired")
                    raise self._not_found(session_id, caller)
                if session is not None and (
                    session.ephemeral or record is None or record.version == session.version
                ):
                    return self._info(self.store.get(session_id, caller.principal))
                if session is not None and not session.busy:
                    self.store.drop(session)
                if record is not None:
                    return SessionInfo(
                        session_id=record.session_id,
                        steps=record.steps,
                        created_unix_s=record.created_unix_s,
                        last_used_unix_s=record.last_used_unix_s,
                        idle_timeout_s=record.idle_timeout_s,
                        state_bytes=self.engine.state_bytes_per_slot,
                        busy=False,
                        has_next_distribution=record.logits is not None,
                        model_name=record.model.name,
                        model_version=record.model.version,
                    )
            if session is None:
                raise self._not_found(session_id, caller)
            return self._info(self.store.get(session_id, caller.principal))
        finally:
            self.request_done()

    def sessions_here(self, principal: str) -> list[SessionInfo]:
        """``principal``'s sessions this plane holds in memory, ephemeral ones (owned by a step
        stream) left out."""
        return [self._info(s) for s in self.store.owned(principal) if not s.ephemeral]

    async def list_sessions(
        self, page_size: int = 0, page_token: str = "", *, caller: Caller = ANONYMOUS
    ) -> tuple[list[SessionInfo], str]:
        """One page of ``caller``'s sessions (:attr:`sessions_of`), ordered by id, and the token
        of the next page ("" after the last). ``page_size`` 0 means :data:`SESSIONS_PAGE`, and
        larger is capped there; ``page_token``: the previous page's last id (the page starts
        after it, so sessions created or closed meanwhile neither repeat nor shift others).
        Lists the sessions held in memory: with a durable store, sessions only in the store
        (created by another replica, or before a restart, and not used here since) are not
        listed."""
        if page_size < 0:
            raise InvalidArgument(f"page_size must be >= 0, got {page_size}")
        if len(page_token) > 128:
            raise InvalidArgument("page_token must be a session id (at most 128 characters)")
        self._enter(caller)
        try:
            mine = self.sessions_of(caller.principal)
        finally:
            self.request_done()
        size = min(page_size or SESSIONS_PAGE, SESSIONS_PAGE)
        after = sorted((i for i in mine if i.session_id > page_token), key=lambda i: i.session_id)
        page = after[:size]
        return page, (page[-1].session_id if len(after) > size else "")

    # --- durable sessions ------------------------------------------------------------------------

    @staticmethod
    def _check_new_id(session_id: str) -> None:
        if not SESSION_ID.match(session_id):
            more = "..." if len(session_id) > 64 else ""
            raise InvalidArgument(
                "a session id must be 16 to 128 characters of [A-Za-z0-9_-], got "
                f"{session_id[:64]!r}{more}"
            )

    def _not_found(self, session_id: str, caller: Caller = ANONYMOUS) -> NotFound:
        return NotFound(self.store.why_not_found(session_id, caller.principal))

    def _local(self, session_id: str, caller: Caller) -> Session | None:
        """``caller``'s session ``session_id`` if held here. Session ids are scoped per
        principal: another principal's session of the same id is another session, invisible
        here (no oracle for which ids another principal uses)."""
        return self.store.local(session_id, caller.principal)

    async def acquire(self, session_id: str, caller: Caller = ANONYMOUS) -> Session:
        """Hold ``session_id`` for one request of ``caller``, loading it from the durable store
        when this process does not hold it (after a restart, a failover or a move between
        replicas).

        Raises :class:`NotFound` (also for another principal's session), :class:`Busy`, or
        :class:`FailedPrecondition` (a record written for another model).
        """
        if self.durable is not None and self._local(session_id, caller) is None:
            record = await self.durable.load(session_id, caller.principal)
            # Another request may have loaded it while this one waited.
            if record is not None and self._local(session_id, caller) is None:
                self._adopt(record)
        return self.store.acquire(session_id, caller.principal)

    def _adopt(self, record: SessionRecord) -> Session:
        session = self.store.create(
            record.idle_timeout_s,
            session_id=record.session_id,
            created_wall=record.created_unix_s,
            owner=record.owner,
        )
        self.engine.load(session.slot, record.h, record.c, record.logits)
        session.steps = record.steps
        session.version = record.version
        if record.requests:
            # The request ids it remembers travel with it: a retry after a restart or on
            # another replica gets the first attempt's outcome.
            session.recent = collections.OrderedDict(
                (r.request_id, Remembered(r.digest, None, r.outcome)) for r in record.requests
            )
        return session

    async def _persist_new(self, session: Session, caller: Caller = ANONYMOUS) -> None:
        """Create ``session``'s record (version 1); :class:`AlreadyExists` if the id is taken.
        Nothing is created once ``caller``'s deadline has passed (:class:`DeadlineExceeded`)."""
        if caller.expired():
            self.store.drop(session, "closed")
            self._check_deadline(caller)
        if self.durable is None or session.ephemeral:
            return
        record = self.durable.record(session, self.engine, steps=session.steps, version=1)
        try:
            ok = await self.durable.commit(record, 0, caller.deadline)
        except BaseException:
            self.store.drop(session, "closed")
            raise
        if not ok:
            self.store.drop(session, "closed")
            raise AlreadyExists(f"session id {session.id[:64]!r} is taken")
        session.version = 1

    async def _finish(
        self,
        session: Session,
        snap: SlotSnapshot,
        steps: int,
        request_id: str = "",
        new: Remembered | None = None,
        caller: Caller = ANONYMOUS,
    ) -> None:
        """The end of a request that changed ``session`` (the caller holds it): commit its new
        state (durable store), count it (``steps``), remember its outcome under ``request_id``
        (``new``) and release the session. If the commit fails the session is put back as it
        was (``snap``; the local copy is dropped when the store may hold the new version).

        A cancellation (the client's deadline, a disconnect, a front end gone) never cuts this
        in two: once the write is out, the request waits for its outcome, so that the session's
        step count, state and request ids here agree with the store (a retry with the same
        request id then gets the committed outcome); then the cancellation goes on. The caller
        checked ``caller``'s deadline just before, and the write is not sent once it has passed
        (nothing is committed once the deadline is known to be past).
        """
        if self.durable is None or session.ephemeral:
            self._count(session, steps, request_id, new)
            return
        done = asyncio.ensure_future(
            self._commit_count(session, snap, steps, request_id, new, caller.deadline)
        )
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            while not done.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(done)
            if not done.cancelled():
                done.exception()  # seen: this request is cancelled whatever the commit did
            raise

    async def _commit_count(
        self,
        session: Session,
        snap: SlotSnapshot,
        steps: int,
        request_id: str,
        new: Remembered | None,
        deadline: float | None,
    ) -> None:
        try:
            await self._commit(
                session, steps=steps, request_id=request_id, new=new, deadline=deadline
            )
        except BaseException:
            self._restore(session, snap, None)
            raise
        self._count(session, steps, request_id, new)

    def _count(self, session: Session, steps: int, request_id: str, new: Remembered | None) -> None:
        session.steps = steps
        if request_id and new is not None:
            self.store.remember(session, request_id, new.outcome, new.digest, new.blob)
        self.store.release(session)

    async def _commit(
        self,
        session: Session,
        *,
        steps: int,
        request_id: str = "",
        new: Remembered | None = None,
        deadline: float | None = None,
    ) -> None:
        """Commit the session's state in the pool as its next version, before the response,
        with its recent request ids (and ``request_id``'s outcome ``new``); not once
        ``deadline`` has passed (:class:`DeadlineExceeded`, nothing written).

        On a lost race the local copy is dropped and :class:`Aborted` raised. When the commit
        fails otherwise (the store is unreachable, a bug, a cancellation) the store may or may
        not hold the new version, so the local copy is dropped too: the next request reads
        whichever the store has. The caller restores the slot.
        """
        if self.durable is None or session.ephemeral:
            return
        record = self.durable.record(
            session,
            self.engine,
            steps=steps,
            version=session.version + 1,
            requests=self._durable_requests(session, request_id, new),
        )
        try:
            ok = await self.durable.commit(record, session.version, deadline)
        except DeadlineExceeded:
            raise  # not sent: the local copy is still the store's
        except BaseException:
            self.store.drop(session)
            raise
        if not ok:
            self.store.drop(session)
            raise self.durable.aborted(session.id)
        session.version += 1

    @staticmethod
    def _durable_requests(
        session: Session, request_id: str, new: Remembered | None
    ) -> tuple[Request, ...]:
        """The recent requests a record keeps: the last RECENT_REQUESTS ids with their payload
        digests, and the outcomes of the newest ones that fit in RECENT_RECORD_BYTES (older or
        larger ones are kept as "applied" only)."""
        entries = list(session.recent.items()) if session.recent else []
        if request_id and new is not None:
            entries = [e for e in entries if e[0] != request_id] + [(request_id, new)]
        entries = entries[-RECENT_REQUESTS:]
        budget = RECENT_RECORD_BYTES
        kept: list[Request] = []
        for rid, r in reversed(entries):
            if r.blob is None:
                r.blob = encode_outcome(r.outcome)
            blob = r.blob if len(r.blob) <= budget else b""
            budget -= len(blob)
            kept.append(Request(rid, r.digest, blob))
        kept.reverse()
        return tuple(kept)

    async def export_session(self, session_id: str, *, caller: Caller = ANONYMOUS) -> bytes:
        """The session's record as bytes (its current state; nothing changes)."""
        self._check_id(session_id)
        self._enter(caller)
        try:
            session = await self.acquire(session_id, caller)
            try:
                return self._record_of(session, session.id).to_bytes()
            finally:
                self.store.release(session)
        finally:
            self.request_done()

    async def import_session(
        self, data: bytes, session_id: str = "", *, caller: Caller = ANONYMOUS
    ) -> str:
        """A new session from an exported record; its id (``session_id`` or the record's)."""
        try:
            record = SessionRecord.from_bytes(data)
        except RecordError as e:
            raise InvalidArgument(f"not a valid session record: {str(e)[:200]}") from None
        if record.model != self.model_identity:
            m = record.model
            raise InvalidArgument(
                f"the record was written for model {m.name} version {m.version} "
                f"(sha256 {m.checksum[:12]}...), not the one served here"
            )
        new_id = session_id or record.session_id
        self._check_new_id(new_id)
        spec = self.runtime.spec
        if record.h.shape != (spec.num_layers, spec.hidden_size):
            raise InvalidArgument("the record's state does not fit this model")
        self._enter(caller)
        try:
            return await self._create_from(record, new_id, caller)
        finally:
            self.request_done()

    async def fork_session(
        self, session_id: str, new_session_id: str = "", *, caller: Caller = ANONYMOUS
    ) -> str:
        """A copy of ``session_id`` under a new id; the original is unchanged."""
        self._check_id(session_id)
        if new_session_id:
            self._check_new_id(new_session_id)
        self._enter(caller)
        try:
            session = await self.acquire(session_id, caller)
            try:
                record = self._record_of(session, session.id)
            finally:
                self.store.release(session)
            return await self._create_from(record, new_session_id, caller)
        finally:
            self.request_done()

    def _record_of(self, session: Session, session_id: str) -> SessionRecord:
        record = session_record(
            session, self.engine, self.model_identity, steps=session.steps, version=session.version
        )
        return dataclasses.replace(record, session_id=session_id)

    async def _create_from(self, record: SessionRecord, session_id: str, caller: Caller) -> str:
        # The caller owns what it imports or forks, whoever owned the original.
        self._check_quota(caller)
        session = self.store.create(
            record.idle_timeout_s or None, session_id=session_id, held=True, owner=caller.principal
        )
        self.engine.load(session.slot, record.h, record.c, record.logits)
        session.steps = record.steps
        await self._persist_new(session, caller)
        self.store.release(session)
        return session.id

    @staticmethod
    def _check_id(session_id: str) -> None:
        if not session_id:
            raise InvalidArgument("session_id is empty")

    # --- input checks ------------------------------------------------------------------------

    def encode(self, text: str, token_ids: Sequence[int]) -> np.ndarray:
        """Exactly one of ``text``/``token_ids``; checked ids as int64. Raises InvalidArgument."""
        if text and len(token_ids):
            raise InvalidArgument("give either text or token_ids, not both")
        if text:
            if len(text) > 8 * self.limits.max_prompt_tokens:
                raise InvalidArgument(
                    f"text of {len(text)} characters is over the limit "
                    f"(max_prompt_tokens={self.limits.max_prompt_tokens})"
                )
            ids = np.asarray(self.spec.encode(text), np.int64)
            if ids.size == 0:
                raise InvalidArgument(
                    f"text is empty after normalisation (rule {self.spec.preprocess!r})"
                )
        elif len(token_ids):
            # Plain Python for the check: a step is usually a token or a few, where numpy's
            # per-call cost dominates.
            listed = list(token_ids)
            if min(listed) < 0 or max(listed) >= self.spec.vocab_size:
                bad = next(t for t in listed if not 0 <= t < self.spec.vocab_size)
                raise InvalidArgument(
                    f"token id {bad} is outside the vocabulary [0, {self.spec.vocab_size})"
                )
            ids = np.array(listed, np.int64)
        else:
            raise InvalidArgument("input is empty: give text or token_ids")
        if ids.size > self.limits.max_prompt_tokens:
            raise InvalidArgument(
                f"input of {ids.size} tokens is over max_prompt_tokens="
                f"{self.limits.max_prompt_tokens}"
            )
        return ids

    def check_step(
        self,
        text: str,
        token_ids: Sequence[int],
        output: str,
        top_k: int,
        features: np.ndarray | None = None,
    ) -> np.ndarray:
        """Validate a step's input and output choice; its ids. Raises InvalidArgument, or
        FailedPrecondition for features (a sequence model's input) on this token model."""
        if features is not None:
            raise self.wrong_kind("it takes no features (a 'sequence' model's input)")
        ids = self.encode(text, token_ids)
        self._check_output(output, top_k)
        return ids

    def wrong_kind(self, what: str) -> FailedPrecondition:
        """FailedPrecondition for a request this plane's model kind cannot serve (``what``
        says why), naming the model, its kind and what it takes."""
        r = self.runtime
        return FailedPrecondition(
            f"model {r.name!r} version {r.version} is a {r.kind!r} model: {what}; "
            f"{self.input_hint()}"
        )

    def input_hint(self) -> str:
        """What a step on this model takes, for messages."""
        return "send text or token_ids"

    def _check_output(self, output: str, top_k: int) -> None:
        if output not in (OUTPUT_LAST, OUTPUT_ALL, OUTPUT_TOP_K):
            raise InvalidArgument(f"unknown output {output!r}")
        if output == OUTPUT_TOP_K and not 1 <= top_k <= self.spec.vocab_size:
            raise InvalidArgument(f"top_k must be in 1..{self.spec.vocab_size}, got {top_k}")

    # --- steps ---------------------------------------------------------------------------------

    async def step(
        self,
        session_id: str,
        *,
        text: str = "",
        token_ids: Sequence[int] = (),
        output: str = OUTPUT_LAST,
        top_k: int = 0,
        caller: Caller = ANONYMOUS,
        request_id: str = "",
        features: np.ndarray | None = None,
    ) -> StepResult:
        """Feed input to an existing session; returns the requested view of the logits."""
        self._check_id(session_id)
        self._check_request_id(request_id)
        ids = self.check_step(text, token_ids, output, top_k, features)
        self._enter(caller)
        try:
            session = await self.acquire(session_id, caller)
            return await self.run_step(session, ids, output, top_k, caller, request_id)
        finally:
            self.request_done()

    async def run_step(
        self,
        session: Session,
        ids: np.ndarray,
        output: str,
        top_k: int,
        caller: Caller = ANONYMOUS,
        request_id: str = "",
    ) -> StepResult:
        """Feed checked ``ids`` to a session the caller holds (busy); releases it.

        On failure or cancellation the session's state is put back as it was. Nothing is
        committed once the caller's deadline has passed (:class:`DeadlineExceeded`). A
        ``request_id`` seen on this session before returns that request's result unchanged
        (:class:`InvalidArgument` when that request had another payload).
        """
        digest = step_digest(ids, output, top_k) if request_id else b""
        snap = self.engine.snapshot(session.slot)
        work = None
        try:
            earlier = self._recall(session, request_id, digest, StepResult)
            if earlier is not None:
                self.store.release(session)
                return earlier
            work = self.engine.submit_step(session.slot, ids, want_all=output == OUTPUT_ALL)
            logits = await work.future
            self._check_deadline(caller)
        except BaseException:
            self._restore(session, snap, work)
            raise
        top: list[tuple[int, str, float]] = []
        if output == OUTPUT_TOP_K:
            top = self._top_k(logits[-1], top_k)
        steps = session.steps + len(ids)
        result = StepResult(
            session.id,
            None if output == OUTPUT_TOP_K else logits,
            top,
            len(ids),
            steps,
            self.runtime.version,
        )
        new = Remembered(digest, result) if request_id else None
        await self._finish(session, snap, steps, request_id, new, caller)
        return result

    def _recall(
        self, session: Session, request_id: str, digest: bytes, kind: type[OutcomeT]
    ) -> OutcomeT | None:
        """The outcome ``request_id`` had on ``session``, if it is one of its recent requests.

        :class:`InvalidArgument` when the id was used for another payload; :class:`AlreadyExists`
        when the request was applied but its outcome was not kept (a record restored after a
        restart or failover keeps the newest outcomes that fit in RECENT_RECORD_BYTES).
        """
        r = self.store.recalled(session, request_id)
        if r is None:
            return None
        if r.digest != digest:
            raise InvalidArgument(
                f"request_id {request_id[:64]!r} was used on this session for another request "
                "(other input or parameters); a new request needs a new id"
            )
        if r.outcome is None and r.blob:
            with contextlib.suppress(Exception):  # a blob that does not decode: not kept
                r.outcome = decode_outcome(session.id, r.blob)
        if not isinstance(r.outcome, kind):
            raise AlreadyExists(
                f"request {request_id[:64]!r} was applied already (session "
                f"{session.id[:64]!r} is at step {session.steps}), but its outcome was not kept "
                f"across the restart (over the {RECENT_RECORD_BYTES} bytes of outcomes a "
                "session's record keeps); GetSession shows the session as it is"
            )
        return r.outcome

    @staticmethod
    def _check_deadline(caller: Caller) -> None:
        if caller.expired():
            raise DeadlineExceeded("the client's deadline passed before the request committed")

    @staticmethod
    def _check_request_id(request_id: str) -> None:
        if len(request_id) > 128:
            raise InvalidArgument(
                f"request_id has {len(request_id)} characters; at most 128 are allowed"
            )

    def _restore(
        self, session: Session, snap: SlotSnapshot, item: StepWork | Generation | None
    ) -> None:
        # Cancel the work and put the state back in one step under the engine's lock, so an
        # iteration in flight cannot write over the restored state.
        self.engine.abandon(item, session.slot, snap)
        self.store.release(session)

    def _top_k(self, logits: np.ndarray, k: int) -> list[tuple[int, str, float]]:
        x = logits.astype(np.float64)
        p = np.exp(x - x.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")[:k]
        return [(int(i), self.spec.vocab[i], float(p[i])) for i in order]

    async def open_stream(self, session_id: str = "", *, caller: Caller = ANONYMOUS) -> StepStream:
        """A step stream attached to ``session_id``, or owning a new ephemeral session.

        Opening it takes no token of the caller's rate limit: each message does."""
        self._enter(caller, counted=False)
        try:
            if session_id:
                session = await self.acquire(session_id, caller)  # loads it if held elsewhere
                self.store.release(session)
                self.store.attach(session)
                return StepStream(self, session, owned=False, caller=caller)
            self._check_quota(caller)
            ephemeral = self.store.create(ephemeral=True, owner=caller.principal)
            return StepStream(self, ephemeral, owned=True, caller=caller)
        except BaseException:
            self.request_done()
            raise

    # --- generation ------------------------------------------------------------------------------

    def check_generate(self, prompt: str, params: GenerateParams) -> np.ndarray | None:
        """Validate a Generate request; the prompt's ids (None when empty)."""
        if not 1 <= params.max_tokens <= self.limits.max_new_tokens:
            raise InvalidArgument(
                f"max_tokens must be in 1..max_new_tokens={self.limits.max_new_tokens}, "
                f"got {params.max_tokens}"
            )
        if not (params.temperature >= 0 and np.isfinite(params.temperature)):
            raise InvalidArgument(f"temperature must be >= 0, got {params.temperature}")
        if params.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0, got {params.top_k}")
        if not 0 <= params.top_p <= 1:
            raise InvalidArgument(f"top_p must be in [0, 1], got {params.top_p}")
        if len(params.stop) > MAX_STOPS:
            raise InvalidArgument(f"at most {MAX_STOPS} stop strings, got {len(params.stop)}")
        for s in params.stop:
            if not s or len(s) > MAX_STOP_CHARS:
                raise InvalidArgument(f"stop strings must have 1..{MAX_STOP_CHARS} characters")
        return self.encode(prompt, ()) if prompt else None

    async def generate(
        self,
        session_id: str,
        prompt: str,
        params: GenerateParams,
        *,
        caller: Caller = ANONYMOUS,
        request_id: str = "",
    ) -> AsyncGenerator[GenerateChunk, None]:
        """Stream a continuation; each chunk holds every token produced since the last one.

        On an existing session the state afterwards holds prompt + every generated token; an
        empty ``session_id`` uses an ephemeral session freed at the end. Close the iterator
        (``aclose``) when abandoning it: that cancels the generation and restores the session.
        """
        ids = self.check_generate(prompt, params)
        self._check_request_id(request_id)
        self._enter(caller)
        session: Session | None = None
        owned = not session_id
        snap: SlotSnapshot | None = None
        item: StepWork | Generation | None = None
        digest = b""
        ok = False
        try:
            if owned:
                self._check_quota(caller)
                session = self.store.create(ephemeral=True, held=True, owner=caller.principal)
            else:
                session = await self.acquire(session_id, caller)
                snap = self.engine.snapshot(session.slot)
                digest = generate_digest(ids, params) if request_id else b""
                earlier = self._recall(session, request_id, digest, GenerateChunk)
                if earlier is not None:
                    # A retry of a generation that completed: its whole outcome, once.
                    self.store.release(session)
                    ok = True
                    yield earlier
                    return
            prompt_tokens = 0 if ids is None else len(ids)
            logits: np.ndarray | None
            if ids is not None:
                item = self.engine.submit_step(session.slot, ids)
                logits = (await item.future)[-1]
            else:
                logits = self.engine.next_logits(session.slot)
            if logits is None:
                raise InvalidArgument(
                    "prompt is empty and the session has no next-token distribution yet "
                    "(feed it text first)"
                )
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            gen = Generation(
                session.slot,
                max_tokens=params.max_tokens,
                temperature=float(params.temperature),
                top_k=params.top_k,
                top_p=float(params.top_p),
                seed=seed,
                stops=params.stop,
                table=self._table,
            )
            item = gen
            self.engine.start_generation(gen, logits)
            first = True
            sent_ids: list[int] = []
            sent_text: list[str] = []
            while True:
                await gen.event.wait()
                gen.event.clear()
                delta = gen.drain()
                if delta is None:
                    continue
                sent_ids += delta.token_ids
                sent_text.append(delta.text)
                if delta.finish is not None:
                    # Commit and release before the last message: a client that reacts to it at
                    # once must find the session free, and an acknowledged generation durable.
                    self._check_deadline(caller)
                    steps = session.steps + prompt_tokens + gen.fed
                    if owned or snap is None:
                        session.steps = steps
                        self.store.end(session, "closed")
                        ok = True
                    else:
                        whole = GenerateChunk(
                            session.id,
                            "".join(sent_text),
                            list(sent_ids),
                            delta.generated,
                            prompt_tokens,
                            delta.finish,
                        )
                        new = Remembered(digest, whole) if request_id else None
                        # From here the session is _finish's: committed and released, or put
                        # back as it was (a failed commit), whatever happens to this request.
                        ok = True
                        await self._finish(session, snap, steps, request_id, new, caller)
                yield GenerateChunk(
                    session_id=session.id if first else "",
                    text=delta.text,
                    token_ids=delta.token_ids,
                    generated_tokens=delta.generated,
                    prompt_tokens=prompt_tokens if first else 0,
                    finish_reason=delta.finish,
                )
                first = False
                if delta.finish is not None:
                    return
        finally:
            if not ok:
                if session is not None and not owned and snap is not None:
                    self._restore(session, snap, item)
                else:
                    self.engine.abandon(item)
                    if session is not None:
                        self.store.end(session, "disconnected")
            self.request_done()


class StepStream:
    """One client's step stream: attached to a session, or owning an ephemeral one."""

    def __init__(
        self, plane: DataPlane, session: Session, *, owned: bool, caller: Caller = ANONYMOUS
    ) -> None:
        self.plane = plane
        self.session = session
        self.owned = owned
        self.caller = caller
        self.closed = False

    @property
    def session_id(self) -> str:
        return self.session.id

    async def step(
        self,
        *,
        text: str = "",
        token_ids: Sequence[int] = (),
        output: str = OUTPUT_LAST,
        top_k: int = 0,
        caller: Caller | None = None,
        request_id: str = "",
        features: np.ndarray | None = None,
    ) -> StepResult:
        """One message's step; ``caller`` defaults to the stream's (who opened it)."""
        caller = caller or self.caller
        plane = self.plane
        if plane.gone is not None:
            raise plane.gone(self.session.id)
        plane._check_request_id(request_id)
        ids = plane.check_step(text, token_ids, output, top_k, features)
        # Every message counts against the rate limit like a unary Step (over it, the stream
        # ends with RESOURCE_EXHAUSTED).
        plane._rate(caller)
        store = plane.store
        if self.owned:
            session = store.hold(self.session)
        else:
            session = await plane.acquire(self.session.id, caller)
        return await plane.run_step(session, ids, output, top_k, caller, request_id)

    async def close(self, reason: str = "closed") -> None:
        """End the stream; frees an owned session (``reason``: closed or disconnected)."""
        if self.closed:
            return
        self.closed = True
        if self.owned:
            self.plane.store.end(self.session, reason)
        else:
            self.plane.store.detach(self.session)
        self.plane.request_done()
