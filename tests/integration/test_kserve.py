"""KServe v2 / Triton gRPC (``inference.GRPCInferenceService``) through stock tritonclient.

tritonclient's generated modules define the same protobuf names (package ``inference``) as
ours, and one interpreter's default descriptor pool cannot hold both ("duplicate symbol"),
while this process imports the server. So tritonclient runs in a child interpreter
(:data:`CLIENT`): it takes a plan of operations on stdin and prints what it got as JSON; the
test compares every logits row with in-process ONNX Runtime (``reference``, one state per
sequence; tolerance 1e-5 absolute, as the other server tests). That also makes these true wire
tests: the client side never sees our generated code.
"""

from __future__ import annotations

import importlib.util
import random
import re
from typing import Any

import numpy as np
import pytest
from google.protobuf import descriptor as D

from protos.inference import grpc_service_pb2 as kpb
from server.kserve import sequence_session_id

from .conftest import VOCAB, Reference, run_script

# Found, never imported here (see above).
if importlib.util.find_spec("tritonclient") is None:
    pytest.skip("tritonclient (dev extra) is not installed", allow_module_level=True)

MODEL, VERSION = "tiny", "3"  # conftest's model_path: tiny/3/model.onnx
ATOL = 1e-5

CLIENT = r"""
import json, queue, sys
import numpy as np
import tritonclient.grpc as g
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

plan = json.load(sys.stdin)
out = []


def inputs(step):
    if "text" in step:
        x = g.InferInput("text", [1, 1], "BYTES")
        x.set_data_from_numpy(np.array([[step["text"].encode()]], dtype=object))
    else:
        t = np.array([step["tokens"]], np.int64)
        x = g.InferInput("tokens", list(t.shape), "INT64")
        x.set_data_from_numpy(t)
    return [x]


def seq(step):
    return dict(
        sequence_id=step.get("seq", 0),
        sequence_start=step.get("start", False),
        sequence_end=step.get("end", False),
    )


def result(r):
    return {"logits": r.as_numpy("logits").tolist(), "id": r.get_response().id}


def failure(e):
    return {"error": e.message(), "status": e.status()}


def fields(d):
    return {
        f.name: [f.number, f.type, f.is_repeated, f.message_type and f.message_type.full_name,
                 f.containing_oneof and f.containing_oneof.name]
        for f in d.fields
    }


def walk(d, acc):
    # Map entries too: their key and value fields are the map's types.
    acc[d.full_name] = fields(d)
    for n in d.nested_types:
        walk(n, acc)


c = g.InferenceServerClient(plan["target"] or "127.0.0.1:1")
if plan.get("token"):  # a bearer token on every inference call (lstm-serve --auth-tokens)
    import functools
    _auth = {"authorization": "Bearer " + plan["token"]}
    c.infer = functools.partial(c.infer, headers=_auth)
    c.start_stream = functools.partial(c.start_stream, headers=_auth)
for op in plan["ops"]:
    kind, model = op["op"], plan.get("model", "")
    if kind == "descriptors":
        from tritonclient.grpc import model_config_pb2
        acc = {}
        for mod in (service_pb2, model_config_pb2):
            for d in mod.DESCRIPTOR.message_types_by_name.values():
                walk(d, acc)
        enums = {e.full_name: {v.name: v.number for v in e.values}
                 for e in model_config_pb2.DESCRIPTOR.enum_types_by_name.values()}
        methods = {m.name: [m.input_type.full_name, m.output_type.full_name]
                   for m in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
        out.append({"messages": acc, "enums": enums, "methods": methods})
    elif kind == "health":
        out.append({
            "live": c.is_server_live(),
            "ready": c.is_server_ready(),
            "model_ready": c.is_model_ready(model),
            "version_ready": c.is_model_ready(model, op["version"]),
            "other_ready": c.is_model_ready("no-such-model"),
            "server": c.get_server_metadata(as_json=True),
            "metadata": c.get_model_metadata(model, as_json=True),
            "config": c.get_model_config(model, as_json=True),
        })
    elif kind == "statistics":
        out.append(c.get_inference_statistics(model, as_json=True))
    elif kind == "metadata":
        try:
            out.append(c.get_model_metadata(op["model"], as_json=True))
        except InferenceServerException as e:
            out.append(failure(e))
    elif kind == "index":
        # RepositoryIndex: [{name, version, state, reason}], or the failure.
        try:
            r = c.get_model_repository_index()
            out.append([{"name": m.name, "version": m.version, "state": m.state,
                         "reason": m.reason} for m in r.models])
        except InferenceServerException as e:
            out.append(failure(e))
    elif kind in ("load", "unload"):
        # RepositoryModelLoad / RepositoryModelUnload of op["model"] (default: the plan's
        # model): {"ok": true}, or the failure.
        try:
            name = op.get("model", model)
            c.load_model(name) if kind == "load" else c.unload_model(name)
            out.append({"ok": True})
        except InferenceServerException as e:
            out.append(failure(e))
    elif kind == "infer":
        # ModelInfer, one request at a time.
        got = []
        for i, step in enumerate(op["steps"]):
            try:
                got.append(result(c.infer(model, inputs(step), request_id=str(i), **seq(step))))
            except InferenceServerException as e:
                got.append(failure(e))
        out.append(got)
    elif kind == "typed":
        # ModelInfer with typed contents (tritonclient itself always sends raw bytes).
        got = []
        for step in op["steps"]:
            req = service_pb2.ModelInferRequest(model_name=model, id="typed")
            t = req.inputs.add()
            if "text" in step:
                t.name, t.datatype = "text", "BYTES"
                t.shape.extend([1, 1])
                t.contents.bytes_contents.append(step["text"].encode())
            else:
                t.name, t.datatype = "tokens", "INT64"
                t.shape.extend([1, len(step["tokens"])])
                t.contents.int64_contents.extend(step["tokens"])
            if step.get("seq"):
                req.parameters["sequence_id"].int64_param = step["seq"]
                req.parameters["sequence_start"].bool_param = step.get("start", False)
                req.parameters["sequence_end"].bool_param = step.get("end", False)
            r = c._client_stub.ModelInfer(req)
            got.append({"raw": len(r.raw_output_contents), "shape": list(r.outputs[0].shape),
                        "logits": [list(r.outputs[0].contents.fp32_contents)]})
        out.append(got)
    elif kind in ("stream", "stream-each"):
        # ModelStreamInfer. "stream": every request sent at once (the server keeps each
        # sequence's order); "stream-each": one request, its response, then the next.
        q = queue.Queue()
        c.start_stream(callback=lambda result, error: q.put((result, error)))
        got = {}
        def take():
            r, e = q.get(timeout=20)
            if e is not None:
                got.setdefault("errors", []).append(e.message())
            else:
                got[r.get_response().id] = result(r)
        for i, step in enumerate(op["steps"]):
            c.async_stream_infer(model, inputs(step), request_id=str(i), **seq(step))
            if kind == "stream-each":
                take()
        if kind == "stream":
            for _ in op["steps"]:
                take()
        c.stop_stream()
        out.append(got)
json.dump(out, sys.stdout)
"""


