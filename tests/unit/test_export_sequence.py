"""Export of ``sequence`` checkpoints (the forecaster), and the bundled forecaster.

Parity tolerance as for token models: max abs diff <= 1e-4 on outputs, hn and cn (float32 end
to end), at every required (T, B) plus chaining; inputs are fresh random features and states on
each run. The bundled model is checked against a float64 numpy LSTM computed from its own ONNX
initializers (independent of PyTorch and of ORT's kernels) within 1e-4.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from contract.files import sha256_file
from contract.model import SequenceSpec, validate
from contract.repository import MANIFEST
from export import exporter
from export.common import ExportError
from export.exporter import ExportOptions
from export.graph import SequenceWeights
from export.parity import CHAIN_CASES, PARITY_B, PARITY_T, cpu_session, session_forward
from export.repository import load_manifest, run_batch
from training.checkpoint import SequenceCheckpoint, save
from training.model import SequenceConfig, SequenceLSTM
from training.series import SeriesData, make_series, prepare

TOL = 1e-4
ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "server" / "model_repo" / "sunspots" / "1"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _data(n: int = 120, seed: int = 0) -> SeriesData:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    values = np.stack(
        [np.sin(t / 3) * 5 + 20, np.cos(t / 5), rng.normal(0, 1, n)], axis=1
    ) + rng.normal(0, 0.1, (n, 3))
    return prepare(make_series(values, ["a", "b", "c"], period=19), targets=[0, 1])


def _checkpoint(
    path: Path, cell: str = "scratch", num_layers: int = 1, *, scale: float = 0.3, seed: int = 0
) -> Path:
    """A sequence checkpoint with weights large enough that gates saturate differently."""
    data = _data(seed=seed)
    torch.manual_seed(seed)
    cfg = SequenceConfig(
        num_features=3,
        num_outputs=2,
        hidden_size=10,
        num_layers=num_layers,
        cell=cell,  # type: ignore[arg-type]
    )
    model = SequenceLSTM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale)
    ck = SequenceCheckpoint(cfg, data.to_record(), model.state_dict(), {"seed": seed}, epoch=2)
    save(ck, path)
    return path


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("cell", ["scratch", "torch"])
def test_sequence_export_parity_all_shapes(tmp_path: Path, cell: str, num_layers: int) -> None:
    ck = _checkpoint(tmp_path / "ck.pt", cell, num_layers, seed=num_layers)
    out = tmp_path / "model.onnx"
    report = exporter.export_checkpoint(ck, out, ExportOptions(measure_speed=False))
    par = report["parity"]
    assert par["passed"], par["failures"]
    assert par["T"] == list(PARITY_T) and par["B"] == list(PARITY_B)
    assert set(par["max_abs_diff"]) == {"outputs", "hn", "cn"}
    assert all(v is not None and v <= TOL for v in par["max_abs_diff"].values())
    assert par["chaining"]["cases"] == [list(c) for c in CHAIN_CASES]
    spec = validate(out, kind=None)
    assert isinstance(spec, SequenceSpec)
    assert (spec.num_features, spec.num_outputs, spec.num_layers) == (3, 2, num_layers)
    assert spec.feature_names == ("a", "b", "c") and spec.output_names == ("a_next", "b_next")
    assert report["kind"] == "sequence" and report["perplexity"] is None
    assert report["heldout"]["fp32"]["test"]["points"] == 120 - int(120 * 0.8)

    # Independently of the export's own check: the written file vs PyTorch, state carried
    # across two calls of uneven length.
    model = SequenceLSTM(
        SequenceConfig(
            num_features=3, num_outputs=2, hidden_size=10, num_layers=num_layers, cell=cell
        )  # type: ignore[arg-type]
    ).eval()
    model.load_state_dict(torch.load(ck, weights_only=True)["state_dict"])
    run = session_forward(cpu_session(str(out)), sequence=True)
    rng = np.random.default_rng()
    x = rng.standard_normal((13, 5, 3), np.float32)
    h0 = rng.standard_normal((num_layers, 5, 10), np.float32)
    c0 = rng.standard_normal((num_layers, 5, 10), np.float32)
    y1, h, c = run(x[:4], h0, c0)
    y2, h, c = run(x[4:], h, c)
    with torch.no_grad():
        want, (hn, cn) = model(torch.from_numpy(x), (torch.from_numpy(h0), torch.from_numpy(c0)))
    np.testing.assert_allclose(np.concatenate([y1, y2]), want.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(h, hn.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(c, cn.numpy(), atol=TOL, rtol=0)


def _swap_gates(w: SequenceWeights) -> SequenceWeights:
    H = w.hidden_size
    layers = []
    for layer in w.layers:

        def swap(a: np.ndarray) -> np.ndarray:
            blocks = [a[k * H : (k + 1) * H] for k in range(4)]
            return np.concatenate([blocks[1], blocks[0], blocks[2], blocks[3]])

        layers.append(
            replace(
                layer,
                w_ih=swap(layer.w_ih),
                w_hh=swap(layer.w_hh),
                b_ih=swap(layer.b_ih),
                b_hh=swap(layer.b_hh),
            )
        )
    return replace(w, layers=layers)


def test_a_swapped_gate_mapping_fails_parity_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ck = _checkpoint(tmp_path / "ck.pt")
    real = exporter.sequence_weights
    monkeypatch.setattr(exporter, "sequence_weights", lambda m: _swap_gates(real(m)))
    with pytest.raises(ExportError, match=r"parity FAILED .* outputs max\|diff\|"):
        exporter.export_checkpoint(ck, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_sequence_int8_export(tmp_path: Path) -> None:
    ck = _checkpoint(tmp_path / "ck.pt", "torch", scale=0.2)
    out = tmp_path / "model.onnx"
    report = exporter.export_checkpoint(
        ck, out, ExportOptions(int8=True, int8_tolerance=0.1, measure_speed=False)
    )
    q = exporter.int8_path_for(out)
    spec = validate(q, kind="sequence")
    assert spec.config["variant"] == "int8"
    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops
    assert q.stat().st_size < out.stat().st_size
    held = report["heldout"]
    cmp_ = held["int8_vs_fp32"]
    assert cmp_["metric"] == "held-out MAE" and cmp_["within_tolerance"]
    assert cmp_["fp32"] == pytest.approx(held["fp32"]["test"]["mae"], rel=1e-5)
    assert cmp_["int8"] == pytest.approx(held["int8"]["test"]["mae"], rel=1e-5)
    assert report["int8"]["drift_vs_fp32"]["max_abs_outputs_diff"] > 0
    # A tolerance no int8 model meets fails the export, and nothing is written.
    with pytest.raises(ExportError, match=r"int8 held-out MAE .*tolerance"):
        exporter.export_checkpoint(
            ck, tmp_path / "m2.onnx", ExportOptions(int8=True, int8_tolerance=1e-9)
        )
    assert not (tmp_path / "m2.onnx").exists()


def test_batch_publishes_a_sequence_model_beside_a_token_model(tmp_path: Path) -> None:
    from tests.export_support import random_model, save_checkpoint

    runs = tmp_path / "runs"
    _checkpoint(runs / "forecast" / "checkpoint.pt")
    save_checkpoint(runs / "chars" / "checkpoint.pt", random_model("torch", hidden_size=8))
    repo = tmp_path / "repo"
    summary = run_batch(str(runs), repo, ExportOptions(int8=True, int8_tolerance=0.5))
    assert summary.ok, [r.error for r in summary.results]
    manifest = load_manifest(repo)
    assert validate(repo / "chars" / "1" / "model.onnx").vocab_size > 0
    assert isinstance(validate(repo / "forecast" / "1" / "model.onnx", kind=None), SequenceSpec)
    entry = manifest.models["forecast"]
    assert entry.heldout is not None and entry.model is not None
    assert entry.model["kind"] == "sequence"
    assert manifest.models["chars"].heldout is None
    raw = json.loads((repo / MANIFEST).read_text())
    assert "heldout" in raw["models"]["forecast"] and "heldout" not in raw["models"]["chars"]
    again = run_batch(str(runs), repo, ExportOptions(int8=True, int8_tolerance=0.5))
    assert again.counts()["unchanged"] == 2


# --- the bundled forecaster -------------------------------------------------------------------


def _numpy_forward(path: Path, x: np.ndarray, h0: np.ndarray, c0: np.ndarray) -> tuple:
    """The ONNX file's computation in float64 numpy, from its initializers (ONNX's LSTM gate
    order i, o, f, c), as a reference that shares nothing with PyTorch or ORT's kernels."""
    w = {
        t.name: numpy_helper.to_array(t).astype(np.float64)
        for t in onnx.load(str(path)).graph.initializer
    }

    def sig(z: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-z))

    X = x.astype(np.float64)
    hs, cs = [], []
    k = 0
    while f"W{k}" in w:
        W, R, B = w[f"W{k}"][0], w[f"R{k}"][0], w[f"B{k}"][0]
        H = R.shape[1]
        b = B[: 4 * H] + B[4 * H :]
        h, c = h0[k].astype(np.float64), c0[k].astype(np.float64)
        ys = []
        for t in range(len(X)):
            g = X[t] @ W.T + h @ R.T + b
            i, o, f, cc = (g[:, j * H : (j + 1) * H] for j in range(4))
            c = sig(f) * c + sig(i) * np.tanh(cc)
            h = sig(o) * np.tanh(c)
            ys.append(h)
        X = np.stack(ys)
        hs.append(h)
        cs.append(c)
        k += 1
    return X @ w["out_w_t"] + w["out_b"], np.stack(hs), np.stack(cs)


