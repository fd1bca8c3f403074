"""One behaviour for every session store: memory, SQLite (a file in tmp_path) and Redis (a real
redis-server from tests.state_services). Compare-and-set, batches, expiry, deletion, durability
across reopening, and failures reported as StoreError."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
import redis

from server.state import (
    ModelIdentity,
    SessionRecord,
    StateStore,
    StoreError,
    Write,
    open_store,
)
from server.state.memory import MemoryStore
from server.state.redis import KEY_PREFIX
from server.state.sqlite import SqliteStore
from tests.state_services import _free_port, redis_url  # noqa: F401  (a fixture)

MODEL = ModelIdentity("timemachine", "1", hashlib.sha256(b"weights").hexdigest())
ROOT = Path(__file__).resolve().parents[2]

Body = Callable[[StateStore], Awaitable[None]]


def new_record(sid: str | None = None, idle_s: float = 300.0, layers: int = 2) -> SessionRecord:
    rng = np.random.default_rng()
    now = time.time()
    return SessionRecord(
        session_id=sid or uuid.uuid4().hex,
        h=rng.standard_normal((layers, 32), dtype=np.float32),
        c=rng.standard_normal((layers, 32), dtype=np.float32),
        logits=rng.standard_normal(28, dtype=np.float32),
        steps=0,
        created_unix_s=now,
        last_used_unix_s=now,
        idle_timeout_s=idle_s,
        owner="",
        version=1,
        model=MODEL,
    )


def advanced(rec: SessionRecord) -> SessionRecord:
    """The record after one more step, as a writer that read ``rec`` would commit it."""
    rng = np.random.default_rng()
    return rec.replace(
        h=rng.standard_normal(rec.h.shape, dtype=np.float32),
        steps=rec.steps + 1,
        last_used_unix_s=time.time(),
        version=rec.version + 1,
    )


@pytest.fixture(params=["memory", "sqlite", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sessions.db'}"  # four slashes: an absolute path
    return str(request.getfixturevalue("redis_url"))


def run(url: str, body: Body) -> None:
    """Open the store inside a fresh event loop (redis-py binds to its loop), run, close."""

    async def main() -> None:
        store = open_store(url)
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


def test_create_then_create_again_fails(url: str) -> None:
    async def body(s: StateStore) -> None:
        rec = new_record()
        assert await s.put([Write(rec, 0)]) == [True]
        got = await s.get(rec.session_id)
        assert got == rec
        assert got is not None and not got.h.flags.writeable
        assert await s.put([Write(rec.replace(steps=9), 0)]) == [False]
        assert await s.get(rec.session_id) == rec
        assert await s.get("no-such-session") is None

    run(url, body)


def test_one_session_id_of_two_principals_is_two_records(url: str) -> None:
    """Session ids are scoped per principal (issue 19): a record's key is its owner and id
    (the bare id for principal "", as before), so the same id of two owners never collides."""

    async def body(s: StateStore) -> None:
        sid = uuid.uuid4().hex
        anon = new_record(sid)
        alice = new_record(sid).replace(owner="alice", steps=5)
        bob = new_record(sid).replace(owner="bob", steps=7)
        assert anon.key == sid and alice.key == f"alice/{sid}"
        assert await s.put([Write(anon, 0), Write(alice, 0), Write(bob, 0)]) == [True] * 3
        assert await s.get(sid) == anon
        assert await s.get(alice.key) == alice and await s.get(bob.key) == bob
        # A compare-and-set on one leaves the others as they were.
        alice2 = advanced(alice)
        assert await s.put([Write(alice2, 1), Write(advanced(bob), 2)]) == [True, False]
        assert await s.get(alice.key) == alice2 and await s.get(bob.key) == bob
        await s.delete([bob.key])
        assert await s.get(bob.key) is None
        assert await s.get(sid) == anon and await s.get(alice.key) == alice2

    run(url, body)


def test_commit_over_the_read_version_bumps_it(url: str) -> None:
    async def body(s: StateStore) -> None:
        v1 = new_record()
        await s.put([Write(v1, 0)])
        v2 = advanced(v1)
        assert await s.put([Write(v2, 1)]) == [True]
        assert await s.get(v1.session_id) == v2
        v3 = advanced(v2)
        assert await s.put([Write(v3, 2)]) == [True]
        got = await s.get(v1.session_id)
        assert got == v3 and got is not None and got.version == 3
        # A write expecting a version that was never stored is refused.
        assert await s.put([Write(advanced(v3), 7)]) == [False]
        assert await s.put([Write(new_record(), 1)]) == [False]  # absent id, expected 1

    run(url, body)


def test_stale_writer_loses_and_leaves_the_winner(url: str) -> None:
    async def body(s: StateStore) -> None:
        v1 = new_record()
        await s.put([Write(v1, 0)])
        read_a, read_b = await s.get(v1.session_id), await s.get(v1.session_id)
        assert read_a is not None and read_b is not None
        a, b = advanced(read_a), advanced(read_b)
        results = [await s.put([Write(a, 1)]), await s.put([Write(b, 1)])]
        assert results == [[True], [False]]
        assert await s.get(v1.session_id) == a

    run(url, body)


def test_batch_with_winners_and_losers(url: str) -> None:
    async def body(s: StateStore) -> None:
        a, b = new_record(), new_record()
        assert await s.put([Write(a, 0), Write(b, 0)]) == [True, True]
        c = new_record()
        a2, b_stale, a_dup = advanced(a), advanced(b), a.replace(steps=5)
        writes = [Write(a2, 1), Write(b_stale, 5), Write(c, 0), Write(a_dup, 0)]
        assert await s.put(writes) == [True, False, True, False]
        assert await s.get(a.session_id) == a2
        assert await s.get(b.session_id) == b
        assert await s.get(c.session_id) == c
        # Two writes to one id in one call apply in order.
        a3 = advanced(a2)
        a4 = advanced(a3)
        other4 = advanced(a3)
        writes = [Write(a3, 2), Write(a4, 3), Write(other4, 3)]
        assert await s.put(writes) == [True, True, False]
        assert await s.get(a.session_id) == a4
        # A replay of the committed write (a resend after a lost reply) reports True again and
        # changes nothing; a different record at that version does not.
        assert await s.put([Write(a4, 3), Write(other4, 3)]) == [True, False]
        assert await s.put([Write(c, 0)]) == [True]
        assert await s.get(a.session_id) == a4 and await s.get(c.session_id) == c
        assert await s.put([]) == []

    run(url, body)


def test_get_after_delete_is_none(url: str) -> None:
    async def body(s: StateStore) -> None:
        recs = [new_record() for _ in range(3)]
        await s.put([Write(r, 0) for r in recs])
        await s.delete([recs[0].session_id, recs[1].session_id, "never-existed"])
        await s.delete([])
        assert await s.get(recs[0].session_id) is None
        assert await s.get(recs[1].session_id) is None
        assert await s.get(recs[2].session_id) == recs[2]
        # A deleted id can be created afresh.
        assert await s.put([Write(recs[0], 0)]) == [True]

    run(url, body)


class WallClock:
    """A wall clock (``time.time``) the test moves by hand, for the stores that take one."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_idle_records_expire(url: str) -> None:
    # Memory and SQLite judge expiry by a clock they are given: a fake one, moved past the short
    # record's timeout. Redis judges it by its own clock: the short record gets a few seconds
    # (so it is surely there when first read) and the test polls until Redis drops it.
    clock = WallClock() if not url.startswith("redis") else None
    idle = 2.0 if clock is None else 0.2

    def at_now(rec: SessionRecord) -> SessionRecord:
        if clock is None:
            return rec
        return rec.replace(created_unix_s=clock.now, last_used_unix_s=clock.now)

    async def body(s: StateStore) -> None:
        short, long = at_now(new_record(idle_s=idle)), at_now(new_record(idle_s=300.0))
        forever = at_now(new_record(idle_s=float("inf")))
        await s.put([Write(short, 0), Write(long, 0), Write(forever, 0)])
        assert await s.get(short.session_id) == short
        if clock is not None:
            clock.now += idle - 0.01
            assert await s.get(short.session_id) == short  # not yet
            clock.now += 0.02
        else:
            deadline = time.monotonic() + idle + 30
            while await s.get(short.session_id) is not None:
                assert time.monotonic() < deadline, "the short record never expired"
                await asyncio.sleep(0.05)
        assert await s.get(short.session_id) is None
        assert await s.get(long.session_id) == long
        assert await s.get(forever.session_id) == forever
        # An expired record is absent: updating it fails, creating it again succeeds.
        assert await s.put([Write(advanced(short), 1)]) == [False]
        assert await s.put([Write(at_now(short.replace(idle_timeout_s=60.0)), 0)]) == [True]

    if clock is None:
        run(url, body)
    elif url == "memory":
        asyncio.run(_with_store(MemoryStore(clock=clock), body))
    else:
        asyncio.run(_with_store(SqliteStore(url[len("sqlite:///") :], clock=clock), body))


