"""Session store with an injected clock: ids, expiry, LRU, refusal, busy, accounting."""

from __future__ import annotations

import numpy as np
import pytest

from server.batch import StatePool
from server.errors import AlreadyExists, Busy, NotFound, ResourceExhausted
from server.sessions import RECENT_REQUESTS, SessionStore


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


def test_attached_and_busy_sessions_are_never_evicted_and_evicted_ids_say_so():
    lru, clock = make(3, "lru")
    a, b, c = lru.create(), lru.create(), lru.create()
    lru.attach(a)  # an open stream holds it
    lru.acquire(b.id)  # a request holds it
    clock.t = 1
    d = lru.create()  # evicts c: the only one neither attached nor busy
    assert lru.get(a.id) is a and lru.get(b.id) is b and lru.get(d.id) is d
    with pytest.raises(NotFound, match="was evicted"):
        lru.get(c.id)
    lru.release(b)
    e = lru.create()  # now b is the least recently used free one... but d is older
    assert lru.local(d.id) is None and lru.local(b.id) is b and lru.local(e.id) is e
    with pytest.raises(NotFound, match="was evicted"):
        lru.get(d.id)
    lru.detach(a)
    lru.acquire(b.id)
    lru.acquire(e.id)
    f = lru.create()  # a is free again: evicted
    assert lru.local(a.id) is None and lru.local(f.id) is f


def test_attached_sessions_do_not_expire_while_their_stream_is_open():
    store, clock = make(4)
    s = store.create()
    store.attach(s)
    clock.t += store.idle_timeout_s * 3
    assert store.expire_idle() == 0 and store.get(s.id) is s
    store.detach(s)  # counts as use: the idle clock starts again
    clock.t += store.idle_timeout_s * 0.5
    assert store.expire_idle() == 0
    clock.t += store.idle_timeout_s
    assert store.expire_idle() == 1
    with pytest.raises(NotFound, match="expired after"):
        store.get(s.id)


def test_expiry_follows_the_last_use_through_many_touches():
    store, clock = make(8)
    sessions = [store.create() for _ in range(8)]
    seed = np.random.SeedSequence().entropy  # in every message: a failing plan can be replayed
    rng = np.random.default_rng(seed)
    last = {s.id: clock.t for s in sessions}
    for _ in range(5000):  # enough touches to compact the deadline heap several times
        clock.t += float(rng.random()) * 0.01
        s = sessions[int(rng.integers(len(sessions)))]
        store.touch(s)
        last[s.id] = clock.t
    assert len(store._deadlines) <= 2 * len(sessions) + 1024 + 1, f"seed {seed}"
    cut = sorted(last.values())[3]
    clock.t = cut + store.idle_timeout_s + 1e-9
    expired = store.expire_idle()
    want = sum(1 for t in last.values() if clock.t - t > store.idle_timeout_s)
    assert expired == want and len(store) == 8 - want, f"seed {seed}"


def test_not_found_quotes_at_most_64_characters_of_the_id():
    store, _ = make()
    with pytest.raises(NotFound) as e:
        store.get("x" * 100_000)
    assert len(str(e.value)) < 200


def test_session_ids_are_scoped_per_principal():
    """Issue 19: one principal's ids neither collide with nor reveal another's."""
    store, clock = make(4)
    sid = "client-chosen-id-0001"
    a = store.create(session_id=sid, owner="alice")
    b = store.create(session_id=sid, owner="bob")  # before: AlreadyExists "is taken"
    anon = store.create(session_id=sid)  # principal "" (authentication off)
    assert len({a.slot, b.slot, anon.slot}) == 3 and a.id == b.id == anon.id == sid
    with pytest.raises(AlreadyExists, match="is taken"):
        store.create(session_id=sid, owner="alice")  # within one principal, still taken
    assert store.local(sid, "alice") is a and store.local(sid, "bob") is b
    assert store.local(sid) is anon and store.local(sid, "carol") is None
    with pytest.raises(NotFound, match="never created"):
        store.acquire(sid, "carol")
    assert store.acquire(sid, "alice") is a
    store.acquire(sid, "bob")  # Alice's request does not make Bob's session busy
    store.release(a)
    store.close(sid, owner="alice")
    assert store.local(sid, "alice") is None and store.local(sid, "bob") is b
    store.release(b)
    clock.t = 11  # Bob's expires; "expired" is said to Bob only
    store.expire_idle()
    with pytest.raises(NotFound, match="expired"):
        store.get(sid, "bob")
    assert "never created" in store.why_not_found(sid, "alice")
    assert store.owned_by("bob") == 0 and store.owned_by("") == 0


def test_recent_request_ids_keep_the_payload_digest_and_the_last_16():
    store, _ = make(2)
    s = store.create()
    for i in range(RECENT_REQUESTS + 3):
        store.remember(s, f"r{i}", i, digest=bytes([i]))
    assert store.recalled(s, "r0") is None and store.recalled(s, "") is None
    last = store.recalled(s, f"r{RECENT_REQUESTS + 2}")
    assert last is not None and last.outcome == RECENT_REQUESTS + 2
    assert last.digest == bytes([RECENT_REQUESTS + 2]) and last.blob is None
    assert s.recent is not None and len(s.recent) == RECENT_REQUESTS