def test_the_bundled_forecaster_follows_the_contract_and_computes_an_lstm() -> None:
    path = BUNDLED / "model.onnx"
    spec = validate(path, kind=None)
    assert isinstance(spec, SequenceSpec)
    assert spec.feature_names == ("sunspots",) and spec.output_names == ("sunspots_next",)
    assert spec.config["data"]["dataset"] == "sunspots"
    assert 32 <= spec.hidden_size <= 64 and path.stat().st_size < 100_000
    assert isinstance(validate(BUNDLED / "model.int8.onnx", kind="sequence"), SequenceSpec)
    report = json.loads((BUNDLED / "metrics.json").read_text())
    assert report["fp32"]["sha256"] == sha256_file(path)
    assert report["int8"]["sha256"] == sha256_file(BUNDLED / "model.int8.onnx")
    for entry in (report["checkpoint"], report["fp32"], report["int8"]):
        assert not Path(entry["path"]).is_absolute()

    run = session_forward(cpu_session(str(path)), sequence=True)
    rng = np.random.default_rng()
    L, H = spec.num_layers, spec.hidden_size
    for T, B in ((1, 1), (12, 3), (60, 8)):
        x = rng.standard_normal((T, B, 1), np.float32)
        h0 = rng.standard_normal((L, B, H), np.float32) * 0.5
        c0 = rng.standard_normal((L, B, H), np.float32) * 0.5
        got = run(x, h0, c0)
        want = _numpy_forward(path, x, h0, c0)
        for g, wv in zip(got, want, strict=True):
            np.testing.assert_allclose(g, wv, atol=TOL, rtol=0)


