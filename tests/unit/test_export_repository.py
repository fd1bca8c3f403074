"""The model repository: layout, manifest, idempotence, per-model failures, interrupts."""

from __future__ import annotations

import fcntl
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from contract.files import sha256_file
from contract.model import validate
from contract.repository import MANIFEST
from export.common import ExportError
from export.exporter import ExportOptions
from export.repository import (
    ManifestEntry,
    Result,
    discover,
    load_manifest,
    model_name,
    run_batch,
)
from tests.export_support import random_model, save_checkpoint

FAST = ExportOptions(measure_speed=False)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _good(d: Path, name: str, seed: int = 0, cell: str = "torch") -> Path:
    return save_checkpoint(d / name, random_model(cell, "onehot", 1, 12, seed=seed), epoch=seed)


def _bad_checkpoints(d: Path, template: Path) -> dict[str, Path]:
    """Corrupt, truncated, foreign and wrong-version checkpoints, with the expected messages."""
    d.mkdir(parents=True, exist_ok=True)
    raw = template.read_bytes()
    truncated = d / "truncated.pt"
    truncated.write_bytes(raw[: len(raw) // 2])
    corrupt = d / "corrupt.pt"  # valid zip directory, damaged record data
    with zipfile.ZipFile(template) as zin, zipfile.ZipFile(corrupt, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            zout.writestr(item, bytes(b ^ 0x5A for b in data) if item.file_size > 100 else data)
    foreign = d / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    wrong_version = d / "wrong_version.pt"
    ck = torch.load(template, weights_only=True)
    ck["format_version"] = 99
    torch.save(ck, wrong_version)
    return {
        "truncated": truncated,
        "corrupt": corrupt,
        "foreign": foreign,
        "wrong_version": wrong_version,
    }


EXPECTED_ERRORS = {
    "truncated": r"not a PyTorch checkpoint \(no zip archive",
    "corrupt": r"not a readable checkpoint",
    "foreign": r"not an lstm-serve checkpoint",
    "wrong_version": r"format_version 99 is not supported",
}


def test_names_from_paths(tmp_path: Path) -> None:
    base = tmp_path / "runs"
    assert model_name(base / "foo" / "checkpoint.pt", base) == "foo"
    assert model_name(base / "bar.pt", base) == "bar"
    assert model_name(base / "a" / "best.pt", base) == "a-best"
    assert model_name(base / "checkpoint.pt", base) == "runs"
    assert model_name(base / "we ird!" / "checkpoint.pt", base) == "we_ird_"


def test_discover_dir_glob_file_and_collisions(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    a = _good(ck / "a", "checkpoint.pt")
    b = _good(ck, "b.pt")
    (ck / "a" / ".checkpoint.pt.tmp123").write_bytes(b"in progress")  # a trainer's temp file
    (ck / "notes.txt").write_text("not a checkpoint")
    assert [(j.name, j.checkpoint) for j in discover(str(ck))] == [("a", a), ("b", b)]
    assert [j.name for j in discover(str(ck / "*.pt"))] == ["b"]
    assert [j.name for j in discover(str(ck / "**" / "*.pt"))] == ["a", "b"]
    assert [j.name for j in discover(str(a))] == ["a"]
    _good(ck, "a.pt")  # collides with a/checkpoint.pt
    jobs = discover(str(ck))
    assert [j.error is not None for j in jobs] == [True, True, False]
    assert "would come from several checkpoints" in (jobs[0].error or "")
    with pytest.raises(ExportError, match="no such checkpoint file or directory"):
        discover(str(tmp_path / "nope"))
    with pytest.raises(ExportError, match="no checkpoints found"):
        discover(str(tmp_path / "ck" / "*.pth"))


def test_batch_exports_good_fails_bad_and_writes_the_manifest(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    good_a = _good(ck / "alpha", "checkpoint.pt", seed=1, cell="scratch")
    good_b = _good(ck, "beta.pt", seed=2)
    bad = _bad_checkpoints(ck, good_b)
    repo = tmp_path / "repo"
    seen: list[Result] = []
    summary = run_batch(str(ck), repo, FAST, on_result=seen.append)

    assert not summary.ok
    assert summary.counts() == {"exported": 2, "unchanged": 0, "failed": 4}
    assert len(seen) == 6
    manifest = json.loads((repo / MANIFEST).read_text())
    assert manifest["format"] == "lstm-serve-model-repo" and manifest["format_version"] == 1
    models = manifest["models"]
    assert set(models) == {"alpha", "beta", *bad}

    for name, src in (("alpha", good_a), ("beta", good_b)):
        e = models[name]
        assert e["status"] == "ok" and e["error"] is None and e["version"] == 1
        assert e["source"]["sha256"] == sha256_file(src)
        assert e["source"]["path"] == str(src.resolve())
        out = e["outputs"]["fp32"]
        assert out["path"] == f"{name}/1/model.onnx"
        assert out["sha256"] == sha256_file(repo / out["path"])
        assert e["parity"]["passed"] and e["parity"]["T"] == [1, 7, 35, 100]
        assert e["parity"]["B"] == [1, 3, 32, 512]
        assert e["perplexity"] is None and e["int8"] is None
        spec = validate(repo / out["path"])
        assert spec.config["checkpoint_sha256"] == e["source"]["sha256"]
    assert models["alpha"]["model"]["cell"] == "scratch"

    for name, pattern in EXPECTED_ERRORS.items():
        e = models[name]
        assert e["status"] == "failed" and e["version"] is None and e["outputs"] == {}
        assert e["error"] and "\n" not in e["error"]
        assert re.search(pattern, e["error"]), e["error"]
        assert not (repo / name).exists()  # no folder, no partial file for a failed model
    assert sorted(p.name for p in repo.iterdir()) == [".lock", "alpha", "beta", MANIFEST]
    # The typed manifest reads back to exactly the bytes on disk.
    on_disk = (repo / MANIFEST).read_text()
    assert json.dumps(load_manifest(repo).to_dict(), indent=2) + "\n" == on_disk


def test_batch_is_idempotent_and_reexports_changes(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    a = _good(ck, "a.pt", seed=1)
    _good(ck, "b.pt", seed=2)
    repo = tmp_path / "repo"
    first = run_batch(str(ck), repo, FAST)
    assert first.ok and first.counts()["exported"] == 2
    model_a = repo / "a" / "1" / "model.onnx"
    stamp = (model_a.stat().st_mtime_ns, (repo / MANIFEST).read_text())

    again = run_batch(str(ck), repo, FAST)
    assert again.ok
    assert [r.action for r in again.results] == ["unchanged", "unchanged"]
    assert [r.version for r in again.results] == [1, 1]
    assert model_a.stat().st_mtime_ns == stamp[0]
    after = json.loads((repo / MANIFEST).read_text())["models"]
    assert after == json.loads(stamp[1])["models"]  # entries untouched

    _good(ck, "a.pt", seed=7)  # retrained: new bytes under the same name
    changed = run_batch(str(ck), repo, FAST)
    assert {r.name: r.action for r in changed.results} == {"a": "exported", "b": "unchanged"}
    models = load_manifest(repo).models
    assert models["a"].version == 2 and models["a"].source.sha256 == sha256_file(a)
    assert (repo / "a" / "2" / "model.onnx").is_file()
    assert model_a.is_file()  # earlier versions stay

    (repo / "b" / "1" / "model.onnx").write_bytes(b"tampered")
    healed = run_batch(str(ck), repo, FAST)
    assert {r.name: r.action for r in healed.results} == {"a": "unchanged", "b": "exported"}
    assert load_manifest(repo).models["b"].version == 2

    with_int8 = run_batch(str(ck), repo, ExportOptions(int8=True, measure_speed=False))
    assert [r.action for r in with_int8.results] == ["exported", "exported"]
    entry = load_manifest(repo).models["a"]
    assert set(entry.outputs) == {"fp32", "int8"}
    assert entry.outputs["int8"].path == "a/3/model.int8.onnx"
    assert entry.int8 is not None
    assert entry.int8["ops"] and "DynamicQuantizeLSTM" in entry.int8["ops"]


def test_failed_checkpoint_is_not_retried_until_it_changes(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    good = _good(ck, "good.pt")
    bad = ck / "bad.pt"
    bad.write_bytes(b"garbage")
    repo = tmp_path / "repo"
    run_batch(str(ck), repo, FAST)
    again = run_batch(str(ck), repo, FAST)
    assert not again.ok
    by = {r.name: r for r in again.results}
    assert by["bad"].action == "unchanged" and by["bad"].status == "failed"
    assert "not a PyTorch checkpoint" in (by["bad"].error or "")
    bad.write_bytes(good.read_bytes())  # fixed
    fixed = run_batch(str(ck), repo, FAST)
    assert fixed.ok and {r.name: r.action for r in fixed.results}["bad"] == "exported"


def test_failure_after_success_keeps_the_last_good_version(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    a = _good(ck, "a.pt")
    repo = tmp_path / "repo"
    run_batch(str(ck), repo, FAST)
    a.write_bytes(a.read_bytes()[:100])  # a broken re-save
    summary = run_batch(str(ck), repo, FAST)
    assert not summary.ok
    entry = load_manifest(repo).models["a"]
    assert entry.status == "failed"
    assert entry.previous is not None and entry.previous.version == 1
    assert entry.previous.outputs["fp32"].path == "a/1/model.onnx"
    assert (repo / "a" / "1" / "model.onnx").is_file()


def test_interrupt_leaves_no_partial_model_or_manifest(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    for i in range(3):
        _good(ck, f"m{i}.pt", seed=i)
    repo = tmp_path / "repo"

    def interrupt_after_first(r: Result) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(str(ck), repo, FAST, on_result=interrupt_after_first)
    models = load_manifest(repo).models  # parses: never half-written
    assert list(models) == ["m0"] and models["m0"].status == "ok"
    leftovers = [p for p in repo.rglob("*") if p.name.startswith(".") and p.name != ".lock"]
    assert leftovers == []
    assert sorted(p.name for p in repo.iterdir()) == [".lock", "m0", MANIFEST]

    stale = repo / "m1" / ".tmp-deadbeef"  # what a SIGKILL mid-export would leave
    stale.mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"half")
    done = run_batch(str(ck), repo, FAST)
    assert done.ok and not stale.exists()
    assert [r.action for r in done.results] == ["unchanged", "exported", "exported"]


def test_a_second_run_on_a_locked_repository_is_refused(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    _good(ck, "a.pt")
    repo = tmp_path / "repo"
    repo.mkdir()
    with open(repo / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(ExportError, match="another lstm-export batch is writing"):
            run_batch(str(ck), repo, FAST)


def test_unreadable_manifest_is_not_overwritten(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    _good(ck, "a.pt")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / MANIFEST).write_text("{ broken")
    with pytest.raises(ExportError, match="not a readable manifest"):
        run_batch(str(ck), repo, FAST)
    assert (repo / MANIFEST).read_text() == "{ broken"


def test_summary_json_shape(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    _good(ck, "a.pt")
    summary = run_batch(str(ck), tmp_path / "repo", FAST)
    d: dict[str, Any] = json.loads(json.dumps(summary.to_dict()))
    assert d["ok"] is True and d["counts"] == {"exported": 1, "unchanged": 0, "failed": 0}
    assert d["results"][0]["name"] == "a" and d["results"][0]["version"] == 1


# A manifest as format_version 1 has always been written (key order included): an ok entry with
# int8, a failed entry that keeps its last good version, and one that never had one.
_FORMAT_V1: dict[str, Any] = {
    "format": "lstm-serve-model-repo",
    "format_version": 1,
    "models": {
        "a": {
            "name": "a",
            "status": "ok",
            "error": None,
            "source": {"path": "/abs/runs/a.pt", "sha256": "11" * 32, "size_bytes": 9990559},
            "options": {
                "int8": True,
                "perplexity": True,
                "val_fraction": None,
                "int8_tolerance": 0.02,
                "per_channel": False,
                "corpus_sha256": "22" * 32,
            },
            "exporter": {"lstm_serve": "0.1.0", "onnx": "1.23.2", "onnxruntime": None},
            "version": 2,
            "outputs": {
                "fp32": {"path": "a/2/model.onnx", "sha256": "33" * 32, "size_bytes": 3327462},
                "int8": {"path": "a/2/model.int8.onnx", "sha256": "44" * 32, "size_bytes": 8682},
            },
            "model": {"cell": "torch", "num_layers": 2, "parameters": 831388},
            "training": {"epoch": 9, "best_val_ppl": 4.085, "corpus_sha256": None},
            "parity": {"passed": True, "tolerance": 0.0001, "T": [1, 7], "failures": []},
            "perplexity": {"fp32": {"perplexity": 4.0648}, "int8_vs_fp32": None},
            "int8": {"size_bytes": 8682, "ops": ["DynamicQuantizeLSTM"], "speed": None},
            "exported_at": "2026-11-25T03:02:11+00:00",
            "seconds": 22.5,
        },
        "b": {
            "name": "b",
            "status": "failed",
            "error": "not a PyTorch checkpoint (no zip archive: truncated, corrupt or a different "
            "kind of file)",
            "source": {"path": "/abs/runs/b.pt", "sha256": "55" * 32, "size_bytes": 100},
            "options": {"int8": False, "perplexity": False, "val_fraction": 0.2},
            "exporter": {"lstm_serve": "0.1.0"},
            "version": None,
            "outputs": {},
            "attempted_at": "2026-11-25T03:05:00+00:00",
            "previous": {
                "version": 1,
                "outputs": {
                    "fp32": {"path": "b/1/model.onnx", "sha256": "66" * 32, "size_bytes": 1234}
                },
                "source": {"path": "/abs/runs/b.pt", "sha256": "77" * 32, "size_bytes": 999},
                "exported_at": "2026-11-24T01:00:00+00:00",
            },
        },
        "c": {
            "name": "c",
            "status": "failed",
            "error": "cannot read checkpoint: Permission denied",
            "source": {"path": "/abs/runs/c.pt", "sha256": None, "size_bytes": None},
            "options": {},
            "exporter": {},
            "version": None,
            "outputs": {},
            "attempted_at": "2026-11-25T03:05:01+00:00",
            "previous": None,
        },
    },
    "updated_at": "2026-11-25T03:10:00+00:00",
}


def test_manifest_format_v1_loads_typed_and_saves_byte_for_byte(tmp_path: Path) -> None:
    text = json.dumps(_FORMAT_V1, indent=2) + "\n"
    (tmp_path / MANIFEST).write_text(text)
    manifest = load_manifest(tmp_path)
    a, b, c = (manifest.models[n] for n in "abc")
    assert a.status == "ok" and a.version == 2 and a.outputs["int8"].size_bytes == 8682
    assert a.source.sha256 == "11" * 32 and a.seconds == 22.5
    assert b.previous is not None and b.previous.outputs["fp32"].path == "b/1/model.onnx"
    assert c.previous is None and c.source.sha256 is None
    assert json.dumps(manifest.to_dict(), indent=2) + "\n" == text
    # A failure after a failure keeps the last good version; after a success, that success.
    assert ManifestEntry.failed("b", b.source, {}, {}, "again", b).previous == b.previous
    prev = ManifestEntry.failed("a", a.source, {}, {}, "broken", a).previous
    assert prev is not None and (prev.version, prev.outputs) == (2, a.outputs)
    assert prev.exported_at == a.exported_at


@pytest.mark.parametrize(
    ("models", "needle"),
    [
        ({"a": "not an object"}, "expected an object"),
        ({"a": {"name": "a"}}, "missing status"),
        ({"a": {**_FORMAT_V1["models"]["a"], "status": "maybe"}}, "unknown status 'maybe'"),
        ({"a": {**_FORMAT_V1["models"]["a"], "version": None}}, "needs an integer version"),
        ({"a": {**_FORMAT_V1["models"]["b"], "previous": {"version": 1}}}, "missing outputs"),
    ],
)
def test_malformed_manifest_entry_is_refused_and_left_alone(
    tmp_path: Path, models: dict[str, Any], needle: str
) -> None:
    ck = tmp_path / "ck"
    _good(ck, "a.pt")
    repo = tmp_path / "repo"
    repo.mkdir()
    text = json.dumps(dict(_FORMAT_V1, models=models))
    (repo / MANIFEST).write_text(text)
    with pytest.raises(ExportError, match=f"entry 'a' is not a manifest entry .*{needle}"):
        run_batch(str(ck), repo, FAST)
    assert (repo / MANIFEST).read_text() == text
