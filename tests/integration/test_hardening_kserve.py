"""KServe v2 hardening (issue 19): the credential is checked once, before anything else, on
every RPC of ``inference.GRPCInferenceService`` but the health ones; error messages quote a
bounded part of what the client sent; a principal's session quota is RESOURCE_EXHAUSTED.

Raw bytes on real channels (no tritonclient: its generated modules clash with ours in one
interpreter, see test_kserve.py), against in-process servers and a real ``lstm-serve``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme

from protos.inference import grpc_service_pb2 as kpb
from server.kserve import OPEN_RPCS

from .conftest import ServerThread, make_settings

SERVICE = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
MODEL = "tiny"  # conftest's model_path: tiny/3/model.onnx
TOKEN = "token-of-alice-0123456789"
BAD_TOKEN = "not-a-valid-token-at-all"
JUNK = b"\xff\xff\xff\xff\x0f"  # a field with an invalid varint: no message parses it
LONG = "x" * 10_000
SHORT = 300  # a bounded message is shorter than this; an echo of LONG is not


def test_the_open_rpcs_are_the_health_ones():
    # The exception to authentication is explicit, and it is only these three.
    assert {"ServerLive", "ServerReady", "ModelReady"} == OPEN_RPCS
    assert {m.name for m in SERVICE.methods} >= OPEN_RPCS


# --- helpers -------------------------------------------------------------------------------


def _tokens_input(ids: list[int]) -> Any:
    return kpb.ModelInferRequest.InferInputTensor(
        name="tokens",
        datatype="INT64",
        shape=[1, len(ids)],
        contents=kpb.InferTensorContents(int64_contents=ids),
    )


def _request(method: Any) -> bytes:
    """A plausible request for ``method``, built from its descriptor alone (a new RPC gets one
    too): the model's name wherever the message has a name field, one token to infer."""
    cls = getattr(kpb, method.input_type.name)
    msg = cls()
    fields = cls.DESCRIPTOR.fields_by_name
    if "name" in fields:
        msg.name = MODEL
    if "model_name" in fields:
        msg.model_name = MODEL
    if cls is kpb.ModelInferRequest:
        msg.inputs.append(_tokens_input([1, 2]))
    return msg.SerializeToString()


