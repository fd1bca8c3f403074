"""Training the forecaster: the same LSTM cells on a real time series, one step ahead.

:func:`train_forecaster` fits a :class:`training.model.SequenceLSTM` with mean squared error
on standardised values (:mod:`training.series` says how the series is framed, split and
scaled). A training example is a window of ``num_steps`` consecutive steps starting from a zero
state, at a random offset; an epoch covers every offset of the fitting part once, in batches.
After each evaluated epoch the model reads the *whole* series from its start with the state
carried (what a served session does), and the epoch with the lowest validation MSE is kept as
``checkpoint.pt``. The held-out part is only measured at the end, with that checkpoint, next to
the naive baselines (:func:`training.series.baseline_predictions`), in the data's units.

Outputs in ``out_dir``: ``checkpoint.pt`` (best validation epoch), ``last.pt`` (the last
epoch), ``metrics.json`` (per-epoch losses, the held-out table, the setup) and
``forecast.png`` (held-out forecasts against the truth, and the loss curves).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from contract.files import write_atomic

from .checkpoint import SequenceCheckpoint, save
from .config import ForecastConfig, TrainError
from .metrics_log import jsonable
from .model import SequenceConfig, SequenceLSTM
from .series import SeriesData, baseline_predictions, errors, load_dataset, prepare

BASELINES = ("last_value", "seasonal_naive", "ar")


@torch.no_grad()
def predict(model: SequenceLSTM, data: SeriesData) -> np.ndarray:
    """Standardised one-step predictions ``[N - 1, O]``: the whole series read once from a zero
    state (batch 1), row ``t`` predicting time ``t + 1``."""
    was_training = model.training
    model.eval()
    x = torch.from_numpy(data.inputs())[:, None, :]
    out, _ = model(x)
    model.train(was_training)
    return out[:, 0, :].double().numpy()


def _mse(pred: np.ndarray, data: SeriesData, part: str) -> float:
    sl = data.part(part)
    d = pred[sl] - data.scaled_targets()[sl]
    return float(np.mean(d * d)) if d.size else math.nan


def _windows(data: SeriesData, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training window of the fitting part: ``X [W, T, F]``, ``Y [W, T, O]``."""
    x, y = data.inputs(), data.scaled_targets()
    rows = data.part("fit").stop  # rows whose target is in the fitting part
    T = min(num_steps, rows)
    starts = range(rows - T + 1)
    X = np.stack([x[s : s + T] for s in starts])
    Y = np.stack([y[s : s + T] for s in starts])
    return torch.from_numpy(X), torch.from_numpy(Y)


