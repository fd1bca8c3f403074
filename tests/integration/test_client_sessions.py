"""ListSessions and the ``lstm-client`` command line around it (issue 20 item 4): ``sessions
list|get|close|reset`` through a real ``lstm-serve`` (front end -> engine), ``info`` and
``health`` as text and ``--json``, paging and per-principal scoping, an out-of-range StepOutput
value named in the error, one error line against a TLS server (no gRPC core log lines), a
closed pipe ending ``generate`` quietly, and the start-up "try:" line under TLS and tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import trustme

from protos.lstmserve.v1 import lstm_serve_pb2 as pb
from server.client import LstmClient

ROOT = Path(__file__).resolve().parents[2]
TOKEN_A = "token-of-alice-0123456789"
TOKEN_B = "token-of-bob-9876543210xx"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server.client", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    paths = {k: d / f"{k}.pem" for k in ("ca", "other_ca", "cert", "key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    other.cert_pem.write_to_path(str(paths["other_ca"]))
    server.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    server.private_key_pem.write_to_path(str(paths["key"]))
    return paths


def test_list_sessions_pages_and_scopes_per_principal(start_server, tmp_path: Path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {TOKEN_A}\nbob {TOKEN_B}\n")
    srv = start_server(auth_tokens=str(tokens))
    with (
        LstmClient(srv.target, token=TOKEN_A, timeout=10) as alice,
        LstmClient(srv.target, token=TOKEN_B, timeout=10) as bob,
    ):
        mine = sorted(alice.create_session() for _ in range(5))
        theirs = bob.create_session(session_id=mine[0])  # the same id, another principal's
        alice.step(mine[1], text="abc")
        with alice.step_stream() as s:  # ephemeral: owned by the stream, not listed
            s.step(text="a")
            listed = alice.list_sessions(page_size=2)  # three pages
        assert [x.session_id for x in listed] == mine
        assert listed[1].steps == 3 and listed[1].has_next_distribution
        assert {(x.model_name, x.model_version, x.busy) for x in listed} == {("tiny", "3", False)}
        assert [x.session_id for x in bob.list_sessions()] == [theirs]
        # One page at a time, on the wire: the token is the page's last id.
        md = (("authorization", f"Bearer {TOKEN_A}"),)
        page = alice.stub.ListSessions(pb.ListSessionsRequest(page_size=3), metadata=md)
        assert [x.session_id for x in page.sessions] == mine[:3]
        assert page.next_page_token == mine[2]
        rest = alice.stub.ListSessions(
            pb.ListSessionsRequest(page_token=page.next_page_token), metadata=md
        )
        assert [x.session_id for x in rest.sessions] == mine[3:] and rest.next_page_token == ""
        with pytest.raises(grpc.RpcError) as e:
            alice.stub.ListSessions(pb.ListSessionsRequest(page_size=-1), metadata=md)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        alice.close_session(mine[0])
        assert [x.session_id for x in alice.list_sessions()] == mine[1:]
        with pytest.raises(grpc.RpcError) as e:
            LstmClient(srv.target, timeout=10).list_sessions()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_an_out_of_range_output_is_named(shared_server, stub_for):
    stub = stub_for(shared_server)
    with pytest.raises(grpc.RpcError) as e:
        stub.Step(pb.StepRequest(text="ab", output=7))  # type: ignore[arg-type]
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == "unknown output 7"
    with pytest.raises(grpc.RpcError) as e:
        list(stub.StepStream(iter([pb.StepStreamRequest(text="ab", output=-3)])))  # type: ignore[arg-type]
    assert e.value.details() == "unknown output -3"


def test_cli_sessions_info_and_health_through_lstm_serve(serve):
    srv = serve("--frontends", "1")
    t = ["--target", srv.target]
    with LstmClient(srv.target, timeout=10) as c:
        a = c.create_session(session_id="a" * 20)
        b = c.create_session(session_id="b" * 20)
        c.step(a, text="the time")
    out = _cli("sessions", *t)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == [
        "SESSION", "MODEL", "VERSION", "STEPS", "IDLE_S", "TIMEOUT_S", "BUSY", "CREATED"
    ]  # fmt: skip
    assert lines[1].split()[:4] == [a, "tiny", "3", "8"]
    assert lines[2].split()[:4] == [b, "tiny", "3", "0"]
    assert lines[3] == "(2 sessions)"
    listed = json.loads(_cli("sessions", "list", "--json", *t).stdout)
    assert [(x["session_id"], x["steps"]) for x in listed] == [(a, 8), (b, 0)]
    got = _cli("sessions", "get", a, *t)
    assert got.returncode == 0 and f"session      {a}\n" in got.stdout
    assert "steps        8\n" in got.stdout and "can continue yes" in got.stdout
    assert json.loads(_cli("sessions", "get", a, "--json", *t).stdout)["model_name"] == "tiny"
    assert _cli("sessions", "reset", a, *t).stdout == f"reset {a}\n"
    assert json.loads(_cli("sessions", "get", a, "--json", *t).stdout)["steps"] == 0
    assert _cli("sessions", "close", b, *t).stdout == f"closed {b}\n"
    gone = _cli("sessions", "get", b, *t)
    assert gone.returncode == 1 and gone.stderr.startswith("lstm-client: error: NOT_FOUND: ")
    usage = _cli("sessions", "close", *t)
    assert usage.returncode == 2 and usage.stderr == (
        "lstm-client: error: sessions close needs the session's ID "
        "(see lstm-client sessions --help)\n"
    )

    info = _cli("info", *t)
    assert info.returncode == 0, info.stderr
    assert "vocab:" not in info.stdout and len(info.stdout.splitlines()) == 8
    assert info.stdout.startswith("model      tiny version 3\nprovider   CPUExecutionProvider\n")
    assert "vocabulary 28 tokens: " in info.stdout and "(16 more)" in info.stdout
    assert "layers     2 x LSTM, hidden size 24\n" in info.stdout
    as_json = json.loads(_cli("info", "--json", *t).stdout)
    assert as_json["vocab"][:3] == ["<unk>", " ", "a"] and as_json["vocab_size"] == 28
    assert isinstance(as_json["config"], dict) and as_json["limits"]["max_sessions"] > 0
    health = _cli("health", "--json", *t)
    assert (health.returncode, json.loads(health.stdout)) == (0, {"status": "SERVING"})


def test_generate_into_a_closed_pipe_exits_quietly(shared_server):
    cmd = (
        f"{sys.executable} -m server.client generate --target {shared_server.target} "
        '--prompt time --max-tokens 400 | head -c 20; echo " ${PIPESTATUS[0]}"'
    )
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.stderr == ""
    assert len(out.stdout) == 20 + len(" 0\n") and out.stdout.endswith(" 0\n"), out.stdout


def test_tls_server_try_line_and_one_line_client_errors(serve, pki, tmp_path: Path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {TOKEN_A}\n")
    srv = serve(
        "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]),
        "--auth-tokens", str(tokens), "--frontends", "1",
    )  # fmt: skip
    text = "".join(srv.lines)
    assert TOKEN_A not in text
    try_line = next(x for x in srv.lines if x.startswith("try: "))
    assert f" --target {srv.target} --tls-ca {pki['cert']} " in try_line
    assert "--auth-tokens is on: clients need one of its tokens (--token TOKEN" in text
    assert "TLS is on: clients need --tls-ca with the CA that signed --tls-cert" in text
    # This certificate is CA-signed, so the client takes the CA, as the note says.
    ok = _cli("health", "--target", srv.target, "--tls-ca", str(pki["ca"]))
    assert (ok.returncode, ok.stdout) == (0, "SERVING\n"), ok.stderr
    # No --tls-ca (plaintext to a TLS port) or the wrong CA (gRPC's core logs the failed
    # handshake itself unless told not to): one line on stderr either way.
    clean = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    env = {**clean, "LSTM_SERVE_TOKEN": TOKEN_A}
    for flags in ([], ["--tls-ca", str(pki["other_ca"])]):
        bad = subprocess.run(
            [sys.executable, "-m", "server.client", "health", "--target", srv.target,
             "--timeout", "5", *flags],
            capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
        )  # fmt: skip
        assert bad.returncode == 1
        lines = bad.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("lstm-client: error: UNAVAILABLE: "), (
            bad.stderr
        )
