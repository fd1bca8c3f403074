"""Hardening (issue 13): bounded and undecodable requests, the model's checksum, the metrics
port, build information in GetModelInfo, reflection. Real servers, real channels."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from contract.files import sha256_file
from export.graph import build_model, random_weights
from export.repository import Manifest, ManifestEntry, OutputFile, Source
from protos.lstmserve.v1 import lstm_serve_pb2 as pb
from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from server.runtime import recorded_sha256

from .conftest import ROOT, VOCAB, ServerThread, make_settings

SERVICE = pb.DESCRIPTOR.services_by_name["LstmServeService"]
# Field 1, length-delimited, with a length varint that never ends: no message parses it.
BAD = b"\x0a\xff"


def _raw(ch: grpc.Channel, method_name: str, messages: list[bytes]) -> list[bytes]:
    """Call ``method_name`` with these bytes as they are (no serializer either way)."""
    method = SERVICE.methods_by_name[method_name]
    path = f"/{SERVICE.full_name}/{method_name}"
    if method.client_streaming:
        return list(ch.stream_stream(path)(iter(messages), timeout=10))
    if method.server_streaming:
        return list(ch.unary_stream(path)(messages[0], timeout=10))
    return [ch.unary_unary(path)(messages[0], timeout=10)]


def _expect_invalid(ch: grpc.Channel, method_name: str, messages: list[bytes]) -> None:
    with pytest.raises(grpc.RpcError) as e:
        _raw(ch, method_name, messages)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method_name
    input_type = SERVICE.methods_by_name[method_name].input_type.name
    assert e.value.details() == f"request is not a valid {input_type}"


def _samples(body: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
        if s.name == name
    }


def _scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read().decode()


def _wait(cond, timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# --- undecodable and oversized requests ---------------------------------------------------------


def test_undecodable_bytes_get_invalid_argument_on_every_rpc(start_server, reference, caplog):
    caplog.set_level(logging.INFO)
    srv = start_server(metrics_port=0)
    methods = [m.name for m in SERVICE.methods]
    assert len(methods) == 15  # every RPC of the service, the model control ones included
    with grpc.insecure_channel(srv.target) as ch:
        for name in methods:
            _expect_invalid(ch, name, [BAD])
        # A stream's messages are decoded one by one: the first is answered, the bad one ends it.
        good = pb.StepStreamRequest(text="ab").SerializeToString()
        call = ch.stream_stream(f"/{SERVICE.full_name}/StepStream")(iter([good, BAD]), timeout=10)
        first = pb.StepStreamResponse.FromString(next(call))
        assert first.tokens_consumed == 2
        with pytest.raises(grpc.RpcError) as e:
            next(call)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # The server goes on serving, exactly.
        stub = pb_grpc.LstmServeServiceStub(ch)
        sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
        seed = random.SystemRandom().randrange(2**32)
        tokens = [int(t) for t in np.random.default_rng(seed).integers(0, len(VOCAB), 17)]
        got = stub.Step(pb.StepRequest(session_id=sid, token_ids=tokens))
        want, _ = reference.feed(tokens, reference.zeros())
        np.testing.assert_allclose(np.asarray(got.logits), want[-1], atol=1e-5, err_msg=f"{seed}")

    body = _scrape(srv.app.metrics_port)
    bad = _samples(body, "lstm_serve_undecodable_requests_total")
    assert bad == {(("method", m),): 2.0 if m == "StepStream" else 1.0 for m in methods}
    codes = _samples(body, "lstm_serve_requests_total")
    for m in methods:
        want_n = 2.0 if m == "StepStream" else 1.0
        assert codes[(("code", "INVALID_ARGUMENT"), ("method", m))] == want_n, m
    # One log line for the lot (at most one per 10 s), and never a traceback.
    lines = [r for r in caplog.records if "is not a valid" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert all(r.exc_info is None for r in caplog.records)
    assert "Traceback" not in caplog.text


def test_undecodable_requests_through_front_ends_reach_the_engines_metrics(serve):
    srv = serve("--frontends", "1", "--metrics-port", "0")
    with grpc.insecure_channel(srv.target) as ch:
        _expect_invalid(ch, "Step", [BAD])
        _expect_invalid(ch, "StepStream", [BAD])
        stub = pb_grpc.LstmServeServiceStub(ch)
        sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
        assert stub.Step(pb.StepRequest(session_id=sid, text="still")).tokens_consumed == 5

    def shipped() -> bool:
        bad = _samples(srv.metrics(), "lstm_serve_undecodable_requests_total")
        return bad == {(("method", "Step"),): 1.0, (("method", "StepStream"),): 1.0}

    _wait(shipped, what="the front end's counts in the engine's /metrics")
    _wait(lambda: any("is not a valid" in line for line in srv.lines), what="the log line")
    out = "".join(srv.lines)
    assert out.count("is not a valid") == 1, out
    assert "Traceback" not in out and "DecodeError" not in out


def test_undecodable_health_requests_get_invalid_argument(start_server, tmp_path, caplog):
    # Open to every client (no token even with --auth-tokens), and as hard to flood the log
    # through as every other service: INVALID_ARGUMENT, counted, one line per 10 s.
    caplog.set_level(logging.INFO)
    tokens = tmp_path / "tokens"
    tokens.write_text("alice s3cret-token-alice\n")
    srv = start_server(metrics_port=0, auth_tokens=str(tokens))
    path = "/grpc.health.v1.Health/"
    with grpc.insecure_channel(srv.target) as ch:
        for _ in range(3):
            for name, call in (
                ("Check", ch.unary_unary(path + "Check")),
                ("Watch", ch.unary_stream(path + "Watch")),
            ):
                with pytest.raises(grpc.RpcError) as e:
                    list(call(BAD, timeout=10)) if name == "Watch" else call(BAD, timeout=10)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
                assert e.value.details() == "request is not a valid HealthCheckRequest"
        # Still answering, for every service of the port.
        stub = health_pb2_grpc.HealthStub(ch)
        serving = health_pb2.HealthCheckResponse.SERVING
        for service in ("", SERVICE.full_name, "inference.GRPCInferenceService"):
            req = health_pb2.HealthCheckRequest(service=service)
            assert stub.Check(req, timeout=10).status == serving
            watch = stub.Watch(req, timeout=10)
            assert next(watch).status == serving
            watch.cancel()
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND

    bad = _samples(_scrape(srv.app.metrics_port), "lstm_serve_undecodable_requests_total")
    assert bad == {(("method", "Check"),): 3.0, (("method", "Watch"),): 3.0}
    lines = [r for r in caplog.records if "is not a valid" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert all(r.exc_info is None for r in caplog.records)
    assert "Traceback" not in caplog.text


def _import_request(total: int) -> bytes:
    """An ImportSession request of exactly ``total`` bytes (its record is garbage)."""
    for n in range(total - 6, total):
        data = pb.ImportSessionRequest(record=b"\0" * n).SerializeToString()
        if len(data) == total:
            return data
    raise AssertionError(total)


def test_request_size_limit_follows_the_settings(start_server):
    srv = start_server()
    limit = srv.settings.max_message_bytes()
    assert 256 << 10 <= limit <= 512 << 10  # a few hundred KB, not 16 MiB
    with grpc.insecure_channel(srv.target) as ch:
        with pytest.raises(grpc.RpcError) as e:
            _raw(ch, "ImportSession", [_import_request(limit + 1)])
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # At the limit the message is parsed, and its record refused as the garbage it is.
        with pytest.raises(grpc.RpcError) as e:
            _raw(ch, "ImportSession", [_import_request(limit)])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The largest valid prompts fit: 8 characters per token (4 UTF-8 bytes each; a run of
        # non-letters folds to one space), and max_prompt_tokens token ids.
        stub = pb_grpc.LstmServeServiceStub(ch)
        n = srv.settings.max_prompt_tokens
        text = "\U0001f600" * (8 * n)
        assert len(pb.StepRequest(text=text).SerializeToString()) > 128 << 10
        sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
        assert stub.Step(pb.StepRequest(session_id=sid, text=text)).tokens_consumed == 1
        ids = [len(VOCAB) - 1] * n
        assert stub.Step(pb.StepRequest(session_id=sid, token_ids=ids)).tokens_consumed == n


# --- the model's checksum ---------------------------------------------------------------------


def _repository(root: Path, model: Path) -> Path:
    """A repository holding ``tiny/1/model.onnx`` and a manifest written as lstm-export does."""
    target = root / "tiny" / "1" / "model.onnx"
    target.parent.mkdir(parents=True)
    shutil.copyfile(model, target)
    out = OutputFile("tiny/1/model.onnx", sha256_file(target), target.stat().st_size)
    report = dict.fromkeys(("model", "training", "parity", "perplexity", "int8"), None) | {
        "created_at": "2026-01-01T00:00:00+00:00",
        "seconds": 1.0,
    }
    entry = ManifestEntry.exported(
        "tiny", Source("/ckpt/tiny.pt", "0" * 64, 1), {}, {}, 1, {"fp32": out}, report
    )
    manifest = Manifest({"tiny": entry}, "2026-01-01T00:00:00+00:00")
    (root / "manifest.json").write_text(json.dumps(manifest.to_dict(), indent=2))
    return target


def test_a_model_whose_bytes_differ_from_the_manifest_is_refused(tmp_path, model_path, serve):
    target = _repository(tmp_path / "repo", model_path)
    expected = sha256_file(target)
    serve("--metrics-port", "-1", model=tmp_path / "repo").stop()  # intact: it starts

    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the middle of the file: in the weights
    target.write_bytes(bytes(data))
    actual = sha256_file(target)
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "--model", str(tmp_path / "repo"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "LSTM_SERVE_PROVIDER": "cpu", "LSTM_SERVE_METRICS_PORT": "-1"},
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lstm-serve: error:")]
    assert len(errors) == 1, proc.stderr
    assert str(target) in errors[0] and expected in errors[0] and actual in errors[0]


def test_which_models_a_manifest_covers(tmp_path, model_path):
    target = _repository(tmp_path / "repo", model_path)
    assert recorded_sha256(target) == (tmp_path / "repo" / "manifest.json", sha256_file(target))
    other = tmp_path / "repo" / "tiny" / "2" / "model.onnx"  # not listed: loads as before
    other.parent.mkdir()
    shutil.copyfile(model_path, other)
    assert recorded_sha256(other) is None
    assert recorded_sha256(model_path) is None  # no manifest at all
    # A failed entry keeps its last good version's files; those are checked too.
    manifest = json.loads((tmp_path / "repo" / "manifest.json").read_text())
    entry = manifest["models"]["tiny"]
    manifest["models"]["tiny"] = entry | {
        "status": "failed",
        "version": None,
        "outputs": {},
        "previous": {"version": 1, "outputs": entry["outputs"]},
    }
    (tmp_path / "repo" / "manifest.json").write_text(json.dumps(manifest))
    assert recorded_sha256(target) == (tmp_path / "repo" / "manifest.json", sha256_file(target))
    # Something else called manifest.json is not ours: ignored.
    (tmp_path / "repo" / "manifest.json").write_text('{"name": "something else"}')
    assert recorded_sha256(target) is None


# --- metrics port, GetModelInfo, reflection -------------------------------------------------


def test_metrics_port_serves_metrics_only_with_process_metrics(shared_server):
    port = shared_server.app.metrics_port
    body = _scrape(port)
    names = {s.name for fam in text_string_to_metric_families(body) for s in fam.samples}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= names
    assert "lstm_serve_sessions_active" in names
    assert "lstm_serve_sessions_active" in _scrape(port, "/metrics?x=1")
    for path in ("/", "/metrics/", "/metricsx", "/favicon.ico", "/debug/vars"):
        with pytest.raises(urllib.error.HTTPError) as e:
            _scrape(port, path)
        assert e.value.code == 404, path


BUILD_INFO = {
    "checkpoint_sha256": "ab" * 32,
    "versions": {"lstm_serve": "0.1.0", "onnxruntime": "1.31.1", "torch": "2.13.0"},
    "created_at": "2026-01-01T00:00:00+00:00",
}


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose config carries what lstm-export records about the build."""
    import onnx

    config = {
        "num_layers": 2,
        "hidden_size": 24,
        "vocab_size": len(VOCAB),
        "cell": "random",
        "preprocess": "d2l_letters_lower",
        "unk_id": 0,
        "input_mode": "onehot",
        "training": {"epoch": 3, "best_val_ppl": 4.5, "corpus_sha256": "cd" * 32},
        **BUILD_INFO,
    }
    path = tmp_path_factory.mktemp("exported") / "model.onnx"
    onnx.save(build_model(random_weights(len(VOCAB), 24, 2, seed=3), VOCAB, config), str(path))
    return path


