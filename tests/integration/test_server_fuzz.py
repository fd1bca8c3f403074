"""Fuzzing every RPC of ``lstmserve.v1.LstmServeService`` (and ``grpc.health.v1.Health``,
open to every client) through one real server.

Two kinds of input per RPC: hypothesis-built messages whose fields take edge values (empty and
~100 KB strings, random unicode, NaN/inf/negative floats, ints at their type's limits, unknown
enum values, ids of other sessions, corrupted session records), and raw random bytes sent with no
serializer at all. Every call must end within its deadline with a status a client can act on
(never UNKNOWN, never INTERNAL); afterwards the server must still give exact greedy text, hold no
session busy, and its process (this one: the server runs in-process) must not have grown by more
than ``RSS_GROWTH_BOUND``.

Default: about 1,000 cases in all (hypothesis skips repeats: GetModelInfo has one message);
``LSTM_SERVE_FUZZ_EXAMPLES=N`` runs about N instead.

The check after fuzzing never depends on test order or selection: the check test fuzzes the
module's server itself (every RPC, typed and raw) before it checks, so run alone (a single test
id, ``-k``) it still checks a fuzzed server; and the server's fixture checks once more at
teardown when fuzz tests ran after the last check (any order, e.g. pytest-randomly's).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.lstmserve.v1 import lstm_serve_pb2 as pb

from .conftest import VOCAB, Reference, ServerThread, make_settings

SERVICE = "/lstmserve.v1.LstmServeService/"
HEALTH = "/grpc.health.v1.Health/"
VOCAB_INDEX = {c: i for i, c in enumerate(VOCAB)}
V = len(VOCAB)
MAX_NEW_TOKENS = 50
MAX_PROMPT_TOKENS = 64
CALL_TIMEOUT_S = 15.0
RSS_GROWTH_BOUND = 200 * 2**20
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE,
}
# (request type, response type, channel method) per RPC.
RPCS: dict[str, tuple[Any, Any, str]] = {
    "CreateSession": (pb.CreateSessionRequest, pb.CreateSessionResponse, "unary_unary"),
    "CloseSession": (pb.CloseSessionRequest, pb.CloseSessionResponse, "unary_unary"),
    "ResetSession": (pb.ResetSessionRequest, pb.ResetSessionResponse, "unary_unary"),
    "GetSession": (pb.GetSessionRequest, pb.GetSessionResponse, "unary_unary"),
    "Step": (pb.StepRequest, pb.StepResponse, "unary_unary"),
    "StepStream": (pb.StepStreamRequest, pb.StepStreamResponse, "stream_stream"),
    "Generate": (pb.GenerateRequest, pb.GenerateResponse, "unary_stream"),
    "GetModelInfo": (pb.GetModelInfoRequest, pb.GetModelInfoResponse, "unary_unary"),
    "ExportSession": (pb.ExportSessionRequest, pb.ExportSessionResponse, "unary_unary"),
    "ImportSession": (pb.ImportSessionRequest, pb.ImportSessionResponse, "unary_unary"),
    "ForkSession": (pb.ForkSessionRequest, pb.ForkSessionResponse, "unary_unary"),
    "Check": (health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse, "unary_unary"),
    # Watch never ends by itself: its first message is the answer, then the call is cancelled.
    "Watch": (health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse, "unary_stream"),
}
PATHS = {name: (HEALTH if name in ("Check", "Watch") else SERVICE) + name for name in RPCS}
# The names the health service answers for (SERVING); any other is unknown to it.
HEALTH_NAMES = ["", "lstmserve.v1.LstmServeService", "inference.GRPCInferenceService"]

# Example budget: ~85 typed and ~20 raw-bytes cases per RPC by default (13 RPCs: ~1,100).
TOTAL = int(os.environ.get("LSTM_SERVE_FUZZ_EXAMPLES", "0") or 0) or 1100
TYPED_EXAMPLES = max(1, TOTAL * 4 // 5 // len(RPCS))
RAW_EXAMPLES = max(1, TOTAL // 5 // len(RPCS))
# The check test's own fuzzing pass, per RPC (~10 typed and ~4 raw by default).
CHECK_TYPED_EXAMPLES = max(2, TYPED_EXAMPLES // 8)
CHECK_RAW_EXAMPLES = max(2, RAW_EXAMPLES // 4)
FUZZ = settings(
    deadline=None,
    database=None,  # nothing written into the checkout; a failure prints its example anyway
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Client-chosen ids of a few long-lived sessions: the strategies name them, so calls hit real
# sessions, other RPCs' sessions, and ids that CreateSession/ImportSession/ForkSession find taken
# (and re-create when a fuzzed CloseSession took them away).
POOL = [f"fuzz-pool-session-{i:02d}" for i in range(6)]
# Filled by the server fixture: a genuine exported record, for ImportSession to mangle.
RECORD: dict[str, bytes] = {}

# --- strategies ----------------------------------------------------------------------------------

_HUGE = st.builds(
    lambda ch, n: ch * n,
    st.sampled_from(["a", "z ", "é", "\U0001f600", "\x00", "9", "ab\u200b"]),
    st.sampled_from([65, 513, 4096, 100_000]),
)
_UNICODE = st.text(max_size=40)  # any code point but surrogates (protobuf strings are UTF-8)
TEXTS = st.one_of(
    st.just(""),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz ", max_size=80),
    _UNICODE,
    _HUGE,
)
SESSION_IDS = st.one_of(
    st.just(""),
    st.sampled_from(POOL),
    st.sampled_from(POOL).map(lambda s: s + " "),
    st.from_regex(r"[A-Za-z0-9_-]{16,128}", fullmatch=True),
    st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
    _UNICODE,
    _HUGE,
)
FLOAT_EDGES = [0.0, -0.0, math.nan, math.inf, -math.inf, -1.0, 1e-45, 0.5, 1.0, 2.0, 3.4e38]
FLOAT32 = st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(width=32))
DOUBLE = st.one_of(st.sampled_from([*FLOAT_EDGES, 1e308, -1e-300, 5.0]), st.floats())
INT32 = st.one_of(
    st.sampled_from([-(2**31), -1, 0, 1, 5, V - 1, V, V + 1, 2**31 - 1]),
    st.integers(-(2**31), 2**31 - 1),
)
UINT32 = st.one_of(
    st.integers(0, MAX_NEW_TOKENS + 5),
    st.sampled_from([0, 1, MAX_NEW_TOKENS, MAX_NEW_TOKENS + 1, 2**31, 2**32 - 1]),
    st.integers(0, 2**32 - 1),
)
TOKEN = st.one_of(
    st.integers(0, V - 1),
    st.sampled_from([-1, V, V + 1, -(2**63), 2**63 - 1]),
    st.integers(-(2**63), 2**63 - 1),
)
TOKEN_LISTS = st.one_of(
    st.lists(st.integers(0, V - 1), max_size=MAX_PROMPT_TOKENS + 2),
    st.lists(TOKEN, max_size=20),
    st.builds(lambda n: [1] * n, st.sampled_from([MAX_PROMPT_TOKENS + 1, 10_000])),
)
# Proto3 enums are open: any int32 goes on the wire.
OUTPUTS = st.one_of(st.sampled_from([0, 1, 2, 3, 4, -1]), st.integers(-(2**31), 2**31 - 1))
STOPS = st.lists(
    st.one_of(st.just(""), st.text(alphabet="abc ", max_size=3), _UNICODE, _HUGE), max_size=12
)


def _mangle(how: int, pos: int) -> bytes:
    rec = RECORD["record"]
    pos %= len(rec)
    if how == 0:
        return rec
    if how == 1:  # one bit flipped
        return rec[:pos] + bytes([rec[pos] ^ 1]) + rec[pos + 1 :]
    if how == 2:  # truncated
        return rec[:pos]
    return rec + rec[:pos]  # trailing garbage


RECORDS = st.one_of(
    st.builds(_mangle, st.integers(0, 3), st.integers(0, 2**20)),
    st.binary(max_size=10_000),
)
STEP_FIELDS: dict[str, Any] = dict(
    session_id=SESSION_IDS, text=TEXTS, token_ids=TOKEN_LISTS, output=OUTPUTS, top_k=INT32
)
# Half the stream messages repeat the first one's id or leave it empty, as clients must.
STREAM_FIELDS = {**STEP_FIELDS, "session_id": st.one_of(st.just(""), SESSION_IDS)}

# Wild messages alone almost never get past validation (some field is nearly always out of
# range), so each RPC also gets plausible ones: pool sessions, in-range values, edges at the
# limits. They reach the engine, the sampler and the session table.
_POOL_ID = st.sampled_from(POOL)
_WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ", min_size=1, max_size=MAX_PROMPT_TOKENS + 4)
_PLAUSIBLE_INPUT: list[dict[str, Any]] = [
    {"text": _WORDS},
    {"token_ids": st.lists(st.integers(0, V - 1), min_size=1, max_size=MAX_PROMPT_TOKENS + 1)},
]
_PLAUSIBLE_OUTPUT = dict(output=st.integers(0, 4), top_k=st.integers(0, V + 1))
PLAUSIBLE_STEPS = [
    st.builds(pb.StepRequest, session_id=_POOL_ID, **inp, **_PLAUSIBLE_OUTPUT)
    for inp in _PLAUSIBLE_INPUT
]
PLAUSIBLE_STREAM_STEPS = [
    st.builds(pb.StepStreamRequest, **inp, **_PLAUSIBLE_OUTPUT) for inp in _PLAUSIBLE_INPUT
]


def _attach(first_id: str, msgs: list[Any]) -> list[Any]:
    if msgs:
        msgs[0].session_id = first_id
    return msgs


PLAUSIBLE_STREAM = st.builds(
    _attach,
    st.one_of(st.just(""), _POOL_ID),
    st.lists(st.one_of(*PLAUSIBLE_STREAM_STEPS), min_size=1, max_size=6),
)
PLAUSIBLE_GENERATE = st.builds(
    pb.GenerateRequest,
    session_id=st.one_of(st.just(""), _POOL_ID),
    prompt=_WORDS,
    max_tokens=st.integers(1, MAX_NEW_TOKENS),
    temperature=st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0, 5, width=32)),
    top_k=st.integers(0, V + 1),
    top_p=st.floats(0, 1, width=32),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    stop=st.lists(st.text(alphabet="abcde ", min_size=1, max_size=3), max_size=3),
)


def _half(a: st.SearchStrategy[Any], b: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``a`` or ``b``, even odds (``st.one_of`` would flatten ``b``'s branches beside ``a``)."""
    return st.booleans().flatmap(lambda pick_a: a if pick_a else b)


