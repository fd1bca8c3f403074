"""TLS, mutual TLS, bearer tokens, sessions owned by who made them, quotas and rate limits,
against the real server with certificates made here (trustme) and real channels."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.lstmserve.v1 import lstm_serve_pb2 as pb
from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from server.client import LstmClient

from .conftest import ManualClock

TOKEN_A = "token-of-alice-0123456789"
TOKEN_B = "token-of-bob-9876543210xx"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("carol@example.org", common_name="carol")
    other_ca = trustme.CA()
    stranger = other_ca.issue_cert("mallory", common_name="mallory")
    paths = {
        "ca": d / "ca.pem",
        "server_cert": d / "server.pem",
        "server_key": d / "server.key",
        "client_cert": d / "client.pem",
        "client_key": d / "client.key",
        "stranger_cert": d / "stranger.pem",
        "stranger_key": d / "stranger.key",
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server.cert_chain_pems[0].write_to_path(str(paths["server_cert"]))
    server.private_key_pem.write_to_path(str(paths["server_key"]))
    client.cert_chain_pems[0].write_to_path(str(paths["client_cert"]))
    client.private_key_pem.write_to_path(str(paths["client_key"]))
    stranger.cert_chain_pems[0].write_to_path(str(paths["stranger_cert"]))
    stranger.private_key_pem.write_to_path(str(paths["stranger_key"]))
    return paths


def tokens_file(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "tokens"
    path.write_text("# principal token\n" + "\n".join(lines) + "\n")
    return path


def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def test_tls_and_tokens_and_ownership(start_server, pki, tmp_path: Path):
    tokens = tokens_file(tmp_path, f"alice {TOKEN_A}", f"bob {TOKEN_B}")
    srv = start_server(
        tls_cert=str(pki["server_cert"]),
        tls_key=str(pki["server_key"]),
        auth_tokens=str(tokens),
    )
    target = f"localhost:{srv.app.port}"
    ca = str(pki["ca"])
    alice = LstmClient(target, tls_ca=ca, token=TOKEN_A, timeout=10)
    bob = LstmClient(target, tls_ca=ca, token=TOKEN_B, timeout=10)
    nobody = LstmClient(target, tls_ca=ca, timeout=10)
    wrong = LstmClient(target, tls_ca=ca, token="not-a-valid-token-at-all", timeout=10)
    try:
        # Health is open; everything else needs a credential.
        assert nobody.health() == health_pb2.HealthCheckResponse.SERVING
        assert code_of(nobody.create_session) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(wrong.create_session) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(nobody.model_info) == grpc.StatusCode.UNAUTHENTICATED
        sid = alice.create_session()
        alice.step(sid, text="the time")
        # Bob cannot see, use, copy or close Alice's session: exactly as if it did not exist.
        for call in (
            lambda: bob.step(sid, text="x"),
            lambda: bob.get_session(sid),
            lambda: bob.reset_session(sid),
            lambda: bob.close_session(sid),
            lambda: bob.export_session(sid),
            lambda: bob.fork_session(sid),
            lambda: list(bob.generate("", 5, session_id=sid)),
        ):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert "never created" in e.value.details()
        # A stream attached by Bob is refused too.
        stub = bob.stub
        it = stub.StepStream(
            iter([pb.StepStreamRequest(session_id=sid, text="a")]),
            metadata=(("authorization", f"Bearer {TOKEN_B}"),),
            timeout=10,
        )
        assert code_of(lambda: list(it)) == grpc.StatusCode.NOT_FOUND
        assert alice.get_session(sid).steps == len("the time")
        # Bob's fork of his own session, and Alice's import of her export, are theirs.
        mine = bob.create_session()
        fork = bob.fork_session(mine)
        assert code_of(lambda: alice.get_session(fork)) == grpc.StatusCode.NOT_FOUND
        record = alice.export_session(sid)
        copy = alice.import_session(record, "alice-imported-0001")
        assert code_of(lambda: bob.get_session(copy)) == grpc.StatusCode.NOT_FOUND
        alice.close_session(sid)
    finally:
        for c in (alice, bob, nobody, wrong):
            c.close()
    # Plaintext against a TLS port does not get through.
    with grpc.insecure_channel(target) as ch:
        assert (
            code_of(
                lambda: pb_grpc.LstmServeServiceStub(ch).GetModelInfo(
                    pb.GetModelInfoRequest(), timeout=5
                )
            )
            == grpc.StatusCode.UNAVAILABLE
        )


def test_mutual_tls_principal_is_the_certificate_subject(start_server, pki):
    srv = start_server(
        tls_cert=str(pki["server_cert"]),
        tls_key=str(pki["server_key"]),
        tls_client_ca=str(pki["ca"]),
    )
    target = f"localhost:{srv.app.port}"
    ca = str(pki["ca"])
    carol = LstmClient(
        target,
        tls_ca=ca,
        tls_cert=str(pki["client_cert"]),
        tls_key=str(pki["client_key"]),
        timeout=10,
    )
    try:
        sid = carol.create_session()
        assert carol.step(sid, text="abc").steps == 3
        # Session ids are scoped per principal: the session is Carol's, not principal "".
        owners = srv.on_loop(lambda: srv.app.store.local(sid, "carol").owner)
        assert owners == "carol"
        assert srv.on_loop(lambda: srv.app.store.local(sid)) is None
    finally:
        carol.close()
    for cert, key in ((None, None), (pki["stranger_cert"], pki["stranger_key"])):
        c = LstmClient(
            target,
            tls_ca=ca,
            tls_cert=str(cert) if cert else None,
            tls_key=str(key) if key else None,
            timeout=5,
        )
        try:  # no certificate, or one from another CA: the handshake fails
            assert code_of(c.create_session) == grpc.StatusCode.UNAVAILABLE
        finally:
            c.close()


def test_tokens_reload_and_quota_and_rate_limit(start_server, tmp_path: Path):
    tokens = tokens_file(tmp_path, f"alice {TOKEN_A}")
    srv = start_server(auth_tokens=str(tokens), max_sessions_per_principal=2, rate_limit_rps=20)
    # The rate limit's clock, moved by hand: the bucket's size and refill, exactly, however long
    # the calls take on this machine.
    clock = ManualClock()

    def install() -> None:
        assert srv.app is not None and srv.app.core is not None
        for v in srv.app.core.models.versions.values():
            v.plane.clock = clock

    srv.on_loop(install)
    alice = LstmClient(srv.target, token=TOKEN_A, timeout=10)
    bob = LstmClient(srv.target, token=TOKEN_B, timeout=10)
    try:
        assert code_of(bob.create_session) == grpc.StatusCode.UNAUTHENTICATED
        tokens_file(tmp_path, f"alice {TOKEN_A}", f"bob {TOKEN_B}")
        assert srv.on_loop(lambda: srv.app.servicer.authenticator.reload())
        bob.create_session()  # the reloaded file knows Bob
        a1, _ = alice.create_session(), alice.create_session()
        with pytest.raises(grpc.RpcError) as e:
            alice.create_session()
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_sessions_per_principal=2" in e.value.details()
        bob.create_session()  # Bob's quota is his own
        alice.close_session(a1)
        a3 = alice.create_session()

        def calls(n: int) -> list[str]:
            codes = []
            for _ in range(n):
                try:
                    alice.get_session(a3)
                    codes.append("OK")
                except grpc.RpcError as e:
                    codes.append(e.code().name)
                    assert "rate_limit_rps=20" in e.details()
            return codes

        clock.advance(2.0)  # a full bucket: two seconds' worth, 40 requests
        assert calls(80) == ["OK"] * 40 + ["RESOURCE_EXHAUSTED"] * 40
        clock.advance(0.5)  # refilled at 20 a second: 10 more
        assert calls(12) == ["OK"] * 10 + ["RESOURCE_EXHAUSTED"] * 2
        assert bob.model_info().name  # Bob's bucket is his own
        # A broken tokens file keeps the tokens already loaded.
        tokens.write_text("alice\n")
        assert not srv.on_loop(lambda: srv.app.servicer.authenticator.reload())
        assert bob.model_info().name
    finally:
        alice.close()
        bob.close()


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _frontend_of(channel: grpc.Channel, token: str) -> str:
    """Which front end answers on this channel (GetModelInfo's trailing metadata)."""
    _, call = pb_grpc.LstmServeServiceStub(channel).GetModelInfo.with_call(
        pb.GetModelInfoRequest(), metadata=_bearer(token), timeout=10
    )
    return dict(call.trailing_metadata())["lstm-serve-frontend"]


def _channel_per_frontend(target: str, n: int, tries: int = 60) -> dict[str, grpc.Channel]:
    """A channel to each of the ``n`` front ends, by front end. Each has a connection of its own
    (a local subchannel pool, and an option of its own: gRPC shares one connection between
    channels with equal options), so the kernel's SO_REUSEPORT spreading applies to each."""
    found: dict[str, grpc.Channel] = {}
    for i in range(tries):
        opts = [("grpc.use_local_subchannel_pool", 1), ("lstm-serve-test.channel", i)]
        ch = grpc.insecure_channel(target, options=opts)
        fe = _frontend_of(ch, TOKEN_A)
        if fe in found:
            ch.close()
            continue
        found[fe] = ch
        if len(found) == n:
            return found
    for ch in found.values():
        ch.close()
    raise AssertionError(f"{tries} connections all landed on front end(s) {sorted(found)}")


def test_sighup_reloads_tokens_in_every_front_end(serve, tmp_path: Path):
    tokens = tokens_file(tmp_path, f"alice {TOKEN_A}")
    srv = serve("--auth-tokens", str(tokens), "--frontends", "2", "--metrics-port", "-1")
    channels = _channel_per_frontend(srv.target, 2)
    try:
        assert sorted(channels) == ["0", "1"]

        def bob_creates(fe: str) -> None:
            pb_grpc.LstmServeServiceStub(channels[fe]).CreateSession(
                pb.CreateSessionRequest(), metadata=_bearer(TOKEN_B), timeout=10
            )

        for fe in channels:
            assert code_of(lambda fe=fe: bob_creates(fe)) == grpc.StatusCode.UNAUTHENTICATED
        tokens_file(tmp_path, f"alice {TOKEN_A}", f"bob {TOKEN_B}")
        os.kill(srv.proc.pid, signal.SIGHUP)
        # Every front end must know Bob now: each is asked on its own connection.
        pending = set(channels)
        deadline = time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            for fe in sorted(pending):
                try:
                    bob_creates(fe)
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
                    continue
                # ... and it was that front end that answered.
                assert _frontend_of(channels[fe], TOKEN_B) == fe
                pending.discard(fe)
            time.sleep(0.1)
        assert not pending, f"front end(s) {sorted(pending)} did not reload the tokens file"
    finally:
        for ch in channels.values():
            ch.close()
    with grpc.insecure_channel(srv.target) as ch:  # health needs no token
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
