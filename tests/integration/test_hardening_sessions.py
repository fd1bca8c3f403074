"""Issue 19, second pass, on sessions: a commit that a cancellation cannot cut in two, nothing
committed once the deadline is known to have passed, session ids scoped per principal (KServe
sequences included), every StepStream message under the rate limit, and store failures mapped
to UNAVAILABLE (an outage) or INTERNAL (a bug).

Tests that need a controlled race drive the engine's data plane on the server's own event loop
(``srv.call``), with the durable store wrapped so that a write can be held while the request
that made it is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from protos.lstmserve.v1 import lstm_serve_pb2 as pb
from server.client import LstmClient
from server.dataplane import Caller, DataPlane, GenerateParams
from server.state.base import StoreError, Write
from server.state.record import SessionRecord

from .conftest import Reference, ServerThread

V = 28
ATOL = 1e-5
TOKEN_A = "token-of-alice-0123456789"
TOKEN_B = "token-of-bob-9876543210xx"


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def plane_of(srv: ServerThread) -> DataPlane:
    assert srv.app is not None and srv.app.core is not None
    return srv.app.core.models.default().plane


class Wrapped:
    """A state store around a real one: a put can be held (``hold``) until ``release``; the
    next puts or gets can be made to raise."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.url = inner.url
        self._gate: asyncio.Event | None = None
        self.entered: asyncio.Event | None = None
        self.put_error: BaseException | None = None
        self.get_error: BaseException | None = None
        self.puts = 0

    def hold(self) -> None:
        self._gate = asyncio.Event()
        self.entered = asyncio.Event()

    def release(self) -> None:
        assert self._gate is not None
        self._gate.set()

    async def get(self, key: str) -> SessionRecord | None:
        if self.get_error is not None:
            raise self.get_error
        return await self.inner.get(key)

    async def put(self, writes: Sequence[Write]) -> list[bool]:
        self.puts += 1
        if self.put_error is not None:
            raise self.put_error
        if self._gate is not None:
            assert self.entered is not None
            self.entered.set()
            await self._gate.wait()
        return await self.inner.put(writes)

    async def delete(self, keys: Sequence[str]) -> None:
        await self.inner.delete(keys)

    async def close(self) -> None:
        await self.inner.close()


def wrap_store(srv: ServerThread) -> Wrapped:
    """Wrap the durable store of the default version's plane (and of the model router)."""

    def install() -> Wrapped:
        plane = plane_of(srv)
        assert plane.durable is not None
        w = Wrapped(plane.durable.store)
        plane.durable.store = w
        assert srv.app is not None and srv.app.core is not None
        srv.app.core.models.durable_store = w
        return w

    return srv.on_loop(install)


# --- deadlines and commits -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["step", "generate"])
def test_a_cancel_while_the_commit_is_out_keeps_count_state_and_request_id_together(
    start_server, tmp_path: Path, reference: Reference, kind: str
):
    """The window no server can close: the write is out when the client gives up. The request
    waits for the write's outcome, so the step count, the state and the request id agree with
    the store, and the retry with the same id returns the committed outcome (before: the local
    copy was dropped, the retry reloaded the committed record without its request ids and fed
    the tokens a second time: GetSession counted them twice)."""
    srv = start_server(state_store=sqlite_url(tmp_path / "s.db"))
    plane = plane_of(srv)
    store = wrap_store(srv)
    params = GenerateParams(max_tokens=9)

    async def attempt() -> Any:
        if kind == "step":
            return await plane.step(sid, token_ids=[3, 4, 5], request_id="r-1")
        out = []
        async for chunk in plane.generate(sid, "ab", params, request_id="r-1"):
            out += chunk.token_ids
        return out

    async def scenario() -> tuple[Any, Any, int]:
        store.hold()
        assert store.entered is not None
        first = asyncio.get_running_loop().create_task(attempt())
        await store.entered.wait()  # the write is out
        first.cancel()  # the client's deadline passes now
        await asyncio.sleep(0.01)
        store.release()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        # The cancelled request waited for the write's outcome: it has landed (no sleeping on
        # the chance that it has).
        landed = await store.inner.get(sid)
        assert landed is not None and landed.steps == (3 if kind == "step" else 2 + 9), landed
        again = await attempt()  # the retry, same request id
        info = await plane.get_session(sid)
        return again, await attempt(), info.steps

    sid = srv.call(plane.create_session()).session_id
    again, third, steps = srv.call(scenario())
    if kind == "step":
        want, state = reference.feed([3, 4, 5], reference.zeros())
        np.testing.assert_allclose(again.logits[-1], want[-1], atol=ATOL, rtol=0)
        assert again.steps == third.steps == steps == 3, "a retried request was counted twice"
        fed = [3, 4, 5]
    else:
        want_ids, state = reference.greedy_with_state([2, 3], 9)
        assert again == third == want_ids
        assert steps == 2 + 9, "a retried generation was counted twice"
        fed = [2, 3, *want_ids]
    # The state holds each token once: the next step continues from exactly there.
    _, state = reference.feed(fed, reference.zeros())
    want, _ = reference.feed([7], state)
    probe = srv.call(plane.step(sid, token_ids=[7]))
    np.testing.assert_allclose(probe.logits[-1], want[-1], atol=ATOL, rtol=0)