_NEW_ID = st.one_of(st.just(""), st.from_regex(r"[A-Za-z0-9_-]{16,128}", fullmatch=True))
HEALTH_REQUESTS = st.builds(
    health_pb2.HealthCheckRequest,
    service=st.one_of(
        st.sampled_from([*HEALTH_NAMES, "grpc.health.v1.Health", "inference"]), _UNICODE, _HUGE
    ),
)

MESSAGES: dict[str, st.SearchStrategy[Any]] = {
    "CreateSession": st.one_of(
        st.builds(pb.CreateSessionRequest, idle_timeout_s=DOUBLE, session_id=SESSION_IDS),
        st.builds(
            pb.CreateSessionRequest,
            idle_timeout_s=st.floats(0, 1e4),
            session_id=st.one_of(_NEW_ID, _POOL_ID),
        ),
    ),
    "CloseSession": st.builds(pb.CloseSessionRequest, session_id=_half(_POOL_ID, SESSION_IDS)),
    "ResetSession": st.builds(pb.ResetSessionRequest, session_id=_half(_POOL_ID, SESSION_IDS)),
    "GetSession": st.builds(pb.GetSessionRequest, session_id=_half(_POOL_ID, SESSION_IDS)),
    "Step": st.one_of(st.builds(pb.StepRequest, **STEP_FIELDS), *PLAUSIBLE_STEPS),
    "StepStream": st.one_of(
        st.lists(st.builds(pb.StepStreamRequest, **STREAM_FIELDS), max_size=6), PLAUSIBLE_STREAM
    ),
    "Generate": st.one_of(
        st.builds(
            pb.GenerateRequest,
            session_id=st.one_of(st.just(""), SESSION_IDS),
            prompt=TEXTS,
            max_tokens=UINT32,
            temperature=FLOAT32,
            top_k=INT32,
            top_p=FLOAT32,
            seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
            stop=STOPS,
        ),
        PLAUSIBLE_GENERATE,
    ),
    "GetModelInfo": st.just(pb.GetModelInfoRequest()),
    "ExportSession": st.builds(pb.ExportSessionRequest, session_id=_half(_POOL_ID, SESSION_IDS)),
    "ImportSession": st.one_of(
        st.builds(pb.ImportSessionRequest, record=RECORDS, session_id=SESSION_IDS),
        st.builds(
            pb.ImportSessionRequest,
            record=st.builds(_mangle, st.just(0), st.just(0)),
            session_id=_NEW_ID,
        ),
    ),
    "ForkSession": st.one_of(
        st.builds(pb.ForkSessionRequest, session_id=SESSION_IDS, new_session_id=SESSION_IDS),
        st.builds(pb.ForkSessionRequest, session_id=_POOL_ID, new_session_id=_NEW_ID),
    ),
    "Check": HEALTH_REQUESTS,
    "Watch": HEALTH_REQUESTS,
}