def test_the_bundled_forecasters_held_out_figures_reproduce() -> None:
    """The published MAE/RMSE, recomputed from the raw series through the metadata's scaling,
    and better than both naive baselines (the README's claim)."""
    from statsmodels.datasets import sunspots

    from training.series import baseline_predictions, errors, load_dataset

    raw = sunspots.load_pandas().data["SUNACTIVITY"].to_numpy()
    spec = validate(BUNDLED / "model.onnx", kind="sequence")
    sess = cpu_session(str(BUNDLED / "model.onnx"))
    zero = np.zeros((spec.num_layers, 1, spec.hidden_size), np.float32)
    (out,) = sess.run(
        ["outputs"], {"features": spec.scale_features(raw[:-1, None, None]), "h0": zero, "c0": zero}
    )
    pred = spec.unscale_outputs(out)[:, 0, 0]
    test = slice(int(len(raw) * 0.8), len(raw))
    mae = float(np.mean(np.abs(pred[test.start - 1 :] - raw[test])))
    report = json.loads((BUNDLED / "metrics.json").read_text())
    assert mae == pytest.approx(report["heldout"]["fp32"]["test"]["mae"], rel=1e-5)
    data = prepare(load_dataset("sunspots"))
    sl = data.part("test")
    base = baseline_predictions(data)
    for name in ("last_value", "seasonal_naive"):
        assert mae < errors(base[name][sl], data.raw_targets()[sl])["mae"]