async def _with_store(store: StateStore, body: Body) -> None:
    try:
        await body(store)
    finally:
        await store.close()


def test_redis_expires_by_ttl(redis_url: str) -> None:  # noqa: F811
    async def body(s: StateStore) -> None:
        # Seconds, not tenths: the TTL is read back before it runs out however slow this
        # machine is; then the test polls for the key to go.
        rec = new_record(idle_s=2.0)
        await s.put([Write(rec, 0)])
        raw = redis.Redis.from_url(redis_url)
        try:
            ttl_ms = raw.pttl(KEY_PREFIX + rec.session_id)
            # The record's own expiry: last use + 2 s (not a default, not none).
            assert isinstance(ttl_ms, int) and 0 < ttl_ms <= 2001, ttl_ms
            deadline = time.monotonic() + 30
            # Gone from Redis itself, not merely hidden by the store.
            while raw.exists(KEY_PREFIX + rec.session_id):
                assert time.monotonic() < deadline, "Redis kept the key past its TTL"
                time.sleep(0.05)
        finally:
            raw.close()

    run(redis_url, body)


def test_redis_reloads_its_script_after_a_flush(redis_url: str) -> None:  # noqa: F811
    async def body(s: StateStore) -> None:
        v1 = new_record()
        assert await s.put([Write(v1, 0)]) == [True]
        raw = redis.Redis.from_url(redis_url)
        raw.script_flush()  # what a Redis restart does to the script cache
        raw.close()
        v2, other = advanced(v1), new_record()
        assert await s.put([Write(v2, 1), Write(other, 0), Write(v2, 5)]) == [True, True, True]
        assert await s.get(v1.session_id) == v2

    run(redis_url, body)