def _raw_payload(name: str) -> st.SearchStrategy[Any]:
    blob = st.one_of(
        st.binary(max_size=64),
        st.binary(min_size=1, max_size=4096),
        # A valid message with garbage after it, and the first bytes of one.
        st.builds(
            lambda b: pb.StepRequest(session_id=POOL[0], text="ab").SerializeToString() + b,
            st.binary(min_size=1, max_size=16),
        ),
        st.builds(
            lambda n: pb.GenerateRequest(prompt="abc", max_tokens=3).SerializeToString()[:n],
            st.integers(1, 8),
        ),
        st.just(b"\xff" * 32),  # an unterminated varint
        st.just(b"\x0a\xff\xff\xff\xff\x0f"),  # a string field claiming 4 GiB
    )
    return st.lists(blob, min_size=1, max_size=4) if name == "StepStream" else blob


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# --- the server and the calls ------------------------------------------------------------------


class Fuzzed:
    """The server under fuzz, a channel to it, and its RSS before the fuzzing."""

    def __init__(self, srv: ServerThread) -> None:
        self.srv = srv
        self.channel = grpc.insecure_channel(srv.target)
        self.rss_before = 0
        self.codes: dict[str, dict[str, int]] = {}
        self.fuzz_calls = 0  # fuzzed calls (not the set-up's, not heal's)
        self.checked_after = -1  # fuzz_calls when the server was last checked

    def call(self, name: str, request: Any, raw: bool = False) -> grpc.StatusCode:
        """One call of ``name`` (a message, a list for StepStream, or bytes with ``raw``) to
        the end; the status it ended with."""
        req_t, resp_t, kind = RPCS[name]
        method = getattr(self.channel, kind)(
            PATHS[name],
            request_serializer=None if raw else req_t.SerializeToString,
            response_deserializer=None if raw else resp_t.FromString,
        )
        arg = iter(request) if kind == "stream_stream" else request
        try:
            result = method(arg, timeout=CALL_TIMEOUT_S)
            if name == "Watch":
                replies = [next(result)]
                result.cancel()
            else:
                replies = [result] if kind == "unary_unary" else list(result)
        except grpc.RpcError as e:
            code = e.code()
        else:
            code = grpc.StatusCode.OK
            if not raw:
                _check_replies(name, request, replies)
        by_code = self.codes.setdefault(name + (" raw" if raw else ""), {})
        by_code[code.name] = by_code.get(code.name, 0) + 1
        if name in ("CreateSession", "CloseSession") and not raw and request.session_id in POOL:
            self.heal(request.session_id)
        return code

    def heal(self, sid: str) -> None:
        """Keep a pool session alive for the RPCs fuzzed later (calls not counted): re-create
        it when it was closed or given an idle timeout short enough to expire meanwhile."""
        unary = {
            name: self.channel.unary_unary(
                SERVICE + name,
                request_serializer=RPCS[name][0].SerializeToString,
                response_deserializer=RPCS[name][1].FromString,
            )
            for name in ("GetSession", "CloseSession", "CreateSession")
        }
        with contextlib.suppress(grpc.RpcError):
            info = unary["GetSession"](pb.GetSessionRequest(session_id=sid), timeout=10)
            if info.idle_timeout_s >= 60:
                return
        with contextlib.suppress(grpc.RpcError):
            unary["CloseSession"](pb.CloseSessionRequest(session_id=sid), timeout=10)
        unary["CreateSession"](pb.CreateSessionRequest(session_id=sid), timeout=10)