def run_client(
    target: str, ops: list[dict[str, Any]], model: str = MODEL, *, token: str = ""
) -> list[Any]:
    """Run ``ops`` in a child interpreter with tritonclient; what each op returned. ``token``:
    sent as ``authorization: Bearer TOKEN`` on its inference calls (ModelInfer and
    ModelStreamInfer)."""
    plan: dict[str, Any] = {"target": target, "model": model, "ops": ops}
    if token:
        plan["token"] = token
    return run_script(CLIENT, plan)


def run_client_as(
    target: str, ops: list[dict[str, Any]], *, token: str, model: str = MODEL
) -> list[Any]:
    return run_client(target, ops, model, token=token)


def encode(text: str) -> list[int]:
    return [VOCAB.index(ch) for ch in re.sub("[^A-Za-z]+", " ", text).lower()]


class Oracle:
    """The reference's state per sequence, fed in the order the plan gives."""

    def __init__(self, reference: Reference) -> None:
        self.ref = reference
        self.states: dict[Any, Any] = {}

    def expect(self, step: dict[str, Any]) -> np.ndarray:
        tokens = step["tokens"] if "tokens" in step else encode(step["text"])
        key = step.get("seq", 0)
        state = self.ref.zeros() if not key or step.get("start") else self.states[key]
        logits, state = self.ref.feed(tokens, state)
        if key:
            self.states[key] = state
        return logits[-1:]


