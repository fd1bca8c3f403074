"""``LstmClient`` and ``lstm-client`` against a real server serving a repository of two models
(``letters``, the default, and ``digits``): ``models`` (table and ``--json``), ``models load`` /
``models unload``, ``--model`` / ``--model-version`` on generate, step, info and create, and the
library's ``model=`` / ``model_version=`` keywords. Outputs are compared with in-process ONNX
Runtime (:class:`tests.reference.Reference`) on the model each request must have reached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from server import client as client_mod
from server.client import LstmClient, ModelList, ModelStatus, ModelVersionStatus
from tests.integration.conftest import VOCAB, ServerThread
from tests.integration.test_model_repository import DIGITS, publish, start
from tests.reference import Reference

ROOT = Path(__file__).resolve().parents[2]
NOWHERE = "127.0.0.1:1"  # nothing listens here: a check that raised ValueError made no RPC
ATOL = 1e-5
SPACE = DIGITS.index(" ")  # the text rule maps any run of non-letters to one space


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Reference, Reference]:
    """REPO/letters/1 (the default) and REPO/digits/7, and their references."""
    root = tmp_path_factory.mktemp("client-models") / "repo"
    letters = Reference(publish(root, "letters", 1, seed=4))
    digits = Reference(publish(root, "digits", 7, seed=5, vocab=DIGITS))
    return root, letters, digits


@pytest.fixture
def serve(repo) -> Iterator[Callable[..., ServerThread]]:
    """Factory: a server on ``repo`` (default model ``letters``); stopped afterwards."""
    started: list[ServerThread] = []

    def make(**settings: Any) -> ServerThread:
        srv = start(repo[0], default_model="letters", **settings)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def both(repo) -> Iterator[ServerThread]:
    """A server in control mode none: both models loaded (tests here leave no sessions)."""
    srv = start(repo[0], default_model="letters", max_new_tokens=300)
    yield srv
    srv.stop()


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        client_mod.main(argv)
    out = capsys.readouterr()
    code = e.value.code
    return (code if isinstance(code, int) else 1), out.out, out.err


def _one_error_line(stderr: str, prefix: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), stderr
    return lines[0]


def _code(fn: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def _table(stdout: str) -> tuple[list[dict[str, str]], str]:
    """The rows of ``lstm-client models`` (split on the header's column starts) and its
    footer ("(* = the default model; ...)"), "" when it has none."""
    lines = stdout.rstrip("\n").splitlines()
    footer = lines.pop() if lines[-1].startswith("(") else ""
    head, rows = lines[0], lines[1:]
    names = ["MODEL", "POLICY", "VERSION", "STATE", "SESSIONS", "MEMORY_MIB", "REASON"]
    starts = [head.index(n) for n in names]
    ends = [*starts[1:], None]
    parsed = []
    for row in rows:
        cells = {n: row[s:e].strip() for n, s, e in zip(names, starts, ends, strict=True)}
        cells["DEFAULT"] = row[: starts[0]].strip()
        parsed.append(cells)
    return parsed, footer


def _text(ids: list[int], vocab: list[str], unk: int = 0) -> str:
    return "".join(vocab[i] for i in ids if i != unk)


def _top(ref: Reference, tokens: list[int], k: int) -> list[tuple[int, float]]:
    logits, _ = ref.feed(tokens, ref.zeros())
    z = logits[-1].astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")[:k]
    return [(int(i), float(p[i])) for i in order]


# -- models: list, table, JSON ----------------------------------------------------------------


def test_models_table_and_json_show_names_default_states_and_sessions(serve, capsys):
    srv = serve(model_control_mode="explicit")  # loads only the default model at start
    with LstmClient(srv.target, timeout=10) as c:
        pinned = [c.create_session() for _ in range(2)]  # two sessions on letters 1
        listed = c.list_models()
    assert isinstance(listed, ModelList) and listed.model_control_mode == "explicit"
    by_name = {m.name: m for m in listed.models}
    assert set(by_name) == {"letters", "digits"}
    letters, digits = by_name["letters"], by_name["digits"]
    assert (letters.is_default, letters.version_policy) == (True, "latest 1")
    assert [(v.version, v.state, v.sessions) for v in letters.versions] == [("1", "READY", 2)]
    assert [(v.version, v.state, v.sessions) for v in digits.versions] == [("7", "UNAVAILABLE", 0)]
    assert letters.versions[0].memory_bytes > 0
    assert listed.default is letters and listed.get("digits") is digits
    assert listed.get("nope") is None

    code, out, err = _main(["models", "--target", srv.target], capsys)
    assert (code, err) == (0, ""), err
    rows, footer = _table(out)
    got = {
        (r["DEFAULT"], r["MODEL"], r["POLICY"], r["VERSION"], r["STATE"], r["SESSIONS"])
        for r in rows
    }
    assert got == {
        ("*", "letters", "latest 1", "1", "READY", "2"),
        ("", "digits", "latest 1", "7", "UNAVAILABLE", "0"),
    }
    mib = {r["MODEL"]: r["MEMORY_MIB"] for r in rows}
    assert mib["letters"] == f"{letters.versions[0].memory_bytes / 2**20:.2f}"
    assert mib["digits"] == f"{digits.versions[0].memory_bytes / 2**20:.2f}"
    assert footer == "(* = the default model; model control mode: explicit)"

    code, out, err = _main(["models", "list", "--json", "--target", srv.target], capsys)
    assert (code, err) == (0, ""), err
    doc = json.loads(out)
    assert doc["model_control_mode"] == "explicit"
    assert {
        m["name"]: (
            m["is_default"],
            m["version_policy"],
            [(v["version"], v["state"], v["sessions"]) for v in m["versions"]],
        )
        for m in doc["models"]
    } == {
        "letters": (True, "latest 1", [("1", "READY", 2)]),
        "digits": (False, "latest 1", [("7", "UNAVAILABLE", 0)]),
    }
    assert all(isinstance(v["memory_bytes"], int) for m in doc["models"] for v in m["versions"])
    with LstmClient(srv.target, timeout=10) as c:
        for sid in pinned:
            c.close_session(sid)


def test_models_in_a_real_process(both):
    out = subprocess.run(
        [sys.executable, "-m", "server.client", "models", "--target", both.target],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=dict(os.environ),
    )
    assert out.returncode == 0 and out.stderr == "", out.stderr
    rows, footer = _table(out.stdout)
    assert {(r["DEFAULT"], r["MODEL"], r["VERSION"], r["STATE"]) for r in rows} == {
        ("*", "letters", "1", "READY"),
        ("", "digits", "7", "READY"),  # control mode none loads every model
    }
    assert footer.endswith("model control mode: none)")


def test_format_models_rows_mib_and_reasons():
    models = [
        ModelStatus(
            "big",
            "all",
            True,
            (
                ModelVersionStatus("2", "READY", "", 12, 3 * 2**20 + 2**19),
                ModelVersionStatus("3", "UNAVAILABLE", "bad file:\n  truncated", 0, 0),
            ),
        ),
        ModelStatus("empty", "latest 1", False, ()),
    ]
    assert client_mod.format_models(models, "poll").splitlines() == [
        "  MODEL  POLICY    VERSION  STATE        SESSIONS  MEMORY_MIB  REASON",
        "* big    all       2        READY              12        3.50",
        "* big    all       3        UNAVAILABLE         0        0.00  bad file: truncated",
        "  empty  latest 1  -        -                   -           -",
        "(* = the default model; model control mode: poll)",
    ]


# -- models load / unload -------------------------------------------------------------------------


def test_models_load_and_unload_in_explicit_mode(serve, repo, capsys):
    srv = serve(model_control_mode="explicit", version_drain_s=600.0)
    digits_ref = repo[2]
    with LstmClient(srv.target, timeout=30) as c:
        # Not loaded yet (explicit mode loads only the default model at start).
        assert _code(lambda: c.create_session(model="digits")) == grpc.StatusCode.NOT_FOUND

        code, out, err = _main(["models", "load", "digits", "--target", srv.target], capsys)
        assert (code, err) == (0, ""), err
        rows, footer = _table(out)
        assert [(r["MODEL"], r["VERSION"], r["STATE"], r["SESSIONS"]) for r in rows] == [
            ("digits", "7", "READY", "0")
        ]
        assert footer == "" and rows[0]["DEFAULT"] == ""
        listed = c.list_models().get("digits")
        assert listed is not None and listed.versions[0].state == "READY"

        sid = c.create_session(model="digits")
        got = c.step(sid, token_ids=[2, 3, 4], model="digits")
        want, _ = digits_ref.feed([2, 3, 4], digits_ref.zeros())
        np.testing.assert_allclose(np.asarray(got.logits), want[-1], atol=ATOL, rtol=0)

        code, out, err = _main(
            ["models", "unload", "digits", "--json", "--target", srv.target], capsys
        )
        assert (code, err) == (0, ""), err
        doc = json.loads(out)
        assert (doc["name"], doc["is_default"]) == ("digits", False)
        # Retired, not gone: the pinned session goes on, no new one is made.
        assert [(v["version"], v["state"], v["sessions"]) for v in doc["versions"]] == [
            ("7", "RETIRING", 1)
        ]
        assert c.step(sid, token_ids=[5]).steps == 4
        assert _code(lambda: c.create_session(model="digits")) == grpc.StatusCode.UNAVAILABLE

        # The library's own calls, and loading it again serves new sessions.
        status = c.load_model("digits")
        assert isinstance(status, ModelStatus)
        assert status == ModelStatus(
            "digits",
            "latest 1",
            False,
            (ModelVersionStatus("7", "READY", "", 1, status.versions[0].memory_bytes),),
        )
        again = c.create_session(model="digits", model_version="7")
        assert c.get_session(again).model_name == "digits"
        unloaded = c.unload_model("digits")
        assert [(v.state, v.sessions) for v in unloaded.versions] == [("RETIRING", 2)]
        assert _code(lambda: c.load_model("nope")) == grpc.StatusCode.NOT_FOUND
        c.close_session(sid)
        c.close_session(again)


def test_models_shows_why_a_version_failed_to_load(tmp_path, capsys):
    root = tmp_path / "repo"
    publish(root, "letters", 1, seed=4)
    publish(root, "digits", 7, seed=5, vocab=DIGITS)
    (root / "digits" / "8").mkdir()
    (root / "digits" / "8" / "model.onnx").write_bytes(b"not an onnx model\n" * 10)
    srv = start(root, default_model="letters", model_control_mode="explicit")
    try:
        t = ["--target", srv.target]
        code, out, err = _main(["models", "load", "digits", *t], capsys)
        assert (code, err) == (0, ""), err
        rows, _ = _table(out)
        # The broken newest version is refused with its reason; the one before it serves.
        assert {(r["VERSION"], r["STATE"]) for r in rows} == {("7", "READY"), ("8", "UNAVAILABLE")}
        reason = {r["VERSION"]: r["REASON"] for r in rows}
        assert reason["7"] == ""
        with LstmClient(srv.target, timeout=10) as c:
            digits = c.list_models().get("digits")
        assert digits is not None
        want = {v.version: " ".join(v.reason.split()) for v in digits.versions}
        assert want["8"] and reason["8"] == want["8"]
        code, out, err = _main(["models", "--json", *t], capsys)
        assert code == 0, err
        doc = {m["name"]: m for m in json.loads(out)["models"]}
        assert {v["version"]: v["reason"] for v in doc["digits"]["versions"]} == {
            v.version: v.reason for v in digits.versions
        }
    finally:
        srv.stop()


def test_models_load_needs_explicit_mode_one_line(both, capsys):
    for action in ("load", "unload"):
        code, out, err = _main(["models", action, "digits", "--target", both.target], capsys)
        assert (code, out) == (1, "")
        line = _one_error_line(err, "lstm-client: error: FAILED_PRECONDITION: ")
        assert "--model-control-mode explicit" in line
    with LstmClient(both.target, timeout=10) as c:
        assert _code(lambda: c.load_model("digits")) == grpc.StatusCode.FAILED_PRECONDITION
        assert _code(lambda: c.unload_model("digits")) == grpc.StatusCode.FAILED_PRECONDITION
        assert {m.name: m.versions[0].state for m in c.list_models().models} == {
            "letters": "READY",
            "digits": "READY",
        }


def test_models_load_and_unload_need_an_admin(serve, tmp_path, capsys):
    tokens = tmp_path / "tokens"
    tokens.write_text("admin aaaaaaaaaaaaaaaaaaaa\nuser bbbbbbbbbbbbbbbbbbbbbb\n")
    srv = serve(model_control_mode="explicit", auth_tokens=str(tokens), admin_principals="admin")
    base = ["models", "load", "digits", "--target", srv.target]
    code, out, err = _main([*base, "--token", "bbbbbbbbbbbbbbbbbbbbbb"], capsys)
    assert (code, out) == (1, "")
    _one_error_line(err, "lstm-client: error: PERMISSION_DENIED: ")
    code, out, err = _main([*base, "--token", "aaaaaaaaaaaaaaaaaaaa"], capsys)
    assert (code, err) == (0, ""), err
    assert [r["STATE"] for r in _table(out)[0]] == ["READY"]


# -- --model on generate, step, info, create ------------------------------------------------


def test_generate_with_model_gives_that_models_greedy_output(both, repo, capsys):
    _, letters, digits = repo
    base = ["generate", "--target", both.target, "--prompt", "12", "--max-tokens", "40"]
    code, out, err = _main([*base, "--model", "digits"], capsys)
    assert (code, err) == (0, ""), err
    want_ids = digits.greedy([SPACE], 40)
    assert out == _text(want_ids, DIGITS) + "\n"
    code, out7, err = _main([*base, "--model", "digits", "--model-version", "7"], capsys)
    assert (code, out7) == (0, out), err
    # Without --model: the default model, letters ("12" is one space to it too).
    code, out, err = _main(base, capsys)
    assert (code, err) == (0, ""), err
    assert out == _text(letters.greedy([VOCAB.index(" ")], 40), VOCAB) + "\n"
    # The library: the same tokens, and the version it asked for.
    with LstmClient(both.target, timeout=30) as c:
        msgs = list(c.generate("12", 40, model="digits", model_version=7))
        assert [t for m in msgs for t in m.token_ids] == want_ids
        assert c.generate_text("7 - 8", 40, model="digits") == _text(want_ids, DIGITS)
    code, out, err = _main([*base, "--model", "digits", "--model-version", "3"], capsys)
    assert (code, out) == (1, "")
    _one_error_line(err, "lstm-client: error: NOT_FOUND: ")
    code, out, err = _main([*base, "--model", "nope"], capsys)
    assert (code, out) == (1, "")
    _one_error_line(err, "lstm-client: error: NOT_FOUND: ")


def test_create_and_step_pin_the_session_and_refuse_another_model(both, repo, capsys):
    _, letters, digits = repo
    t = ["--target", both.target]
    code, out, err = _main(["create", "--model", "digits", *t], capsys)
    assert code == 0, err
    sid = out.strip()
    assert out == sid + "\n" and len(sid) == 32  # stdout: the id alone, as before
    assert err == "model digits version 7\n"
    try:
        code, out, err = _main(
            ["step", "--session", sid, "--text", "x", "--model", "letters", *t], capsys
        )
        assert (code, out) == (1, "")
        line = _one_error_line(err, "lstm-client: error: FAILED_PRECONDITION: ")
        assert "pinned to model digits version 7" in line
        code, out, err = _main(
            ["step", "--session", sid, "--text", "x", "--model-version", "1", *t], capsys
        )
        assert code == 1
        _one_error_line(err, "lstm-client: error: FAILED_PRECONDITION: ")
        with LstmClient(both.target, timeout=10) as c:
            info = c.get_session(sid)
            assert (info.model_name, info.model_version, info.steps) == ("digits", "7", 0)

        # Naming its own model (or none) steps it; the top tokens are digits' own.
        code, out, err = _main(
            ["step", "--session", sid, "--text", "12", "--model", "digits", "--top-k", "3", *t],
            capsys,
        )
        assert (code, err) == (0, ""), err
        lines = out.splitlines()
        assert lines[0] == f"session {sid} steps=1"
        want = _top(digits, [SPACE], 3)
        got = [(int(line.split("\t")[1]), float(line.split("\t")[2])) for line in lines[1:]]
        assert [i for i, _ in got] == [i for i, _ in want]
        np.testing.assert_allclose([p for _, p in got], [p for _, p in want], atol=1e-4)
    finally:
        with LstmClient(both.target, timeout=10) as c:
            c.close_session(sid)

    # An ephemeral session on --model digits, and the default (letters) without it.
    code, out, err = _main(["step", "--text", "7", "--model", "digits", "--top-k", "2", *t], capsys)
    assert (code, err) == (0, ""), err
    lines = out.splitlines()
    assert lines[0] == "session (ephemeral) steps=1"
    assert [int(line.split("\t")[1]) for line in lines[1:]] == [
        i for i, _ in _top(digits, [SPACE], 2)
    ]
    code, out, err = _main(["step", "--text", "ab", "--top-k", "2", *t], capsys)
    assert code == 0, err
    ab = [VOCAB.index("a"), VOCAB.index("b")]
    assert [int(line.split("\t")[1]) for line in out.splitlines()[1:]] == [
        i for i, _ in _top(letters, ab, 2)
    ]


def test_info_names_the_model(both, capsys):
    t = ["--target", both.target]
    code, out, err = _main(["info", "--model", "digits", *t], capsys)
    assert code == 0, err
    assert "model      digits version 7\n" in out and '"9"' in out
    code, out, err = _main(["info", *t], capsys)
    assert code == 0, err
    assert "model      letters version 1\n" in out
    with LstmClient(both.target, timeout=10) as c:
        info = c.model_info("digits", 7)
        assert (info.name, info.version, list(info.vocab)) == ("digits", "7", DIGITS)
        assert c.model_info(model_version="1").name == "letters"
        assert _code(lambda: c.model_info("letters", "2")) == grpc.StatusCode.NOT_FOUND


# -- the library's model keywords -------------------------------------------------------------


def test_library_model_keywords_pin_and_check(both, repo):
    _, letters, digits = repo
    with LstmClient(both.target, timeout=10) as c:
        sid = c.create_session(model="digits", model_version="7")
        other = c.create_session()  # letters, the default
        try:
            got = c.step(sid, token_ids=[2, 3], output="all", model="digits", model_version=7)
            want, state = digits.feed([2, 3], digits.zeros())
            np.testing.assert_allclose(np.asarray(got.logits), want.ravel(), atol=ATOL, rtol=0)
            # Another model, or another version: refused, and nothing was fed.
            assert _code(lambda: c.step(sid, token_ids=[4], model="letters")) == (
                grpc.StatusCode.FAILED_PRECONDITION
            )
            assert _code(lambda: c.step(sid, token_ids=[4], model_version="1")) == (
                grpc.StatusCode.FAILED_PRECONDITION
            )
            assert _code(lambda: c.step(other, token_ids=[4], model="digits")) == (
                grpc.StatusCode.FAILED_PRECONDITION
            )
            assert (
                _code(lambda: list(c.generate("", 3, session_id=sid, model="letters")))
                == grpc.StatusCode.FAILED_PRECONDITION
            )
            assert c.get_session(sid).steps == 2

            # A stream attached to it with its model steps on; with another, the first step fails.
            with c.step_stream(sid, model="digits") as s:
                got = s.step(token_ids=[4])
            want, state = digits.feed([4], state)
            np.testing.assert_allclose(np.asarray(got.logits), want[-1], atol=ATOL, rtol=0)
            assert _code(lambda: c.step_stream(sid, model="letters").step(token_ids=[1])) == (
                grpc.StatusCode.FAILED_PRECONDITION
            )
            # The session continues with greedy generation on digits.
            ids = [
                t for m in c.generate("", 5, session_id=sid, model="digits") for t in m.token_ids
            ]
            assert ids == _greedy_from(digits, want, state, 5)

            # An ephemeral stream on digits (the model rides only on the first message).
            with c.step_stream(model="digits", model_version="7") as s:
                a = s.step(token_ids=[9, 10])
                b = s.step(token_ids=[11], output="top_k", top_k=2)
                assert c.get_session(s.session_id).model_name == "digits"
            w, st = digits.feed([9, 10], digits.zeros())
            np.testing.assert_allclose(np.asarray(a.logits), w[-1], atol=ATOL, rtol=0)
            w, _ = digits.feed([11], st)
            assert [t.token_id for t in b.top] == list(np.argsort(-w[-1], kind="stable")[:2])
            assert [t.token for t in b.top] == [DIGITS[t.token_id] for t in b.top]
            # Letters by default, through every path.
            got = c.step(other, text="ab")
            want, _ = letters.feed([VOCAB.index("a"), VOCAB.index("b")], letters.zeros())
            np.testing.assert_allclose(np.asarray(got.logits), want[-1], atol=ATOL, rtol=0)
        finally:
            c.close_session(sid)
            c.close_session(other)


def _greedy_from(ref: Reference, logits: np.ndarray, state: Any, n: int) -> list[int]:
    """``n`` greedy tokens continuing a session whose last logits and state are given."""
    out: list[int] = []
    for _ in range(n):
        out.append(int(np.argmax(logits[-1])))
        logits, state = ref.feed([out[-1]], state)
    return out


# -- argument checks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda c: c.create_session(model=3), "model must be a string"),
        (lambda c: c.create_session(model_version="v1"), "model_version"),
        (lambda c: c.create_session(model_version="1\n"), "model_version"),
        (lambda c: c.create_session(model_version=-1), "model_version"),
        (lambda c: c.create_session(model_version=True), "model_version"),
        (lambda c: c.create_session(model="a/b"), "model"),
        (lambda c: c.create_session(model=" digits"), "model"),
        (lambda c: c.step("s" * 16, text="a", model_version="latest"), "model_version"),
        (lambda c: c.step_stream(model=["digits"]), "model must be a string"),
        (lambda c: c.step_stream("s" * 16, model_version=1.5), "model_version"),
        (lambda c: c.generate("a", 5, model_version="7a"), "model_version"),
        (lambda c: c.generate("a", 5, model=None), "model must be a string"),
        (lambda c: c.model_info(model_version="newest"), "model_version"),
        (lambda c: c.load_model(""), "must not be empty"),
        (lambda c: c.unload_model(""), "must not be empty"),
        (lambda c: c.load_model(None), "model must be a string"),
        (lambda c: c.unload_model("../x"), "model"),
    ],
)
def test_library_rejects_bad_model_arguments_before_any_rpc(call, match):
    with LstmClient(NOWHERE, timeout=2) as c, pytest.raises(ValueError, match=match):
        call(c)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["generate", "--prompt", "a", "--model-version", "abc"], "--model-version"),
        (["step", "--text", "a", "--model-version", "-1"], "--model-version"),
        (["info", "--model", "a/b"], "--model"),
        (["create", "--model-version", "1.0"], "--model-version"),
        (["models", "load"], "needs the model's NAME"),
        (["models", "unload", "--json"], "needs the model's NAME"),
        (["models", "list", "digits"], "unrecognized arguments: digits"),
        (["models", "frob"], "invalid choice"),
        (["models", "load", "digits", "extra"], "unrecognized arguments"),
    ],
)
def test_cli_bad_model_arguments_are_one_line_and_exit_2(argv, flag, capsys):
    code, out, err = _main([*argv, "--target", NOWHERE], capsys)
    assert (code, out) == (2, "")
    assert flag in _one_error_line(err, "lstm-client: error: ")


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("generate", ["(default: the server's default model, or with --session: the session's)"]),
        ("step", ["--model-version", "(default: its newest serving version"]),
        ("info", ["(default: the server's default model)"]),
        ("create", ["(default: the server's default model)", "(default: 0.0)"]),
        (
            "models",
            [
                "[ACTION] [NAME]",
                "list, load NAME or unload NAME (default: list)",
                "--json",
                "127.0.0.1:50051",
            ],
        ),
    ],
)
def test_cli_help_shows_model_defaults(command, shown, capsys):
    code, out, _ = _main([command, "--help"], capsys)
    assert code == 0
    flat = " ".join(out.split())  # argparse wraps lines
    for text in shown:
        assert text in flat, flat
