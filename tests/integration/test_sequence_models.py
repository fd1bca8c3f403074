"""Sequence models (features -> outputs) served beside token models, by one server.

Real servers on 127.0.0.1:0 and real channels. Every output is compared with in-process ONNX
Runtime on the same file, one session at a time with its state carried by hand (atol 1e-5),
while sessions of both kinds run interleaved and batched together: over lstmserve.v1 (unary
Step and StepStream), KServe v2 gRPC (the generated stubs) and HTTP/REST, in one process and
in the split topology (front ends over the engine's socket), and across a restart with a
durable store. Every bad input is refused with its status code and a message naming it.
"""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from contract.model import validate
from export.graph import random_model, random_sequence_model
from protos.inference import grpc_service_pb2 as kpb
from protos.inference import grpc_service_pb2_grpc as kpb_grpc
from protos.lstmserve.v1 import lstm_serve_pb2 as pb
from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from server.client import LstmClient
from tests.integration.conftest import VOCAB, ServerThread, make_settings, run_script
from tests.reference import Reference, SequenceReference

ATOL = 1e-5
F, O = 3, 2  # noqa: E741 (the contract names the sizes F and O)
ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "server" / "model_repo"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A token model ``tiny`` and a sequence model ``seq`` (F=3, O=2, two layers)."""
    import onnx

    root = tmp_path_factory.mktemp("both-kinds")
    for name, model in (
        ("tiny", random_model(VOCAB, hidden_size=24, num_layers=2, seed=11)),
        ("seq", random_sequence_model(F, O, hidden_size=16, num_layers=2, seed=5)),
    ):
        (root / name / "1").mkdir(parents=True)
        onnx.save(model, str(root / name / "1" / "model.onnx"))
    return root


def start(repo: Path, **overrides: Any) -> ServerThread:
    settings = dataclasses.replace(
        make_settings(repo / "unused"), model="", model_repository=str(repo), **overrides
    ).validate()
    return ServerThread(settings).start()


@pytest.fixture(scope="module")
def srv(repo: Path) -> Iterator[ServerThread]:
    # Chunks of 2: longer steps go through several prefill calls and end in the decode call,
    # where sessions of one kind share a batch row by row.
    s = start(repo, default_model="tiny", http_port=0, max_prompt_tokens=64, prefill_chunk_tokens=2)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def refs(repo: Path) -> tuple[Reference, SequenceReference]:
    return Reference(repo / "tiny" / "1" / "model.onnx"), SequenceReference(
        repo / "seq" / "1" / "model.onnx"
    )


def tensor(x: np.ndarray) -> Any:
    return pb.FloatTensor(shape=x.shape, values=x.ravel().tolist())


def rows_of(t: Any) -> np.ndarray:
    return np.asarray(t.values, np.float32).reshape(list(t.shape))


def kserve_request(
    x: np.ndarray, seq: int = 0, *, start: bool = False, end: bool = False, raw: bool = False
) -> Any:
    req = kpb.ModelInferRequest(model_name="seq")
    t = req.inputs.add(name="features", datatype="FP32", shape=[1, *x.shape])
    if raw:
        req.raw_input_contents.append(np.asarray(x, "<f4").tobytes())
    else:
        t.contents.fp32_contents.extend(x.ravel().tolist())
    if seq:
        req.parameters["sequence_id"].int64_param = seq
        req.parameters["sequence_start"].bool_param = start
        req.parameters["sequence_end"].bool_param = end
    return req


def kserve_outputs(resp: Any) -> np.ndarray:
    out = resp.outputs[0]
    assert out.name == "outputs" and out.datatype == "FP32"
    shape = list(out.shape)
    if resp.raw_output_contents:
        arr = np.frombuffer(resp.raw_output_contents[0], "<f4")
    else:
        arr = np.asarray(out.contents.fp32_contents, np.float32)
    return arr.reshape(shape)


class Session:
    """One session of either kind driven through one way in, checked against the oracle."""

    def __init__(
        self, kind: str, way: str, target: str, refs: tuple[Reference, SequenceReference], n: int
    ) -> None:
        self.kind, self.way, self.n = kind, way, n
        self.ref = refs[0] if kind == "token" else refs[1]
        self.state = self.ref.zeros()
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.LstmServeServiceStub(self.channel)
        self.kstub = kpb_grpc.GRPCInferenceServiceStub(self.channel)
        self.rng = np.random.default_rng(n)
        self.calls = 0
        self.sid = ""
        self.stream: Any = None
        if way == "unary":
            model = "tiny" if kind == "token" else "seq"
            self.sid = self.stub.CreateSession(
                pb.CreateSessionRequest(model_name=model), timeout=10
            ).session_id
        elif way == "stream":
            self.requests: list[Any] = []
            self.cv = threading.Condition()
            model = "tiny" if kind == "token" else "seq"
            self.first_model = model
            self.stream = self.stub.StepStream(self._feed(), timeout=120)

    def _feed(self) -> Iterator[Any]:
        while True:
            with self.cv:
                while not self.requests:
                    self.cv.wait()
                req = self.requests.pop(0)
            if req is None:
                return
            yield req

    def _send(self, req: Any) -> Any:
        with self.cv:
            self.requests.append(req)
            self.cv.notify()
        return next(self.stream)

    def step(self) -> None:
        t = int(self.rng.integers(1, 7))
        all_rows = bool(self.rng.integers(0, 2))
        output = pb.STEP_OUTPUT_ALL_LOGITS if all_rows else pb.STEP_OUTPUT_LAST_LOGITS
        if self.kind == "token":
            ids = [int(i) for i in self.rng.integers(0, len(VOCAB), t)]
            want, self.state = self.ref.feed(ids, self.state)  # type: ignore[arg-type]
            if self.way == "unary":
                r = self.stub.Step(
                    pb.StepRequest(session_id=self.sid, token_ids=ids, output=output), timeout=30
                )
            else:
                first = {"model_name": self.first_model} if self.calls == 0 else {}
                r = self._send(pb.StepStreamRequest(token_ids=ids, output=output, **first))
            got = np.asarray(r.logits, np.float32).reshape(r.positions, -1)
            assert not r.HasField("outputs")
        else:
            x = self.rng.normal(size=(t, F)).astype(np.float32)
            want, self.state = self.ref.feed(x, self.state)  # type: ignore[arg-type]
            if self.way == "kserve":
                req = kserve_request(
                    x, 1000 + self.n, start=self.calls == 0, raw=bool(self.rng.integers(0, 2))
                )
                got = kserve_outputs(self.kstub.ModelInfer(req, timeout=30))[0]
                all_rows = True
            elif self.way == "unary":
                r = self.stub.Step(
                    pb.StepRequest(session_id=self.sid, features=tensor(x), output=output),
                    timeout=30,
                )
                got = rows_of(r.outputs)
                assert r.positions == len(got) and not r.logits
            else:
                first = {"model_name": self.first_model} if self.calls == 0 else {}
                r = self._send(pb.StepStreamRequest(features=tensor(x), output=output, **first))
                got = rows_of(r.outputs)
        self.calls += 1
        expect = want if all_rows else want[-1:]
        assert got.shape == expect.shape, (self.kind, self.way, got.shape, expect.shape)
        np.testing.assert_allclose(got, expect, atol=ATOL, rtol=0)

    def close(self) -> None:
        if self.stream is not None:
            with self.cv:
                self.requests.append(None)
                self.cv.notify()
            for _ in self.stream:
                pass
        self.channel.close()


def run_interleaved(target: str, refs: tuple[Reference, SequenceReference], seed: int) -> None:
    """Sessions of both kinds, every way in, stepped in a random order by four threads at once
    (so the engine batches them together), each step checked against the oracle."""
    ways = [
        ("token", "unary"),
        ("token", "stream"),
        ("seq", "unary"),
        ("seq", "stream"),
        ("seq", "kserve"),
    ]
    sessions = [
        Session(kind, way, target, refs, seed * 100 + i) for i, (kind, way) in enumerate(ways * 2)
    ]
    order = [s for s in sessions for _ in range(6)]
    random.Random(seed).shuffle(order)
    # Each thread takes whole sessions, so a session's steps stay in order.
    lanes: list[list[Session]] = [[], [], [], []]
    owner = {id(s): i % 4 for i, s in enumerate(sessions)}
    for s in order:
        lanes[owner[id(s)]].append(s)
    errors: list[BaseException] = []

    def lane(todo: list[Session]) -> None:
        try:
            for s in todo:
                s.step()
        except BaseException as e:  # reported below, with the others
            errors.append(e)

    threads = [threading.Thread(target=lane, args=(todo,)) for todo in lanes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for s in sessions:
        s.close()
    if errors:
        raise errors[0]
    assert all(s.calls == 6 for s in sessions)


def test_interleaved_sessions_of_both_kinds_are_exact(srv, refs):
    run_interleaved(srv.target, refs, seed=1)
    fed = srv.on_loop(
        lambda: {
            v.name: sum(v.stats.tokens.values()) for v in srv.app.core.models.versions.values()
        }
    )
    assert fed["tiny"] > 0 and fed["seq"] > 0


def test_model_info_metadata_and_config_per_kind(srv):
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LstmServeServiceStub(ch)
        seq = stub.GetModelInfo(pb.GetModelInfoRequest(model_name="seq"), timeout=10)
        assert seq.kind == pb.MODEL_KIND_SEQUENCE
        assert (seq.num_features, seq.num_outputs) == (F, O)
        assert list(seq.feature_names) == ["x0", "x1", "x2"] and len(seq.output_names) == O
        assert len(seq.scaling.feature_std) == F and len(seq.scaling.output_mean) == O
        assert not seq.vocab and seq.max_prompt_tokens == 64
        tok = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert tok.name == "tiny" and tok.kind == pb.MODEL_KIND_TOKEN_LM and tok.num_features == 0
        k = kpb_grpc.GRPCInferenceServiceStub(ch)
        meta = k.ModelMetadata(kpb.ModelMetadataRequest(name="seq"), timeout=10)
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            ("features", "FP32", [1, -1, F])
        ]
        assert [(t.name, list(t.shape)) for t in meta.outputs] == [("outputs", [1, -1, O])]
        config = k.ModelConfig(kpb.ModelConfigRequest(name="seq"), timeout=10).config
        assert [(i.name, list(i.dims)) for i in config.input] == [("features", [1, -1, F])]
        assert [(o.name, list(o.dims)) for o in config.output] == [("outputs", [1, -1, O])]
        tmeta = k.ModelMetadata(kpb.ModelMetadataRequest(name="tiny"), timeout=10)
        assert [t.name for t in tmeta.inputs] == ["tokens", "text"]


def test_kserve_stream_and_stateless_infer_on_a_sequence_model(srv, refs):
    """ModelStreamInfer: two sequences interleaved on one stream; a request with no sequence
    id runs on a zero state; the end flag frees the sequence."""
    ref = refs[1]
    rng = np.random.default_rng(3)
    plan = []
    for i in range(8):
        seq = 7001 + i % 2
        plan.append((seq, rng.normal(size=(int(rng.integers(1, 5)), F)).astype(np.float32)))
    states = {7001: ref.zeros(), 7002: ref.zeros()}
    seen: set[int] = set()
    reqs, wants = [], {}
    for j, (seq, x) in enumerate(plan):
        want, states[seq] = ref.feed(x, states[seq])
        wants[str(j)] = want
        req = kserve_request(x, seq, start=seq not in seen, end=j >= 6)
        req.id = str(j)
        reqs.append(req)
        seen.add(seq)
    with grpc.insecure_channel(srv.target) as ch:
        k = kpb_grpc.GRPCInferenceServiceStub(ch)
        got = list(k.ModelStreamInfer(iter(reqs), timeout=30))
        assert all(not r.error_message for r in got), [r.error_message for r in got]
        assert sorted(r.infer_response.id for r in got) == sorted(wants)
        for r in got:
            out = kserve_outputs(r.infer_response)[0]
            np.testing.assert_allclose(out, wants[r.infer_response.id], atol=ATOL, rtol=0)
        x = rng.normal(size=(3, F)).astype(np.float32)
        alone = kserve_outputs(k.ModelInfer(kserve_request(x), timeout=10))[0]
        np.testing.assert_allclose(alone, ref.feed(x, ref.zeros())[0], atol=ATOL, rtol=0)
        with pytest.raises(grpc.RpcError) as e:
            k.ModelInfer(kserve_request(x, 7001), timeout=10)  # ended: no START, no sequence
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "START" in e.value.details()


def test_rest_infer_on_a_sequence_model(srv, refs):
    x = np.random.default_rng(4).normal(size=(4, F)).astype(np.float32)
    body = {
        "inputs": [
            {"name": "features", "shape": [1, 4, F], "datatype": "FP32", "data": x.tolist()}
        ],
        "outputs": [{"name": "outputs"}],
    }
    url = f"http://127.0.0.1:{srv.app.http_port}/v2/models/seq/infer"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        got = json.loads(r.read())
    out = got["outputs"][0]
    assert out["name"] == "outputs" and out["shape"] == [1, 4, O]
    want = refs[1].feed(x, refs[1].zeros())[0]
    np.testing.assert_allclose(np.asarray(out["data"]).reshape(4, O), want, atol=ATOL, rtol=0)
    meta_url = f"http://127.0.0.1:{srv.app.http_port}/v2/models/seq"
    with urllib.request.urlopen(meta_url, timeout=10) as r:
        meta = json.loads(r.read())
    assert meta["inputs"][0]["name"] == "features"


def expect_error(call: Any, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == code, (e.value.code(), e.value.details())
    for f in fragments:
        assert f in e.value.details(), (f, e.value.details())
    return e.value.details()


def test_bad_inputs_are_refused_by_name(srv):
    invalid, failed = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LstmServeServiceStub(ch)
        sid = stub.CreateSession(pb.CreateSessionRequest(model_name="seq"), timeout=10).session_id
        tok = stub.CreateSession(pb.CreateSessionRequest(), timeout=10).session_id

        def step(**kw: Any) -> Any:
            return lambda: stub.Step(pb.StepRequest(session_id=sid, **kw), timeout=10)

        good = np.ones((2, F), np.float32)
        expect_error(
            step(features=tensor(np.ones((2, 2), np.float32))), invalid, "[2, 2]", "[T, 3]"
        )
        bad = good.copy()
        bad[1, 2] = np.nan
        expect_error(step(features=tensor(bad)), invalid, "features[1, 2] is nan", "'x2'")
        bad = good.copy()
        bad[0, 1] = np.inf
        expect_error(step(features=tensor(bad)), invalid, "features[0, 1] is inf", "row 0")
        big = np.zeros((65, F), np.float32)
        expect_error(step(features=tensor(big)), invalid, "65 rows", "max_prompt_tokens=64")
        expect_error(step(features=pb.FloatTensor(shape=[0, F])), invalid, "no rows")
        expect_error(
            step(features=pb.FloatTensor(shape=[2, F], values=[1.0] * 5)),
            invalid,
            "5 values",
        )
        expect_error(step(), invalid, "input is empty", "features [T, 3]")
        for kw in ({"text": "abc"}, {"token_ids": [1, 2]}):
            expect_error(step(**kw), failed, "model 'seq' version 1", "'sequence' model")
        expect_error(
            step(features=tensor(good), output=pb.STEP_OUTPUT_TOP_K, top_k=2),
            failed,
            "no top-k output",
        )
        expect_error(
            lambda: stub.Step(pb.StepRequest(session_id=tok, features=tensor(good)), timeout=10),
            failed,
            "model 'tiny' version 1 is a 'token_lm' model",
            "no features",
        )
        for gen in (
            pb.GenerateRequest(model_name="seq", prompt="a", max_tokens=2),
            pb.GenerateRequest(session_id=sid, max_tokens=2),
        ):
            expect_error(
                lambda g=gen: list(stub.Generate(g, timeout=10)), failed, "Generate", "'seq'"
            )
        # A StepStream message with a bad input ends the stream with the same status.
        reqs = iter([pb.StepStreamRequest(model_name="seq", features=tensor(bad))])
        expect_error(lambda: list(stub.StepStream(reqs, timeout=10)), invalid, "features[0, 1]")
        # Nothing above changed the session: it was never fed.
        assert stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10).steps == 0

        k = kpb_grpc.GRPCInferenceServiceStub(ch)
        req = kserve_request(good)
        req.inputs[0].datatype = "FP64"
        expect_error(lambda: k.ModelInfer(req, timeout=10), invalid, "'FP32'")
        req = kserve_request(good)
        del req.inputs[0].shape[:]
        req.inputs[0].shape.extend([2, F])
        expect_error(lambda: k.ModelInfer(req, timeout=10), invalid, "[1, T, F]")
        bad_k = good.copy()
        bad_k[1, 0] = -np.inf
        expect_error(
            lambda: k.ModelInfer(kserve_request(bad_k, raw=True), timeout=10),
            invalid,
            "features[1, 0] is -inf",
        )
        req = kserve_request(np.ones((2, 4), np.float32))
        expect_error(lambda: k.ModelInfer(req, timeout=10), invalid, "[T, 3]")
        treq = kpb.ModelInferRequest(model_name="tiny")
        treq.inputs.add(
            name="features", datatype="FP32", shape=[1, 1, F]
        ).contents.fp32_contents.extend([1.0] * F)
        expect_error(lambda: k.ModelInfer(treq, timeout=10), failed, "'token_lm' model")
        sreq = kpb.ModelInferRequest(model_name="seq")
        sreq.inputs.add(
            name="tokens", datatype="INT64", shape=[1, 2]
        ).contents.int64_contents.extend([1, 2])
        expect_error(lambda: k.ModelInfer(sreq, timeout=10), failed, "'sequence' model")


def test_fork_export_import_and_a_durable_restart_continue_exactly(repo, refs, tmp_path):
    """A sequence session survives a restart (sqlite store) and continues exactly; a fork and
    an import carry its state too."""
    store = f"sqlite:///{tmp_path / 'sessions.db'}"
    ref = refs[1]
    rng = np.random.default_rng(9)
    xs = [rng.normal(size=(int(rng.integers(1, 6)), F)).astype(np.float32) for _ in range(6)]
    state = ref.zeros()
    first = start(repo, default_model="tiny", state_store=store)
    try:
        with grpc.insecure_channel(first.target) as ch:
            stub = pb_grpc.LstmServeServiceStub(ch)
            sid = stub.CreateSession(
                pb.CreateSessionRequest(model_name="seq", session_id="durable-seq-session-1"),
                timeout=10,
            ).session_id
            for x in xs[:3]:
                want, state = ref.feed(x, state)
                r = stub.Step(pb.StepRequest(session_id=sid, features=tensor(x)), timeout=10)
                np.testing.assert_allclose(rows_of(r.outputs), want[-1:], atol=ATOL, rtol=0)
            record = stub.ExportSession(pb.ExportSessionRequest(session_id=sid), timeout=10).record
            fork = stub.ForkSession(pb.ForkSessionRequest(session_id=sid), timeout=10).session_id
            r = stub.Step(pb.StepRequest(session_id=fork, features=tensor(xs[3])), timeout=10)
            np.testing.assert_allclose(
                rows_of(r.outputs), ref.feed(xs[3], state)[0][-1:], atol=ATOL, rtol=0
            )
    finally:
        first.stop()
    second = start(repo, default_model="tiny", state_store=store)
    try:
        with grpc.insecure_channel(second.target) as ch:
            stub = pb_grpc.LstmServeServiceStub(ch)
            info = stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10)
            assert info.steps == sum(len(x) for x in xs[:3]) and info.model_name == "seq"
            saved = state
            for x in xs[3:]:
                want, state = ref.feed(x, state)
                r = stub.Step(
                    pb.StepRequest(
                        session_id=sid, features=tensor(x), output=pb.STEP_OUTPUT_ALL_LOGITS
                    ),
                    timeout=10,
                )
                np.testing.assert_allclose(rows_of(r.outputs), want, atol=ATOL, rtol=0)
            copy = stub.ImportSession(
                pb.ImportSessionRequest(record=record, session_id="imported-seq-session-1"),
                timeout=10,
            ).session_id
            r = stub.Step(pb.StepRequest(session_id=copy, features=tensor(xs[4])), timeout=10)
            np.testing.assert_allclose(
                rows_of(r.outputs), ref.feed(xs[4], saved)[0][-1:], atol=ATOL, rtol=0
            )
            # A request id's retry gets the first outcome, not a second feed.
            x = xs[5]
            want, state = ref.feed(x, state)
            req = pb.StepRequest(session_id=sid, features=tensor(x), request_id="once")
            a = stub.Step(req, timeout=10)
            b = stub.Step(req, timeout=10)
            np.testing.assert_allclose(rows_of(a.outputs), want[-1:], atol=ATOL, rtol=0)
            assert rows_of(b.outputs).tolist() == rows_of(a.outputs).tolist()
            assert a.steps == b.steps
    finally:
        second.stop()


def test_split_topology_serves_a_sequence_model(serve, repo, refs):
    """Front ends over the engine's socket carry features, outputs and the model's
    description; two front ends, both kinds, every way in."""
    served = serve(
        "--topology",
        "split",
        "--frontends",
        "2",
        "--model-repository",
        str(repo),
        "--default-model",
        "tiny",
        "--prefill-chunk-tokens",
        "3",
    )
    run_interleaved(served.target, refs, seed=2)
    with grpc.insecure_channel(served.target) as ch:
        stub = pb_grpc.LstmServeServiceStub(ch)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(model_name="seq"), timeout=10)
        assert info.kind == pb.MODEL_KIND_SEQUENCE and list(info.scaling.feature_std) == [1.0] * F
        bad = np.ones((1, F), np.float32)
        bad[0, 0] = np.nan
        expect_error(
            lambda: stub.Step(
                pb.StepRequest(
                    session_id=stub.CreateSession(
                        pb.CreateSessionRequest(model_name="seq"), timeout=10
                    ).session_id,
                    features=tensor(bad),
                ),
                timeout=10,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "features[0, 0] is nan",
        )


def test_the_bundled_repository_serves_both_models(refs):
    """`make serve`'s repository: the character model stays the default, the sunspots
    forecaster is served beside it, exact against ORT on the bundled file, scaling included."""
    srv = ServerThread(
        dataclasses.replace(make_settings(BUNDLED / "unused"), model="").validate()
    ).start()
    path = BUNDLED / "sunspots" / "1" / "model.onnx"
    spec = validate(path, kind="sequence")
    ref = SequenceReference(path)
    try:
        with LstmClient(srv.target, timeout=30) as c:
            listed = c.list_models()
            assert listed.default is not None and listed.default.name == "timemachine"
            states = {m.name: [v.state for v in m.versions] for m in listed.models}
            assert states == {"sunspots": ["READY"], "timemachine": ["READY"]}
            assert c.model_info().name == "timemachine"
            assert c.generate_text("the time ", 5, temperature=0)
            raw = np.array([[50.0], [80.0], [120.0], [90.0], [60.0], [30.0]])
            got = c.step_features(raw, model="sunspots", chunk_rows=4)
            want = spec.unscale_outputs(ref.feed(spec.scale_features(raw), ref.zeros())[0])
            np.testing.assert_allclose(got.outputs, want, atol=1e-4, rtol=1e-5)
            assert got.output_names == ("sunspots_next",) and got.steps == 6
            sid = c.create_session(model="sunspots")
            half = c.step_features(raw[:3], session_id=sid)
            rest = c.step_features(raw[3:], session_id=sid)
            np.testing.assert_allclose(
                np.concatenate([half.outputs, rest.outputs]), want, atol=1e-4, rtol=1e-5
            )
            with pytest.raises(ValueError, match="token model"):
                c.step_features(raw)
    finally:
        srv.stop()


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.client", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_client_cli_steps_a_csv(srv, refs, tmp_path):
    ref = refs[1]
    x = np.random.default_rng(12).normal(size=(5, F)).round(3)
    want = ref.feed(x.astype(np.float32), ref.zeros())[0]
    # A header in another order than the model's: the columns are put in its order.
    csv = "x2,x0,x1\n" + "".join(f"{r[2]},{r[0]},{r[1]}\n" for r in x)
    path = tmp_path / "rows.csv"
    path.write_text(csv)
    target = ["--target", srv.target, "--model", "seq"]
    done = run_cli("step", "--features", str(path), "--json", *target)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    names = [n for n in lines[0] if n != "row"]
    got = np.asarray([[line[n] for n in names] for line in lines])
    # The model's scaling is the identity (random_sequence_model): raw in, raw out.
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    # From stdin, no header, already scaled: one row a step, the same numbers in a table.
    body = "".join(",".join(str(v) for v in r) + "\n" for r in x)
    done = run_cli("step", "--features", "-", "--scaled", *target, stdin=body)
    assert done.returncode == 0, done.stderr
    table = done.stdout.splitlines()
    assert table[0].split("\t")[0] == "row" and len(table) == 6
    got = np.asarray([[float(v) for v in line.split("\t")[1:]] for line in table[1:]])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # Clear errors, one line, exit 2 (a bad file) or 1 (the server refused).
    path.write_text("1,2\n")
    done = run_cli("step", "--features", str(path), *target)
    assert done.returncode == 2 and "CSV line 1: 2 value(s), the model takes 3" in done.stderr
    path.write_text("1,2,nope\n")
    done = run_cli("step", "--features", str(path), *target)
    assert done.returncode == 2 and "CSV line 1" in done.stderr
    done = run_cli("step", "--features", str(path), "--target", srv.target)
    assert done.returncode == 2 and "is a token model" in done.stderr
    assert "Traceback" not in done.stderr


def test_readme_recipe_serves_an_nn_lstm(tmp_path):
    """README's "Serving your own LSTM", run as written: an nn.LSTM and a linear head, through
    the graph builder into a repository, served, and stepped with raw rows by the client;
    exact against the PyTorch module itself on the scaled rows."""
    torch = pytest.importorskip("torch")
    import onnx

    from contract.model import Scaling
    from export.graph import NumpyLayer, SequenceWeights, build_sequence_model

    torch.manual_seed(0)
    F_, H, L, O_ = 2, 32, 2, 1
    lstm, head = torch.nn.LSTM(F_, H, L), torch.nn.Linear(H, O_)

    def np32(t: Any) -> np.ndarray:
        return t.detach().float().numpy()

    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    layers = [NumpyLayer(*(np32(getattr(lstm, f"{w}_l{k}")) for w in names)) for k in range(L)]
    scaling = Scaling((20.0, 500.0), (5.0, 120.0), (500.0,), (120.0,))
    config = {
        "kind": "sequence",
        "num_layers": L,
        "hidden_size": H,
        "cell": "nn.LSTM",
        "num_features": F_,
        "num_outputs": O_,
        "feature_names": ["temperature", "load"],
        "output_names": ["load_next"],
        "scaling": scaling.to_dict(),
    }
    model = build_sequence_model(
        SequenceWeights(layers, np32(head.weight), np32(head.bias)), config
    )
    (tmp_path / "load" / "1").mkdir(parents=True)
    onnx.save(model, str(tmp_path / "load" / "1" / "model.onnx"))

    raw = np.array([[21.5, 480.0], [22.0, 510.0], [19.0, 700.0]])
    x = (raw - scaling.feature_mean) / scaling.feature_std
    with torch.no_grad():
        y, _ = lstm(torch.tensor(x, dtype=torch.float32)[:, None, :])
        y = head(y)[:, 0].double().numpy()
    want = y * scaling.output_std + scaling.output_mean

    srv = start(tmp_path)
    try:
        body = "temperature,load\n" + "".join(f"{a},{b}\n" for a, b in raw)
        done = run_cli(
            "step", "--features", "-", "--target", srv.target, "--model", "load", stdin=body
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == "row\tload_next"
        got = np.asarray([float(line.split("\t")[1]) for line in lines[1:]])
        np.testing.assert_allclose(got, want[:, 0], rtol=1e-5, atol=1e-3)
        with LstmClient(srv.target, timeout=10) as c:
            out = c.step_features(raw, model="load").outputs
        np.testing.assert_allclose(out, want, rtol=0, atol=1e-3)  # 1e-5 of the 120 std
    finally:
        srv.stop()


TRITON_HTTP = r"""
import json, sys
import numpy as np
import tritonclient.http as h

