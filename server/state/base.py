"""The session-state store interface: versioned records, compare-and-set writes.

A store maps keys to :class:`~server.state.record.SessionRecord` values so that sessions
outlive the process that created them. A record's key is ``record.key``
(:func:`~server.state.record.storage_key`: the session id for principal "", else owner and id),
so two principals' sessions of the same id are two records. Concurrency control is optimistic:
a writer reads a record at version v and writes version v+1 expecting v; if another writer got
there first the write is refused (False), never merged. The caller decides what to do (re-read,
or fail the request).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .record import SessionRecord


class StoreError(RuntimeError):
    """The store is unreachable or broken. The message is one line."""


@dataclass(frozen=True)
class Write:
    """One compare-and-set write.

    ``record`` is the new record (its ``version`` is the new version); ``expected_version`` is
    the version the writer read, or 0 to create: the id must then not exist (an expired record
    counts as absent).
    """

    record: SessionRecord
    expected_version: int


class StateStore(Protocol):
    """Where session records live. Implementations: memory, sqlite, redis (see ``open_store``).

    Every method is a coroutine; an instance is used from one asyncio event loop only. Methods
    raise :class:`StoreError` when the backing service fails; a refused compare-and-set is not an
    error. Records returned by ``get`` have read-only arrays.
    """

    url: str
    """Where the store is, as given to ``open_store`` (no password in it)."""

    async def get(self, key: str) -> SessionRecord | None:
        """The record stored under ``key`` (``record.key``), or None if absent or expired."""
        ...

    async def put(self, writes: Sequence[Write]) -> list[bool]:
        """Apply ``writes`` in one transaction (or one pipeline); one bool per write, in order.

        True where committed: the stored version equalled ``expected_version`` (or, for 0, the
        id was absent or expired) and the record was replaced by ``write.record``. False where
        the check failed; that record is left as it was. Expiry of a committed record is
        ``record.last_used_unix_s + record.idle_timeout_s``. Two writes for the same id in one
        call are applied in order, the second checked against the first's result.

        Idempotent: a write whose record is already stored, same version and same bytes, reports
        True. The Redis client resends a transaction whose reply was lost on a broken
        connection, and that resend must not report the first attempt's commit as a lost race;
        every store behaves alike so callers see one contract.
        """
        ...

    async def delete(self, keys: Sequence[str]) -> None:
        """Remove the records under these keys; absent keys are ignored."""
        ...

    async def close(self) -> None:
        """Release connections and files. The store is unusable afterwards."""
        ...
