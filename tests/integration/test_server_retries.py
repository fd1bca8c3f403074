"""Failed calls and retries: a request id makes a retry return the first attempt's outcome
instead of feeding the tokens twice, and nothing is committed after the client's deadline.

The race between a client deadline and the server's commit cannot be closed by any server; what
can be promised is checked: hundreds of deadlines raced against Steps, StepStream messages and
Generates, each followed by retries with the same request id, leave every session equal to
in-process ONNX Runtime fed each request exactly once.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos.lstmserve.v1 import lstm_serve_pb2 as pb
from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from server.state.record import SessionRecord

from .conftest import Reference

V = 28
ATOL = 1e-5
GIVE_UP = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


def test_a_retry_with_the_same_request_id_is_not_fed_twice(start_server, stub_for, reference):
    stub = stub_for(start_server())
    sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
    req = pb.StepRequest(session_id=sid, token_ids=[3, 4, 5], request_id="r-1")
    first = stub.Step(req)
    again = stub.Step(req)
    assert list(again.logits) == list(first.logits) and again.steps == first.steps == 3
    other = stub.Step(pb.StepRequest(session_id=sid, token_ids=[6], request_id="r-2"))
    assert other.steps == 4
    want, _ = reference.feed([3, 4, 5, 6], reference.zeros())
    np.testing.assert_allclose(other.logits, want[-1], atol=ATOL, rtol=0)
    # Generate: the retry returns the whole first outcome in one message.
    g = pb.GenerateRequest(session_id=sid, prompt="", max_tokens=12, request_id="g-1")
    msgs = list(stub.Generate(g))
    again = list(stub.Generate(g))
    assert len(again) == 1 and again[0].finish_reason == msgs[-1].finish_reason
    assert list(again[0].token_ids) == [t for m in msgs for t in m.token_ids]
    assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).steps == 4 + 12
    # The same id with another payload (other tokens, other output, or a Generate's id on a
    # Step) is refused, not answered with the first call's result (issue 19).
    for other in (
        pb.StepRequest(session_id=sid, token_ids=[3, 4, 6], request_id="r-1"),
        pb.StepRequest(
            session_id=sid, token_ids=[3, 4, 5], request_id="r-1", output=pb.STEP_OUTPUT_ALL_LOGITS
        ),
        pb.StepRequest(session_id=sid, token_ids=[3, 4, 5], request_id="g-1"),
    ):
        with pytest.raises(grpc.RpcError) as e:
            stub.Step(other)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, other
    g2 = pb.GenerateRequest(session_id=sid, prompt="", max_tokens=13, request_id="g-1")
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(g2))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Text is its tokens: the same step as text is the same request.
    txt = pb.StepRequest(session_id=sid, text="cd", request_id="t-1")
    assert (
        stub.Step(txt).steps
        == stub.Step(pb.StepRequest(session_id=sid, token_ids=[4, 5], request_id="t-1")).steps
    )
    assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).steps == 4 + 12 + 2
    too_long = pb.StepRequest(session_id=sid, token_ids=[1], request_id="x" * 129)
    with pytest.raises(grpc.RpcError) as e:
        stub.Step(too_long)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("mode", "processes"),
    [("step", False), ("stream", False), ("generate", False), ("step", True), ("generate", True)],
)
def test_deadlines_raced_against_requests_then_retried_feed_each_request_once(
    start_server, stub_for, serve, reference: Reference, mode: str, processes: bool
):
    # processes: a real lstm-serve, where the front end passes the time left to the engine.
    if processes:
        channel = grpc.insecure_channel(serve("--metrics-port", "-1").target)
        stub = pb_grpc.LstmServeServiceStub(channel)
    else:
        stub = stub_for(start_server())
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    n_sessions, n_requests = 4, 60 if mode != "generate" else 25
    sids = [stub.CreateSession(pb.CreateSessionRequest()).session_id for _ in range(n_sessions)]
    fed: dict[str, list[int]] = {sid: [] for sid in sids}
    raced = certain = certain_expired = 0
    for i in range(n_requests):
        sid = sids[i % n_sessions]
        rid = uuid.uuid4().hex
        # Deadlines around the time a request takes here: some expire before, some during,
        # some after the commit. Every 8th request is certain to expire (a 300-token Generate
        # in 1 ms), so the race is exercised whatever this machine's speed (gRPC itself lets a
        # request with a sub-millisecond deadline through now and then).
        is_certain = i % 8 == 7
        deadline = 0.001 if is_certain else rng.choice([0.0002, 0.0005, 0.001, 0.002, 0.005, 0.02])
        certain += is_certain
        if mode == "generate" or is_certain:
            n = 300 if is_certain else rng.randrange(1, 30)

            def call(timeout, rid=rid, sid=sid, n=n):
                req = pb.GenerateRequest(session_id=sid, prompt="", max_tokens=n, request_id=rid)
                if not fed[sid]:
                    req.prompt = "a"
                return [t for m in stub.Generate(req, timeout=timeout) for t in m.token_ids]

        else:
            chunk = [rng.randrange(1, V) for _ in range(rng.choice([1, 1, 2, 5]))]

            def call(timeout, rid=rid, sid=sid, chunk=chunk):
                if mode == "step":
                    r = stub.Step(
                        pb.StepRequest(session_id=sid, token_ids=chunk, request_id=rid),
                        timeout=timeout,
                    )
                else:
                    msg = pb.StepStreamRequest(session_id=sid, token_ids=chunk, request_id=rid)
                    (r,) = list(stub.StepStream(iter([msg]), timeout=timeout))
                return list(r.logits)

        try:
            got = call(deadline)
        except grpc.RpcError as e:
            assert e.code() in GIVE_UP | {grpc.StatusCode.FAILED_PRECONDITION}, (seed, e)
            raced += 1
            certain_expired += is_certain
            got = None
            # The retry: same id, a long deadline, for as long as the first attempt may still
            # hold the session (however loaded this machine is).
            retry_until = time.monotonic() + 60
            while got is None and time.monotonic() < retry_until:
                try:
                    got = call(10.0)
                except grpc.RpcError as e2:
                    assert e2.code() == grpc.StatusCode.FAILED_PRECONDITION, (seed, e2)
                    time.sleep(0.002)
            assert got is not None, f"seed {seed}: request {i} never went through"
        if mode == "generate" or is_certain:
            prefix = [] if fed[sid] else [reference_index("a")]
            fed[sid] += prefix + got
        else:
            state = reference.zeros()
            _, state = _feed_all(reference, fed[sid], state)
            want, _ = reference.feed(chunk, state)
            np.testing.assert_allclose(got, want[-1], atol=ATOL, rtol=0, err_msg=f"seed {seed}")
            fed[sid] += chunk
    assert certain_expired == certain > 0, (
        f"seed {seed}: {certain_expired} of {certain} certain deadlines"
    )
    assert raced >= certain, f"seed {seed}"
    for sid in sids:
        info = stub.GetSession(pb.GetSessionRequest(session_id=sid))
        assert info.steps == len(fed[sid]), f"seed {seed}: fed twice or lost"
        # The session's state is the reference's for exactly these tokens.
        probe = stub.Step(pb.StepRequest(session_id=sid, token_ids=[7]))
        state = reference.zeros()
        _, state = _feed_all(reference, fed[sid], state)
        want, _ = reference.feed([7], state)
        np.testing.assert_allclose(probe.logits, want[-1], atol=ATOL, rtol=0, err_msg=f"{seed}")
        if mode == "generate":
            # Greedy generation: the tokens follow the model from where the session was.
            ids = fed[sid]
            assert ids[1:] == _greedy_path(reference, ids), f"seed {seed}"


@pytest.mark.parametrize(
    ("store", "processes"), [("memory", False), ("sqlite", False), ("sqlite", True)]
)
def test_hundreds_of_tiny_deadlines_on_many_sessions_at_once(
    start_server, serve, tmp_path: Path, reference: Reference, store: str, processes: bool
):
    """Issue 19: 500 calls with 0.2-20 ms deadlines on 48 sessions left 3 sessions whose step
    count was ahead of their state (a durable commit cut in two by the cancellation: the local
    copy dropped, the retry fed the tokens again on the committed record) and 7 whose state held
    a call the client saw fail. Here every session has its own client thread (so the engine
    batches them, and commits go to the store together); Steps, StepStream messages and
    Generates race tiny deadlines; every failed call is retried with its request id. Every
    reply, every session's step count and its exact state (ExportSession) must equal the
    in-process reference fed each request exactly once."""
    url = "memory" if store == "memory" else f"sqlite:///{tmp_path / 'retries.db'}"
    if processes:
        target = serve("--metrics-port", "-1", "--state-store", url).target
    else:
        target = start_server(state_store=url).target
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.LstmServeServiceStub(channel)
    seed = random.SystemRandom().randrange(2**32)
    n_sessions, per_session = 24, 14
    sids = [stub.CreateSession(pb.CreateSessionRequest()).session_id for _ in range(n_sessions)]
    counts = {"expired": 0, "certain": 0, "certain_expired": 0}
    lock = threading.Lock()
    errors: list[BaseException] = []
    fed: dict[str, list[int]] = {}

    def client(k: int, sid: str) -> None:
        rng = random.Random(seed + k)
        tokens: list[int] = []
        state = reference.zeros()
        last: np.ndarray | None = None  # the reference's next-token logits
        for i in range(per_session):
            rid = uuid.uuid4().hex
            certain = i % 7 == 6  # a 300-token Generate in 1 ms: certain to expire
            kind = "generate" if certain else rng.choice(["step", "stream", "generate"])
            deadline = 0.001 if certain else rng.choice([2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02])
            chunk = [rng.randrange(1, V) for _ in range(rng.choice([1, 1, 2, 5, 20]))]
            n = 300 if certain else rng.randrange(1, 40)
            prompt = "" if tokens else "a"

            def call(timeout: float, kind=kind, rid=rid, chunk=chunk, n=n, prompt=prompt):
                if kind == "generate":
                    req = pb.GenerateRequest(
                        session_id=sid, prompt=prompt, max_tokens=n, request_id=rid
                    )
                    return [t for m in stub.Generate(req, timeout=timeout) for t in m.token_ids]
                if kind == "step":
                    r = stub.Step(
                        pb.StepRequest(session_id=sid, token_ids=chunk, request_id=rid),
                        timeout=timeout,
                    )
                else:
                    msg = pb.StepStreamRequest(session_id=sid, token_ids=chunk, request_id=rid)
                    (r,) = list(stub.StepStream(iter([msg]), timeout=timeout))
                return r

            try:
                got = call(deadline)
            except grpc.RpcError as e:
                assert e.code() in GIVE_UP | {grpc.StatusCode.FAILED_PRECONDITION}, (seed, k, i, e)
                with lock:
                    counts["expired"] += 1
                    counts["certain_expired"] += certain
                got = None
                # The retry: same request id, a long deadline, for as long as the first attempt
                # may still hold the session (however loaded this machine is).
                retry_until = time.monotonic() + 60
                while got is None and time.monotonic() < retry_until:
                    try:
                        got = call(10.0)
                    except grpc.RpcError as e2:
                        assert e2.code() == grpc.StatusCode.FAILED_PRECONDITION, (seed, k, i, e2)
                        time.sleep(0.001)
                assert got is not None, f"seed {seed}: session {k} call {i} never went through"
            with lock:
                counts["certain"] += certain
            if kind == "generate":
                if prompt:
                    logits, state = reference.feed([reference_index(prompt)], state)
                    last = logits[-1]
                    tokens.append(reference_index(prompt))
                assert last is not None, f"seed {seed}: session {k} call {i}"
                for t in got:  # greedy: each token is the argmax after everything before it
                    assert t == int(np.argmax(last)), f"seed {seed}: session {k} call {i}"
                    logits, state = reference.feed([t], state)
                    last = logits[-1]
                tokens += got
            else:
                logits, state = reference.feed(chunk, state)
                np.testing.assert_allclose(
                    got.logits, logits[-1], atol=ATOL, rtol=0, err_msg=f"seed {seed}, {k}/{i}"
                )
                last = logits[-1]
                tokens += chunk
                assert got.steps == len(tokens), f"seed {seed}: session {k} call {i}"
        fed[sid] = tokens

    def run(k: int, sid: str) -> None:
        try:
            client(k, sid)
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k, s)) for k, s in enumerate(sids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    if errors:
        raise errors[0]
    assert counts["certain_expired"] == counts["certain"] > 0, (seed, counts)
    assert counts["expired"] >= counts["certain"], (seed, counts)
    for sid in sids:
        info = stub.GetSession(pb.GetSessionRequest(session_id=sid))
        assert info.steps == len(fed[sid]), f"seed {seed}: a request counted twice or lost"
        _, state = reference.feed(fed[sid], reference.zeros())
        record = SessionRecord.from_bytes(
            stub.ExportSession(pb.ExportSessionRequest(session_id=sid)).record
        )
        assert record.steps == len(fed[sid]), f"seed {seed}"
        np.testing.assert_allclose(record.h, state[0][:, 0], atol=ATOL, rtol=0, err_msg=f"{seed}")
        np.testing.assert_allclose(record.c, state[1][:, 0], atol=ATOL, rtol=0, err_msg=f"{seed}")
    channel.close()


def _feed_all(reference: Reference, tokens: list[int], state):
    if not tokens:
        return None, state
    return reference.feed(tokens, state)


def _greedy_path(reference: Reference, ids: list[int]) -> list[int]:
    # Each generated token is the argmax after everything before it.
    out = []
    state = reference.zeros()
    for tok in ids[:-1]:
        logits, state = reference.feed([tok], state)
        out.append(int(np.argmax(logits[-1])))
    return out


VOCAB = ["<unk>", " ", *"abcdefghijklmnopqrstuvwxyz"]


def reference_index(ch: str) -> int:
    return VOCAB.index(ch)
