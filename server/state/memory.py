"""A store in a dict: sessions live as long as the process (the default, and the reference for
the other stores' behaviour in tests)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from .base import Write
from .record import SessionRecord

# A full sweep of expired records is O(sessions); doing it at most this often keeps abandoned
# sessions from piling up without putting that cost on every write.
_SWEEP_EVERY_S = 30.0


class MemoryStore:
    """Records in a dict, checked for expiry on ``get`` and swept now and then on ``put``.

    Records are stored with read-only copies of their arrays, so a caller that keeps mutating its
    own arrays cannot change what was committed. ``clock`` is wall time (``time.time``); tests
    may pass their own.
    """

    url = "memory"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._records: dict[str, SessionRecord] = {}
        self._clock = clock
        self._next_sweep = clock() + _SWEEP_EVERY_S

    def _live(self, session_id: str, now: float) -> SessionRecord | None:
        rec = self._records.get(session_id)
        if rec is not None and now >= rec.expires_unix_s:
            del self._records[session_id]
            return None
        return rec

    async def get(self, session_id: str) -> SessionRecord | None:
        return self._live(session_id, self._clock())

    async def put(self, writes: Sequence[Write]) -> list[bool]:
        now = self._clock()
        results = []
        for w in writes:
            cur = self._live(w.record.key, now)
            ok = (cur.version if cur is not None else 0) == w.expected_version
            if not ok and cur is not None and cur.version == w.record.version:
                ok = cur == w.record  # a replay of the committed write (see StateStore.put)
            if ok:
                self._records[w.record.key] = _frozen_copy(w.record)
            results.append(ok)
        if now >= self._next_sweep:
            self.sweep(now)
        return results

    async def delete(self, session_ids: Sequence[str]) -> None:
        for sid in session_ids:
            self._records.pop(sid, None)

    async def close(self) -> None:
        self._records.clear()

    def sweep(self, now: float | None = None) -> int:
        """Drop every expired record; returns how many."""
        now = self._clock() if now is None else now
        dead = [sid for sid, r in self._records.items() if now >= r.expires_unix_s]
        for sid in dead:
            del self._records[sid]
        self._next_sweep = now + _SWEEP_EVERY_S
        return len(dead)

    def __len__(self) -> int:
        return len(self._records)


def _frozen_copy(rec: SessionRecord) -> SessionRecord:
    def ro(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a.flags.writeable = False
        return a

    return rec.replace(
        h=ro(rec.h), c=ro(rec.c), logits=None if rec.logits is None else ro(rec.logits)
    )
