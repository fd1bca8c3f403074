"""KServe v2 over HTTP/REST (``--http-port``, ``server/rest.py``): stock ``tritonclient.http``,
curl and plain HTTP against the real server on free ports.

Logits are compared with in-process ONNX Runtime per sequence (:class:`Oracle` of
``test_kserve``; tolerance 1e-5 absolute, as every server test), for binary and JSON tensors
alike. tritonclient runs in a child interpreter, as in ``test_kserve``: it brings gevent, which
has no business in the process that runs the server.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import socket
import ssl
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trustme

from server.kserve import sequence_session_id

from .conftest import ROOT, make_serve_command, port_in_use, run_script
from .test_kserve import ATOL, MODEL, VERSION, Oracle, check, interleaved

if importlib.util.find_spec("tritonclient") is None or importlib.util.find_spec("gevent") is None:
    pytest.skip("tritonclient[http] (dev extra) is not installed", allow_module_level=True)

TOKEN = "token-of-alice-0123456789"

CLIENT = r"""
import json, sys
import numpy as np
import tritonclient.http as h
from tritonclient.utils import InferenceServerException

plan = json.load(sys.stdin)
out = []
c = h.InferenceServerClient(plan["url"])
model = plan["model"]


def inputs(step):
    binary = step.get("binary_in", True)
    if "text" in step:
        x = h.InferInput("text", [1, 1], "BYTES")
        x.set_data_from_numpy(np.array([[step["text"].encode()]], dtype=object), binary)
    else:
        t = np.array([step["tokens"]], np.int64)
        x = h.InferInput("tokens", list(t.shape), "INT64")
        x.set_data_from_numpy(t, binary)
    return [x]


def outputs(step):
    if "binary_out" not in step:
        return None  # none named: tritonclient asks for binary_data_output
    return [h.InferRequestedOutput("logits", binary_data=step["binary_out"])]


for op in plan["ops"]:
    kind = op["op"]
    if kind == "health":
        out.append({
            "live": c.is_server_live(),
            "ready": c.is_server_ready(),
            "model_ready": c.is_model_ready(model),
            "version_ready": c.is_model_ready(model, op["version"]),
            "other_ready": c.is_model_ready("no-such-model"),
            "server": c.get_server_metadata(),
            "metadata": c.get_model_metadata(model),
            "version_metadata": c.get_model_metadata(model, op["version"]),
            "config": c.get_model_config(model),
            "index": c.get_model_repository_index(),
        })
    elif kind == "statistics":
        out.append(c.get_inference_statistics(model))
    elif kind == "infer":
        got = []
        for i, step in enumerate(op["steps"]):
            try:
                r = c.infer(
                    model,
                    inputs(step),
                    outputs=outputs(step),
                    request_id=str(i),
                    sequence_id=step.get("seq", 0),
                    sequence_start=step.get("start", False),
                    sequence_end=step.get("end", False),
                )
                o = r.get_output("logits")
                got.append({
                    "logits": r.as_numpy("logits").tolist(),
                    "id": r.get_response()["id"],
                    "binary": "binary_data_size" in o.get("parameters", {}),
                })
            except InferenceServerException as e:
                got.append({"error": e.message(), "status": e.status()})
        out.append(got)
    elif kind == "missing":
        try:
            c.get_model_metadata("no-such-model")
            out.append({})
        except InferenceServerException as e:
            out.append({"error": e.message(), "status": e.status()})
