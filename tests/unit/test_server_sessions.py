"""Session store with an injected clock: ids, expiry, LRU, refusal, busy, accounting."""

from __future__ import annotations

import pytest

from server.batch import StatePool
from server.errors import Busy, NotFound, ResourceExhausted
from server.sessions import SessionStore


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(max_sessions: int = 4, eviction: str = "refuse") -> tuple[SessionStore, Clock]:
    clock = Clock()
    pool = StatePool(2, 8, 5, max_sessions)
    return SessionStore(
        pool, max_sessions=max_sessions, idle_timeout_s=10, eviction=eviction, clock=clock
    ), clock


def test_ids_are_128_bit_hex_and_unique():
    store, _ = make(4)
    ids = {store.create().id for _ in range(4)}
    assert len(ids) == 4 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert store.state_bytes == 4 * 2 * 2 * 8 * 4


def test_idle_expiry_by_clock():
    store, clock = make()
    a = store.create()
    b = store.create(idle_timeout_s=3)
    clock.t = 4
    with pytest.raises(NotFound, match="expired"):
        store.get(b.id)
    store.acquire(a.id)  # busy sessions never expire
    clock.t = 100
    assert store.expire_idle() == 0
    store.release(a)
    clock.t = 109
    assert store.expire_idle() == 0
    clock.t = 111
    assert store.expire_idle() == 1
    assert store.stats.ended["expired"] == 2 and len(store) == 0
    assert store.pool.in_use == 0


def test_refuse_when_full_and_lru_evicts_least_recent_idle():
    store, clock = make(2)
    store.create()
    store.create()
    with pytest.raises(ResourceExhausted, match="max_sessions=2"):
        store.create()
    lru, clock = make(3, "lru")
    a, b, c = lru.create(), lru.create(), lru.create()
    clock.t = 1
    lru.touch(a)
    lru.acquire(b.id)  # busy: never evicted
    d = lru.create()
    assert len(lru) == 3 and all(lru.get(s.id) is s for s in (a, b, d))
    with pytest.raises(NotFound):
        lru.get(c.id)
    assert lru.stats.ended["evicted"] == 1
    lru.acquire(a.id)
    lru.acquire(d.id)
    with pytest.raises(ResourceExhausted):
        lru.create()


def test_busy_and_close():
    store, _ = make()
    s = store.create()
    store.acquire(s.id)
    with pytest.raises(Busy, match=s.id):
        store.acquire(s.id)
    with pytest.raises(Busy):
        store.close(s.id)
    store.release(s)
    store.close(s.id)
    with pytest.raises(NotFound):
        store.get(s.id)
    assert store.stats.ended["closed"] == 1