def test_a_put_of_200_writes(url: str) -> None:
    async def body(s: StateStore) -> None:
        recs = [new_record() for _ in range(200)]
        assert await s.put([Write(r, 0) for r in recs]) == [True] * 200
        nexts = [advanced(r) for r in recs]
        expect = [i % 3 != 0 for i in range(200)]
        writes = [Write(n, 1 if ok else 2) for n, ok in zip(nexts, expect, strict=True)]
        assert await s.put(writes) == expect
        for r, n, ok in zip(recs, nexts, expect, strict=True):
            assert await s.get(r.session_id) == (n if ok else r)

    run(url, body)


def test_sqlite_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "s.db"

    async def main() -> None:
        first = SqliteStore(path)
        rec = new_record()
        await first.put([Write(rec, 0)])
        second = SqliteStore(path)  # while the first is still open
        assert await second.get(rec.session_id) == rec
        rec2 = advanced(rec)
        assert await second.put([Write(rec2, 1)]) == [True]
        assert await first.put([Write(advanced(rec), 1)]) == [False]  # CAS across processes
        await first.close()
        await second.close()
        third = open_store(f"sqlite:///{path}")
        assert await third.get(rec.session_id) == rec2
        await third.close()

    asyncio.run(main())


def test_sqlite_commit_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    rec = new_record()
    child = f"""
import asyncio, sys
from server.state import SessionRecord, Write
from server.state.sqlite import SqliteStore
async def main():
    s = SqliteStore({str(path)!r})
    ok = await s.put([Write(SessionRecord.from_bytes(sys.stdin.buffer.read()), 0)])
    print(ok, flush=True)
asyncio.run(main())
import time; time.sleep(60)
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", child],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=False,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(rec.to_bytes())
        proc.stdin.close()
        assert proc.stdout.readline().strip() == b"[True]"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    async def main() -> None:
        s = SqliteStore(path)
        assert await s.get(rec.session_id) == rec
        await s.close()

    asyncio.run(main())


@pytest.mark.parametrize("backend", ["sqlite", "redis"])  # memory keeps objects, not bytes
def test_a_corrupt_stored_record_is_a_store_error(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'sessions.db'}"
    else:
        url = str(request.getfixturevalue("redis_url"))

    async def body(s: StateStore) -> None:
        rec = new_record()
        await s.put([Write(rec, 0)])
        if url.startswith("sqlite"):
            db = sqlite3.connect(tmp_path / "sessions.db")
            with db:
                db.execute("UPDATE sessions SET record = ? WHERE id = ?", (b"junk", rec.session_id))
            db.close()
        else:
            raw = redis.Redis.from_url(url)
            raw.hset(KEY_PREFIX + rec.session_id, "r", rec.to_bytes()[:-1])
            raw.close()
        with pytest.raises(StoreError, match=rec.session_id) as e:
            await s.get(rec.session_id)
        assert "\n" not in str(e.value)

    run(url, body)


def test_memory_store_keeps_its_own_copy() -> None:
    async def body(s: StateStore) -> None:
        rec = new_record()
        before = rec.h.copy()
        await s.put([Write(rec, 0)])
        rec.h[:] = 0  # the caller reuses its buffer
        got = await s.get(rec.session_id)
        assert got is not None and np.array_equal(got.h, before)

    run("memory", body)


def test_unreachable_redis_is_a_store_error() -> None:
    url = f"redis://127.0.0.1:{_free_port()}/0"  # nothing listens there

    async def body(s: StateStore) -> None:
        for call in (s.get("x"), s.put([Write(new_record(), 0)]), s.delete(["x"])):
            with pytest.raises(StoreError) as e:
                await call
            msg = str(e.value)
            assert "\n" not in msg and url in msg

    run(url, body)


def test_unopenable_sqlite_file_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no-such-dir"):
        SqliteStore(tmp_path / "no-such-dir" / "s.db")


def test_open_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = open_store("sqlite:///rel.db")  # three slashes: relative to the working directory
    assert (tmp_path / "rel.db").exists()
    asyncio.run(s.close())
    s = open_store(f"sqlite:///{tmp_path / 'abs.db'}")
    assert s.url == f"sqlite:////{str(tmp_path / 'abs.db').lstrip('/')}"
    asyncio.run(s.close())
    assert open_store("memory").url == "memory"
    r = open_store("redis://:secret@127.0.0.1:1/0")
    assert "secret" not in r.url
    asyncio.run(r.close())
    for bad in ("postgres://x/y", "sqlite://", "sqlite:///", "redis:///0", "", "file.db"):
        with pytest.raises(ValueError, match="redis://HOST:PORT/DB"):
            open_store(bad)