json.dump(out, sys.stdout)
"""


def run_client(url: str, ops: list[dict[str, Any]], model: str = MODEL) -> list[Any]:
    """``ops`` through tritonclient.http in a child interpreter; what each returned."""
    result: list[Any] = run_script(CLIENT, {"url": url, "model": model, "ops": ops})
    return result


def http(
    url: str,
    body: bytes | str | dict[str, Any] | None = None,
    *,
    method: str | None = None,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request: ``(status, headers, body)``, errors included."""
    if isinstance(body, dict):
        body = json.dumps(body)
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def json_infer(step: dict[str, Any]) -> dict[str, Any]:
    """A plain-JSON inference request body for one plan step."""
    if "text" in step:
        tensor = {"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [step["text"]]}
    else:
        t = step["tokens"]
        tensor = {"name": "tokens", "shape": [1, len(t)], "datatype": "INT64", "data": [t]}
    body: dict[str, Any] = {"inputs": [tensor]}
    if step.get("seq"):
        body["parameters"] = {
            "sequence_id": step["seq"],
            "sequence_start": step.get("start", False),
            "sequence_end": step.get("end", False),
        }
    return body


def url_of(srv: Any, scheme: str = "http", host: str = "127.0.0.1") -> str:
    assert srv.app.http_port
    return f"{scheme}://{host}:{srv.app.http_port}"


def test_http_is_off_unless_asked(start_server):
    srv = start_server()
    assert srv.app.http_port is None and srv.app.rest is None


def test_tritonclient_http_interleaved_sequences_exact(start_server, reference):
    """Sequences interleaved at random through tritonclient.http, each step with binary or JSON
    input and binary or JSON output (or none named: binary_data_output), against in-process
    ONNX Runtime per sequence."""
    srv = start_server(http_port=0)
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    plan = interleaved(rng, [11, 12, "seq-a", "a string id / hashed"], 6)
    plan += [{"tokens": [3, 4, 5]}, {"text": "Hello, World"}]  # no sequence: a zero state
    for step in plan:
        step["binary_in"] = rng.random() < 0.5
        mode = rng.choice(["binary", "json", "unnamed"])
        if mode != "unnamed":
            step["binary_out"] = mode == "binary"
    (got,) = run_client(url_of(srv)[len("http://") :], [{"op": "infer", "steps": plan}])
    check(got, plan, Oracle(reference), f"seed {seed}")
    for i, (step, row) in enumerate(zip(plan, got, strict=True)):
        assert row["id"] == str(i)
        assert row["binary"] == step.get("binary_out", True), (seed, i, step)
    assert srv.on_loop(lambda: len(srv.app.store)) == 0, f"seed {seed}: a sequence was left"


def test_tritonclient_http_health_metadata_config_and_statistics(start_server):
    srv = start_server(http_port=0)
    url = url_of(srv)[len("http://") :]
    health, stats0, _, stats1, missing = run_client(
        url,
        [
            {"op": "health", "version": VERSION},
            {"op": "statistics"},
            {"op": "infer", "steps": [{"tokens": [1, 2]}, {"tokens": [99]}]},
            {"op": "statistics"},
            {"op": "missing"},
        ],
    )
    assert health["live"] and health["ready"] and health["model_ready"]
    assert health["version_ready"] and not health["other_ready"]
    assert health["server"]["name"] == "lstm-serve"
    assert "sequence" in health["server"]["extensions"]
    for meta in (health["metadata"], health["version_metadata"]):
        assert meta["name"] == MODEL and meta["versions"] == [VERSION]
        assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]} == {
            "tokens": ("INT64", [1, -1]),
            "text": ("BYTES", [1, 1]),
        }
        assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [1, 28]}]
    config = health["config"]  # Triton's HTTP answer: the configuration itself
    assert config["name"] == MODEL and config["max_batch_size"] == 0
    assert [i["name"] for i in config["input"]] == ["tokens", "text"]
    assert config["input"][0]["data_type"] == "TYPE_INT64" and config["input"][0]["dims"] == [1, -1]
    assert config["sequence_batching"]["max_sequence_idle_microseconds"] == 600 * 10**6
    assert health["index"] == [{"name": MODEL, "version": VERSION, "state": "READY", "reason": ""}]

    def counts(stats: dict[str, Any]) -> tuple[int, int]:
        (m,) = stats["model_stats"]
        s = m["inference_stats"]
        return s["success"]["count"], s["fail"]["count"]

    assert counts(stats0) == (0, 0)
    assert counts(stats1) == (1, 1)  # one good request, one with a token outside the vocabulary
    assert missing["status"] == "404" and "unknown model" in missing["error"]


