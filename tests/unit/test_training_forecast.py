"""The forecaster: the series (dataset, split, scaling, baselines), the sequence model on both
cells, a real short training run, its checkpoint and the ``lstm-train forecast`` command.

Tolerances: scratch vs nn.LSTM with the same weights within 1e-5 (float32); baselines exact
(float64) on series built so the answer is known.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training.checkpoint import CheckpointError, SequenceCheckpoint, load, load_any, save
from training.cli import main
from training.config import ForecastConfig
from training.forecast import predict, train_forecaster
from training.model import SequenceConfig, SequenceLSTM, load_lstm_layer_weights, lstm_layer_weights
from training.series import (
    SeriesData,
    SeriesError,
    baseline_predictions,
    errors,
    load_dataset,
    make_series,
    prepare,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def synthetic(n: int = 160, seed: int | None = None) -> SeriesData:
    """Two noisy sines of different periods (F=2); the first one is the target (O=1)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    a = np.sin(2 * np.pi * t / 12) * 10 + 50 + rng.normal(0, 0.5, n)
    b = np.cos(2 * np.pi * t / 7) * 3 + rng.normal(0, 0.5, n)
    return prepare(make_series(np.stack([a, b], 1), ["a", "b"], period=12), targets=[0])


def test_sunspots_come_from_the_statsmodels_wheel() -> None:
    s = load_dataset("sunspots")
    assert s.values.shape == (309, 1) and np.isfinite(s.values).all()
    assert (s.times[0], s.times[-1]) == (1700.0, 2008.0)
    assert s.source.startswith("statsmodels ") and len(s.sha256) == 64
    assert s.period == 11
    with pytest.raises(SeriesError, match=r"unknown dataset 'nope' \(known: \['sunspots'\]\)"):
        load_dataset("nope")


def test_split_is_in_time_order_and_scaling_uses_the_fitting_part_only() -> None:
    s = load_dataset("sunspots")
    d = prepare(s, test_fraction=0.2, val_fraction=0.1)
    assert (d.fit_end, d.train_end, d.n) == (222, 247, 309)
    assert d.years("test") == (1947.0, 2008.0) and d.years("val") == (1922.0, 1946.0)
    fit = s.values[: d.fit_end, 0]
    assert d.scaling.feature_mean[0] == pytest.approx(fit.mean())
    assert d.scaling.feature_std[0] == pytest.approx(fit.std())
    assert d.scaling.feature_mean[0] != pytest.approx(s.values[:, 0].mean())
    # Row t of the inputs predicts time t + 1; the parts do not overlap and cover every target.
    parts = [d.part(p) for p in ("fit", "val", "test")]
    assert [(p.start, p.stop) for p in parts] == [(0, 221), (221, 246), (246, 308)]
    np.testing.assert_allclose(d.unscale(d.scaled_targets()), d.raw_targets(), rtol=1e-5, atol=1e-4)
    again = SeriesData.from_record(json.loads(json.dumps(d.to_record())))
    np.testing.assert_array_equal(again.inputs(), d.inputs())
    assert again.scaling == d.scaling and again.output_names == ("sunspots_next",)
    with pytest.raises(SeriesError, match="cannot be split"):
        prepare(make_series(np.arange(4.0), ["x"]))