def interleaved(rng: random.Random, ids: list[Any], steps: int) -> list[dict[str, Any]]:
    """Steps of several sequences, interleaved at random: start first, end last."""
    queue = [i for i in ids for _ in range(steps)]
    rng.shuffle(queue)
    seen: dict[Any, int] = {}
    plan: list[dict[str, Any]] = []
    for i in queue:
        n = seen[i] = seen.get(i, 0) + 1
        step: dict[str, Any] = {"seq": i, "start": n == 1, "end": n == steps}
        if rng.random() < 0.2:
            step["text"] = rng.choice(["Time ", "traveller", "the MACHINE!", "x"])
        else:
            step["tokens"] = [rng.randrange(len(VOCAB)) for _ in range(rng.randint(1, 4))]
        plan.append(step)
    return plan


def check(
    got: list[Any] | dict[str, Any], plan: list[dict[str, Any]], oracle: Oracle, context: str = ""
) -> None:
    """Every step's logits row against the oracle; ``context`` (e.g. the plan's seed) goes in
    every failure message."""
    for i, step in enumerate(plan):
        row = got[i] if isinstance(got, list) else got[str(i)]
        assert "error" not in row, (context, i, step, row)
        np.testing.assert_allclose(
            np.asarray(row["logits"], np.float32),
            oracle.expect(step),
            atol=ATOL,
            rtol=0,
            err_msg=f"{context} step {i}: {step}",
        )


def test_messages_match_tritonclient_field_by_field():
    """Every message, field (name, number, type, repeated), enum value and RPC we define is the
    published protocol's, as tritonclient's generated classes have it."""
    (theirs,) = run_client("", [{"op": "descriptors"}])

    def walk(d: D.Descriptor, acc: dict[str, Any]) -> None:
        acc[d.full_name] = {
            f.name: [
                f.number,
                f.type,
                f.is_repeated,
                f.message_type and f.message_type.full_name,
                f.containing_oneof and f.containing_oneof.name,
            ]
            for f in d.fields
        }
        for n in d.nested_types:  # map entries too: the map's key and value types
            walk(n, acc)

    ours: dict[str, Any] = {}
    for d in kpb.DESCRIPTOR.message_types_by_name.values():
        walk(d, ours)
    assert len(ours) >= 30
    # The model-repository extension is there whole: every field Triton's messages have.
    repository = {
        "ModelRepositoryParameter",
        "RepositoryIndexRequest",
        "RepositoryIndexResponse",
        "RepositoryIndexResponse.ModelIndex",
        "RepositoryModelLoadRequest",
        "RepositoryModelLoadRequest.ParametersEntry",
        "RepositoryModelLoadResponse",
        "RepositoryModelUnloadRequest",
        "RepositoryModelUnloadRequest.ParametersEntry",
        "RepositoryModelUnloadResponse",
    }
    for name in repository:
        assert ours[f"inference.{name}"] == theirs["messages"][f"inference.{name}"], name
    for name, fields in ours.items():
        assert name in theirs["messages"], name
        for field, spec in fields.items():
            assert theirs["messages"][name].get(field) == spec, (name, field)
    for enum in kpb.DESCRIPTOR.enum_types_by_name.values():
        assert {v.name: v.number for v in enum.values} == theirs["enums"][enum.full_name]
    service = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for m in service.methods:
        assert theirs["methods"][m.name] == [m.input_type.full_name, m.output_type.full_name]
    assert {"RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"} <= {
        m.name for m in service.methods
    }


def test_sequence_session_ids_are_valid_and_distinct():
    ids = [1, 2**64 - 1, "1", "abc", "ab", "a b", "x" * 200, "é"]
    sids = [sequence_session_id(i) for i in ids]
    assert len(set(sids)) == len(ids)
    for sid in sids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{16,128}", sid), sid


def test_health_metadata_config_and_statistics(start_server):
    srv = start_server()
    health, stats0, _, stats1 = run_client(
        srv.target,
        [
            {"op": "health", "version": VERSION},
            {"op": "statistics"},
            {"op": "infer", "steps": [{"tokens": [1, 2]}, {"tokens": [99]}]},
            {"op": "statistics"},
        ],
    )
    assert health["live"] and health["ready"] and health["model_ready"]
    assert health["version_ready"] and not health["other_ready"]
    assert "sequence" in health["server"]["extensions"]
    meta = health["metadata"]
    assert meta["name"] == MODEL and meta["versions"] == [VERSION]
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]} == {
        "tokens": ("INT64", ["1", "-1"]),
        "text": ("BYTES", ["1", "1"]),
    }
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["1", "28"]}]
    config = health["config"]["config"]
    assert "sequence_batching" in config
    assert int(config["sequence_batching"]["max_sequence_idle_microseconds"]) > 0
    assert [i["name"] for i in config["input"]] == ["tokens", "text"]

    def counts(stats: dict[str, Any]) -> tuple[int, int]:
        (m,) = stats["model_stats"]
        s = m["inference_stats"]
        return int(s.get("success", {}).get("count", 0)), int(s.get("fail", {}).get("count", 0))

    assert counts(stats0) == (0, 0)
    assert counts(stats1) == (1, 1)  # one good request, one with a token outside the vocabulary
    assert int(stats1["model_stats"][0]["inference_count"]) == 1


