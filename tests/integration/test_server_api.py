"""Every status code, with a useful message, and failed requests leaving state untouched."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from protos.lstmserve.v1 import lstm_serve_pb2 as pb

from .conftest import Reference


def _code(fn, *args, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        r = fn(*args, **kw)
        if hasattr(r, "__iter__") and not isinstance(r, pb.StepResponse):
            list(r)
    return info.value.code(), info.value.details()


def test_not_found_for_unknown_and_closed_sessions(shared_server, stub_for):
    stub = stub_for(shared_server)
    code, msg = _code(stub.Step, pb.StepRequest(session_id="0" * 32, text="a"))
    assert code == grpc.StatusCode.NOT_FOUND and "0" * 32 in msg
    sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
    assert len(sid) == 32 and int(sid, 16) >= 0
    stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
    for call, req in (
        (stub.Step, pb.StepRequest(session_id=sid, text="a")),
        (stub.GetSession, pb.GetSessionRequest(session_id=sid)),
        (stub.ResetSession, pb.ResetSessionRequest(session_id=sid)),
        (stub.CloseSession, pb.CloseSessionRequest(session_id=sid)),
        (stub.Generate, pb.GenerateRequest(session_id=sid, prompt="a", max_tokens=3)),
    ):
        assert _code(call, req)[0] == grpc.StatusCode.NOT_FOUND
    code, _ = _code(
        lambda: list(stub.StepStream(iter([pb.StepStreamRequest(session_id=sid, text="a")])))
    )
    assert code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("request_kw", "needle"),
    [
        ({"token_ids": [28]}, "outside the vocabulary"),
        ({"token_ids": [-1]}, "outside the vocabulary"),
        ({}, "empty"),
        ({"text": "a", "token_ids": [1]}, "either"),
        ({"token_ids": [1] * 65}, "max_prompt_tokens=64"),
        ({"text": "a" * 65}, "max_prompt_tokens=64"),
        ({"text": "a", "output": pb.STEP_OUTPUT_TOP_K, "top_k": 0}, "top_k"),
        ({"text": "a", "output": pb.STEP_OUTPUT_TOP_K, "top_k": 29}, "top_k"),
    ],
)
def test_step_invalid_argument(shared_server, stub_for, request_kw, needle):
    stub = stub_for(shared_server)
    sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
    code, msg = _code(stub.Step, pb.StepRequest(session_id=sid, **request_kw))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in msg
    # A rejected request changed nothing.
    assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).steps == 0


@pytest.mark.parametrize(
    ("request_kw", "needle"),
    [
        ({"max_tokens": 0}, "max_new_tokens=500"),
        ({"max_tokens": 501}, "max_new_tokens=500"),
        ({"max_tokens": 5, "temperature": -1}, "temperature"),
        ({"max_tokens": 5, "temperature": float("nan")}, "temperature"),
        ({"max_tokens": 5, "top_p": 1.5}, "top_p"),
        ({"max_tokens": 5, "top_k": -2}, "top_k"),
        ({"max_tokens": 5, "stop": [""]}, "stop"),
        ({"max_tokens": 5, "stop": ["a"] * 9}, "stop"),
        ({"max_tokens": 5, "prompt": "x" * 65}, "max_prompt_tokens=64"),
        ({"max_tokens": 5, "prompt": ""}, "prompt is empty"),
    ],
)
def test_generate_invalid_argument(shared_server, stub_for, request_kw, needle):
    stub = stub_for(shared_server)
    kw = {"prompt": "the", **request_kw}
    code, msg = _code(stub.Generate, pb.GenerateRequest(**kw))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in msg


def test_invalid_session_requests(shared_server, stub_for):
    stub = stub_for(shared_server)
    assert _code(stub.Step, pb.StepRequest(text="a"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = _code(stub.CreateSession, pb.CreateSessionRequest(idle_timeout_s=-1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
    other = stub.CreateSession(pb.CreateSessionRequest()).session_id
    reqs = [
        pb.StepStreamRequest(session_id=sid, text="a"),
        pb.StepStreamRequest(session_id=other, text="b"),
    ]
    code, msg = _code(lambda: list(stub.StepStream(iter(reqs))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and sid in msg


def test_busy_session_is_refused_naming_it(shared_server, stub_for):
    stub = stub_for(shared_server)
    sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
    gen = stub.Generate(pb.GenerateRequest(session_id=sid, prompt="the", max_tokens=500))
    next(gen)  # the generation is running: the session is busy until it ends
    for call, req in (
        (stub.Step, pb.StepRequest(session_id=sid, text="a")),
        (stub.ResetSession, pb.ResetSessionRequest(session_id=sid)),
        (stub.CloseSession, pb.CloseSessionRequest(session_id=sid)),
        (stub.Generate, pb.GenerateRequest(session_id=sid, prompt="a", max_tokens=3)),
    ):
        code, msg = _code(call, req)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert sid in msg and "busy" in msg
    assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).busy
    rest = list(gen)
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    # Free again the moment the last message arrives.
    stub.Step(pb.StepRequest(session_id=sid, text="a"))


def test_session_table_full_is_resource_exhausted(start_server, stub_for):
    srv = start_server(max_sessions=3)
    stub = stub_for(srv)
    sids = [stub.CreateSession(pb.CreateSessionRequest()).session_id for _ in range(3)]
    code, msg = _code(stub.CreateSession, pb.CreateSessionRequest())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_sessions=3" in msg
    # Ephemeral sessions count too.
    code, _ = _code(stub.Generate, pb.GenerateRequest(prompt="a", max_tokens=2))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    stub.CloseSession(pb.CloseSessionRequest(session_id=sids[0]))
    stub.CreateSession(pb.CreateSessionRequest())


def test_lru_eviction_replaces_the_least_recently_used_idle_session(start_server, stub_for):
    srv = start_server(max_sessions=3, eviction="lru")
    stub = stub_for(srv)
    a, b, c = (stub.CreateSession(pb.CreateSessionRequest()).session_id for _ in range(3))
    stub.Step(pb.StepRequest(session_id=a, text="x"))  # a is now the most recently used
    d = stub.CreateSession(pb.CreateSessionRequest()).session_id
    assert (
        _code(stub.GetSession, pb.GetSessionRequest(session_id=b))[0] == grpc.StatusCode.NOT_FOUND
    )
    for sid in (a, c, d):
        stub.GetSession(pb.GetSessionRequest(session_id=sid))
    ended = srv.on_loop(lambda: dict(srv.app.store.stats.ended))
    assert ended["evicted"] == 1


def test_queue_full_is_resource_exhausted(start_server, stub_for):
    srv = start_server(max_queue_size=1, inline_max_rows=0)
    stub = stub_for(srv)
    sids = [stub.CreateSession(pb.CreateSessionRequest()).session_id for _ in range(12)]
    codes: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def hammer(sid: str) -> None:
        for _ in range(20):
            try:
                stub.Step(pb.StepRequest(session_id=sid, token_ids=[1] * 64))
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
                assert "max_queue_size=1" in e.details()
            with lock:
                codes.append(code)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in sids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert grpc.StatusCode.OK in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_reset_and_get_session(shared_server, stub_for, reference: Reference):
    stub = stub_for(shared_server)
    t0 = time.time()
    created = stub.CreateSession(pb.CreateSessionRequest(idle_timeout_s=30))
    sid = created.session_id
    assert created.idle_timeout_s == 30
    assert created.state_bytes == 2 * 2 * 24 * 4
    info = stub.GetSession(pb.GetSessionRequest(session_id=sid))
    assert info.steps == 0 and not info.busy and not info.has_next_distribution
    assert t0 - 1 <= info.created_unix_s <= time.time() + 1
    first = stub.Step(pb.StepRequest(session_id=sid, text="abc"))
    second = stub.Step(pb.StepRequest(session_id=sid, text="def"))
    # The shared server's model is conftest's (same weights): each step continues the state.
    want, state = reference.feed([2, 3, 4], reference.zeros())  # "abc"
    np.testing.assert_allclose(np.asarray(first.logits), want[-1], atol=1e-5, rtol=0)
    want, _ = reference.feed([5, 6, 7], state)  # "def", after "abc"
    np.testing.assert_allclose(np.asarray(second.logits), want[-1], atol=1e-5, rtol=0)
    info = stub.GetSession(pb.GetSessionRequest(session_id=sid))
    assert info.steps == 6 and info.has_next_distribution
    assert info.last_used_unix_s >= info.created_unix_s
    stub.ResetSession(pb.ResetSessionRequest(session_id=sid))
    info = stub.GetSession(pb.GetSessionRequest(session_id=sid))
    assert info.steps == 0 and not info.has_next_distribution
    again = stub.Step(pb.StepRequest(session_id=sid, text="abc"))
    np.testing.assert_array_equal(np.asarray(again.logits), np.asarray(first.logits))
    # Asking for a longer idle timeout than the server's gets the server's.
    big = stub.CreateSession(pb.CreateSessionRequest(idle_timeout_s=1e9))
    assert big.idle_timeout_s == 600


def test_model_info(shared_server, stub_for):
    stub = stub_for(shared_server)
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.provider == "CPUExecutionProvider"
    assert info.name == "model" and info.version == "1"
    assert list(info.vocab)[:3] == ["<unk>", " ", "a"]
    assert (info.num_layers, info.hidden_size) == (2, 24)
    assert info.preprocess == "d2l_letters_lower" and info.unk_id == 0
    assert info.max_prompt_tokens == 64 and info.max_new_tokens == 500
    assert info.state_bytes_per_session == 2 * 2 * 24 * 4
    assert '"num_layers": 2' in info.config_json


def test_model_repository_layout_names_the_model(start_server, stub_for):
    srv = start_server()
    info = stub_for(srv).GetModelInfo(pb.GetModelInfoRequest())
    assert (info.name, info.version) == ("tiny", "3")


def test_stop_string_ends_generation_and_is_not_returned(shared_server, stub_for, reference):
    stub = stub_for(shared_server)
    plain = list(stub.Generate(pb.GenerateRequest(prompt="the time", max_tokens=60)))
    greedy = "".join(m.text for m in plain)
    # Without a stop string: the model's own greedy path (conftest's weights, in-process ORT).
    prompt = [reference_vocab().index(c) for c in "the time"]
    assert [t for m in plain for t in m.token_ids] == reference.greedy(prompt, 60)
    stop = greedy[20:23]
    cut = greedy.index(stop)
    msgs = list(
        stub.Generate(pb.GenerateRequest(prompt="the time", max_tokens=60, stop=[stop, "zzzzzzz"]))
    )
    assert "".join(m.text for m in msgs) == greedy[:cut]
    assert msgs[-1].finish_reason == pb.FINISH_REASON_STOP
    ids = [t for m in msgs for t in m.token_ids]
    assert "".join(reference_vocab()[t] for t in ids) == greedy[:cut]


def reference_vocab() -> list[str]:
    return ["<unk>", " ", *"abcdefghijklmnopqrstuvwxyz"]