def _call(
    ch: grpc.Channel, name: str, payload: bytes, metadata: tuple[tuple[str, str], ...] = ()
) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """``name`` with these bytes as they are; (code, details, replies)."""
    method = SERVICE.methods_by_name[name]
    path = f"/{SERVICE.full_name}/{name}"
    try:
        if method.client_streaming:
            replies = list(ch.stream_stream(path)(iter([payload]), timeout=10, metadata=metadata))
        else:
            replies = [ch.unary_unary(path)(payload, timeout=10, metadata=metadata)]
    except grpc.RpcError as e:
        return e.code(), e.details() or "", []
    return grpc.StatusCode.OK, "", replies


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("kserve-pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("carol@example.org", common_name="carol")
    files = {
        "ca": ca.cert_pem,
        "server_cert": server.cert_chain_pems[0],
        "server_key": server.private_key_pem,
    }
    for name, blob in files.items():
        blob.write_to_path(str(d / name))
    return {
        "dir": str(d).encode(),
        "ca": ca.cert_pem.bytes(),
        "client_cert": client.cert_chain_pems[0].bytes(),
        "client_key": client.private_key_pem.bytes(),
    }


# --- authentication: the whole matrix ----------------------------------------------------------


@pytest.mark.parametrize("transport", ["plaintext", "tls", "mtls"])
def test_every_rpc_checks_the_credential_first(start_server, pki, tmp_path: Path, transport):
    """Every RPC of the service (from its descriptor) without a token, with a bad one, with a
    good one, with a request and with bytes that do not parse; under TLS and mutual TLS too."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {TOKEN}\n")
    d = Path(pki["dir"].decode())
    settings: dict[str, Any] = {"auth_tokens": str(tokens)}
    if transport != "plaintext":
        settings |= {"tls_cert": str(d / "server_cert"), "tls_key": str(d / "server_key")}
    if transport == "mtls":
        settings["tls_client_ca"] = str(d / "ca")
    srv = start_server(**settings)
    if transport == "plaintext":
        ch = grpc.insecure_channel(srv.target)
    else:
        cert = (pki["client_key"], pki["client_cert"]) if transport == "mtls" else (None, None)
        creds = grpc.ssl_channel_credentials(pki["ca"], *cert)
        ch = grpc.secure_channel(f"localhost:{srv.app.port}", creds)

    # Under mutual TLS the verified certificate is a credential of its own (principal carol).
    anonymous_ok = transport == "mtls"
    seen = set()
    with ch:
        for method in SERVICE.methods:
            name = method.name
            seen.add(name)
            request = _request(method)
            for who, metadata in (
                ("none", ()),
                ("bad", _bearer(BAD_TOKEN)),
                ("good", _bearer(TOKEN)),
            ):
                allowed = name in OPEN_RPCS or who == "good" or (who == "none" and anonymous_ok)
                for payload in (request, JUNK):
                    code, details, replies = _call(ch, name, payload, metadata)
                    where = (transport, name, who, "junk" if payload is JUNK else "request")
                    if not allowed:
                        assert code == grpc.StatusCode.UNAUTHENTICATED, where
                        continue
                    if payload is JUNK:
                        if method.client_streaming:  # answered in the stream, which goes on
                            assert code == grpc.StatusCode.OK, where
                            reply = kpb.ModelStreamInferResponse.FromString(replies[0])
                            assert "not a valid ModelStreamInferRequest" in reply.error_message
                        else:
                            assert code == grpc.StatusCode.INVALID_ARGUMENT, (where, details)
                            assert "not a valid" in details, where
                        continue
                    if name in ("RepositoryModelLoad", "RepositoryModelUnload"):
                        # Authenticated, not an admin (and the server is not in explicit mode).
                        assert code == grpc.StatusCode.PERMISSION_DENIED, (where, details)
                        continue
                    assert code == grpc.StatusCode.OK, (where, code, details)
                    if method.client_streaming:
                        reply = kpb.ModelStreamInferResponse.FromString(replies[0])
                        assert not reply.error_message, (where, reply.error_message)
    assert len(seen) == 12 and seen > OPEN_RPCS


def test_a_handler_without_the_decorator_cannot_be_registered():
    from server.kserve import KServeServicer, add_kserve_servicer

    class Forgetful(KServeServicer):
        async def ModelInfer(self, request: Any, context: Any) -> Any:  # no @rpc
            return await self._infer(request, self.base.caller_of(context))

    servicer = Forgetful.__new__(Forgetful)
    with pytest.raises(TypeError, match="ModelInfer is not decorated"):
        add_kserve_servicer(servicer, None)  # type: ignore[arg-type]


# --- bounded echoes -----------------------------------------------------------------------------


def _infer_request(**fields: Any) -> Any:
    req = kpb.ModelInferRequest(model_name=fields.pop("model_name", MODEL))
    req.inputs.append(fields.pop("input", _tokens_input([1])))
    for key, value in fields.items():
        if key == "outputs":
            req.outputs.extend(value)
        elif key == "sequence_id":
            req.parameters["sequence_id"].string_param = value
        else:
            setattr(req, key, value)
    return req


def _cases() -> dict[str, tuple[str, Any, grpc.StatusCode]]:
    """field -> (RPC, request, the code it must get), each with 10,000 characters there."""
    tensor = kpb.ModelInferRequest.InferInputTensor
    out = kpb.ModelInferRequest.InferRequestedOutputTensor
    text = kpb.InferTensorContents(bytes_contents=[b"ab"])
    not_found, invalid = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
    return {
        "ModelInfer model_name": ("ModelInfer", _infer_request(model_name=LONG), not_found),
        "ModelInfer model_version": (
            "ModelInfer",
            _infer_request(model_version=LONG),
            not_found,
        ),
        "ModelMetadata name": ("ModelMetadata", kpb.ModelMetadataRequest(name=LONG), not_found),
        "ModelMetadata version": (
            "ModelMetadata",
            kpb.ModelMetadataRequest(name=MODEL, version=LONG),
            not_found,
        ),
        "ModelConfig name": ("ModelConfig", kpb.ModelConfigRequest(name=LONG), not_found),
        "ModelStatistics name": (
            "ModelStatistics",
            kpb.ModelStatisticsRequest(name=LONG),
            not_found,
        ),
        "input name": (
            "ModelInfer",
            _infer_request(input=tensor(name=LONG, datatype="INT64", shape=[1, 1])),
            invalid,
        ),
        "output name": ("ModelInfer", _infer_request(outputs=[out(name=LONG)]), invalid),
        "tokens datatype": (
            "ModelInfer",
            _infer_request(input=tensor(name="tokens", datatype=LONG, shape=[1, 1])),
            invalid,
        ),
        "text datatype": (
            "ModelInfer",
            _infer_request(input=tensor(name="text", datatype=LONG, shape=[1, 1], contents=text)),
            invalid,
        ),
        "tokens shape": (
            "ModelInfer",
            _infer_request(input=tensor(name="tokens", datatype="INT64", shape=[1] * 10_000)),
            invalid,
        ),
        "text shape": (
            "ModelInfer",
            _infer_request(input=tensor(name="text", datatype="BYTES", shape=[1] * 10_000)),
            invalid,
        ),
        "string sequence_id": ("ModelInfer", _infer_request(sequence_id=LONG), invalid),
        "RepositoryModelLoad model_name": (
            "RepositoryModelLoad",
            kpb.RepositoryModelLoadRequest(model_name=LONG),
            not_found,
        ),
        "RepositoryModelUnload model_name": (
            "RepositoryModelUnload",
            kpb.RepositoryModelUnloadRequest(model_name=LONG),
            not_found,
        ),
    }


def _short(text: str) -> bool:
    return len(text) < SHORT and "x" * 65 not in text


@pytest.fixture
def explicit_server(model_path: Path) -> Iterator[ServerThread]:
    """conftest's model served from its repository in explicit mode (load and unload reach the
    model name)."""
    settings = dataclasses.replace(
        make_settings(model_path),
        model="",
        model_repository=str(model_path.parents[2]),
        model_control_mode="explicit",
    ).validate()
    srv = ServerThread(settings).start()
    yield srv
    srv.stop()


def test_error_messages_quote_at_most_64_characters_of_any_field(explicit_server):
    with grpc.insecure_channel(explicit_server.target) as ch:
        for field, (name, request, want) in _cases().items():
            code, details, _ = _call(ch, name, request.SerializeToString())
            assert code == want, (field, code, details[:200])
            assert _short(details), (field, len(details), details[:200])
            if "shape" not in field:
                assert "x" * 64 in details, (field, details)  # 64 characters are quoted
            # The same request inside a stream: its error_message is as short.
            if name == "ModelInfer":
                code, _, replies = _call(ch, "ModelStreamInfer", request.SerializeToString())
                assert code == grpc.StatusCode.OK, field
                message = kpb.ModelStreamInferResponse.FromString(replies[0]).error_message
                assert message and _short(message), (field, len(message), message[:200])
        # Still serving.
        code, _, _ = _call(ch, "ModelInfer", _infer_request().SerializeToString())
        assert code == grpc.StatusCode.OK


# --- quotas -------------------------------------------------------------------------------------


def _start(seq: int) -> bytes:
    req = _infer_request()
    req.parameters["sequence_id"].int64_param = seq
    req.parameters["sequence_start"].bool_param = True
    return req.SerializeToString()


def _quota_codes(target: str) -> list[tuple[grpc.StatusCode, str]]:
    with grpc.insecure_channel(target) as ch:
        return [(c, d) for c, d, _ in (_call(ch, "ModelInfer", _start(s)) for s in (1, 2))]


def test_a_principals_session_quota_is_resource_exhausted(start_server):
    # The caller's own limit: retrying cannot help until it ends a sequence.
    (first, _), (second, details) = _quota_codes(start_server(max_sessions_per_principal=1).target)
    assert first == grpc.StatusCode.OK
    assert second == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "max_sessions_per_principal=1" in details
    # A full session table is the server's, not the caller's: UNAVAILABLE, as Triton's full
    # queue, which a retry (later, or on another replica) may get past.
    (first, _), (second, details) = _quota_codes(start_server(max_sessions=1).target)
    assert first == grpc.StatusCode.OK
    assert second == grpc.StatusCode.UNAVAILABLE, details
    assert "max_sessions=1" in details


def test_the_quota_is_resource_exhausted_through_front_ends(serve):
    # The engine raises it; the front end must still know it for a quota, not a full queue.
    srv = serve("--max-sessions-per-principal", "1", "--metrics-port", "-1")
    (first, _), (second, details) = _quota_codes(srv.target)
    assert first == grpc.StatusCode.OK
    assert second == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "max_sessions_per_principal=1" in details