def _check_replies(name: str, request: Any, replies: list[Any]) -> None:
    """What an OK answer promises, beyond its status."""
    if name in ("Step", "StepStream"):
        for r in replies:
            assert len(r.logits) == V * r.positions and r.tokens_consumed >= 1
            assert all(math.isfinite(x) for x in r.logits)
            assert len(r.top) <= V
    elif name in ("Check", "Watch"):
        (r,) = replies
        known = request.service in HEALTH_NAMES
        # Check answers NOT_FOUND for a name it does not know; Watch says SERVICE_UNKNOWN.
        want = "SERVING" if known else "SERVICE_UNKNOWN"
        assert health_pb2.HealthCheckResponse.ServingStatus.Name(r.status) == want
    elif name == "Generate":
        assert replies, "Generate ended OK with no message"
        assert replies[-1].finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
        assert replies[-1].generated_tokens <= min(request.max_tokens, MAX_NEW_TOKENS)
        assert all(0 <= t < V for r in replies for t in r.token_ids)


@pytest.fixture(scope="module")
def fuzzed(model_path: Path, reference: Reference) -> Iterator[Fuzzed]:
    # Small limits so an accepted Generate is cheap; an LRU-evicting table so the many sessions
    # the fuzzing creates never lock the pool out (and eviction gets fuzzed too).
    srv = ServerThread(
        make_settings(
            model_path,
            max_new_tokens=MAX_NEW_TOKENS,
            max_prompt_tokens=MAX_PROMPT_TOKENS,
            max_sessions=1000,
            eviction="lru",
            drain_grace_s=1.0,
        )
    )
    srv.start()
    f = Fuzzed(srv)
    for sid in POOL:
        assert f.call("CreateSession", pb.CreateSessionRequest(session_id=sid)).name == "OK"
    f.call("Step", pb.StepRequest(session_id=POOL[0], text="the time"))
    export = f.channel.unary_unary(
        SERVICE + "ExportSession",
        request_serializer=pb.ExportSessionRequest.SerializeToString,
        response_deserializer=pb.ExportSessionResponse.FromString,
    )
    RECORD["record"] = export(pb.ExportSessionRequest(session_id=POOL[0]), timeout=10).record
    # Warm every path once before the baseline, so the bound below is about growth, not the
    # first use of gRPC's and ONNX Runtime's buffers.
    for _ in range(3):
        f.call("Generate", pb.GenerateRequest(prompt="warm up", max_tokens=MAX_NEW_TOKENS))
        f.call("StepStream", [pb.StepStreamRequest(token_ids=[1, 2, 3])] * 3)
    f.rss_before = _rss_bytes()
    try:
        yield f
        # Fuzzing that no check followed (fuzz tests run after the check test, or without it):
        # check what it did too.
        if f.fuzz_calls > 0 and f.fuzz_calls != f.checked_after:
            _assert_intact(f, reference)
    finally:
        f.channel.close()
        srv.stop()


