"""Write-through of sessions to a durable state store (:mod:`server.state`).

With ``--state-store sqlite:///...`` or ``redis://...`` every request that changed a session
commits the session's new record before its response is sent, so an acknowledged step survives
kill -9 of the server, and another replica sharing the store can continue the session.

* Commits are batched per loop tick: the requests an engine iteration completes resume in the
  same tick, and their records go to the store in one transaction (SQLite) or one pipeline
  (Redis).
* Optimistic concurrency: a record carries a version; a commit succeeds only over the version
  this process read. The loser of a race between two replicas gets :class:`Aborted`, its
  local copy is dropped (so a retry loads the current record) and the stored record is the
  winner's.
* A record written for another model (name, version or checksum differ) is never used:
  :class:`FailedPrecondition`.
* Errors: the store's own failures (:class:`StoreError`: unreachable, timed out, refused) are
  :class:`Unavailable`, worth a retry; anything else is a bug, logged once with its traceback
  and answered INTERNAL (:class:`StoreFailed`), so that a client does not retry it forever.
* Records are kept per principal (``record.key``): session ids are scoped per principal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from .errors import Aborted, DeadlineExceeded, FailedPrecondition, ServeError, Unavailable
from .metrics import STORE_STATS
from .state import StateStore
from .state.base import StoreError, Write
from .state.record import ModelIdentity, Request, SessionRecord, storage_key

if TYPE_CHECKING:
    from .engine import Engine
    from .sessions import Session

log = logging.getLogger(__name__)


class StoreFailed(ServeError):
    """The session store failed in a way that is not the store being unreachable: a bug (in
    this server or the store's client). Logged once, with its traceback, where it happened; the
    request fails with INTERNAL (no gRPC code is mapped to it), not UNAVAILABLE, which a client
    would retry forever."""


class Durable:
    """Commits, loads and deletes session records for one data plane."""

    def __init__(self, store: StateStore, model: ModelIdentity) -> None:
        self.store = store
        self.model = model
        self._pending: list[tuple[Write, asyncio.Future[bool], float | None]] = []
        self._flushing = False
        STORE_STATS.enabled = True  # lstm_serve_state_store_duration_seconds

    def record(
        self,
        session: Session,
        engine: Engine,
        *,
        steps: int,
        version: int,
        requests: tuple[Request, ...] = (),
    ) -> SessionRecord:
        """The record of ``session``'s current state in the pool, as ``version``."""
        return session_record(
            session, engine, self.model, steps=steps, version=version, requests=requests
        )

    def check_model(self, record: SessionRecord) -> None:
        """:class:`FailedPrecondition` unless ``record`` was written for this server's model."""
        if record.model != self.model:
            m = record.model
            raise FailedPrecondition(
                f"session {record.session_id[:64]!r} was stored by a server with model "
                f"{m.name} version {m.version} (sha256 {m.checksum[:12]}...); this server "
                f"serves {self.model.name} version {self.model.version} "
                f"(sha256 {self.model.checksum[:12]}...)"
            )

    async def load(self, session_id: str, owner: str = "") -> SessionRecord | None:
        """``owner``'s record of ``session_id``, None when there is none."""
        t0 = time.perf_counter()
        try:
            record = await self.store.get(storage_key(owner, session_id))
        except StoreError as e:
            raise Unavailable(f"the session store is unreachable: {e}") from None
        except Exception as e:
            raise self._failed("get", e) from None
        finally:
            STORE_STATS.observe("get", time.perf_counter() - t0)
        if record is not None and (record.owner, record.session_id) != (owner, session_id):
            return None  # a record under a key it does not belong to: never another's session
        if record is not None:
            self.check_model(record)
        return record

    async def delete(self, session_id: str, owner: str = "") -> None:
        """Delete ``owner``'s record of ``session_id`` (absent: nothing happens)."""
        t0 = time.perf_counter()
        try:
            await self.store.delete([storage_key(owner, session_id)])
        except StoreError as e:
            raise Unavailable(f"the session store is unreachable: {e}") from None
        except Exception as e:
            raise self._failed("delete", e) from None
        finally:
            STORE_STATS.observe("delete", time.perf_counter() - t0)

    @staticmethod
    def _failed(what: str, e: Exception) -> StoreFailed:
        log.error("session store %s failed (a bug, not an outage)", what, exc_info=e)
        return StoreFailed(
            f"internal error in the session store ({type(e).__name__}); see the server log"
        )

    async def commit(
        self, record: SessionRecord, expected_version: int, deadline: float | None = None
    ) -> bool:
        """Commit ``record`` over ``expected_version`` (0: create); False when another writer
        got there first. Raises :class:`Unavailable` when the store cannot be reached, and
        :class:`DeadlineExceeded` (nothing written) when ``deadline`` (``time.monotonic()``; the
        client's) has passed by the time the write would be sent."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((Write(record, expected_version), fut, deadline))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self._flushing = False
        asyncio.get_running_loop().create_task(self._put(batch))

    async def _put(self, pending: list[tuple[Write, asyncio.Future[bool], float | None]]) -> None:
        # The last moment to honour a deadline: a write whose client has given up is not sent.
        now = time.monotonic()
        batch: list[tuple[Write, asyncio.Future[bool]]] = []
        for w, fut, deadline in pending:
            if deadline is None or now < deadline:
                batch.append((w, fut))
            elif not fut.done():
                fut.set_exception(
                    DeadlineExceeded("the client's deadline passed before the request committed")
                )
        if not batch:
            return
        t0 = time.perf_counter()
        try:
            results = await self.store.put([w for w, _ in batch])
        except StoreError as e:
            log.error("session store: %s", e)
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(Unavailable(f"the session store is unreachable: {e}"))
            return
        except Exception as e:  # a bug must fail these requests (INTERNAL), not hang them
            failed = self._failed("put", e)
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(StoreFailed(str(failed)))
            return
        finally:
            STORE_STATS.observe("put", time.perf_counter() - t0)
        for (_, fut), ok in zip(batch, results, strict=True):
            if not fut.done():
                fut.set_result(ok)

    def aborted(self, session_id: str) -> Aborted:
        return Aborted(
            f"session {session_id[:64]!r} was changed by another replica first; nothing was "
            "changed by this request (retry: the next attempt reads the current state)"
        )


def session_record(
    session: Session,
    engine: Engine,
    model: ModelIdentity,
    *,
    steps: int,
    version: int,
    requests: tuple[Request, ...] = (),
) -> SessionRecord:
    """The record of ``session``'s current state in the pool (the caller holds the session)."""
    h, c = engine.state(session.slot)
    return SessionRecord(
        session_id=session.id,
        h=h,
        c=c,
        logits=engine.next_logits(session.slot),
        steps=steps,
        created_unix_s=session.created_wall,
        last_used_unix_s=session.last_used_wall(),
        idle_timeout_s=session.idle_timeout_s,
        owner=session.owner,
        version=version,
        model=model,
        requests=requests,
    )
