"""Failed calls and retries: a request id makes a retry return the first attempt's outcome
instead of feeding the tokens twice, and nothing is committed after the client's deadline.

The race between a client deadline and the server's commit cannot be closed by any server; what
can be promised is checked: hundreds of deadlines raced against Steps, StepStream messages and
Generates, each followed by retries with the same request id, leave every session equal to
in-process ONNX Runtime fed each request exactly once.
"""

from __future__ import annotations

import random
import uuid

import grpc
import numpy as np
import pytest

from protos.lstmserve.v1 import lstm_serve_pb2 as pb
from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc

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
    raced = 0
    for i in range(n_requests):
        sid = sids[i % n_sessions]
        rid = uuid.uuid4().hex
        # Deadlines around the time a request takes here: some expire before, some during,
        # some after the commit.
        deadline = rng.choice([0.0002, 0.0005, 0.001, 0.002, 0.005, 0.02])
        if mode == "generate":
            n = rng.randrange(1, 30)

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
            assert e.code() in GIVE_UP | {grpc.StatusCode.FAILED_PRECONDITION}, e
            raced += 1
            got = None
            for _ in range(200):  # the retry: same id, a long deadline
                try:
                    got = call(10.0)
                    break
                except grpc.RpcError as e2:
                    # The first attempt may still hold the session for a moment.
                    assert e2.code() == grpc.StatusCode.FAILED_PRECONDITION, e2
            assert got is not None
        if mode == "generate":
            prefix = [] if fed[sid] else [reference_index("a")]
            fed[sid] += prefix + got
        else:
            state = reference.zeros()
            _, state = _feed_all(reference, fed[sid], state)
            want, _ = reference.feed(chunk, state)
            np.testing.assert_allclose(got, want[-1], atol=ATOL, rtol=0, err_msg=f"seed {seed}")
            fed[sid] += chunk
    assert raced > 0, "no deadline expired: the race was not exercised"
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
            assert ids[1:] == _greedy_path(reference, ids)


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