plan = json.load(sys.stdin)
c = h.InferenceServerClient(plan["url"])
got = []
for step in plan["steps"]:
    x = np.asarray(step["rows"], np.float32)[None]
    inp = h.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, step["binary_in"])
    out = h.InferRequestedOutput("outputs", binary_data=step["binary_out"])
    r = c.infer(
        plan["model"], [inp], outputs=[out], sequence_id=step["seq"],
        sequence_start=step["start"], sequence_end=step["end"],
    )
    got.append(r.as_numpy("outputs").tolist())
json.dump(got, sys.stdout)
"""


def test_tritonclient_http_interleaved_sequences_on_a_sequence_model(srv, refs):
    """Stock tritonclient.http (in a child interpreter: it brings gevent) drives three
    sequences of the sequence model interleaved at random, binary or JSON tensors each way;
    every step's outputs [1, T, O] exact against in-process ONNX Runtime per sequence."""
    pytest.importorskip("tritonclient.http")
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    chunks = {s: [rng.randint(1, 4) for _ in range(rng.randint(3, 6))] for s in (21, 22, 23)}
    order = [s for s, sizes in chunks.items() for _ in sizes]
    rng.shuffle(order)
    seen: dict[int, int] = {}
    steps = []
    for s in order:
        k = seen.get(s, 0)
        seen[s] = k + 1
        rows = nprng.normal(size=(chunks[s][k], F)).astype(np.float32)
        steps.append(
            {
                "seq": s,
                "rows": rows.tolist(),
                "start": k == 0,
                "end": k == len(chunks[s]) - 1,
                "binary_in": rng.random() < 0.5,
                "binary_out": rng.random() < 0.5,
            }
        )
    plan = {"url": f"127.0.0.1:{srv.app.http_port}", "model": "seq", "steps": steps}
    got = run_script(TRITON_HTTP, plan)
    state = {s: refs[1].zeros() for s in chunks}
    for i, (step, out) in enumerate(zip(steps, got, strict=True)):
        want, state[step["seq"]] = refs[1].feed(
            np.asarray(step["rows"], np.float32), state[step["seq"]]
        )
        arr = np.asarray(out, np.float32)
        assert arr.shape == (1, len(step["rows"]), O), (seed, i, arr.shape)
        np.testing.assert_allclose(arr[0], want, atol=ATOL, rtol=0, err_msg=f"seed {seed} #{i}")
