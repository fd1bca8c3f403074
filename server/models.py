"""Many models and versions in one engine process, and sessions pinned to their version.

:class:`Models` is the data plane the transports see (the :class:`~server.dataplane.Plane`
protocol, with a ``model`` argument where a request may name one). Each loaded version has its
own :class:`Version`: an ONNX Runtime session, a state pool, a session store, an engine (one
batch per version) and a :class:`~server.dataplane.DataPlane`. A request that names a session
goes to the version the session was created on, whatever has loaded since; a request that
creates one (or runs on an ephemeral one) goes to the model's newest READY version.

Life of a version::

    LOADING -> READY -> RETIRING -> (unloaded)
       \\-> failed (UNAVAILABLE with the reason; the versions already serving keep serving)

A version is validated (the ONNX contract, the SHA-256 its repository records, one smoke
inference) before any request can reach it. A READY version retires when it leaves its model's
version policy (a newer one loaded) or is unloaded: it takes no new sessions and stays for the
sessions pinned to it until they have all ended or ``version_drain_s`` has passed; then it is
unloaded, and a request on one of its sessions gets FAILED_PRECONDITION naming the session's
version and the one now serving. Durable records name their version, so after a restart a
session goes back to its version if that version is loaded again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.repository import (
    MANIFEST,
    MODEL_FILE,
    RepositoryError,
    VersionPolicy,
    model_names,
    read_policy,
    version_dir,
    versions,
)

from .dataplane import (
    ANONYMOUS,
    ANY_MODEL,
    LOADING,
    OUTPUT_LAST,
    READY,
    RETIRING,
    UNAVAILABLE,
    Caller,
    DataPlane,
    GenerateChunk,
    GenerateParams,
    ModelInfo,
    ModelRef,
    ModelStatus,
    SessionInfo,
    StepResult,
    Stream,
    VersionStatus,
)
from .engine import Engine
from .errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from .metrics import SchedulerStats
from .runtime import ModelLoadError, ModelRuntime
from .sessions import SessionStore, quote
from .state import StateStore
from .state.base import StoreError
from .state.record import RecordError, SessionRecord, storage_key

log = logging.getLogger("lstm_serve.models")

# Sessions of unloaded versions, remembered so that a request on one is told why it fails.
_GONE_MAX = 100_000
# The durable store's reachability probe (Models.store_reachable): a read of a key no record
# can have (':' is in no session id, '/' in every key that names an owner), answered from the
# last probe for STORE_PROBE_S, and given up on (unreachable) after STORE_PROBE_TIMEOUT_S.
STORE_PROBE_ID = "lstm-serve:probe"
STORE_PROBE_S = 1.0
STORE_PROBE_TIMEOUT_S = 2.0


@dataclass
class Version:
    """One loaded version of a model, with everything that serves it."""

    name: str
    version: str
    runtime: ModelRuntime
    store: SessionStore
    engine: Engine
    plane: DataPlane
    stats: SchedulerStats
    state: str = READY
    retire_deadline: float = 0.0  # clock time after which a RETIRING version is unloaded

    @property
    def number(self) -> int:
        return int(self.version) if self.version.isdigit() else 0

    def memory_bytes(self) -> int:
        """The model file (weights in memory) plus the state of the live sessions."""
        try:
            weights = self.runtime.location.path.stat().st_size
        except OSError:
            weights = 0
        return weights + self.store.state_bytes


@dataclass
class _Failure:
    fingerprint: tuple[int, ...]
    reason: str


@dataclass
class _Gone:
    name: str
    version: str
    owner: str


def _fingerprint(path: Path) -> tuple[int, ...]:
    """Changes when the version's files change (so a failed load is retried only then)."""
    out: list[int] = []
    for p in (path / MODEL_FILE, path.parent.parent / MANIFEST):
        try:
            st = p.stat()
            out += [st.st_mtime_ns, st.st_size]
        except OSError:
            out += [0, 0]
    return tuple(out)


Builder = Callable[[ModelRuntime], Version]
Loader = Callable[[str], ModelRuntime]


@dataclass
class _Model:
    name: str
    policy: VersionPolicy = field(default_factory=VersionPolicy)
    policy_error: str = ""
    unloaded: bool = False  # UnloadModel in explicit mode: nothing loads until LoadModel


