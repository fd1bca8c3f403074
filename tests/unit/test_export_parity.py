"""Export parity: ORT runs what PyTorch runs, for both cells, at every required shape.

Tolerance: max abs diff <= 1e-4 on logits, hn and cn (float32 end to end). Inputs are fresh
random tokens and states on each run (the seed is in the failure message).
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from contract.model import validate
from export import exporter
from export.common import ExportError
from export.graph import NumpyWeights
from export.parity import (
    CHAIN_CASES,
    PARITY_B,
    PARITY_T,
    check_parity,
    cpu_session,
    session_forward,
    torch_forward,
)
from tests.export_support import CELLS, INPUT_MODES, random_model, save_checkpoint

TOL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("input_mode", INPUT_MODES)
@pytest.mark.parametrize("cell", CELLS)
def test_export_parity_all_shapes(
    tmp_path: Path, cell: str, input_mode: str, num_layers: int
) -> None:
    model = random_model(cell, input_mode, num_layers, hidden_size=20, seed=num_layers)
    ckpt = save_checkpoint(tmp_path / "ck.pt", model, epoch=3, best_val_ppl=7.5)
    out = tmp_path / "model.onnx"
    report = exporter.export_checkpoint(ckpt, out)

    par = report["parity"]
    assert par["passed"], par["failures"]
    assert par["T"] == list(PARITY_T) and par["B"] == list(PARITY_B)
    assert par["tolerance"] == TOL
    assert all(v is not None and v <= TOL for v in par["max_abs_diff"].values())
    assert par["chaining"]["cases"] == [list(c) for c in CHAIN_CASES]
    for kind in ("chain-steps", "chain-chunks"):
        assert all(
            v is not None and v <= TOL for v in par["chaining"]["max_abs_diff"][kind].values()
        )

    # Independent of the parity module: run the written file against the model here.
    onnx.checker.check_model(str(out), full_check=True)
    lstm_ops = [n.op_type for n in onnx.load(str(out)).graph.node if n.op_type == "LSTM"]
    assert len(lstm_ops) == num_layers  # native operator, one per layer, no unrolled loop
    sess = cpu_session(str(out))
    rng = np.random.default_rng()
    for T, B in ((1, 1), (13, 5)):
        tokens = rng.integers(0, 28, (T, B), dtype=np.int64)
        h0 = rng.standard_normal((num_layers, B, 20), dtype=np.float32)
        c0 = rng.standard_normal((num_layers, B, 20), dtype=np.float32)
        got = sess.run(None, {"tokens": tokens, "h0": h0, "c0": c0})
        with torch.no_grad():
            logits, (hn, cn) = model(
                torch.from_numpy(tokens), (torch.from_numpy(h0), torch.from_numpy(c0))
            )
        for g, w in zip(got, (logits, hn, cn), strict=True):
            assert g.shape == tuple(w.shape)
            np.testing.assert_allclose(g, w.numpy(), rtol=0, atol=TOL)

    spec = validate(out)
    cfg = spec.config
    assert cfg["cell"] == cell and cfg["input_mode"] == input_mode
    assert cfg["num_layers"] == num_layers and cfg["hidden_size"] == 20
    assert cfg["checkpoint_sha256"] == report["checkpoint"]["sha256"]
    assert cfg["training"]["epoch"] == 3 and cfg["training"]["best_val_ppl"] == 7.5
    assert set(cfg["versions"]) >= {"onnx", "onnxruntime", "torch", "lstm_serve"}
    assert cfg["created_at"].endswith("+00:00")
    if input_mode == "embedding":
        assert cfg["embedding_dim"] == 8


@pytest.mark.parametrize("cell", CELLS)
def test_dropout_trained_checkpoint_exports_its_inference_model(tmp_path: Path, cell: str) -> None:
    # Dropout is training-only: the graph has none, and parity must compare with eval mode.
    model = random_model(cell, "embedding", 2, 16, dropout=0.5).train()
    ckpt = save_checkpoint(tmp_path / "ck.pt", model)
    report = exporter.export_checkpoint(ckpt, tmp_path / "m.onnx")
    assert report["parity"]["passed"]
    assert not any(n.op_type == "Dropout" for n in onnx.load(str(tmp_path / "m.onnx")).graph.node)


def _swap_gates(w: NumpyWeights) -> NumpyWeights:
    """The classic export bug: gate blocks in the wrong order (here: forget <-> input)."""
    layers = []
    for layer in w.layers:
        H = layer.w_hh.shape[1]

        def swap(a: np.ndarray, H: int = H) -> np.ndarray:
            b = a.copy()
            b[:H], b[H : 2 * H] = a[H : 2 * H], a[:H]
            return b

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


def test_wrong_gate_mapping_fails_the_export_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = save_checkpoint(tmp_path / "ck.pt", random_model("scratch", "onehot", 1, 16))
    real = exporter.checkpoint_weights
    monkeypatch.setattr(exporter, "checkpoint_weights", lambda m: _swap_gates(real(m)))
    out = tmp_path / "out" / "model.onnx"
    with pytest.raises(
        ExportError, match=r"parity FAILED \(tolerance 0.0001\): shape T=1 B=1"
    ) as e:
        exporter.export_checkpoint(ckpt, out, exporter.ExportOptions(int8=True))
    # The float64 diagnosis must not excuse a real mapping error as rounding.
    assert "vs float64 there: ONNX" in str(e.value)
    assert "--tolerance decides" not in str(e.value)
    assert not out.exists()
    assert not exporter.int8_path_for(out).exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_existing_file_is_untouched_when_export_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = save_checkpoint(tmp_path / "ck.pt", random_model("torch", "onehot", 1, 16))
    out = tmp_path / "model.onnx"
    exporter.export_checkpoint(ckpt, out)
    before = out.read_bytes()
    real = exporter.checkpoint_weights
    monkeypatch.setattr(exporter, "checkpoint_weights", lambda m: _swap_gates(real(m)))
    with pytest.raises(ExportError, match="parity FAILED"):
        exporter.export_checkpoint(ckpt, out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt", "model.onnx"]


def test_non_finite_weights_fail_parity(tmp_path: Path) -> None:
    model = random_model("torch", "onehot", 1, 16)
    with torch.no_grad():
        model.output.weight[3, 2] = float("nan")
    ckpt = save_checkpoint(tmp_path / "ck.pt", model)
    with pytest.raises(ExportError, match=r"logits max\|diff\|=nan"):
        exporter.export_checkpoint(ckpt, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_chaining_check_catches_a_model_that_forgets_state(tmp_path: Path) -> None:
    model = random_model("torch", "onehot", 1, 16)
    ckpt = save_checkpoint(tmp_path / "ck.pt", model)
    art = exporter.build_artifacts(ckpt)
    fwd = session_forward(cpu_session(art.fp32))

    def forgetful(tokens: np.ndarray, h0: np.ndarray, c0: np.ndarray):  # type: ignore[no-untyped-def]
        return fwd(tokens, np.zeros_like(h0), np.zeros_like(c0))

    # Against itself on shapes it is consistent; only carrying state across calls exposes it.
    report = check_parity(
        forgetful,
        forgetful,
        num_layers=1,
        hidden_size=16,
        vocab_size=28,
        T_values=(7,),
        B_values=(3,),
    )
    assert not report.passed
    assert all(f.startswith("chain-") for f in report.failures())
    assert "chain-steps T=35 B=3" in report.summary()

    good = check_parity(
        fwd, torch_forward(model), num_layers=1, hidden_size=16, vocab_size=28, T_values=(7,)
    )
    assert good.passed, good.failures()
    assert good.to_dict()["failures"] == []
    json.dumps(good.to_dict())  # the report goes into manifests: it must be JSON


def test_failed_shapes_are_measured_against_float64(tmp_path: Path) -> None:
    model = random_model("torch", "onehot", 1, 16, scale=0.2)
    art = exporter.build_artifacts(save_checkpoint(tmp_path / "ck.pt", model))
    # Demanding 1e-12 fails on float32 rounding alone; the report then says how far ONNX and
    # PyTorch float32 each are from float64 on that input (both tiny here, neither zero).
    report = check_parity(
        session_forward(cpu_session(art.fp32)),
        torch_forward(model),
        num_layers=1,
        hidden_size=16,
        vocab_size=28,
        T_values=(35,),
        B_values=(32,),
        chain_cases=(),
        tolerance=1e-12,
        reference64=torch_forward(copy.deepcopy(model).double()),
    )
    assert not report.passed
    assert "vs float64 there: ONNX" in report.summary()
    (case,) = report.to_dict()["vs_float64_on_failures"]
    assert (case["T"], case["B"]) == (35, 32)
    for name in ("logits", "hn", "cn"):
        assert 0 < case["outputs"][name]["candidate"] < 1e-4
        assert 0 < case["outputs"][name]["reference"] < 1e-4


def test_parity_uses_fresh_inputs_each_run() -> None:
    model = random_model("torch", "onehot", 1, 16)
    ref = torch_forward(model)
    kw = {"num_layers": 1, "hidden_size": 16, "vocab_size": 28, "T_values": (1,), "B_values": (1,)}
    a = check_parity(ref, ref, **kw)  # type: ignore[arg-type]
    b = check_parity(ref, ref, **kw)  # type: ignore[arg-type]
    assert a.seed != b.seed
    assert a.passed and a.max_abs()["logits"] == 0.0