def _fuzz_typed(fuzzed: Fuzzed, name: str, request: Any) -> None:
    code = fuzzed.call(name, request)
    fuzzed.fuzz_calls += 1
    assert code in ALLOWED, f"{name} ended with {code.name}"


def _fuzz_raw(fuzzed: Fuzzed, name: str, payload: Any) -> None:
    code = fuzzed.call(name, payload, raw=True)
    fuzzed.fuzz_calls += 1
    assert code in ALLOWED, f"{name} with raw bytes ended with {code.name}"


@pytest.mark.parametrize("name", list(RPCS))
@settings(FUZZ, max_examples=TYPED_EXAMPLES)
@given(data=st.data())
def test_typed_messages_end_with_an_allowed_status(fuzzed: Fuzzed, name: str, data: Any) -> None:
    _fuzz_typed(fuzzed, name, data.draw(MESSAGES[name], label=name))


@pytest.mark.parametrize("name", list(RPCS))
@settings(FUZZ, max_examples=RAW_EXAMPLES)
@given(data=st.data())
def test_raw_bytes_end_with_an_allowed_status(fuzzed: Fuzzed, name: str, data: Any) -> None:
    _fuzz_raw(fuzzed, name, data.draw(_raw_payload(name), label=f"{name} bytes"))


def test_server_still_exact_and_bounded_after_fuzzing(fuzzed: Fuzzed, reference: Reference) -> None:
    """What the fuzzing must not have broken, on the server that was fuzzed. The test does not
    rely on running after the fuzz tests (file order, selection): it fuzzes every RPC of that
    server itself first, typed and raw, then checks."""
    before = fuzzed.fuzz_calls
    for name in RPCS:
        _fuzz_pass(fuzzed, name)
    # Every RPC got at least its one message (GetModelInfo has no other) and raw bytes.
    assert fuzzed.fuzz_calls - before >= 2 * len(RPCS)
    _assert_intact(fuzzed, reference)


