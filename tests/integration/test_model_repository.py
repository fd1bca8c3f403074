"""The model repository: many models and versions, hot load, sessions pinned to their version.

Real servers (in this process, or a real ``lstm-serve``), real files, real gRPC channels; every
output is compared with in-process ONNX Runtime on the version the session is pinned to.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import shutil
import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from export.graph import random_model
from protos.lstmserve.v1 import lstm_serve_pb2 as pb
from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.integration.conftest import VOCAB, ManualClock, ServerThread, make_settings
from tests.integration.test_kserve import Oracle, check, interleaved, run_client
from tests.reference import Reference

DIGITS = ["<unk>", " ", *"0123456789"]
ATOL = 1e-5


def publish(repo: Path, name: str, version: int, *, seed: int, vocab: list[str] = VOCAB) -> Path:
    """Write a random model as REPO/NAME/VERSION/model.onnx the way lstm-export does: complete
    in a temporary folder first, then renamed into place in one step."""
    import onnx

    tmp = repo / name / f".tmp-{version}"
    tmp.mkdir(parents=True)
    onnx.save(random_model(vocab, hidden_size=24, num_layers=2, seed=seed), str(tmp / "model.onnx"))
    final = repo / name / str(version)
    os.replace(tmp, final)
    return final / "model.onnx"


def policy(repo: Path, name: str, body: dict[str, Any]) -> None:
    (repo / name / "config.json").write_text(json.dumps({"version_policy": body}))


def start(repo: Path, clock: Callable[[], float] | None = None, **overrides: Any) -> ServerThread:
    settings = dataclasses.replace(
        make_settings(repo / "unused"), model="", model_repository=str(repo), **overrides
    ).validate()
    return ServerThread(settings, clock).start()


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def states(stub: Any, name: str) -> dict[str, str]:
    models = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    return {v.version: v.state for m in models if m.name == name for v in m.versions}


def reasons(stub: Any, name: str) -> dict[str, str]:
    models = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    return {v.version: v.reason for m in models if m.name == name for v in m.versions}


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class Tracked:
    """A session and its reference state on the version it must be pinned to."""

    def __init__(self, stub: Any, ref: Reference, **create: Any) -> None:
        reply = stub.CreateSession(pb.CreateSessionRequest(**create), timeout=10)
        self.sid, self.version = reply.session_id, reply.model_version
        self.stub, self.ref, self.state = stub, ref, ref.zeros()

    def step(self, rng: np.random.Generator, vocab_size: int) -> None:
        tokens = [int(t) for t in rng.integers(0, vocab_size, int(rng.integers(1, 5)))]
        got = self.stub.Step(pb.StepRequest(session_id=self.sid, token_ids=tokens), timeout=10)
        want, self.state = self.ref.feed(tokens, self.state)
        np.testing.assert_allclose(np.asarray(got.logits), want[-1], atol=ATOL, rtol=0)


def test_poll_loads_a_new_version_and_sessions_stay_on_theirs(tmp_path: Path):
    repo = tmp_path / "repo"
    v1 = publish(repo, "tiny", 1, seed=1)
    srv = start(
        repo, model_control_mode="poll", repository_poll_s=0.1, max_new_tokens=300, metrics_port=0
    )
    refs = {"1": Reference(v1)}
    rng = np.random.default_rng(0)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.LstmServeServiceStub(ch)
            old = [Tracked(stub, refs["1"]) for _ in range(4)]
            assert {s.version for s in old} == {"1"}
            for s in old:
                s.step(rng, len(VOCAB))

            # Generations run on sessions of v1 while v2 is published and loads: none fails, and
            # each produces exactly v1's greedy text.
            errors: list[BaseException] = []
            texts: dict[str, list[int]] = {}

            def generate(s: Tracked) -> None:
                try:
                    ids: list[int] = []
                    for _ in range(3):
                        req = pb.GenerateRequest(session_id=s.sid, prompt="the time", max_tokens=60)
                        for m in stub.Generate(req, timeout=60):
                            ids.extend(m.token_ids)
                    texts[s.sid] = ids
                except BaseException as e:
                    errors.append(e)

            threads = [threading.Thread(target=generate, args=(s,)) for s in old]
            for t in threads:
                t.start()
            v2 = publish(repo, "tiny", 2, seed=2)
            refs["2"] = Reference(v2)
            wait_for(lambda: states(stub, "tiny").get("2") == "READY", "v2 to load")
            for t in threads:
                t.join(120)
            assert not errors, errors
            prompt = [VOCAB.index(c) for c in "the time"]
            for s in old:
                want: list[int] = []
                for _ in range(3):
                    got, s.state = refs["1"].greedy_with_state(prompt, 60, s.state)
                    want += got
                assert texts[s.sid] == want, "a v1 session stopped producing v1's outputs"

            # v1 retires (out of "latest 1") but serves its sessions; new ones go to v2.
            assert states(stub, "tiny") == {"1": "RETIRING", "2": "READY"}
            new = [Tracked(stub, refs["2"]) for _ in range(4)]
            assert {s.version for s in new} == {"2"}
            every = old + new
            for _ in range(40):
                every[int(rng.integers(len(every)))].step(rng, len(VOCAB))
            info = stub.GetSession(pb.GetSessionRequest(session_id=old[0].sid), timeout=10)
            assert (info.model_name, info.model_version) == ("tiny", "1")
            # Each version's work is counted under its own labels.
            metrics = scrape(srv.app.metrics_port)
            for v in ("1", "2"):
                labels = (("model", "tiny"), ("phase", "prefill"), ("version", v))
                assert metrics[("lstm_serve_tokens_processed_total", labels)] > 0
                labels = (("model", "tiny"), ("version", v))
                assert metrics[("lstm_serve_model_sessions", labels)] == 4
                state = "RETIRING" if v == "1" else "READY"
                info_labels = (("name", "tiny"), ("provider", "CPUExecutionProvider"))
                key = ("lstm_serve_model_info", (*info_labels, ("state", state), ("version", v)))
                assert metrics[key] == 1
            # The two versions really differ on the same input.
            a, _ = refs["1"].feed([3, 4, 5], refs["1"].zeros())
            b, _ = refs["2"].feed([3, 4, 5], refs["2"].zeros())
            assert np.abs(a - b).max() > 0.01

            # Once its last session ends, v1 is unloaded.
            for s in old:
                stub.CloseSession(pb.CloseSessionRequest(session_id=s.sid), timeout=10)
            wait_for(lambda: states(stub, "tiny").get("1") == "UNAVAILABLE", "v1 to unload")
            assert srv.on_loop(lambda: sorted(srv.app.core.models.versions)) == [("tiny", "2")]
    finally:
        srv.stop()


def test_a_broken_or_half_written_version_never_replaces_the_serving_one(tmp_path: Path):
    repo = tmp_path / "repo"
    publish(repo, "tiny", 1, seed=1)
    v2 = publish(repo, "tiny", 2, seed=2)
    ref2 = Reference(v2)
    srv = start(repo, model_control_mode="poll", repository_poll_s=0.1)
    rng = np.random.default_rng(1)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.LstmServeServiceStub(ch)
            wait_for(lambda: states(stub, "tiny") == {"1": "UNAVAILABLE", "2": "READY"}, "v2")
            before = Tracked(stub, ref2)
            before.step(rng, len(VOCAB))

            # v3 with flipped bytes in its weights: ONNX Runtime may still load it, so the
            # repository's manifest must catch it (as lstm-export --batch writes one).
            v3 = publish(repo, "tiny", 3, seed=3)
            digest = __import__("hashlib").sha256(v3.read_bytes()).hexdigest()
            manifest = {"format": "lstm-serve-model-repo", "format_version": 1, "models": {}}
            manifest["models"]["tiny"] = {
                "version": 3,
                "outputs": {"fp32": {"path": "tiny/3/model.onnx", "sha256": digest}},
            }
            (repo / "manifest.json").write_text(json.dumps(manifest))
            data = bytearray(v3.read_bytes())
            data[len(data) // 2] ^= 0x01
            v3.write_bytes(bytes(data))
            wait_for(
                lambda: (
                    states(stub, "tiny").get("3") == "UNAVAILABLE"
                    and "SHA-256 mismatch" in reasons(stub, "tiny")["3"]
                ),
                "v3 refused",
            )
            # A half-written v4 (a copy that stopped half way, no manifest entry).
            whole = v2.read_bytes()
            (repo / "tiny" / "4").mkdir()
            (repo / "tiny" / "4" / "model.onnx").write_bytes(whole[: len(whole) // 2])
            wait_for(
                lambda: (
                    states(stub, "tiny").get("4") == "UNAVAILABLE"
                    and reasons(stub, "tiny")["4"] != ""
                ),
                "v4 refused",
            )
            # v2 goes on serving, old and new sessions alike, and nothing failed.
            assert states(stub, "tiny")["2"] == "READY"
            after = Tracked(stub, ref2)
            assert after.version == "2"
            for _ in range(10):
                before.step(rng, len(VOCAB))
                after.step(rng, len(VOCAB))
            # Fixing v4 (its whole file arrives) makes the next scan load it.
            (repo / "tiny" / "4" / "model.onnx").write_bytes(whole)
            wait_for(lambda: states(stub, "tiny").get("4") == "READY", "v4 fixed")
            assert states(stub, "tiny")["2"] == "RETIRING"
    finally:
        srv.stop()


def test_unload_lets_pinned_sessions_finish_until_the_drain_deadline(tmp_path: Path):
    repo = tmp_path / "repo"
    v1 = publish(repo, "tiny", 1, seed=1)
    ref = Reference(v1)
    clock = ManualClock()
    srv = start(repo, clock, model_control_mode="explicit", version_drain_s=30.0)
    rng = np.random.default_rng(2)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.LstmServeServiceStub(ch)
            pinned = Tracked(stub, ref)
            pinned.step(rng, len(VOCAB))
            reply = stub.UnloadModel(pb.UnloadModelRequest(model_name="tiny"), timeout=10)
            assert [(v.version, v.state, v.sessions) for v in reply.model.versions] == [
                ("1", "RETIRING", 1)
            ]
            # No new sessions on a retiring version; the pinned one goes on.
            with pytest.raises(grpc.RpcError) as e:
                stub.CreateSession(pb.CreateSessionRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            pinned.step(rng, len(VOCAB))
            clock.advance(29)
            time.sleep(1.5)  # a housekeeping tick or more
            pinned.step(rng, len(VOCAB))
            # A stream attached to the session stays open across the deadline.
            requests: queue.Queue[Any] = queue.Queue()
            stream = stub.StepStream(iter(requests.get, None), timeout=30)
            requests.put(pb.StepStreamRequest(session_id=pinned.sid, token_ids=[2, 3]))
            got = next(stream)
            want, pinned.state = ref.feed([2, 3], pinned.state)
            np.testing.assert_allclose(np.asarray(got.logits), want[-1], atol=ATOL, rtol=0)
            clock.advance(2)  # past the drain deadline
            wait_for(lambda: not srv.on_loop(lambda: srv.app.core.models.versions), "unload")
            for call in (
                lambda: stub.Step(pb.StepRequest(session_id=pinned.sid, token_ids=[1]), timeout=10),
                lambda: requests.put(pb.StepStreamRequest(token_ids=[1])) or next(stream),
            ):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "pinned to model tiny version 1" in e.value.details()
                assert "no longer loaded" in e.value.details()
            requests.put(None)
            # The version's engine stops once the stream has ended.
            wait_for(lambda: not srv.on_loop(lambda: srv.app.core.models._unloading), "stopped")
            # Loading it again serves new sessions.
            stub.LoadModel(pb.LoadModelRequest(model_name="tiny"), timeout=60)
            Tracked(stub, ref).step(rng, len(VOCAB))
    finally:
        srv.stop()


def test_model_control_needs_explicit_mode_and_an_admin(tmp_path: Path):
    repo = tmp_path / "repo"
    publish(repo, "tiny", 1, seed=1)
    tokens = tmp_path / "tokens"
    tokens.write_text("admin aaaaaaaaaaaaaaaaaaaa\nuser bbbbbbbbbbbbbbbbbbbbbb\n")
    srv = start(
        repo, model_control_mode="explicit", auth_tokens=str(tokens), admin_principals="admin"
    )
    none = start(repo)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.LstmServeServiceStub(ch)
            user = (("authorization", "Bearer bbbbbbbbbbbbbbbbbbbbbb"),)
            admin = (("authorization", "Bearer aaaaaaaaaaaaaaaaaaaa"),)
            with pytest.raises(grpc.RpcError) as e:
                stub.UnloadModel(pb.UnloadModelRequest(model_name="tiny"), metadata=user)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "--admin-principals" in e.value.details()
            reply = stub.LoadModel(pb.LoadModelRequest(model_name="tiny"), metadata=admin)
            assert [v.state for v in reply.model.versions] == ["READY"]
            with pytest.raises(grpc.RpcError) as e:
                stub.LoadModel(pb.LoadModelRequest(model_name="nope"), metadata=admin)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            listed = stub.ListModels(pb.ListModelsRequest(), metadata=user)
            assert listed.model_control_mode == "explicit"
            assert [(m.name, m.is_default, m.version_policy) for m in listed.models] == [
                ("tiny", True, "latest 1")
            ]
        with grpc.insecure_channel(none.target) as ch:
            stub = pb_grpc.LstmServeServiceStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.LoadModel(pb.LoadModelRequest(model_name="tiny"))
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--model-control-mode explicit" in e.value.details()
    finally:
        srv.stop()
        none.stop()


def test_two_models_side_by_side_over_both_protocols(tmp_path: Path):
    repo = tmp_path / "repo"
    letters = Reference(publish(repo, "letters", 1, seed=4))
    digits = Reference(publish(repo, "digits", 7, seed=5, vocab=DIGITS))
    srv = start(repo, default_model="letters", model_control_mode="explicit")
    rng = np.random.default_rng(3)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.LstmServeServiceStub(ch)
            # explicit mode loads only the default model at start.
            assert states(stub, "digits") == {"7": "UNAVAILABLE"}
            stub.LoadModel(pb.LoadModelRequest(model_name="digits"), timeout=60)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(model_name="digits"), timeout=10)
            assert (info.name, info.version, list(info.vocab)) == ("digits", "7", DIGITS)
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).name == "letters"
            a = [Tracked(stub, letters) for _ in range(3)]
            b = [Tracked(stub, digits, model_name="digits") for _ in range(3)]
            for _ in range(30):
                i = int(rng.integers(6))
                (a + b)[i].step(rng, len(VOCAB) if i < 3 else len(DIGITS))
            # A request naming another model than the session's is refused, by name.
            with pytest.raises(grpc.RpcError) as e:
                stub.Step(
                    pb.StepRequest(session_id=a[0].sid, token_ids=[1], model_name="digits"),
                    timeout=10,
                )
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "pinned to model letters version 1" in e.value.details()
            text = stub.Generate(
                pb.GenerateRequest(prompt="12", max_tokens=5, model_name="digits"), timeout=10
            )
            # (The text rule turns any run of non-letters into one space.)
            got = [t for m in text for t in m.token_ids]
            assert got == digits.greedy([DIGITS.index(" ")], 5)

        # KServe: both models by name, interleaved sequences, and the repository extension.
        plan_l = interleaved(__import__("random").Random(1), [1, 2], 4)
        plan_d = [{"seq": 3, "start": True, "tokens": [2, 3]}, {"seq": 3, "tokens": [4]}]
        out = run_client(
            srv.target,
            [{"op": "stream", "steps": plan_l}, {"op": "index"}, {"op": "unload"}],
            model="letters",
        )
        check(out[0], plan_l, Oracle(letters))
        assert {(m["name"], m["version"], m["state"]) for m in out[1]} == {
            ("letters", "1", "READY"),
            ("digits", "7", "READY"),
        }
        assert out[2] == {"ok": True}
        out = run_client(srv.target, [{"op": "infer", "steps": plan_d}, {"op": "load"}], "digits")
        check(out[0], plan_d, Oracle(digits))
        assert out[1] == {"ok": True}
    finally:
        srv.stop()


def test_a_durable_session_pinned_to_v1_survives_kill_9_and_a_restart_onto_v1_and_v2(
    tmp_path: Path, serve
):
    repo = tmp_path / "repo"
    v1 = publish(repo, "tiny", 1, seed=1)
    ref1 = Reference(v1)
    db = f"sqlite:///{tmp_path / 'sessions.db'}"
    flags = ("--model-repository", str(repo), "--state-store", db, "--metrics-port", "-1")
    srv = serve(*flags)
    rng = np.random.default_rng(4)
    with grpc.insecure_channel(srv.target) as ch:
        s = Tracked(pb_grpc.LstmServeServiceStub(ch), ref1)
        for _ in range(5):
            s.step(rng, len(VOCAB))
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(30)

    ref2 = Reference(publish(repo, "tiny", 2, seed=2))
    policy(repo, "tiny", {"all": {}})
    srv = serve(*flags)
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LstmServeServiceStub(ch)
        s.stub = stub
        for _ in range(5):
            s.step(rng, len(VOCAB))  # exactly v1, from the stored state
        info = stub.GetSession(pb.GetSessionRequest(session_id=s.sid), timeout=10)
        assert (info.model_name, info.model_version) == ("tiny", "1")
        fresh = Tracked(stub, ref2)
        assert fresh.version == "2"
        fresh.step(rng, len(VOCAB))
    srv.stop()

    # A restart that loads only v2: the v1 session is refused by name, not mixed up.
    shutil.rmtree(repo / "tiny" / "1")
    srv = serve(*flags)
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.LstmServeServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Step(pb.StepRequest(session_id=s.sid, token_ids=[1]), timeout=10)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "version 1" in e.value.details() and "serving: 2" in e.value.details()


def test_lstm_export_publishes_a_version_while_16_sessions_generate(tmp_path: Path):
    """The issue's rollout, end to end: lstm-export --batch publishes v2 (nn.LSTM cell) into the
    repository a poll-mode server serves v1 (scratch cell) from, while 16 sessions generate."""
    from tests.export_support import random_model as checkpoint_model
    from tests.export_support import save_checkpoint
    from tests.integration.test_export_cli import run as lstm_export

    ck, repo = tmp_path / "ck", tmp_path / "repo"
    save_checkpoint(ck / "tm.pt", checkpoint_model("scratch", "onehot", 2, 16, seed=1))
    done = lstm_export("batch", "--checkpoints", str(ck), "--out", str(repo))
    assert done.returncode == 0, done.stderr
    ref1 = Reference(repo / "tm" / "1" / "model.onnx")
    srv = start(repo, model_control_mode="poll", repository_poll_s=0.2)
    stop = threading.Event()
    errors: list[BaseException] = []
    outputs: dict[str, list[list[int]]] = {}
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.LstmServeServiceStub(ch)
            sids = [
                stub.CreateSession(pb.CreateSessionRequest(), timeout=10).session_id
                for _ in range(16)
            ]

            def generate(sid: str) -> None:
                outputs[sid] = []
                try:
                    while not stop.is_set() or not outputs[sid]:
                        req = pb.GenerateRequest(session_id=sid, prompt="time", max_tokens=12)
                        outputs[sid].append(
                            [t for m in stub.Generate(req, timeout=60) for t in m.token_ids]
                        )
                except BaseException as e:
                    errors.append(e)

            threads = [threading.Thread(target=generate, args=(sid,)) for sid in sids]
            for t in threads:
                t.start()
            save_checkpoint(ck / "tm.pt", checkpoint_model("torch", "onehot", 2, 16, seed=2))
            done = lstm_export("batch", "--checkpoints", str(ck), "--out", str(repo))
            assert done.returncode == 0, done.stderr
            wait_for(lambda: states(stub, "tm").get("2") == "READY", "v2 to load", timeout=60)
            fresh = stub.CreateSession(pb.CreateSessionRequest(), timeout=10)
            stop.set()
            for t in threads:
                t.join(120)
            assert not errors, errors[:3]
            assert min(len(o) for o in outputs.values()) >= 2  # they ran across the rollout

            # Every generation on a session created before the publish is v1's, to the end.
            prompt = [VOCAB.index(c) for c in "time"]
            for sid in sids:
                state = ref1.zeros()
                for got in outputs[sid]:
                    want, state = ref1.greedy_with_state(prompt, 12, state)
                    assert got == want
            # The new session is v2's, and v2 really differs from v1.
            assert fresh.model_version == "2"
            ref2 = Reference(repo / "tm" / "2" / "model.onnx")
            req = pb.GenerateRequest(session_id=fresh.session_id, prompt="time", max_tokens=30)
            got = [t for m in stub.Generate(req, timeout=60) for t in m.token_ids]
            assert got == ref2.greedy(prompt, 30)
            assert ref1.greedy(prompt, 30) != ref2.greedy(prompt, 30)
    finally:
        stop.set()
        srv.stop()


def test_kserve_sequences_stay_on_their_version_and_a_new_start_takes_the_new_one(
    tmp_path: Path,
):
    repo = tmp_path / "repo"
    ref1 = Reference(publish(repo, "tiny", 1, seed=1))
    srv = start(repo, model_control_mode="poll", repository_poll_s=0.1)
    try:
        (first,) = run_client(
            srv.target, [{"op": "infer", "steps": [{"seq": 5, "start": True, "tokens": [2, 3]}]}]
        )
        want, state = ref1.feed([2, 3], ref1.zeros())
        np.testing.assert_allclose(first[0]["logits"], want[-1:], atol=ATOL, rtol=0)
        ref2 = Reference(publish(repo, "tiny", 2, seed=2))
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.LstmServeServiceStub(ch)
            wait_for(lambda: states(stub, "tiny").get("2") == "READY", "v2 to load")
        steps = [
            {"seq": 5, "tokens": [4]},  # continues on v1
            {"seq": 6, "start": True, "tokens": [2, 3]},  # a new sequence: v2
            {"seq": 5, "start": True, "tokens": [2, 3]},  # restarted: v2 as well
        ]
        meta, got, stats = run_client(
            srv.target,
            [
                {"op": "metadata", "model": "tiny"},
                {"op": "infer", "steps": steps},
                {"op": "statistics"},
            ],
        )
        assert meta["versions"] == ["1", "2"]  # v1 still serves sequence 5
        want1, _ = ref1.feed([4], state)
        # Statistics per version: each inference counted under the version that computed it.
        counts = {
            m["version"]: int(m["inference_stats"]["success"]["count"])
            for m in stats["model_stats"]
        }
        assert counts == {"1": 2, "2": 2}, stats
        want2, _ = ref2.feed([2, 3], ref2.zeros())
        np.testing.assert_allclose(got[0]["logits"], want1[-1:], atol=ATOL, rtol=0)
        np.testing.assert_allclose(got[1]["logits"], want2[-1:], atol=ATOL, rtol=0)
        np.testing.assert_allclose(got[2]["logits"], want2[-1:], atol=ATOL, rtol=0)
    finally:
        srv.stop()


def test_a_session_id_is_one_name_across_versions(tmp_path: Path):
    """Create, fork and import refuse an id the caller holds on another loaded version (each
    version's own store sees only its sessions), so a request by id never has two to choose."""
    repo = tmp_path / "repo"
    publish(repo, "tiny", 1, seed=1)
    publish(repo, "tiny", 2, seed=2)
    policy(repo, "tiny", {"all": {}})
    srv = start(repo)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.LstmServeServiceStub(ch)
            taken = "taken-session-0001"
            stub.CreateSession(
                pb.CreateSessionRequest(session_id=taken, model_version="1"), timeout=10
            )
            other = stub.CreateSession(pb.CreateSessionRequest(model_version="2"), timeout=10)
            record = stub.ExportSession(
                pb.ExportSessionRequest(session_id=other.session_id), timeout=10
            ).record
            calls = [
                lambda: stub.CreateSession(
                    pb.CreateSessionRequest(session_id=taken, model_version="2"), timeout=10
                ),
                lambda: stub.ForkSession(
                    pb.ForkSessionRequest(session_id=other.session_id, new_session_id=taken),
                    timeout=10,
                ),
                lambda: stub.ImportSession(
                    pb.ImportSessionRequest(record=record, session_id=taken), timeout=10
                ),
            ]
            for call in calls:
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
                assert "is taken" in e.value.details()
            info = stub.GetSession(pb.GetSessionRequest(session_id=taken), timeout=10)
            assert info.model_version == "1"
    finally:
        srv.stop()