def test_interleaved_sequences_over_stream_and_unary(start_server, reference):
    """Sequences interleaved at random: every request of one stream sent at once; ModelInfer
    one at a time; and sequences that move between the two RPCs step by step."""
    srv = start_server()
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    burst = interleaved(rng, [11, 12, "seq-a", "a string id / hashed"], 5)
    unary = interleaved(rng, [21, 22, "seq-b"], 5)
    mixed = interleaved(rng, [31, "seq-c"], 6)
    mixed_unary = [s for i, s in enumerate(mixed) if i % 2 == 0]
    mixed_stream = [s for i, s in enumerate(mixed) if i % 2 == 1]
    out = run_client(
        srv.target,
        [{"op": "stream", "steps": burst}, {"op": "infer", "steps": unary}]
        + [
            {"op": "infer" if i % 2 == 0 else "stream-each", "steps": [s]}
            for i, s in enumerate(mixed)
        ],
    )
    oracle = Oracle(reference)
    check(out[0], burst, oracle, f"seed {seed}, burst")
    check(out[1], unary, oracle, f"seed {seed}, unary")
    for i, step in enumerate(mixed):
        check(out[2 + i], [step], oracle, f"seed {seed}, mixed {i}")
    assert mixed_unary and mixed_stream, f"seed {seed}"
    # Every sequence ended: nothing is left on the server.
    assert srv.on_loop(lambda: len(srv.app.store)) == 0, f"seed {seed}"


def test_requests_without_a_sequence_are_stateless(start_server, reference):
    srv = start_server()
    steps = [{"tokens": [3, 4, 5]}, {"tokens": [3, 4, 5]}, {"text": "Hello, World"}]
    out = run_client(
        srv.target,
        [
            {"op": "infer", "steps": steps},
            {"op": "stream", "steps": steps},
            {"op": "typed", "steps": steps},
            {"op": "typed", "steps": [{"seq": 7, "start": True, "tokens": [1]}]},
            {"op": "typed", "steps": [{"seq": 7, "end": True, "text": "ab"}]},
        ],
    )
    oracle = Oracle(reference)
    for got in out[:3]:
        check(got, steps, oracle)
    np.testing.assert_allclose(out[0][0]["logits"], out[0][1]["logits"], atol=0, rtol=0)
    assert out[2][0]["raw"] == 0 and out[2][0]["shape"] == [1, 28]  # typed in, typed out
    check(out[3], [{"seq": 7, "start": True, "tokens": [1]}], oracle)
    check(out[4], [{"seq": 7, "text": "ab"}], oracle)
    assert srv.on_loop(lambda: len(srv.app.store)) == 0


