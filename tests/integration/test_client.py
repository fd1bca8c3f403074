"""The Python client and ``lstm-client`` against a real server: StepStream, named outputs,
argument checks (ValueError in the library, one line and exit 2 in the CLI), ``--help``
defaults, nothing left behind, and the CLIs' messages on a server-only install."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos.lstmserve.v1 import lstm_serve_pb2 as pb
from server import client as client_mod
from server.client import SESSION_HEADER, LstmClient

ROOT = Path(__file__).resolve().parents[2]
# Nothing listens here: a check that raised ValueError against it made no RPC.
NOWHERE = "127.0.0.1:1"


def _sessions(srv) -> int:
    return srv.on_loop(lambda: len(srv.app.store))


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def _cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "server.client"]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=60, cwd=ROOT, env=dict(os.environ)
    )


def _one_error_line(stderr: str, prefix: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), stderr
    return lines[0]


# -- StepStream ------------------------------------------------------------------------------


def test_step_stream_ephemeral_is_freed_on_close(shared_server):
    before = _sessions(shared_server)
    with LstmClient(shared_server.target, timeout=10) as c:
        ref = c.create_session()
        want = [c.step(ref, text=t, output="all") for t in ("the", " time")]
        c.close_session(ref)
        with c.step_stream() as s:
            assert s.session_id == ""
            got = [s.step(text="the", output="all"), s.step(text=" time", output="all")]
            sid = s.session_id
            assert sid and got[0].session_id == sid
            assert c.get_session(sid).steps == 8  # alive while the stream is open
            top = s.step(token_ids=[2, 3], output="top_k", top_k=3)
            assert len(top.top) == 3 and top.steps == 10 and not top.logits
        for g, w in zip(got, want, strict=True):
            assert (g.positions, g.steps) == (w.positions, w.steps)
            # Batched with other sessions or alone, a session gets the same numbers.
            np.testing.assert_allclose(g.logits, w.logits, rtol=0, atol=1e-5)
        assert _code(lambda: c.get_session(sid)) == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ValueError, match="closed"):
            s.step(text="a")
        s.close()  # idempotent
    assert _sessions(shared_server) == before


def test_step_stream_attaches_and_sends_the_session_header(shared_server):
    with LstmClient(shared_server.target, timeout=10) as c:
        sid = c.create_session()
        seen: list[tuple] = []
        real = c.stub.StepStream

        def recording(requests, **kw):
            seen.append(kw["metadata"])
            return real(requests, **kw)

        c.stub.StepStream = recording
        with c.step_stream(sid) as s:
            assert s.session_id == sid
            assert s.step(text="ab").steps == 2
            assert s.step(token_ids=[4], output=pb.STEP_OUTPUT_LAST_LOGITS).steps == 3
        assert (SESSION_HEADER, sid) in seen[0]
        # An attached session outlives the stream.
        assert c.get_session(sid).steps == 3
        c.close_session(sid)


def test_step_stream_error_ends_it_and_frees_the_ephemeral_session(shared_server):
    before = _sessions(shared_server)
    with LstmClient(shared_server.target, timeout=10) as c:
        s = c.step_stream()
        s.step(text="abc")
        sid = s.session_id
        assert _code(lambda: s.step(token_ids=[10_000])) == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ValueError, match="closed"):
            s.step(text="a")
        s.close()
        assert _code(lambda: c.get_session(sid)) == grpc.StatusCode.NOT_FOUND
        assert _code(lambda: c.step_stream("f" * 32).step(text="a")) == grpc.StatusCode.NOT_FOUND
    assert _sessions(shared_server) == before


def test_step_stream_over_tls_with_tokens(start_server, tmp_path: Path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {k: tmp_path / f"{k}.pem" for k in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    tokens = tmp_path / "tokens"
    tokens.write_text("alice token-of-alice-0123456789\nbob token-of-bob-9876543210xx\n")
    srv = start_server(
        tls_cert=str(paths["cert"]), tls_key=str(paths["key"]), auth_tokens=str(tokens)
    )
    target, tls = f"localhost:{srv.app.port}", str(paths["ca"])
    with (
        LstmClient(target, tls_ca=tls, token="token-of-alice-0123456789", timeout=10) as alice,
        LstmClient(target, tls_ca=tls, token="token-of-bob-9876543210xx", timeout=10) as bob,
        LstmClient(target, tls_ca=tls, timeout=10) as nobody,
    ):
        sid = alice.create_session()
        with alice.step_stream(sid) as s:
            assert s.step(text="the").steps == 3
        with alice.step_stream() as s:
            assert s.step(text="time").steps == 4
        assert _code(lambda: bob.step_stream(sid).step(text="x")) in (
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.PERMISSION_DENIED,
        )
        assert _code(lambda: nobody.step_stream().step(text="x")) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert alice.get_session(sid).steps == 3


# -- named outputs and argument checks in the library ------------------------------------------


def test_named_outputs(shared_server):
    with LstmClient(shared_server.target, timeout=10) as c:
        sid = c.create_session()
        try:
            assert c.step(sid, text="ab", output="all").positions == 2
            assert c.step(sid, text="ab", output=pb.STEP_OUTPUT_ALL_LOGITS).positions == 2
            assert c.step(sid, text="a").positions == 1  # "last" by default
            top = c.step(sid, text="a", output="top_k", top_k=4)
            assert len(top.top) == 4 and top.positions == 0
            assert c.step(sid, text="a", output=3, top_k=2).top  # the pb value still works
        finally:
            c.close_session(sid)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda c: c.step("s" * 16, text="a", output="logits"), "output must be one of"),
        (lambda c: c.step("s" * 16, text="a", output=7), "output must be one of"),
        (lambda c: c.step("s" * 16, text="a", output=True), "output must be one of"),
        (lambda c: c.step("s" * 16, text="a", output="top_k"), "top_k >= 1"),
        (lambda c: c.step("s" * 16, text="a", top_k=-1), "top_k"),
        (lambda c: c.step("s" * 16), "exactly one of text and token_ids"),
        (lambda c: c.step("s" * 16, text="a", token_ids=[1]), "exactly one"),
        (lambda c: c.step("s" * 16, token_ids=[-1]), "token_ids"),
        (lambda c: c.step_stream().step(text="a", output="every"), "output must be one of"),
        (lambda c: c.generate("a", -1), "max_tokens"),
        (lambda c: c.generate("a", 0), "max_tokens"),
        (lambda c: c.generate("a", 5, temperature=-0.1), "temperature"),
        (lambda c: c.generate("a", 5, temperature=float("nan")), "temperature"),
        (lambda c: c.generate("a", 5, top_p=1.5), "top_p"),
        (lambda c: c.generate("a", 5, top_p=-0.1), "top_p"),
        (lambda c: c.generate("a", 5, top_k=-1), "top_k"),
        (lambda c: c.generate("a", 5, seed=-1), "seed"),
        (lambda c: c.generate("a", 5, stop="x"), "stop"),
        (lambda c: c.create_session(idle_timeout_s=-1), "idle_timeout_s"),
    ],
)
def test_library_rejects_bad_values_before_any_rpc(call, match):
    with LstmClient(NOWHERE, timeout=2) as c, pytest.raises(ValueError, match=match):
        call(c)


@pytest.mark.parametrize("target", ["", "nohost", "host:0", "host:70000", "a b:1", "http://x:1"])
def test_library_rejects_a_bad_target(target):
    with pytest.raises(ValueError, match="target"):
        LstmClient(target)


def test_library_accepts_grpc_uris_and_ipv6(shared_server, tmp_path: Path):
    # Each form reaches the server it names: the client hands the target to gRPC as given.
    port = shared_server.app.port
    for target in (
        f"127.0.0.1:{port}",
        f"localhost:{port}",
        f"dns:///localhost:{port}",
        f"ipv4:127.0.0.1:{port}",
    ):
        with LstmClient(target, timeout=10) as c:
            assert c.health() == 1, target  # SERVING
            assert len(c.model_info().vocab) == 28, target
    # Forms with nothing behind them here are accepted too: the call, not the constructor,
    # fails, and as an RPC error (nothing listening), not a ValueError.
    for target in ("[::1]:1", "ipv6:[::1]:1", f"unix:{tmp_path / 'x.sock'}", "dns:///localhost:1"):
        with LstmClient(target, timeout=5) as c:
            assert _code(c.health) in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ), target
    with pytest.raises(ValueError, match="timeout"):
        LstmClient(NOWHERE, timeout=0)


# -- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["generate", "--prompt", "a", "--max-tokens", "-1"], "--max-tokens"),
        (["generate", "--prompt", "a", "--max-tokens", "0"], "--max-tokens"),
        (["generate", "--prompt", "a", "--max-tokens", "many"], "--max-tokens"),
        (["generate", "--prompt", "a", "--temperature", "-0.5"], "--temperature"),
        (["generate", "--prompt", "a", "--temperature", "inf"], "--temperature"),
        (["generate", "--prompt", "a", "--top-p", "1.01"], "--top-p"),
        (["generate", "--prompt", "a", "--top-p", "-1"], "--top-p"),
        (["generate", "--prompt", "a", "--top-k", "-1"], "--top-k"),
        (["generate", "--prompt", "a", "--seed", "-1"], "--seed"),
        (["generate", "--prompt", "a", "--target", "nohost"], "--target"),
        (["health", "--target", "127.0.0.1:99999"], "--target"),
        (["health", "--timeout", "0"], "--timeout"),
        (["step", "--text", "a", "--top-k", "0"], "--top-k"),
        (["create", "--idle-timeout-s", "-1"], "--idle-timeout-s"),
        (["generate"], "--prompt"),
    ],
)
def test_cli_bad_values_are_one_line_and_exit_2(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        client_mod.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in _one_error_line(err, "lstm-client: error: ")


def test_cli_bad_value_in_a_real_process():
    out = _cli("generate", "--prompt", "a", "--max-tokens", "-1", "--target", NOWHERE)
    assert out.returncode == 2 and out.stdout == ""
    line = _one_error_line(out.stderr, "lstm-client: error: argument --max-tokens: ")
    assert "must be >= 1, got -1" in line


def test_cli_library_value_errors_exit_2(shared_server, capsys):
    # A check only the library makes (empty --text) is still a usage error, not a traceback.
    with pytest.raises(SystemExit) as e:
        client_mod.main(["step", "--target", shared_server.target, "--text", ""])
    assert e.value.code == 2
    _one_error_line(capsys.readouterr().err, "lstm-client: error: give exactly one")


def test_cli_server_errors_keep_code_and_exit_1(shared_server, capsys):
    argv = ["generate", "--target", shared_server.target, "--prompt", "a", "--max-tokens", "501"]
    with pytest.raises(SystemExit) as e:
        client_mod.main(argv)
    assert e.value.code == 1
    _one_error_line(capsys.readouterr().err, "lstm-client: error: INVALID_ARGUMENT: ")


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("generate", ["(default: 100)", "(default: 0.0)", "(default: 127.0.0.1:50051)"]),
        ("step", ["(default: 5)", "(default: an ephemeral one"]),
        ("health", ["(default: 127.0.0.1:50051)", "(default: none)"]),
        ("info", ["(default: 127.0.0.1:50051)"]),
        ("create", ["(default: 0.0)", "(default: the server picks)"]),
        ("export", ["(default: 127.0.0.1:50051)"]),
        ("import", ["(default: the record's)"]),
        ("fork", ["(default: the server picks)"]),
    ],
)
def test_cli_help_shows_defaults(command, shown, capsys, monkeypatch):
    monkeypatch.setenv("LSTM_SERVE_TOKEN", "secret-token-never-printed")
    with pytest.raises(SystemExit) as e:
        client_mod.main([command, "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for text in shown:
        assert text in out, out
    assert "secret-token-never-printed" not in out


def test_cli_step_without_session_leaves_nothing(shared_server):
    before = _sessions(shared_server)
    out = _cli("step", "--target", shared_server.target, "--text", "the time", "--top-k", "3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "session (ephemeral) steps=8" and len(lines) == 4
    assert _sessions(shared_server) == before


def test_cli_step_with_session_steps_it(shared_server):
    with LstmClient(shared_server.target, timeout=10) as c:
        sid = c.create_session()
        try:
            for steps in (3, 6):
                out = _cli(
                    "step", "--target", shared_server.target, "--session", sid, "--text", "abc"
                )
                assert out.returncode == 0, out.stderr
                assert out.stdout.splitlines()[0] == f"session {sid} steps={steps}"
            assert c.get_session(sid).steps == 6
        finally:
            c.close_session(sid)


# -- a server-only install: no torch, no onnx --------------------------------------------------

# Makes `import torch` / `import onnx` fail as on an install without the extras, then runs a CLI.
_WITHOUT_EXTRAS = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoExtras(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "onnx", "onnxscript"):
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, NoExtras())
    sys.argv = ["{prog}", *sys.argv[1:]]
    from {module} import main
    main()
    """
)


@pytest.mark.parametrize(
    ("module", "prog", "extra", "argv"),
    [
        ("export.cli", "lstm-export", "export", ["--help"]),
        ("export.cli", "lstm-export", "export", ["batch", "--help"]),
        ("export.cli", "lstm-export", "export", ["ckpt.pt", "--out", "m.onnx"]),
        ("training.cli", "lstm-train", "train", ["--help"]),
        ("training.cli", "lstm-train", "train", ["generate", "--help"]),
        ("training.cli", "lstm-train", "train", ["--epochs", "1"]),
    ],
)
def test_cli_without_extras_names_the_extra(module, prog, extra, argv):
    out = _cli(*argv, code=_WITHOUT_EXTRAS.format(prog=prog, module=module))
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    line = _one_error_line(out.stderr, f"{prog}: error: the {extra} extra is not installed")
    assert line.endswith(f"pip install 'lstm-serve[{extra}]'")


def test_client_works_without_extras():
    out = _cli("--help", code=_WITHOUT_EXTRAS.format(prog="lstm-client", module="server.client"))
    assert out.returncode == 0 and "generate" in out.stdout, out.stderr