class Models:
    """The engine's models: load, route, retire. Every method runs on the event loop thread.

    ``load(path)`` makes a validated :class:`ModelRuntime` (called in a worker thread);
    ``build(runtime)`` wires a :class:`Version` around it (app.py owns the wiring).
    ``repository``: serve every model in it; None: serve the one file ``single`` (no control).
    """

    def __init__(
        self,
        *,
        load: Loader,
        build: Builder,
        repository: Path | None,
        single: str = "",
        default_model: str = "",
        control_mode: str = "none",
        version_drain_s: float = 600.0,
        admins: frozenset[str] = frozenset(),
        auth: bool = False,
        durable_store: StateStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self._build = build
        self.repository = repository
        self.single = single
        self.default_name = default_model
        self.control_mode = control_mode if repository is not None else "none"
        self.version_drain_s = version_drain_s
        self.admins = admins
        self.auth = auth
        self.durable_store = durable_store
        self.clock = clock
        self.versions: dict[tuple[str, str], Version] = {}
        self._unloading: list[Version] = []  # out of routing, engine still running
        self.models: dict[str, _Model] = {}
        self._failures: dict[tuple[str, str], _Failure] = {}
        self._loading: set[tuple[str, str]] = set()
        # Keyed by (owner, session id): session ids are scoped per principal.
        self._gone: collections.OrderedDict[tuple[str, str], _Gone] = collections.OrderedDict()
        self._scan_lock = asyncio.Lock()
        self._draining = False
        # Sessions-ended counts of versions since unloaded (the metric stays monotonic).
        self.ended_unloaded: collections.Counter[str] = collections.Counter()
        # Shared by every version's plane: rate limits and quotas are per principal, not per
        # version.
        self.buckets: dict[str, tuple[float, float]] = {}
        self._store_ok = True
        self._store_probed_at = float("-inf")
        self._store_probe = asyncio.Lock()

    # --- admission (every version's plane counts its own requests) -----------------------------

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = value
        for v in [*self.versions.values(), *self._unloading]:
            v.plane.draining = value

    @property
    def in_flight(self) -> int:
        return sum(v.plane.in_flight for v in [*self.versions.values(), *self._unloading])

    async def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for v in [*self.versions.values(), *self._unloading]:
            if not await v.plane.wait_idle(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def owned_by(self, principal: str) -> int:
        return sum(v.store.owned_by(principal) for v in self.versions.values())

    def sessions_of(self, principal: str) -> list[SessionInfo]:
        """``principal``'s sessions on every loaded version (retiring ones included), for
        ListSessions (each version's plane lists through this, app.py sets it)."""
        return [i for v in self.versions.values() for i in v.plane.sessions_here(principal)]

    async def store_reachable(self) -> bool:
        """Whether the durable session store answers (True without one). Readiness follows it
        (health, KServe ServerReady): while it is down every create fails UNAVAILABLE. One probe
        (a read) per :data:`STORE_PROBE_S` at most, however many ask; a change is logged once."""
        store = self.durable_store
        if store is None:
            return True
        async with self._store_probe:
            if time.monotonic() - self._store_probed_at < STORE_PROBE_S:
                return self._store_ok
            why = ""
            try:
                await asyncio.wait_for(store.get(STORE_PROBE_ID), STORE_PROBE_TIMEOUT_S)
            except TimeoutError:
                why = f"no answer within {STORE_PROBE_TIMEOUT_S:g} s"
            except Exception as e:  # StoreError, or anything else the client raises
                why = " ".join(str(e).split()) or type(e).__name__
            self._store_probed_at = time.monotonic()
            ok = not why
            if ok != self._store_ok:
                if ok:
                    log.info("the session store %s answers again: ready", store.url)
                else:
                    log.error("the session store is unreachable (%s): not ready", why)
            self._store_ok = ok
            return ok

    # --- loading -------------------------------------------------------------------------------

    async def start(self) -> None:
        """The first load. Raises :class:`ModelLoadError` when the default model has no version
        that loads (a server that cannot answer today's clients does not start)."""
        if self.repository is None:
            version = await self._load_version_file(self.single)
            self.default_name = version.name
            self.models[version.name] = _Model(version.name)
            return
        names = model_names(self.repository)
        if not names:
            raise ModelLoadError(f"the model repository {self.repository} holds no model")
        if not self.default_name:
            self.default_name = names[0] if len(names) == 1 else "timemachine"
        if self.default_name not in names:
            raise ModelLoadError(
                f"the default model {self.default_name!r} is not in {self.repository} "
                f"(models: {', '.join(names)}); pass --default-model NAME"
            )
        if self.control_mode == "explicit":
            await self.scan([self.default_name])
        else:
            await self.scan()
        if not self._ready_versions(self.default_name):
            reasons = [
                f"version {v}: {f.reason}"
                for (n, v), f in sorted(self._failures.items())
                if n == self.default_name
            ]
            raise ModelLoadError(
                f"no version of the default model {self.default_name!r} could be loaded"
                + (f" ({'; '.join(reasons)})" if reasons else "")
            )

    async def _load_version_file(self, path: str) -> Version:
        loop = asyncio.get_running_loop()
        runtime = await loop.run_in_executor(None, self._load, path)
        version = self._build(runtime)
        version.plane.draining = self._draining
        self.versions[(version.name, version.version)] = version
        return version

    async def scan(self, names: Sequence[str] | None = None, *, force: bool = False) -> None:
        """Bring the given models (default: every model in the repository) to their policy.

        New versions the policy selects load (a version that fails is left out and the policy
        applies to the rest, so a broken newest version never replaces a serving one); READY
        versions the policy no longer selects retire. ``force`` retries versions whose earlier
        load failed even when their files have not changed.
        """
        assert self.repository is not None
        async with self._scan_lock:
            present = set(model_names(self.repository))
            for name in names if names is not None else sorted(present | set(self.models)):
                await self._scan_model(name, name in present, force)

    async def _scan_model(self, name: str, present: bool, force: bool) -> None:
        assert self.repository is not None
        model = self.models.setdefault(name, _Model(name))
        if not present:
            for gone in self._of(name):
                self._retire(gone, "its folder left the repository")
            return
        if model.unloaded and not force:
            return
        model.unloaded = False
        try:
            model.policy = read_policy(self.repository / name)
            model.policy_error = ""
        except RepositoryError as e:
            # A bad config keeps what is serving under the last good policy.
            if model.policy_error != str(e):
                log.error("%s", e)
            model.policy_error = str(e)
        candidates = [str(n) for n in versions(self.repository / name)]
        candidates = [v for v in candidates if self._may_try(name, v, force)]
        while True:
            wanted = [str(n) for n in model.policy.select([int(v) for v in candidates])]
            todo = [v for v in wanted if (name, v) not in self.versions]
            for v in wanted:
                held = self.versions.get((name, v))
                if held is not None and held.state == RETIRING:
                    held.state = READY  # back in the policy before it was unloaded
                    log.info("%s version %s is serving again", name, v)
            if not todo:
                break
            for v in todo:
                if not await self._try_load(name, v):
                    candidates.remove(v)
        for held in self._of(name):
            if held.state == READY and held.version not in wanted:
                self._retire(held, f"out of the version policy ({model.policy.describe()})")

    def _may_try(self, name: str, version: str, force: bool) -> bool:
        failed = self._failures.get((name, version))
        if failed is None or force:
            return True
        assert self.repository is not None
        return _fingerprint(version_dir(self.repository, name, int(version))) != failed.fingerprint

    async def _try_load(self, name: str, version: str) -> bool:
        assert self.repository is not None
        folder = version_dir(self.repository, name, int(version))
        key = (name, version)
        self._loading.add(key)
        t0 = time.monotonic()
        try:
            loaded = await self._load_version_file(str(folder / MODEL_FILE))
        except (ModelLoadError, OSError) as e:
            reason = str(e)
            self._failures[key] = _Failure(_fingerprint(folder), reason)
            log.error("model %s version %s not loaded: %s", name, version, reason)
            return False
        finally:
            self._loading.discard(key)
        self._failures.pop(key, None)
        log.info(
            "model %s version %s loaded in %.2f s (%s)",
            name,
            version,
            time.monotonic() - t0,
            loaded.runtime.describe(),
        )
        return True

    def _retire(self, v: Version, why: str) -> None:
        if v.state == RETIRING:
            return
        v.state = RETIRING
        v.retire_deadline = self.clock() + self.version_drain_s
        log.info(
            "model %s version %s retires (%s): %d session(s) pinned to it may go on for up to "
            "%.0f s",
            v.name,
            v.version,
            why,
            len(v.store),
            self.version_drain_s,
        )

    async def tick(self) -> None:
        """Housekeeping, every second or so: idle sessions expire; retired versions whose
        sessions have all ended (or whose drain time has passed) are unloaded."""
        for v in list(self.versions.values()):
            v.store.expire_idle()
            if v.state != RETIRING:
                continue
            if (len(v.store) == 0 and v.plane.in_flight == 0) or self.clock() >= v.retire_deadline:
                self._unload(v)
        for v in list(self._unloading):
            # Requests already running finish (a generation is bounded by max_new_tokens); an
            # open stream's next message is refused, which ends it.
            if v.plane.in_flight == 0:
                self._unloading.remove(v)
                v.store.end_all("expired")
                self.ended_unloaded.update(v.store.stats.ended)
                await v.engine.stop()
                log.info("model %s version %s unloaded", v.name, v.version)

    def _unload(self, v: Version) -> None:
        """No request reaches ``v`` any more; its engine stops once the last one has ended."""
        if self.versions.get((v.name, v.version)) is not v:
            return
        del self.versions[(v.name, v.version)]
        for sid, owner in v.store.ids_and_owners():
            self._gone[(owner, sid)] = _Gone(v.name, v.version, owner)
            self._gone.move_to_end((owner, sid))
        while len(self._gone) > _GONE_MAX:
            self._gone.popitem(last=False)
        v.plane.gone = lambda sid: self._version_gone(sid, v.name, v.version)
        self._unloading.append(v)

    async def stop(self) -> None:
        for v in [*self.versions.values(), *self._unloading]:
            await v.engine.stop()

    # --- model control -------------------------------------------------------------------------

    def _check_control(self, caller: Caller, what: str) -> None:
        if self.auth and caller.principal not in self.admins:
            raise PermissionDenied(
                f"{what} needs an admin principal (--admin-principals); "
                f"{caller.principal or 'this client'} is not one"
            )
        if self.control_mode != "explicit":
            raise FailedPrecondition(
                f"{what} is only allowed with --model-control-mode explicit "
                f"(this server runs in mode {self.control_mode!r})"
            )

    async def load_model(self, name: str, *, caller: Caller = ANONYMOUS) -> ModelStatus:
        self._check_control(caller, "loading a model")
        assert self.repository is not None
        if name not in model_names(self.repository):
            raise NotFound(f"no model {name[:64]!r} in the model repository")
        await self.scan([name], force=True)
        status = self.status(name)
        if not any(v.state == READY for v in status.versions):
            reasons = "; ".join(f"version {v.version}: {v.reason}" for v in status.versions)
            raise InvalidArgument(f"model {name!r} did not load: {reasons or 'no version'}")
        return status

    async def unload_model(self, name: str, *, caller: Caller = ANONYMOUS) -> ModelStatus:
        self._check_control(caller, "unloading a model")
        model = self.models.get(name)
        if model is None:
            raise NotFound(f"no model {name[:64]!r} is loaded")
        model.unloaded = True
        for v in self._of(name):
            self._retire(v, "unloaded")
        return self.status(name)

    def status(self, name: str) -> ModelStatus:
        model = self.models.get(name) or _Model(name)
        rows: dict[str, VersionStatus] = {}
        if self.repository is not None:
            for number in versions(self.repository / name):
                rows[str(number)] = VersionStatus(str(number), UNAVAILABLE)
        for (n, v), f in self._failures.items():
            if n == name:
                rows[v] = VersionStatus(v, UNAVAILABLE, f.reason)
        for n, v in self._loading:
            if n == name:
                rows[v] = VersionStatus(v, LOADING)
        for held in self._of(name):
            rows[held.version] = VersionStatus(
                held.version,
                held.state,
                model.policy_error,
                sessions=len(held.store),
                memory_bytes=held.memory_bytes(),
            )
        ordered = sorted(rows.values(), key=lambda s: int(s.version) if s.version.isdigit() else 0)
        policy = model.policy.describe() if self.repository is not None else "fixed"
        return ModelStatus(name, policy, tuple(ordered), name == self.default_name)

    async def list_models(self) -> tuple[str, list[ModelStatus]]:
        """The model control mode and every model's status (the repository's and the loaded)."""
        names = set(self.models)
        if self.repository is not None:
            names |= set(model_names(self.repository))
        return self.control_mode, [self.status(n) for n in sorted(names)]

    # --- routing -------------------------------------------------------------------------------

    def _of(self, name: str) -> list[Version]:
        return sorted((v for v in self.versions.values() if v.name == name), key=lambda v: v.number)

    def _ready_versions(self, name: str) -> list[Version]:
        return [v for v in self._of(name) if v.state == READY]

    def serving(self, name: str) -> str:
        ready = self._ready_versions(name)
        return ", ".join(v.version for v in ready) or "none"

    def default(self) -> Version:
        """The default model's newest READY version (what requests naming nothing use)."""
        return self.target(ANY_MODEL)

    def target(self, model: ModelRef) -> Version:
        """The version a new session (or a model-level request) naming ``model`` goes to."""
        name = model.name or self.default_name
        if model.version:
            v = self.versions.get((name, model.version))
            if v is not None and v.state == READY:
                return v
            if v is not None:
                raise Unavailable(
                    f"model {name[:64]!r} version {model.version[:32]} is retiring and takes no "
                    f"new sessions (serving: {self.serving(name)})"
                )
            raise NotFound(
                f"model {name[:64]!r} version {model.version[:32]!r} is not loaded "
                f"(serving: {self.serving(name)})"
            )
        ready = self._ready_versions(name)
        if ready:
            return ready[-1]
        if name in self.models:
            if any(n == name for n, _ in self._loading):
                raise Unavailable(f"model {name[:64]!r} is still loading; retry shortly")
            raise Unavailable(f"model {name[:64]!r} has no version ready")
        raise NotFound(f"no model {name[:64]!r} is served")

    async def plane_of(
        self, session_id: str, caller: Caller, model: ModelRef = ANY_MODEL
    ) -> DataPlane:
        """The plane of the version ``caller``'s session ``session_id`` is pinned to (session
        ids are scoped per principal: another principal's session of the same id plays no
        part; an unknown id goes to the named model's plane, else the default version's, which
        answers NotFound)."""
        for v in self.versions.values():
            session = v.store.local(session_id, caller.principal)
            if session is not None:
                self._check_pin(session_id, v.name, v.version, model)
                return v.plane
        if self.durable_store is not None and session_id:
            try:
                record = await self.durable_store.get(storage_key(caller.principal, session_id))
            except RecordError:
                record = None
            except StoreError as e:
                raise Unavailable(f"the session store is unreachable: {e}") from None
            if (
                record is not None
                and record.owner == caller.principal
                and record.session_id == session_id
            ):
                name, version = record.model.name, record.model.version
                self._check_pin(session_id, name, version, model)
                held = self.versions.get((name, version))
                if held is None:
                    raise self._version_gone(session_id, name, version)
                return held.plane
        gone = self._gone.get((caller.principal, session_id))
        if gone is not None:
            raise self._version_gone(session_id, gone.name, gone.version)
        if model.name:
            # The named model's plane answers NotFound, after checking the input for its kind
            # (the default model may be of another kind and would refuse the input instead).
            with contextlib.suppress(NotFound, Unavailable):
                return self.target(model).plane
        return self._any().plane

    def _any(self) -> Version:
        try:
            return self.default()
        except (NotFound, Unavailable):
            for v in self.versions.values():
                return v
            raise Unavailable("no model is loaded; retry shortly") from None

    def _check_pin(self, session_id: str, name: str, version: str, model: ModelRef) -> None:
        if (model.name and model.name != name) or (model.version and model.version != version):
            raise FailedPrecondition(
                f"session {quote(session_id)} is pinned to model {name} version {version}, "
                f"not {model.describe()}"
            )

    def _check_free(self, session_id: str, caller: Caller, but: Version | None = None) -> None:
        """AlreadyExists when ``caller`` holds ``session_id`` on a loaded version other than
        ``but``: ids are one namespace per principal across versions, and each version's store
        checks only its own (``but``'s store answers for itself, in the same words)."""
        if session_id and any(
            v.store.local(session_id, caller.principal) is not None
            for v in self.versions.values()
            if v is not but
        ):
            raise AlreadyExists(f"session id {quote(session_id)} is taken")

    async def _plane_for(self, session_id: str, caller: Caller, model: ModelRef) -> DataPlane:
        """The plane of the version ``session_id`` is pinned to; with no session id, the one a new
        (ephemeral) session of ``model`` goes to."""
        if session_id:
            return await self.plane_of(session_id, caller, model)
        return self.target(model).plane

    def _version_gone(self, session_id: str, name: str, version: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"session {quote(session_id)} is pinned to model {name} version {version}, which "
            f"is no longer loaded (serving: {self.serving(name)}); create a new session"
        )

    # --- the plane's interface -----------------------------------------------------------------

    async def model_info(self, model: ModelRef = ANY_MODEL) -> ModelInfo:
        # A named version answers while it is loaded at all (a retiring one still serves the
        # sequences pinned to it); otherwise the newest READY one.
        held = self.versions.get((model.name or self.default_name, model.version))
        if model.version and held is not None:
            return await held.plane.model_info()
        return await self.target(model).plane.model_info()

    async def create_session(
        self,
        idle_timeout_s: float = 0.0,
        session_id: str = "",
        *,
        caller: Caller = ANONYMOUS,
        model: ModelRef = ANY_MODEL,
    ) -> SessionInfo:
        target = self.target(model)
        self._check_free(session_id, caller, but=target)
        return await target.plane.create_session(idle_timeout_s, session_id, caller=caller)

    async def close_session(self, session_id: str, *, caller: Caller = ANONYMOUS) -> None:
        try:
            plane = await self.plane_of(session_id, caller)
        except FailedPrecondition:
            # Closing a session of an unloaded version just forgets it (and its record).
            self._gone.pop((caller.principal, session_id), None)
            if self.durable_store is not None:
                try:
                    await self.durable_store.delete([storage_key(caller.principal, session_id)])
                except StoreError as e:
                    raise Unavailable(f"the session store is unreachable: {e}") from None
            return
        await plane.close_session(session_id, caller=caller)

    async def reset_session(self, session_id: str, *, caller: Caller = ANONYMOUS) -> None:
        await (await self.plane_of(session_id, caller)).reset_session(session_id, caller=caller)

    async def get_session(self, session_id: str, *, caller: Caller = ANONYMOUS) -> SessionInfo:
        plane = await self.plane_of(session_id, caller)
        return await plane.get_session(session_id, caller=caller)

    async def list_sessions(
        self, page_size: int = 0, page_token: str = "", *, caller: Caller = ANONYMOUS
    ) -> tuple[list[SessionInfo], str]:
        # Any version's plane admits it (drain, rate limit) and lists every version's sessions
        # (its ``sessions_of`` is :meth:`sessions_of`).
        return await self._any().plane.list_sessions(page_size, page_token, caller=caller)

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
        features: Any = None,
    ) -> StepResult:
        if not session_id:
            raise InvalidArgument("session_id is empty")
        plane = await self.plane_of(session_id, caller, model)
        return await plane.step(
            session_id,
            text=text,
            token_ids=token_ids,
            output=output,
            top_k=top_k,
            caller=caller,
            request_id=request_id,
            features=features,
        )

    async def open_stream(
        self, session_id: str = "", *, caller: Caller = ANONYMOUS, model: ModelRef = ANY_MODEL
    ) -> Stream:
        plane = await self._plane_for(session_id, caller, model)
        return await plane.open_stream(session_id, caller=caller)

    async def export_session(self, session_id: str, *, caller: Caller = ANONYMOUS) -> bytes:
        plane = await self.plane_of(session_id, caller)
        return await plane.export_session(session_id, caller=caller)

    async def import_session(
        self, data: bytes, session_id: str = "", *, caller: Caller = ANONYMOUS
    ) -> str:
        try:
            record = SessionRecord.from_bytes(data)
        except RecordError as e:
            raise InvalidArgument(f"not a valid session record: {str(e)[:200]}") from None
        m = record.model
        held = self.versions.get((m.name, m.version))
        if held is None:
            raise InvalidArgument(
                f"the record was written for model {m.name[:64]} version {m.version[:32]} "
                f"(sha256 {m.checksum[:12]}...), which is not loaded here "
                f"(serving: {self.serving(m.name)})"
            )
        self._check_free(session_id or record.session_id, caller, but=held)
        return await held.plane.import_session(data, session_id, caller=caller)

    async def fork_session(
        self, session_id: str, new_session_id: str = "", *, caller: Caller = ANONYMOUS
    ) -> str:
        plane = await self.plane_of(session_id, caller)
        self._check_free(new_session_id, caller)
        return await plane.fork_session(session_id, new_session_id, caller=caller)

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
        plane = await self._plane_for(session_id, caller, model)
        chunks = plane.generate(session_id, prompt, params, caller=caller, request_id=request_id)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield chunk


async def run_periodically(
    fn: Callable[[], Awaitable[Any]], interval: Callable[[], float], name: str
) -> None:
    """Call ``fn`` every ``interval()`` seconds until cancelled; log (never raise) failures."""
    while True:
        await asyncio.sleep(interval())
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed", name)