def test_curl_health_and_plain_json_infer(start_server, reference):
    srv = start_server(http_port=0)
    url = url_of(srv)

    def curl(*args: str) -> tuple[int, str]:
        out = subprocess.run(
            ["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        body, _, code = out.stdout.rpartition("\n")
        return int(code), body

    assert curl(f"{url}/v2/health/live") == (200, "")
    assert curl(f"{url}/v2/health/ready") == (200, "")
    assert curl(f"{url}/v2/models/{MODEL}/ready") == (200, "")
    assert curl(f"{url}/v2/models/nope/ready") == (400, "")
    oracle = Oracle(reference)
    steps = [
        {"seq": 5, "start": True, "text": "the time"},
        {"seq": 5, "tokens": [3, 1, 4]},
        {"seq": 5, "end": True, "text": " traveller"},
        {"text": "x"},
    ]
    for step in steps:
        code, body = curl(
            "-H", "Content-Type: application/json", "-d", json.dumps(json_infer(step)),
            f"{url}/v2/models/{MODEL}/infer",
        )  # fmt: skip
        assert code == 200, body
        reply = json.loads(body)
        assert reply["model_name"] == MODEL and reply["model_version"] == VERSION
        (out,) = reply["outputs"]
        assert (out["name"], out["datatype"], out["shape"]) == ("logits", "FP32", [1, 28])
        np.testing.assert_allclose(
            np.asarray(out["data"], np.float32).reshape(1, 28),
            oracle.expect(step),
            atol=ATOL,
            rtol=0,
        )


def test_refusals_are_json_with_the_right_code(start_server):
    srv = start_server(http_port=0, max_prompt_tokens=64)
    url = url_of(srv)
    infer = f"{url}/v2/models/{MODEL}/infer"
    tokens = {"name": "tokens", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]}
    raw_header = json.dumps(
        {"inputs": [{**tokens, "data": None, "parameters": {"binary_data_size": 16}}]}
    )
    cases: list[tuple[str, tuple[str, Any, dict[str, str]], int, str]] = [
        ("bad JSON", (infer, "{bad", {}), 400, "not valid JSON"),
        ("not an object", (infer, "[1]", {}), 400, "must be a JSON object"),
        ("no inputs", (infer, {"inputs": []}, {}), 400, "'inputs'"),
        ("unknown model", (f"{url}/v2/models/nope/infer", {"inputs": [tokens]}, {}), 404,
         "unknown model: 'nope'"),
        ("unknown version", (f"{url}/v2/models/{MODEL}/versions/9/infer", {"inputs": [tokens]},
                             {}), 404, "version '9'"),
        ("metadata of an unknown model", (f"{url}/v2/models/nope", None, {}), 404, "nope"),
        ("wrong shape", (infer, {"inputs": [{**tokens, "shape": [1, 3]}]}, {}), 400, "shape"),
        ("wrong datatype", (infer, {"inputs": [{**tokens, "datatype": "FP32",
                                                "data": [1.0, 2.0]}]}, {}), 400, "data-type"),
        ("value of another type", (infer, {"inputs": [{**tokens, "data": ["a", "b"]}]}, {}), 400,
         "does not match datatype INT64"),
        ("token outside the vocabulary", (infer, {"inputs": [{**tokens, "data": [1, 99]}]}, {}),
         400, "99"),
        ("unknown output", (infer, {"inputs": [tokens], "outputs": [{"name": "h"}]}, {}), 400,
         "unexpected inference output"),
        ("sequence without START", (infer, {"inputs": [tokens],
                                            "parameters": {"sequence_id": 77}}, {}), 400,
         "START"),
        ("header length past the body", (infer, "{}", {"Inference-Header-Content-Length": "99"}),
         400, "Inference-Header-Content-Length"),
        ("binary data missing", (infer, raw_header,
                                 {"Inference-Header-Content-Length": str(len(raw_header))}), 400,
         "runs past"),
        ("body over the limit", (infer, "x" * (1 << 20), {}), 413, "limit"),
        ("no route", (f"{url}/v2/nothing", None, {}), 404, "no route"),
    ]  # fmt: skip
    for name, (where, body, headers), status, words in cases:
        code, got_headers, raw = http(where, body, headers=headers)
        assert code == status, (name, code, raw)
        assert got_headers["Content-Type"].startswith("application/json"), name
        message = json.loads(raw)["error"]
        assert words in message, (name, message)
        assert "Traceback" not in message, name
    code, headers, raw = http(f"{url}/v2", method="DELETE")
    assert code == 405 and "DELETE" in json.loads(raw)["error"] and "GET" in headers["Allow"]
    # The server is still fine, and counted the refusals under the KServe method names.
    assert http(f"{url}/v2/health/ready")[0] == 200
    counts = srv.on_loop(lambda: dict(srv.app.requests.counts))
    assert counts[("ModelInfer", "INVALID_ARGUMENT")] >= 10, counts
    assert counts[("ModelInfer", "NOT_FOUND")] == 2, counts


def test_binary_tensors_without_tritonclient(start_server, reference):
    """Triton's binary data extension by hand: a BYTES input and INT64 input as raw bytes after
    the JSON header, the logits back as raw float32 after the response's JSON header."""
    srv = start_server(http_port=0)
    oracle = Oracle(reference)
    text = b"the machine"
    for step, tensor, data in [
        ({"text": "the machine"}, {"name": "text", "shape": [1, 1], "datatype": "BYTES"},
         struct.pack("<I", len(text)) + text),
        ({"tokens": [5, 6, 7]}, {"name": "tokens", "shape": [1, 3], "datatype": "INT64"},
         np.array([5, 6, 7], "<i8").tobytes()),
    ]:  # fmt: skip
        header = json.dumps(
            {
                "id": "r1",
                "inputs": [{**tensor, "parameters": {"binary_data_size": len(data)}}],
                "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
            }
        ).encode()
        code, headers, body = http(
            f"{url_of(srv)}/v2/models/{MODEL}/infer",
            header + data,
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
        assert code == 200, body
        n = int(headers["Inference-Header-Content-Length"])
        reply = json.loads(body[:n])
        assert reply["id"] == "r1"
        (out,) = reply["outputs"]
        assert out["parameters"] == {"binary_data_size": 28 * 4} and "data" not in out
        logits = np.frombuffer(body[n:], "<f4").reshape(1, 28)
        np.testing.assert_allclose(logits, oracle.expect(step), atol=ATOL, rtol=0)


def test_tokens_are_checked_first_and_health_stays_open(start_server, tmp_path: Path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {TOKEN}\n")
    srv = start_server(http_port=0, auth_tokens=str(tokens))
    url = url_of(srv)
    infer = f"{url}/v2/models/{MODEL}/infer"
    step = {"seq": "mine", "start": True, "tokens": [1, 2]}
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    # Open, as grpc.health.v1 and KServe's ServerLive/ServerReady/ModelReady on gRPC.
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
        assert http(url + path)[0] == 200, path
    for where, body in [(f"{url}/v2", None), (f"{url}/v2/models/{MODEL}", None),
                        (f"{url}/v2/models/{MODEL}/config", None), (infer, json_infer(step)),
                        (infer, "{bad JSON: the credential is checked first")]:  # fmt: skip
        code, headers, raw = http(where, body)
        assert code == 401, (where, raw)
        assert headers["WWW-Authenticate"] == "Bearer"
        assert "credential is required" in json.loads(raw)["error"]
    code, _, raw = http(infer, json_infer(step), headers={"Authorization": "Bearer nope" * 3})
    assert (code, json.loads(raw)["error"]) == (401, "invalid token")
    code, _, raw = http(infer, json_infer(step), headers=bearer)
    assert code == 200, raw
    # The sequence belongs to the token's principal, as on gRPC.
    owners = srv.on_loop(lambda: srv.app.store.ids_and_owners())
    assert (sequence_session_id("mine"), "alice") in owners


def test_rate_limit_applies_to_http_too(start_server):
    srv = start_server(http_port=0, rate_limit_rps=1)
    infer = f"{url_of(srv)}/v2/models/{MODEL}/infer"
    codes = [http(infer, json_infer({"tokens": [1]}))[0] for _ in range(6)]
    assert codes[0] == 200 and 503 in codes, codes  # KServe answers a full queue UNAVAILABLE
    code, _, raw = http(infer, json_infer({"tokens": [1]}))
    assert code == 503 and "rate_limit_rps" in json.loads(raw)["error"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("carol@example.org", common_name="carol")
    paths = {k: str(d / k) for k in ("ca", "cert", "key", "client_cert", "client_key")}
    ca.cert_pem.write_to_path(paths["ca"])
    server.cert_chain_pems[0].write_to_path(paths["cert"])
    server.private_key_pem.write_to_path(paths["key"])
    client.cert_chain_pems[0].write_to_path(paths["client_cert"])
    client.private_key_pem.write_to_path(paths["client_key"])
    return paths


def test_tls_and_mutual_tls(start_server, pki):
    srv = start_server(http_port=0, tls_cert=pki["cert"], tls_key=pki["key"])
    trusting = ssl.create_default_context(cafile=pki["ca"])
    url = url_of(srv, "https")
    assert http(f"{url}/v2/health/ready", context=trusting)[0] == 200
    code, _, raw = http(f"{url}/v2/models/{MODEL}/infer", json_infer({"tokens": [1]}),
                        context=trusting)  # fmt: skip
    assert code == 200, raw
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        http(f"{url_of(srv)}/v2/health/ready")  # plaintext to a TLS port
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        http(f"{url}/v2/health/ready", context=ssl.create_default_context())

    # Mutual TLS: a client certificate from --tls-client-ca is required, its CN the principal.
    srv = start_server(
        http_port=0, tls_cert=pki["cert"], tls_key=pki["key"], tls_client_ca=pki["ca"]
    )
    url = url_of(srv, "https")
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        # TLS 1.3 reports the missing certificate after the handshake, at the first read.
        http(f"{url}/v2/health/ready", context=trusting)
    carol = ssl.create_default_context(cafile=pki["ca"])
    carol.load_cert_chain(pki["client_cert"], pki["client_key"])
    step = {"seq": 9, "start": True, "tokens": [1, 2]}
    code, _, raw = http(f"{url}/v2/models/{MODEL}/infer", json_infer(step), context=carol)
    assert code == 200, raw
    owners = srv.on_loop(lambda: srv.app.store.ids_and_owners())
    assert (sequence_session_id(9), "carol") in owners


def _http_port(lines: list[str]) -> int:
    for line in lines:
        if m := re.search(r"KServe v2 HTTP/REST on http://127\.0\.0\.1:(\d+)/v2", line):
            return int(m.group(1))
    raise AssertionError("".join(lines))


@pytest.mark.parametrize(
    "topology", [("--topology", "split", "--frontends", "2"), ("--topology", "single")]
)
def test_lstm_serve_serves_http_on_every_process(serve, reference, topology):
    """lstm-serve, split with two front ends (both serve HTTP on the one port, SO_REUSEPORT:
    sequences stay exact whichever front end each connection lands on) and single; SIGTERM
    drains, exit 0, and the port is free again."""
    s = serve("--http-port", "0", *topology)
    port = _http_port(s.lines)
    assert port not in (s.port, s.metrics_port)
    url = f"127.0.0.1:{port}"
    seed = random.SystemRandom().randrange(2**32)
    plan = interleaved(random.Random(seed), [1, 2, "three"], 4)
    # Several clients, each its own connections: the kernel spreads them over the front ends.
    oracle = Oracle(reference)
    for part in (plan[: len(plan) // 2], plan[len(plan) // 2 :]):
        (got,) = run_client(url, [{"op": "infer", "steps": part}])
        check(got, part, oracle, f"seed {seed}")
    assert http(f"http://{url}/v2/health/ready")[0] == 200
    assert s.stop() == 0
    assert not port_in_use(port)


def test_a_taken_http_port_is_a_start_error_naming_the_flag(model_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [
                *(sys.executable, "-m", "server.cli", "--model", str(model_path), "--port", "0"),
                *("--metrics-port", "-1", "--http-port", str(port)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in out.stderr
    assert "--http-port / LSTM_SERVE_HTTP_PORT" in out.stderr


def test_make_serve_serves_http_on_its_default_port(beside_make_serve):
    """`make serve` turns HTTP on (port 8000, the container's); the suite's own servers never
    touch that port (every test above asks for a free one)."""
    command = make_serve_command()
    assert command[command.index("--http-port") + 1] == "8000"
    if beside_make_serve.proc is None:
        pytest.skip("a make serve this suite did not start holds the default ports")
    assert beside_make_serve.proc.poll() is None
    assert http("http://127.0.0.1:8000/v2/health/ready")[0] == 200