def test_get_model_info_shows_build_info_only_when_asked(exported_model):
    def config(**settings: bool) -> dict:
        srv = ServerThread(make_settings(exported_model, **settings)).start()
        try:
            with grpc.insecure_channel(srv.target) as ch:
                info = pb_grpc.LstmServeServiceStub(ch).GetModelInfo(pb.GetModelInfoRequest())
            return json.loads(info.config_json)
        finally:
            srv.stop()

    hidden = config()
    assert "sha256" not in json.dumps(hidden) and "versions" not in hidden
    assert hidden["training"] == {"epoch": 3, "best_val_ppl": 4.5}
    assert hidden["created_at"] == BUILD_INFO["created_at"] and hidden["num_layers"] == 2

    shown = config(expose_build_info=True)
    assert shown["checkpoint_sha256"] == BUILD_INFO["checkpoint_sha256"]
    assert shown["versions"] == BUILD_INFO["versions"]
    assert shown["training"]["corpus_sha256"] == "cd" * 32


def _list_services(target: str, token: str = "", v1: bool = False) -> set[str]:
    """The services reflection lists (grpc.reflection.v1alpha, or v1: the same messages)."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    with grpc.insecure_channel(target) as ch:
        if v1:
            call = ch.stream_stream(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
        else:
            call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo
        resp = next(call(iter([req]), timeout=10, metadata=metadata))
        return {s.name for s in resp.list_services_response.service}


def test_reflection_is_off_by_default_and_on_with_the_flag(start_server, serve):
    with pytest.raises(grpc.RpcError) as e:
        _list_services(start_server().target)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    srv = serve("--reflection", "--metrics-port", "-1")  # the real command line
    assert {"lstmserve.v1.LstmServeService", "grpc.health.v1.Health"} <= _list_services(srv.target)


def test_with_authentication_an_anonymous_caller_is_unauthenticated_first(start_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice s3cret-token-alice\n")
    srv = start_server(auth_tokens=str(tokens))
    path = f"/{SERVICE.full_name}/Step"
    with grpc.insecure_channel(srv.target) as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary(path)(BAD, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            auth = (("authorization", "Bearer s3cret-token-alice"),)
            ch.unary_unary(path)(BAD, timeout=10, metadata=auth)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_reflection_needs_a_credential_when_authentication_is_on(start_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice s3cret-token-alice\n")
    srv = start_server(reflection=True, auth_tokens=str(tokens))
    for v1 in (False, True):
        for token in ("", "not-a-valid-token-at-all"):
            with pytest.raises(grpc.RpcError) as e:
                _list_services(srv.target, token, v1=v1)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, (v1, token)
        listed = _list_services(srv.target, "s3cret-token-alice", v1=v1)
        assert {SERVICE.full_name, "inference.GRPCInferenceService"} <= listed
        assert "grpc.health.v1.Health" in listed
    # Without authentication reflection stays open (as --reflection asks).
    assert SERVICE.full_name in _list_services(start_server(reflection=True).target, v1=True)