def test_baselines_on_series_whose_answers_are_known() -> None:
    n, period = 60, 6
    periodic = np.tile(np.arange(period, dtype=float) ** 2, n // period)
    d = prepare(make_series(periodic, ["x"], period=period), test_fraction=0.3)
    pred = baseline_predictions(d)
    sl = d.part("test")
    truth = d.raw_targets()[sl]
    assert errors(pred["seasonal_naive"][sl], truth) == {"mae": 0.0, "rmse": 0.0}
    np.testing.assert_array_equal(pred["last_value"][:, 0], periodic[:-1])
    assert np.isnan(pred["seasonal_naive"][: period - 1]).all()
    # An exact AR(2) process is recovered by the least-squares AR baseline.
    x = np.zeros(80)
    x[:2] = [1.0, 2.0]
    for t in range(2, 80):
        x[t] = 0.5 * x[t - 1] - 0.3 * x[t - 2] + 1.0
    d2 = prepare(make_series(x, ["x"], period=2), test_fraction=0.25)
    ar = baseline_predictions(d2)["ar"]
    sl2 = d2.part("test")
    np.testing.assert_allclose(ar[sl2], d2.raw_targets()[sl2], atol=1e-8)
    assert errors(np.array([1.0, 3.0]), np.array([2.0, 1.0])) == {
        "mae": 1.5,
        "rmse": math.sqrt(2.5),
    }


@pytest.mark.parametrize("num_layers", [1, 2])
def test_scratch_and_torch_cells_compute_the_same_sequence_model(num_layers: int) -> None:
    torch.manual_seed(num_layers)
    cfg = SequenceConfig(num_features=3, num_outputs=2, hidden_size=8, num_layers=num_layers)
    scratch = SequenceLSTM(cfg).eval()
    ref = SequenceLSTM(SequenceConfig(**{**cfg.__dict__, "cell": "torch"})).eval()
    load_lstm_layer_weights(ref, lstm_layer_weights(scratch))
    ref.output.load_state_dict(scratch.output.state_dict())
    for T, B in ((1, 1), (9, 4)):
        x = torch.randn(T, B, 3)
        state = (torch.randn(num_layers, B, 8), torch.randn(num_layers, B, 8))
        a, (ha, ca) = scratch(x, state)
        b, (hb, cb) = ref(x, state)
        assert a.shape == (T, B, 2)
        for u, v in ((a, b), (ha, hb), (ca, cb)):
            torch.testing.assert_close(u, v, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", ["scratch", "torch"])
def test_a_short_training_run_reduces_the_loss(tmp_path: Path, cell: str) -> None:
    data = synthetic(seed=None)
    cfg = ForecastConfig(
        out_dir=str(tmp_path), cell=cell, hidden_size=12, epochs=8, num_steps=24, batch_size=8,
        lr=0.02, dropout=0.0, progress=False,
    )  # fmt: skip
    torch.manual_seed(0)
    before = SequenceLSTM(
        SequenceConfig(num_features=2, num_outputs=1, hidden_size=12, cell=cell)  # type: ignore[arg-type]
    )
    mse0 = float(np.mean((predict(before, data) - data.scaled_targets()) ** 2))
    r = train_forecaster(cfg, data=data, log=lambda _: None)
    train = r.metrics["epochs"]["train_mse"]
    assert train[-1] < train[0] * 0.7, train
    assert r.best_val_mse < mse0 * 0.5
    assert set(r.heldout) == {"lstm", "last_value", "seasonal_naive", "ar"}
    for name in ("checkpoint.pt", "last.pt", "metrics.json", "forecast.png"):
        assert (tmp_path / name).is_file(), name
    ckpt = load_any(tmp_path / "checkpoint.pt")
    assert isinstance(ckpt, SequenceCheckpoint) and ckpt.kind == "sequence"
    assert ckpt.epoch == r.best_epoch
    # The checkpoint rebuilds the model that was measured: same held-out MAE.
    pred = predict(ckpt.build_model(), SeriesData.from_record(ckpt.series))
    sl = data.part("test")
    mae = errors(data.unscale(pred)[sl], data.raw_targets()[sl])["mae"]
    assert mae == pytest.approx(r.heldout["lstm"]["mae"], rel=1e-9)


def test_sequence_checkpoints_round_trip_and_are_refused_by_the_token_loader(
    tmp_path: Path,
) -> None:
    data = synthetic(seed=1)
    cfg = SequenceConfig(num_features=2, num_outputs=1, hidden_size=4)
    model = SequenceLSTM(cfg)
    ck = SequenceCheckpoint(cfg, data.to_record(), model.state_dict(), {"note": 1}, epoch=3)
    save(ck, tmp_path / "s.pt")
    back = load_any(tmp_path / "s.pt")
    assert isinstance(back, SequenceCheckpoint)
    assert back.model_config == cfg and back.epoch == 3 and back.train_config == {"note": 1}
    assert torch.load(tmp_path / "s.pt", weights_only=True)["kind"] == "sequence"
    with pytest.raises(CheckpointError, match=r"a 'sequence' checkpoint \(a forecaster\)"):
        load(tmp_path / "s.pt")
    raw = ck.to_dict()
    raw["kind"] = "images"
    torch.save(raw, tmp_path / "k.pt")
    with pytest.raises(CheckpointError, match=r"kind 'images' is not known"):
        load_any(tmp_path / "k.pt")
    raw["kind"] = "sequence"
    raw["series"] = {**raw["series"], "feature_names": ["only_one"]}
    torch.save(raw, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"1 features and 1 outputs but model_config has 2"):
        load_any(tmp_path / "m.pt")


def test_lstm_train_forecast_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    main(["forecast", "--epochs", "2", "--hidden", "8", "--out", str(out), "--no-progress"])
    line = capsys.readouterr().out
    assert "held-out one step ahead: lstm MAE" in line and "seasonal_naive MAE" in line
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["series"]["dataset"] == "sunspots"
    assert metrics["series"]["test_years"] == [1947.0, 2008.0]
    assert set(metrics["heldout"]["test"]) == {"lstm", "last_value", "seasonal_naive", "ar"}
    with pytest.raises(SystemExit) as info:
        main(["forecast", "--val-fraction", "1.0", "--out", str(out)])
    assert info.value.code == 1
    assert "val_fraction must be in [0, 1)" in capsys.readouterr().err
