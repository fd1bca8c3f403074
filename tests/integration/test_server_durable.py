"""Sessions that outlive the process: a durable store (SQLite here; Redis in the store tests and
the scale-out test), write-through, optimistic concurrency between servers sharing a store,
client-chosen ids, and Export/Import/Fork. Every logits row is compared with in-process ONNX
Runtime fed the same tokens.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import struct
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest

from export.graph import random_model
from protos.lstmserve.v1 import lstm_serve_pb2 as pb
from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.state_services import redis_url  # noqa: F401  (a fixture)

from .conftest import VOCAB, Reference

V = 28
ATOL = 1e-5


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"  # path is absolute: four slashes in all


def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def test_kill_9_and_restart_keep_every_acknowledged_step(serve, tmp_path: Path, reference):
    db = tmp_path / "sessions.db"
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    srv = serve("--state-store", sqlite_url(db), "--metrics-port", "-1")
    ch = grpc.insecure_channel(srv.target)
    stub = pb_grpc.LstmServeServiceStub(ch)
    n = 16
    sids = [stub.CreateSession(pb.CreateSessionRequest()).session_id for _ in range(n)]
    states = {sid: reference.zeros() for sid in sids}
    fed = {sid: 0 for sid in sids}

    def step_all(rounds: int) -> None:
        for _ in range(rounds):
            for sid in sids:
                chunk = [rng.randrange(V) for _ in range(rng.choice([1, 2, 5]))]
                r = stub.Step(
                    pb.StepRequest(
                        session_id=sid, token_ids=chunk, output=pb.STEP_OUTPUT_ALL_LOGITS
                    )
                )
                want, states[sid] = reference.feed(chunk, states[sid])
                got = np.asarray(r.logits, np.float32).reshape(len(chunk), V)
                np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=f"seed {seed}")
                fed[sid] += len(chunk)

    step_all(3)
    ch.close()
    # kill -9 of the process that holds the state: nothing is flushed on the way out.
    os.kill(srv.engine_pid, signal.SIGKILL)
    srv.proc.wait(10)
    srv2 = serve("--state-store", sqlite_url(db), "--metrics-port", "-1")
    ch = grpc.insecure_channel(srv2.target)
    stub = pb_grpc.LstmServeServiceStub(ch)
    for sid in sids:
        info = stub.GetSession(pb.GetSessionRequest(session_id=sid))
        assert info.steps == fed[sid], f"seed {seed}"
    step_all(2)  # every session goes on exactly where its last acknowledged step left it
    ch.close()


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_two_servers_sharing_a_store_never_both_advance_a_session(
    start_server, stub_for, tmp_path: Path, reference, store, request
):
    if store == "redis":
        # A database of its own: other tests share the server.
        url = str(request.getfixturevalue("redis_url")).rsplit("/", 1)[0] + "/3"
    else:
        url = sqlite_url(tmp_path / "shared.db")
    a = stub_for(start_server(state_store=url))
    b = stub_for(start_server(state_store=url))
    sid = a.CreateSession(pb.CreateSessionRequest()).session_id
    state = reference.zeros()

    def step(stub, tokens):
        return stub.Step(pb.StepRequest(session_id=sid, token_ids=tokens))

    r = step(a, [3, 4])  # A holds the session (version 2)
    want, state = reference.feed([3, 4], state)
    np.testing.assert_allclose(r.logits, want[-1], atol=ATOL, rtol=0)
    r = step(b, [5])  # B loads version 2 from the store and commits version 3
    want, state = reference.feed([5], state)
    np.testing.assert_allclose(r.logits, want[-1], atol=ATOL, rtol=0)
    # A's copy is stale: its commit over version 2 loses, nothing changes, A drops its copy.
    assert code_of(lambda: step(a, [6])) == grpc.StatusCode.ABORTED
    assert b.GetSession(pb.GetSessionRequest(session_id=sid)).steps == 3
    r = step(a, [6])  # the retry reads version 3
    want, state = reference.feed([6], state)
    np.testing.assert_allclose(r.logits, want[-1], atol=ATOL, rtol=0)
    # Generate through B continues from A's last step (B's copy was stale: one ABORTED first).
    assert (
        code_of(
            lambda: list(b.Generate(pb.GenerateRequest(session_id=sid, prompt="", max_tokens=5)))
        )
        == grpc.StatusCode.ABORTED
    )
    msgs = list(b.Generate(pb.GenerateRequest(session_id=sid, prompt="", max_tokens=20)))
    got = [t for m in msgs for t in m.token_ids]
    assert got == _greedy_from(reference, state, want[-1], 20)
    # A still holds version 4 in memory; what it reports is the store's version 5.
    assert a.GetSession(pb.GetSessionRequest(session_id=sid)).steps == 24
    assert b.GetSession(pb.GetSessionRequest(session_id=sid)).steps == 24


def _greedy_from(reference: Reference, state, logits: np.ndarray, n: int) -> list[int]:
    out = []
    for _ in range(n):
        tok = int(np.argmax(logits))
        out.append(tok)
        logits, state = reference.feed([tok], state)
        logits = logits[-1]
    return out


def test_client_chosen_ids(start_server, stub_for, tmp_path: Path):
    for url in ("memory", sqlite_url(tmp_path / "ids.db")):
        stub = stub_for(start_server(state_store=url))
        sid = "client-chosen_ID-0001"
        assert stub.CreateSession(pb.CreateSessionRequest(session_id=sid)).session_id == sid
        again = pb.CreateSessionRequest(session_id=sid)
        assert code_of(lambda s=stub, r=again: s.CreateSession(r)) == grpc.StatusCode.ALREADY_EXISTS
        for bad in ("short", "x" * 129, "has space in it!!", "ünïcödé-but-long-enough"):
            req = pb.CreateSessionRequest(session_id=bad)
            assert code_of(lambda s=stub, r=req: s.CreateSession(r)) == (
                grpc.StatusCode.INVALID_ARGUMENT
            ), bad
        stub.Step(pb.StepRequest(session_id=sid, text="the"))
        assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).steps == 3


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_export_import_and_fork_continue_exactly(
    start_server, stub_for, tmp_path: Path, reference, store
):
    url = "memory" if store == "memory" else sqlite_url(tmp_path / "x.db")
    stub = stub_for(start_server(state_store=url))
    sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
    stub.Step(pb.StepRequest(session_id=sid, token_ids=[3, 4, 5, 6]))
    record = stub.ExportSession(pb.ExportSessionRequest(session_id=sid)).record
    assert 0 < len(record) < 64 << 10
    copy = stub.ImportSession(
        pb.ImportSessionRequest(record=record, session_id="imported-session-01")
    ).session_id
    fork = stub.ForkSession(pb.ForkSessionRequest(session_id=sid)).session_id
    assert len({sid, copy, fork}) == 3
    _, state = reference.feed([3, 4, 5, 6], reference.zeros())
    want, _ = reference.feed([7, 8], state)
    for s in (sid, copy, fork):  # three independent continuations of the same state
        r = stub.Step(
            pb.StepRequest(session_id=s, token_ids=[7, 8], output=pb.STEP_OUTPUT_ALL_LOGITS)
        )
        np.testing.assert_allclose(
            np.asarray(r.logits, np.float32).reshape(2, V), want, atol=ATOL, rtol=0
        )
        assert r.steps == 6
    # The same record again under its own id: taken.
    req = pb.ImportSessionRequest(record=record)
    assert code_of(lambda: stub.ImportSession(req)) == grpc.StatusCode.ALREADY_EXISTS
    for bad in (record[:-1], record[:10] + bytes([record[10] ^ 1]) + record[11:], b"junk"):
        req = pb.ImportSessionRequest(record=bad, session_id="another-session-02")
        assert code_of(lambda r=req: stub.ImportSession(r)) == grpc.StatusCode.INVALID_ARGUMENT


def test_a_record_of_another_model_is_refused(serve, tmp_path: Path):
    db = tmp_path / "m.db"
    srv = serve("--state-store", sqlite_url(db), "--metrics-port", "-1")
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LstmServeServiceStub(ch)
        sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
        stub.Step(pb.StepRequest(session_id=sid, text="the time"))
        record = stub.ExportSession(pb.ExportSessionRequest(session_id=sid)).record
    srv.stop()
    other = tmp_path / "other" / "1" / "model.onnx"
    other.parent.mkdir(parents=True)
    onnx.save(random_model(VOCAB, hidden_size=24, num_layers=2, seed=99), str(other))
    srv = serve("--state-store", sqlite_url(db), "--metrics-port", "-1", model=other)
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LstmServeServiceStub(ch)
        req = pb.StepRequest(session_id=sid, text="x")
        with pytest.raises(grpc.RpcError) as e:
            stub.Step(req)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "model" in e.value.details()
        req2 = pb.ImportSessionRequest(record=record, session_id="foreign-record-0001")
        assert code_of(lambda: stub.ImportSession(req2)) == grpc.StatusCode.INVALID_ARGUMENT


def test_request_ids_survive_kill_9_and_a_restart(serve, tmp_path: Path, reference):
    """Issue 19: a retry after kill -9 and a restart fed its tokens again (steps 490 -> 492):
    the request ids lived only in the process. Now the session's record keeps them, with a
    digest of each payload and the outcome."""
    db = tmp_path / "rid.db"
    srv = serve("--state-store", sqlite_url(db), "--metrics-port", "-1")
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LstmServeServiceStub(ch)
        sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
        step = pb.StepRequest(session_id=sid, token_ids=[3, 4, 5], request_id="r-1")
        first = stub.Step(step)
        gen = pb.GenerateRequest(session_id=sid, prompt="", max_tokens=7, request_id="g-1")
        generated = [t for m in stub.Generate(gen) for t in m.token_ids]
        top = pb.StepRequest(
            session_id=sid, text="ab", output=pb.STEP_OUTPUT_TOP_K, top_k=3, request_id="t-1"
        )
        first_top = stub.Step(top)
    os.kill(srv.engine_pid, signal.SIGKILL)
    srv.proc.wait(10)
    srv2 = serve("--state-store", sqlite_url(db), "--metrics-port", "-1")
    with grpc.insecure_channel(srv2.target) as ch:
        stub = pb_grpc.LstmServeServiceStub(ch)
        steps = 3 + 7 + 2
        assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).steps == steps
        again = stub.Step(step)  # the restarted server never saw r-1: its record did
        assert list(again.logits) == list(first.logits) and again.steps == 3
        (whole,) = list(stub.Generate(gen))
        assert list(whole.token_ids) == generated
        again_top = stub.Step(top)
        assert [(t.token_id, t.probability) for t in again_top.top] == [
            (t.token_id, t.probability) for t in first_top.top
        ]
        assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).steps == steps
        # The same id with another payload is refused, and changes nothing.
        for other in (
            pb.StepRequest(session_id=sid, token_ids=[3, 4, 6], request_id="r-1"),
            pb.StepRequest(session_id=sid, token_ids=[3, 4, 5], request_id="g-1"),
        ):
            with pytest.raises(grpc.RpcError) as e:
                stub.Step(other)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "another request" in e.value.details()
        other_gen = pb.GenerateRequest(session_id=sid, prompt="", max_tokens=8, request_id="g-1")
        assert code_of(lambda: list(stub.Generate(other_gen))) == (grpc.StatusCode.INVALID_ARGUMENT)
        assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).steps == steps
        # The state holds every request exactly once.
        _, state = reference.feed([3, 4, 5, *generated, 2, 3], reference.zeros())
        want, _ = reference.feed([9], state)
        r = stub.Step(pb.StepRequest(session_id=sid, token_ids=[9]))
        np.testing.assert_allclose(r.logits, want[-1], atol=ATOL, rtol=0)


def test_request_ids_follow_a_session_to_another_server(start_server, stub_for, tmp_path: Path):
    """A failover: the retry reaches another server sharing the store; it returns the first
    outcome instead of applying the request again."""
    url = sqlite_url(tmp_path / "failover.db")
    a = stub_for(start_server(state_store=url))
    b = stub_for(start_server(state_store=url))
    sid = a.CreateSession(pb.CreateSessionRequest()).session_id
    req = pb.StepRequest(session_id=sid, token_ids=[5, 6], request_id="once")
    first = a.Step(req)
    again = b.Step(req)
    assert list(again.logits) == list(first.logits) and again.steps == first.steps == 2
    assert b.GetSession(pb.GetSessionRequest(session_id=sid)).steps == 2
    bad = pb.StepRequest(session_id=sid, token_ids=[5], request_id="once")
    assert code_of(lambda: b.Step(bad)) == grpc.StatusCode.INVALID_ARGUMENT


def test_records_of_the_previous_format_still_load(serve, tmp_path: Path, reference):
    """Records written before format 2 (no request ids) under the bare session id (principal
    "", before ids were scoped per principal) load and continue exactly."""
    import sqlite3

    import msgpack

    db = tmp_path / "old.db"
    srv = serve("--state-store", sqlite_url(db), "--metrics-port", "-1")
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LstmServeServiceStub(ch)
        sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
        stub.Step(pb.StepRequest(session_id=sid, token_ids=[3, 4, 5], request_id="r-1"))
    srv.stop()
    con = sqlite3.connect(db)
    ((key, blob),) = con.execute("SELECT id, record FROM sessions").fetchall()
    assert key == sid  # principal "": the bare id, as before
    body = blob[:-32]
    (head_len,) = struct.unpack_from("<I", body, 6)
    header = msgpack.unpackb(body[10 : 10 + head_len], raw=False)
    assert header.pop("requests")
    head = msgpack.packb(header, use_bin_type=True)
    old = body[:4] + struct.pack("<HI", 1, len(head)) + head + body[10 + head_len :]
    old += hashlib.sha256(old).digest()
    con.execute("UPDATE sessions SET record = ? WHERE id = ?", (old, key))
    con.commit()
    con.close()
    srv = serve("--state-store", sqlite_url(db), "--metrics-port", "-1")
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LstmServeServiceStub(ch)
        assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).steps == 3
        r = stub.Step(pb.StepRequest(session_id=sid, token_ids=[6]))
        _, state = reference.feed([3, 4, 5], reference.zeros())
        want, _ = reference.feed([6], state)
        np.testing.assert_allclose(r.logits, want[-1], atol=ATOL, rtol=0)
        assert r.steps == 4
