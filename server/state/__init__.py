"""Session-state stores (issue 12: sessions outlive the process).

``open_store(url)`` picks the backend from a URL; :mod:`.base` states the contract every store
keeps, :mod:`.record` the record and its byte format.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from .base import StateStore, StoreError, Write
from .memory import MemoryStore
from .record import ModelIdentity, RecordError, SessionRecord

__all__ = [
    "MemoryStore",
    "ModelIdentity",
    "RecordError",
    "SessionRecord",
    "StateStore",
    "StoreError",
    "Write",
    "open_store",
]

ACCEPTED_URLS = (
    "'memory', 'sqlite:////absolute/path.db', 'sqlite:///relative/path.db', 'redis://HOST:PORT/DB'"
)


def open_store(url: str) -> StateStore:
    """The store that ``url`` names. Raises ValueError naming the accepted forms otherwise.

    ``memory``; ``sqlite:///PATH`` (SQLAlchemy's form: ``sqlite:////abs/x.db`` is the absolute
    path ``/abs/x.db``, ``sqlite:///x.db`` is relative to the working directory);
    ``redis://HOST:PORT/DB``. Opening a SQLite store creates the file; a Redis store connects on
    first use.
    """
    if url in ("memory", "memory://"):
        return MemoryStore()
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if not path:
            raise ValueError(f"store URL {url!r} has no file path; accepted: {ACCEPTED_URLS}")
        # Imported here so a memory-store server never loads sqlite3 or redis.
        from .sqlite import SqliteStore

        return SqliteStore(path)
    if url.startswith("redis://"):
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"store URL {url!r} has no host; accepted: {ACCEPTED_URLS}")
        from .redis import RedisStore

        return RedisStore(url)
    raise ValueError(f"unknown store URL {url!r}; accepted: {ACCEPTED_URLS}")