def train_epoch(
    model: SequenceLSTM,
    optimizer: torch.optim.Optimizer,
    windows: tuple[torch.Tensor, torch.Tensor],
    cfg: ForecastConfig,
    epoch: int,
) -> float:
    """One pass over every window (order from ``(seed, epoch)`` only); the mean training MSE.
    Raises :class:`TrainError` when the loss is not finite."""
    X, Y = windows
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    order = torch.randperm(len(X), generator=gen)
    total, count = 0.0, 0
    for i in range(0, len(order), cfg.batch_size):
        idx = order[i : i + cfg.batch_size]
        x = X[idx].transpose(0, 1)  # time-major [T, B, F]
        y = Y[idx].transpose(0, 1)
        out, _ = model(x)
        loss = nn.functional.mse_loss(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        total += loss.item() * len(idx)
        count += len(idx)
    mean = total / count
    if not math.isfinite(mean):
        raise TrainError(f"training diverged in epoch {epoch + 1}; try a smaller --lr")
    return mean


@dataclass
class ForecastResult:
    """What :func:`train_forecaster` reports; ``metrics`` is the final ``metrics.json``."""

    out_dir: Path
    best_epoch: int
    best_val_mse: float
    heldout: dict[str, dict[str, float]]  # model name -> {"mae", "rmse"} on the held-out part
    wall_s: float
    stopped: str
    metrics: dict[str, Any]


def heldout_table(data: SeriesData, lstm_scaled: np.ndarray, part: str = "test") -> dict[str, Any]:
    """MAE and RMSE (data units) of the LSTM and every baseline on one part of the series."""
    sl = data.part(part)
    truth = data.raw_targets()[sl]
    rows = {"lstm": errors(data.unscale(lstm_scaled)[sl], truth)}
    for name, pred in baseline_predictions(data).items():
        p = pred[sl]
        rows[name] = errors(p, truth) if np.isfinite(p).all() else {"mae": None, "rmse": None}
    return rows


def train_forecaster(
    cfg: ForecastConfig,
    *,
    data: SeriesData | None = None,
    log: Callable[[str], None] | None = None,
) -> ForecastResult:
    """Train as ``cfg`` says (``data`` replaces ``cfg.dataset``, for tests); see the module
    docstring for what is written. Raises :class:`TrainError` /
    :class:`training.series.SeriesError` with one-line messages."""
    cfg.check()
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if data is None:
        data = prepare(
            load_dataset(cfg.dataset),
            test_fraction=cfg.test_fraction,
            val_fraction=cfg.val_fraction,
        )
    torch.manual_seed(cfg.seed)
    mcfg = SequenceConfig(
        num_features=len(data.feature_names),
        num_outputs=len(data.targets),
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        cell=cfg.cell,  # type: ignore[arg-type]
        dropout=cfg.dropout,
    )
    model = SequenceLSTM(mcfg).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    windows = _windows(data, cfg.num_steps)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = sum(p.numel() for p in model.parameters())
    has_val = data.train_end > data.fit_end
    say(
        f"lstm-train forecast: {mcfg.cell} cell, {mcfg.num_layers}x{mcfg.hidden_size}, "
        f"{params:,} parameters, F={mcfg.num_features} O={mcfg.num_outputs}, "
        f"{data.series.name}: {data.fit_end} fit / {data.train_end - data.fit_end} validation / "
        f"{data.n - data.train_end} held-out points, {len(windows[0])} windows of "
        f"{windows[0].shape[1]}, {torch.get_num_threads()} threads"
    )
    columns: dict[str, list[Any]] = {"epoch": [], "train_mse": [], "val_mse": [], "wall_s": []}
    best_val, best_epoch, best_state = math.inf, 0, None
    from tqdm import tqdm

    from .train import _show_progress

    bar = tqdm(total=cfg.epochs, unit="epoch", disable=not _show_progress(cfg), dynamic_ncols=True)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    stopped = "completed"
    done = 0

    def checkpoint(epoch: int, state: dict[str, torch.Tensor]) -> SequenceCheckpoint:
        return SequenceCheckpoint(
            model_config=mcfg,
            series=data.to_record(),
            state_dict={k: v.detach().clone() for k, v in state.items()},
            train_config=jsonable(asdict(cfg)),
            optimizer=optimizer.state_dict(),
            epoch=epoch,
            best_val_loss=best_val,
            metrics=columns | {"best_epoch": best_epoch},
        )

    try:
        for epoch in range(cfg.epochs):
            train_mse = train_epoch(model, optimizer, windows, cfg, epoch)
            done = epoch + 1
            pred = None
            if done % cfg.eval_every == 0 or done == cfg.epochs:
                pred = predict(model, data)
            # Without a validation part the best epoch is chosen by the fitting part's MSE.
            score = math.nan if pred is None else _mse(pred, data, "val" if has_val else "fit")
            columns["epoch"].append(done)
            columns["train_mse"].append(train_mse)
            columns["val_mse"].append(score if has_val else math.nan)
            columns["wall_s"].append(time.perf_counter() - t0)
            if pred is not None and score < best_val:
                best_val, best_epoch = score, done
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                save(checkpoint(done, best_state), out / "checkpoint.pt")
            if bar.disable:
                say(
                    f"epoch {done}/{cfg.epochs} train mse {train_mse:.4f} "
                    f"val mse {score:.4f}" + (" *" if best_epoch == done else "")
                )
            else:
                bar.set_postfix_str(f"train {train_mse:.4f} val {score:.4f}")
                bar.update(1)
    except KeyboardInterrupt:
        stopped = f"interrupted during epoch {done + 1}"
        say(f"lstm-train forecast: {stopped}")
    finally:
        bar.close()
    if done:
        save(checkpoint(done, model.state_dict()), out / "last.pt")
    if best_state is None:
        raise TrainError("no epoch finished; nothing to evaluate")
    model.load_state_dict(best_state)
    pred = predict(model, data)
    metrics = _metrics(cfg, data, mcfg, params, columns, best_epoch, best_val, pred, stopped)
    write_atomic(out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    from .plotting import plot_forecast

    sl = data.part("test")
    plot_forecast(
        times=data.series.times[1:][sl],
        truth=data.raw_targets()[sl, 0],
        predictions={
            "LSTM": data.unscale(pred)[sl, 0],
            **{k: v[sl, 0] for k, v in baseline_predictions(data).items()},
        },
        losses=columns,
        heldout=metrics["heldout"]["test"],
        path=out / "forecast.png",
        labels={
            "seasonal_naive": f"seasonal naive ({data.series.period})",
            "ar": f"AR({data.series.period})",
        },
        title=f"{data.series.name}: one step ahead, held-out {data.years('test')[0]:.0f}"
        f"-{data.years('test')[1]:.0f} ({data.output_names[0]})",
    )
    return ForecastResult(
        out_dir=out,
        best_epoch=best_epoch,
        best_val_mse=best_val,
        heldout=metrics["heldout"]["test"],
        wall_s=columns["wall_s"][-1] if columns["wall_s"] else 0.0,
        stopped=stopped,
        metrics=metrics,
    )


def _metrics(
    cfg: ForecastConfig,
    data: SeriesData,
    mcfg: SequenceConfig,
    params: int,
    columns: dict[str, list[Any]],
    best_epoch: int,
    best_val: float,
    pred: np.ndarray,
    stopped: str,
) -> dict[str, Any]:
    rec = data.to_record()
    return jsonable(
        {
            "status": stopped,
            "config": asdict(cfg),
            "model_config": asdict(mcfg),
            "num_parameters": params,
            "series": {k: v for k, v in rec.items() if k not in ("times", "values")}
            | {
                "points": data.n,
                "fit_years": data.years("fit"),
                "val_years": data.years("val"),
                "test_years": data.years("test"),
            },
            "best_epoch": best_epoch,
            "best_val_mse": best_val,
            "heldout": {
                "note": "one step ahead, data units; lstm = checkpoint.pt (best validation "
                "epoch); ar = linear AR(period) fitted on the fitting part",
                "val": heldout_table(data, pred, "val"),
                "test": heldout_table(data, pred, "test"),
            },
            "epochs": columns,
            "machine": {
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "cpu_count": os.cpu_count(),
            },
        }
    )