def test_an_outcome_too_large_for_the_record_is_kept_as_applied_only(
    start_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A record keeps the newest outcomes that fit in RECENT_RECORD_BYTES; a retry of an older
    or larger one, once the session was reloaded from the store, is told that the request was
    applied (ALREADY_EXISTS) instead of being applied again."""
    import server.dataplane as dp
    from server.errors import AlreadyExists

    srv = start_server(state_store=sqlite_url(tmp_path / "big.db"))
    plane = plane_of(srv)
    sid = srv.call(plane.create_session()).session_id
    monkeypatch.setattr(dp, "RECENT_RECORD_BYTES", 600)  # one last-logits outcome (~150 bytes)
    big = srv.call(plane.step(sid, token_ids=list(range(1, 9)), output="all", request_id="big"))
    small = srv.call(plane.step(sid, token_ids=[3], request_id="small"))
    # This process remembers both whole.
    assert srv.call(plane.step(sid, token_ids=list(range(1, 9)), output="all", request_id="big"))
    # A restart (or another replica) has only the record.
    srv.on_loop(lambda: plane.store.drop(plane.store.local(sid)))
    again = srv.call(plane.step(sid, token_ids=[3], request_id="small"))
    assert again.steps == small.steps == 9 and np.array_equal(again.logits, small.logits)
    with pytest.raises(AlreadyExists, match="applied already"):
        srv.call(plane.step(sid, token_ids=list(range(1, 9)), output="all", request_id="big"))
    assert big.steps == 8 and srv.call(plane.get_session(sid)).steps == 9


def test_nothing_is_committed_once_the_deadline_is_known_to_have_passed(
    start_server, tmp_path: Path
):
    srv = start_server(state_store=sqlite_url(tmp_path / "d.db"))
    plane = plane_of(srv)
    sid = srv.call(plane.create_session()).session_id
    srv.call(plane.step(sid, token_ids=[1, 2, 3]))
    late = Caller("", deadline=time.monotonic() - 1.0)
    from server.errors import DeadlineExceeded

    with pytest.raises(DeadlineExceeded):
        srv.call(plane.reset_session(sid, caller=late))
    assert srv.call(plane.get_session(sid)).steps == 3  # not reset
    with pytest.raises(DeadlineExceeded):
        srv.call(plane.create_session(0.0, "too-late-session-01", caller=late))
    from server.errors import NotFound

    with pytest.raises(NotFound):
        srv.call(plane.get_session("too-late-session-01"))
    assert srv.on_loop(lambda: len(plane.store)) == 1
    # The last moment: a write whose deadline passed while it waited for its batch is not sent.
    durable = plane.durable
    assert durable is not None

    async def late_write() -> None:
        record = await durable.load(sid)
        assert record is not None
        await durable.commit(record.replace(version=record.version + 1, steps=99), 2, late.deadline)

    with pytest.raises(DeadlineExceeded):
        srv.call(late_write())
    assert srv.call(plane.get_session(sid)).steps == 3


# --- session ids scoped per principal ---------------------------------------------------------


def _tokens(tmp_path: Path) -> str:
    path = tmp_path / "tokens"
    path.write_text(f"alice {TOKEN_A}\nbob {TOKEN_B}\n")
    return str(path)


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_two_principals_may_use_the_same_session_id(
    start_server, tmp_path: Path, reference: Reference, store: str
):
    """Before: Bob's CreateSession, ForkSession and ImportSession with Alice's id answered
    ALREADY_EXISTS "is taken", telling Bob that Alice uses that id."""
    url = "memory" if store == "memory" else sqlite_url(tmp_path / "p.db")
    srv = start_server(auth_tokens=_tokens(tmp_path), state_store=url)
    alice = LstmClient(srv.target, token=TOKEN_A, timeout=10)
    bob = LstmClient(srv.target, token=TOKEN_B, timeout=10)
    shared, forked, imported = "shared-session-0001", "forked-session-0001", "imported-sess-0001"
    try:
        assert alice.create_session(session_id=shared) == shared
        assert bob.create_session(session_id=shared) == shared  # Bob's own
        alice.step(shared, token_ids=[3, 4, 5])
        bob.step(shared, token_ids=[9])
        assert alice.get_session(shared).steps == 3 and bob.get_session(shared).steps == 1
        # Alice's fork and import take ids that Bob then takes too, each as his own.
        assert alice.fork_session(shared, forked) == forked
        record = alice.export_session(shared)
        assert alice.import_session(record, imported) == imported
        assert bob.fork_session(shared, forked) == forked
        assert bob.import_session(bob.export_session(shared), imported) == imported
        # Within one principal an id is still taken.
        assert code_of(lambda: bob.create_session(session_id=shared)) == (
            grpc.StatusCode.ALREADY_EXISTS
        )
        for sid, steps in ((shared, 3), (forked, 3), (imported, 3)):
            assert alice.get_session(sid).steps == steps
            assert bob.get_session(sid).steps == 1
        # Each continues its own state exactly.
        _, a_state = reference.feed([3, 4, 5], reference.zeros())
        _, b_state = reference.feed([9], reference.zeros())
        for client, state in ((alice, a_state), (bob, b_state)):
            for sid in (shared, forked, imported):
                want, _ = reference.feed([7], state)
                got = np.asarray(client.step(sid, token_ids=[7]).logits, np.float32)
                np.testing.assert_allclose(got.reshape(-1, V)[-1], want[-1], atol=ATOL, rtol=0)
        # Closing Alice's leaves Bob's.
        alice.close_session(shared)
        assert code_of(lambda: alice.get_session(shared)) == grpc.StatusCode.NOT_FOUND
        assert bob.get_session(shared).steps == 2
    finally:
        alice.close()
        bob.close()
    if store == "sqlite":
        # Two records under one id, one per principal: a restart loads each principal's own.
        srv.stop()
        srv2 = start_server(auth_tokens=_tokens(tmp_path), state_store=url)
        with LstmClient(srv2.target, token=TOKEN_B, timeout=10) as bob:
            assert bob.get_session(shared).steps == 2
            assert bob.step(shared, token_ids=[1]).steps == 3
        with LstmClient(srv2.target, token=TOKEN_A, timeout=10) as alice:
            assert code_of(lambda: alice.get_session(shared)) == grpc.StatusCode.NOT_FOUND
            assert alice.get_session(forked).steps == 4


def test_kserve_sequences_are_scoped_per_principal(start_server, tmp_path: Path, reference):
    """Alice and Bob run the same sequence ids at the same time, each getting exactly the
    outputs of their own inputs. Before: one namespace for all principals; Bob's
    sequence_start on Alice's sequence got NOT_FOUND, and a session called
    ``kserve-seq-n...`` squatted a future sequence of Alice's."""
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient (dev extra) is not installed")
    from .test_kserve import Oracle, check, run_client_as

    srv = start_server(auth_tokens=_tokens(tmp_path))
    seed = random.SystemRandom().randrange(2**32)
    rng = np.random.default_rng(seed)

    def plan(seq_ids: list[Any]) -> list[dict[str, Any]]:
        steps = []
        for i in range(6):
            for s in seq_ids:
                tokens = [int(t) for t in rng.integers(0, V, int(rng.integers(1, 4)))]
                steps.append({"seq": s, "start": i == 0, "end": i == 5, "tokens": tokens})
        return steps

    # Bob squats Alice's next sequence id as a plain session first: no effect on Alice.
    squat = "kserve-seq-n00000000000000000077"
    with LstmClient(srv.target, token=TOKEN_B, timeout=10) as bob:
        bob.create_session(session_id=squat)
        bob.step(squat, token_ids=[1, 2])
    # Then both run sequences 78 and "shared-seq" at the same time (Alice also runs 77).
    plans = {TOKEN_A: plan([77, 78, "shared-seq"]), TOKEN_B: plan([78, "shared-seq"])}
    out: dict[str, Any] = {}

    def run(token: str) -> None:
        out[token] = run_client_as(
            srv.target, [{"op": "stream", "steps": plans[token]}], token=token
        )

    threads = [threading.Thread(target=run, args=(t,)) for t in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for token, steps in plans.items():
        who = "alice" if token == TOKEN_A else "bob"
        check(out[token][0], steps, Oracle(reference), f"seed {seed}, {who}")
    # Bob's plain session is as he left it; Alice's sequences have all ended.
    with LstmClient(srv.target, token=TOKEN_B, timeout=10) as bob:
        assert bob.get_session(squat).steps == 2, f"seed {seed}"
    with LstmClient(srv.target, token=TOKEN_A, timeout=10) as alice:
        assert code_of(lambda: alice.get_session(squat)) == grpc.StatusCode.NOT_FOUND, (
            f"seed {seed}"
        )


# --- the rate limit counts stream messages ----------------------------------------------------


class FrozenClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def _freeze(srv: ServerThread) -> FrozenClock:
    clock = FrozenClock()

    def install() -> None:
        assert srv.app is not None and srv.app.core is not None
        for v in srv.app.core.models.versions.values():
            v.plane.clock = clock

    srv.on_loop(install)
    return clock


def test_stream_messages_count_against_the_rate_limit(start_server, stub_for):
    """Before: 100 of 100 StepStream messages passed with --rate-limit-rps 10 (only opening
    the stream took a token). Now each message takes one; over the bucket (two seconds'
    worth: 20) the stream ends with RESOURCE_EXHAUSTED after the messages already answered."""
    srv = start_server(rate_limit_rps=10)
    clock = _freeze(srv)
    stub = stub_for(srv)
    msgs = [pb.StepStreamRequest(token_ids=[1 + i % 20]) for i in range(100)]
    got = []
    with pytest.raises(grpc.RpcError) as e:
        for r in stub.StepStream(iter(msgs), timeout=30):
            got.append(r.steps)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "rate_limit_rps=10" in e.value.details()
    assert got == list(range(1, 21))  # the bucket: 20 messages, then the stream ends
    # A Generate is one request too; half a second refills 5 tokens.
    g = pb.GenerateRequest(prompt="a", max_tokens=3)
    assert code_of(lambda: list(stub.Generate(g))) == grpc.StatusCode.RESOURCE_EXHAUSTED
    clock.now += 0.5
    again = [r.steps for r in stub.StepStream(iter(msgs[:5]), timeout=30)]
    assert again == [1, 2, 3, 4, 5]
    assert code_of(lambda: list(stub.StepStream(iter(msgs[:1]), timeout=30))) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )


def test_kserve_stream_requests_count_against_the_rate_limit(start_server):
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient (dev extra) is not installed")
    from .test_kserve import run_client

    srv = start_server(rate_limit_rps=10)
    _freeze(srv)
    steps = [{"tokens": [1, 2]} for _ in range(30)]
    (got,) = run_client(srv.target, [{"op": "stream-each", "steps": steps}])
    # Each request of the stream is one request: 20 answered, then errors (the stream goes on).
    assert len([k for k in got if k != "errors"]) == 20
    assert len(got["errors"]) == 10 and all("rate" in m for m in got["errors"])


# --- store failures: an outage is UNAVAILABLE, a bug is INTERNAL -------------------------------


def test_a_store_bug_is_internal_and_an_outage_unavailable(
    start_server, stub_for, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """Before: any exception of the store became UNAVAILABLE, so a bug made clients retry
    forever; and a connection error while routing a session became INTERNAL."""
    srv = start_server(state_store=sqlite_url(tmp_path / "e.db"))
    stub = stub_for(srv)
    store = wrap_store(srv)
    sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
    step = pb.StepRequest(session_id=sid, token_ids=[1, 2])
    stub.Step(step)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        store.put_error = TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")
        with pytest.raises(grpc.RpcError) as e:
            stub.Step(step)
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert "TypeError" in e.value.details() and "unsupported" not in e.value.details()
    # Logged once, with its traceback.
    with_tb = [r for r in caplog.records if r.exc_info]
    assert len(with_tb) == 1 and with_tb[0].exc_info[0] is TypeError, caplog.records
    # An outage is worth a retry.
    store.put_error = StoreError("sqlite store x: database is locked")
    assert code_of(lambda: stub.Step(step)) == grpc.StatusCode.UNAVAILABLE
    store.put_error = None
    # The failed commits dropped the local copy (their outcome was unknown); the store's copy
    # is the truth: 2 steps.
    assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).steps == 2
    assert stub.Step(step).steps == 4
    # Routing a session this process does not hold reads the store: an outage there is
    # UNAVAILABLE too, a bug INTERNAL.
    srv.on_loop(lambda: plane_of(srv).store.drop(plane_of(srv).store.local(sid)))
    store.get_error = StoreError("redis store x: ConnectionError: refused")
    assert code_of(lambda: stub.Step(step)) == grpc.StatusCode.UNAVAILABLE
    store.get_error = KeyError("bug")
    assert code_of(lambda: stub.Step(step)) == grpc.StatusCode.INTERNAL
    store.get_error = None
    assert stub.Step(step).steps == 6
