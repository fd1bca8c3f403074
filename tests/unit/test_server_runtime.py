"""Model runtime: locating models, provider honesty, IOBinding path, contract errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.graph import random_model
from server.runtime import CPU, CUDA, ModelLoadError, ModelRuntime, resolve_model


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    for version, seed in (("1", 1), ("2", 2), ("10", 3)):
        path = root / "timemachine" / version / "model.onnx"
        path.parent.mkdir(parents=True)
        onnx.save(random_model(hidden_size=8, num_layers=2, seed=seed), str(path))
    (root / "timemachine" / "notes").mkdir()
    return root


def test_resolve_model_layouts(repo: Path):
    loc = resolve_model(str(repo / "timemachine" / "2" / "model.onnx"))
    assert (loc.name, loc.version) == ("timemachine", "2")
    assert resolve_model(str(repo / "timemachine" / "2")).version == "2"
    assert resolve_model(str(repo / "timemachine")).version == "10"  # numeric, not text order
    assert resolve_model(str(repo)).version == "10"
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model(str(repo / "nope.onnx"))
    with pytest.raises(ModelLoadError, match=r"no model\.onnx"):
        resolve_model(str(repo / "timemachine" / "notes"))


def test_missing_bundled_model_is_one_clear_line(monkeypatch, tmp_path: Path):
    import server.runtime as rt

    monkeypatch.setattr(rt, "bundled_model_path", lambda: tmp_path / "absent" / "model.onnx")
    with pytest.raises(ModelLoadError, match="bundled model is missing") as e:
        resolve_model("")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("L", "H"), [(1, 8), (2, 16)])
def test_run_matches_plain_ort_and_iobinding_matches_run(tmp_path: Path, L: int, H: int):
    path = tmp_path / "m.onnx"
    onnx.save(random_model(hidden_size=H, num_layers=L, seed=4), str(path))
    rt = ModelRuntime(str(path), provider="cpu")
    bound = ModelRuntime(str(path), provider="cpu", use_iobinding=True)
    assert rt.provider == CPU and not rt.use_iobinding and bound.use_iobinding
    assert (rt.spec.num_layers, rt.spec.hidden_size, rt.spec.vocab_size) == (L, H, 28)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng()
    for T, B in ((1, 1), (3, 5), (7, 2)):
        tokens = rng.integers(0, 28, (T, B)).astype(np.int64)
        h = rng.standard_normal((L, B, H)).astype(np.float32)
        c = rng.standard_normal((L, B, H)).astype(np.float32)
        want = ref.run(None, {"tokens": tokens, "h0": h, "c0": c})
        for runtime in (rt, bound):
            got = runtime.run(tokens, h, c)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(g, w, atol=1e-6, rtol=0)


def test_auto_reports_the_provider_in_use_quietly(tmp_path: Path):
    path = tmp_path / "m.onnx"
    onnx.save(random_model(hidden_size=8), str(path))
    code = (
        "import sys; from server.runtime import ModelRuntime\n"
        f"rt = ModelRuntime({str(path)!r}, provider='auto')\n"
        "print(rt.provider); print(rt.provider_note)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    provider, note = out.stdout.splitlines()[:2]
    sess = (
        ort.InferenceSession(str(path), providers=[CUDA, CPU])
        if CUDA in (ort.get_available_providers())
        else None
    )
    cuda_works = sess is not None and sess.get_providers()[0] == CUDA
    assert provider == (CUDA if cuda_works else CPU)
    if CUDA in ort.get_available_providers() and not cuda_works:
        assert "unusable" in note
        # The probe must not spray ORT's misleading library errors on stderr.
        assert "libcu" not in out.stderr and "Failed to load" not in out.stderr, out.stderr


def test_cuda_request_fails_clearly_without_a_gpu(tmp_path: Path):
    path = tmp_path / "m.onnx"
    onnx.save(random_model(hidden_size=8), str(path))
    try:
        rt = ModelRuntime(str(path), provider="cuda")
    except ModelLoadError as e:
        assert "--provider cuda" in str(e) and "\n" not in str(e)
    else:  # a machine with a working GPU
        assert rt.provider == CUDA and rt.use_iobinding


def test_contract_violations_and_garbage_are_model_load_errors(tmp_path: Path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="cannot load"):
        ModelRuntime(str(bad), provider="cpu")
    m = random_model(hidden_size=8)
    del m.metadata_props[:]
    nometa = tmp_path / "nometa.onnx"
    onnx.save(m, str(nometa))
    with pytest.raises(ModelLoadError, match="lstm_serve"):
        ModelRuntime(str(nometa), provider="cpu")


@pytest.mark.parametrize(("L", "H", "B"), [(1, 8, 1), (2, 16, 5), (3, 8, 64)])
def test_run_into_writes_the_outputs_in_place_and_rereads_inputs_each_call(
    tmp_path: Path, L: int, H: int, B: int
):
    path = tmp_path / "m.onnx"
    onnx.save(random_model(hidden_size=H, num_layers=L, seed=B), str(path))
    rt = ModelRuntime(str(path), provider="cpu")
    V = rt.spec.vocab_size
    rng = np.random.default_rng()
    tokens = np.empty((1, B), np.int64)
    bufs = [np.empty((L, B, H), np.float32) for _ in range(4)]
    logits = np.empty((1, B, V), np.float32)
    h, c, hn, cn = bufs
    h[...] = rng.standard_normal(h.shape)
    c[...] = rng.standard_normal(c.shape)
    for step in range(5):  # ping-pong like the running batch: outputs become the next inputs
        tokens[...] = rng.integers(0, V, (1, B))
        want = rt.run(tokens.copy(), h.copy(), c.copy())
        rt.run_into(tokens, h, c, logits, hn, cn)
        for got, exp in zip((logits, hn, cn), want, strict=True):
            np.testing.assert_allclose(got, exp, atol=1e-6, err_msg=f"step {step}")
        h, hn = hn, h
        c, cn = cn, c
    assert len(rt._bindings) == 2  # one binding per buffer set, built once


def test_a_damaged_bundled_model_is_refused_by_its_export_report(tmp_path: Path):
    import shutil

    from server.runtime import bundled_model_path

    src = bundled_model_path().parent
    dst = tmp_path / "timemachine" / "1"
    shutil.copytree(src, dst)
    ModelRuntime(str(dst / "model.onnx"), provider="cpu")  # intact: loads
    data = bytearray((dst / "model.onnx").read_bytes())
    for i in range(200):  # 200 flipped bytes inside the weights
        data[len(data) // 2 + i] ^= 0xFF
    (dst / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="SHA-256 mismatch") as e:
        ModelRuntime(str(dst / "model.onnx"), provider="cpu")
    assert "metrics.json" in str(e.value)