def _fuzz_pass(fuzzed: Fuzzed, name: str) -> None:
    """A short run of both fuzz tests' inputs for one RPC."""

    @settings(FUZZ, max_examples=CHECK_TYPED_EXAMPLES)
    @given(data=st.data())
    def typed(data: Any) -> None:
        _fuzz_typed(fuzzed, name, data.draw(MESSAGES[name], label=name))

    @settings(FUZZ, max_examples=CHECK_RAW_EXAMPLES)
    @given(data=st.data())
    def raw(data: Any) -> None:
        _fuzz_raw(fuzzed, name, data.draw(_raw_payload(name), label=f"{name} bytes"))

    typed()
    raw()


def _assert_intact(fuzzed: Fuzzed, reference: Reference) -> None:
    """Exact greedy text and logits, no session left busy, RSS within its bound."""
    fuzzed.checked_after = fuzzed.fuzz_calls  # (once, even when a check below fails)
    gen = fuzzed.channel.unary_stream(
        SERVICE + "Generate",
        request_serializer=pb.GenerateRequest.SerializeToString,
        response_deserializer=pb.GenerateResponse.FromString,
    )
    prompt = "the time traveller"
    msgs = list(gen(pb.GenerateRequest(prompt=prompt, max_tokens=MAX_NEW_TOKENS), timeout=30))
    got = [t for m in msgs for t in m.token_ids]
    assert got == reference.greedy([VOCAB_INDEX[c] for c in prompt], MAX_NEW_TOKENS)

    # A fresh session's logits, within the integration tests' usual 1e-5 of in-process ORT.
    unary = {
        name: fuzzed.channel.unary_unary(
            SERVICE + name,
            request_serializer=RPCS[name][0].SerializeToString,
            response_deserializer=RPCS[name][1].FromString,
        )
        for name in ("CreateSession", "Step", "GetSession")
    }
    sid = unary["CreateSession"](pb.CreateSessionRequest(), timeout=10).session_id
    ids = [VOCAB_INDEX[c] for c in "it was"]
    r = unary["Step"](
        pb.StepRequest(session_id=sid, token_ids=ids, output=pb.STEP_OUTPUT_ALL_LOGITS),
        timeout=10,
    )
    want, _ = reference.feed(ids, reference.zeros())
    got_logits = np.asarray(r.logits, np.float32).reshape(len(ids), V)
    np.testing.assert_allclose(got_logits, want, atol=1e-5, rtol=0)

    # Nothing left holding a session: every fuzzed request released what it took.
    for sid in POOL:
        try:
            info = unary["GetSession"](pb.GetSessionRequest(session_id=sid), timeout=10)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND
            continue
        assert not info.busy, f"{sid} is still busy after the fuzzing"

    grown = _rss_bytes() - fuzzed.rss_before
    codes = sorted(fuzzed.codes.items())
    print("\nstatus codes by RPC:", *(f"  {k}: {v}" for k, v in codes), sep="\n")
    print(f"RSS growth over the fuzzing: {grown / 2**20:.1f} MiB")
    assert grown < RSS_GROWTH_BOUND, f"RSS grew by {grown / 2**20:.0f} MiB"