def test_errors_map_as_triton_does(start_server, reference):
    srv = start_server()
    unknown = {"seq": 404, "tokens": [1]}
    out = run_client(
        srv.target,
        [
            {"op": "infer", "steps": [unknown, {"tokens": [len(VOCAB)]}]},
            {"op": "infer", "steps": [{"seq": 5, "start": True, "end": True, "tokens": [1]}]},
            {"op": "infer", "steps": [{"seq": 5, "tokens": [1]}]},  # ended: unknown again
            {"op": "stream-each", "steps": [unknown, {"tokens": [2]}]},
            {"op": "metadata", "model": "no-such-model"},
        ],
    )
    e = out[0][0]
    assert e["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "must specify the START flag" in e["error"] and "404" in e["error"]
    assert out[0][1]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "outside the vocabulary" in out[0][1]["error"]
    assert "logits" in out[1][0]
    assert out[2][0]["status"] == "StatusCode.INVALID_ARGUMENT"
    # A stream answers a failed request with error_message and goes on.
    stream = out[3]
    assert len(stream["errors"]) == 1 and "START flag" in stream["errors"][0]
    check({"0": stream["1"]}, [{"tokens": [2]}], Oracle(reference))
    assert out[4]["status"] == "StatusCode.NOT_FOUND"
    assert "unknown model" in out[4]["error"]


def test_through_lstm_serve_front_ends(serve, reference):
    """A real ``lstm-serve``: the front ends reach the engine through RemotePlane."""
    s = serve()
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    burst = interleaved(rng, [1, 2, "remote"], 4)
    plain = [{"tokens": [5, 6]}]
    out = run_client(
        s.target,
        [
            {"op": "health", "version": VERSION},
            {"op": "stream", "steps": burst},
            {"op": "infer", "steps": plain},
            {"op": "infer", "steps": [{"seq": 9, "tokens": [1]}]},
        ],
    )
    assert out[0]["ready"] and out[0]["model_ready"], f"seed {seed}"
    oracle = Oracle(reference)
    check(out[1], burst, oracle, f"seed {seed}, burst")
    check(out[2], plain, oracle, f"seed {seed}, plain")
    assert out[3][0]["status"] == "StatusCode.INVALID_ARGUMENT", f"seed {seed}"


def test_undecodable_requests_get_invalid_argument(start_server):
    # Raw bytes straight on the channel (no tritonclient needed): every unary RPC answers
    # INVALID_ARGUMENT; inside a ModelStreamInfer stream the error comes back as the response's
    # error_message and the stream goes on, as Triton's does. An RPC of the proto that the
    # servicer does not implement yet (it inherits the generated stub) answers UNIMPLEMENTED.
    import grpc

    from protos.inference import grpc_service_pb2_grpc as kpb_grpc
    from server.kserve import KServeServicer

    def implemented(name: str) -> bool:
        return getattr(KServeServicer, name) is not getattr(
            kpb_grpc.GRPCInferenceServiceServicer, name
        )

    srv = start_server()
    junk = b"\xff\xff\xff\xff\x0f"  # a field with an invalid varint
    service = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    with grpc.insecure_channel(srv.target) as ch:
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            if method.client_streaming:
                call = ch.stream_stream(path, request_serializer=None, response_deserializer=None)
                good = kpb.ModelInferRequest(model_name="nope").SerializeToString()
                replies = [
                    kpb.ModelStreamInferResponse.FromString(r)
                    for r in call(iter([junk, good]), timeout=10)
                ]
                # Both answered (requests of no sequence may complete in either order).
                assert len(replies) == 2 and all(r.error_message for r in replies)
                assert any(
                    "not a valid ModelStreamInferRequest" in r.error_message for r in replies
                )
                continue
            call = ch.unary_unary(path, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as e:
                call(junk, timeout=10)
            if not implemented(method.name):
                assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED, method.name
                continue
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method.name
            assert "not a valid" in e.value.details()
        # Still serving.
        live = ch.unary_unary(
            f"/{service.full_name}/ServerLive",
            request_serializer=kpb.ServerLiveRequest.SerializeToString,
            response_deserializer=kpb.ServerLiveResponse.FromString,
        )
        assert live(kpb.ServerLiveRequest(), timeout=10).live


def test_model_statistics_count_every_front_end(serve):
    # Each front end ships its counts to the engine with its heartbeats: ModelStatistics
    # through either front end reports the calls both served.
    import time

    from protos.inference import grpc_service_pb2_grpc as kpb_grpc

    from .test_server_processes import channels_on_two_frontends

    srv = serve("--frontends", "2", "--metrics-port", "-1")
    a, b = channels_on_two_frontends(srv.target)
    stubs = [kpb_grpc.GRPCInferenceServiceStub(ch) for ch in (a, b)]
    name = stubs[0].ModelMetadata(kpb.ModelMetadataRequest(name="tiny"), timeout=10).name
    req = kpb.ModelInferRequest(
        model_name=name,
        inputs=[
            kpb.ModelInferRequest.InferInputTensor(
                name="tokens",
                datatype="INT64",
                shape=[1, 2],
                contents=kpb.InferTensorContents(int64_contents=[3, 4]),
            )
        ],
    )
    n = {0: 5, 1: 7}
    for i, count in n.items():
        for _ in range(count):
            stubs[i].ModelInfer(req, timeout=10)
    deadline = time.monotonic() + 30  # heartbeats every 0.5 s; generous on a loaded machine
    while True:
        counts = [
            s.ModelStatistics(kpb.ModelStatisticsRequest(name=name), timeout=10)
            .model_stats[0]
            .inference_count
            for s in stubs
        ]
        if counts == [12, 12] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert counts == [12, 12]
    for ch in (a, b):
        ch.close()
