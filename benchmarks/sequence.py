"""Section 16: the sequence model (numeric features in, numbers out; issue 21).

* **Held-out error.** The bundled forecaster (``server/model_repo/sunspots/1``) on the held-out
  part of its series, one step ahead, through the contract as a client sends it (features
  scaled with the model's own metadata, outputs unscaled), next to the naive baselines (last
  value, seasonal naive) and a linear autoregression, all computed here in the same run from
  the series statsmodels ships (:mod:`training.series`).
* **Throughput.** StepStream with one feature row per message at 1 and 16 streams through the
  server, each divided by the same model called in process by ONNX Runtime at the same batch
  (B = 1 and B = 16 rows per call, the state fed back), the ratios the token model reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import inprocess
from . import server_bench as sb
from .common import ROOT, SectionSkipped, percentiles_ms, ratio

MODEL_DIR = ROOT / "server" / "model_repo" / "sunspots" / "1"
STREAMS = (1, 16)


def heldout(sess: Any, spec: Any) -> dict[str, Any]:
    """MAE/RMSE on the held-out part: the model (ORT session ``sess``, its
    :class:`~contract.model.SequenceSpec` ``spec``) and every baseline."""
    from export.evaluate import forecast_errors
    from training.config import ForecastConfig
    from training.series import baseline_predictions, errors, load_dataset, prepare

    dataset = spec.config.get("data", {}).get("dataset", "sunspots")
    cfg = ForecastConfig()
    data = prepare(
        load_dataset(dataset), test_fraction=cfg.test_fraction, val_fraction=cfg.val_fraction
    )
    # The same split as at training, or the comparison would be on other years: the scaling
    # fitted on the fitting part must be the one the model records.
    if not np.allclose(data.scaling.feature_mean, spec.scaling.feature_mean, rtol=1e-9):
        raise SectionSkipped("the model's scaling does not match the default split's")
    model = forecast_errors(sess, spec, data)
    sl = data.part("test")
    truth = data.raw_targets()[sl]
    rows: dict[str, Any] = {"lstm": model["test"]}
    for name, pred in baseline_predictions(data).items():
        rows[name] = {**errors(pred[sl], truth), "points": len(truth)}
    return {
        "dataset": dataset,
        "test_points": len(truth),
        "rows": rows,
        "lstm_vs_seasonal_naive_mae": ratio(rows["lstm"]["mae"], rows["seasonal_naive"]["mae"]),
        "lstm_vs_last_value_mae": ratio(rows["lstm"]["mae"], rows["last_value"]["mae"]),
    }


def inprocess_steps(
    sess: Any, spec: Any, batches: tuple[int, ...], seconds: float
) -> list[dict[str, Any]]:
    """ONNX Runtime called directly (``sess``, configured like the server's), T=1 and B rows
    of features per call, state chained."""
    rng = np.random.default_rng(0)
    rows = []
    for B in batches:
        x = rng.standard_normal((1, B, spec.num_features)).astype(np.float32)
        h = np.zeros((spec.num_layers, B, spec.hidden_size), np.float32)
        c = np.zeros_like(h)
        state = [h, c]

        def step(x: np.ndarray = x, state: list[np.ndarray] = state) -> None:
            _, state[0], state[1] = sess.run(None, {"features": x, "h0": state[0], "c0": state[1]})

        samples = inprocess.time_loop(step, seconds, 200, 20)
        per_call = float(np.median(samples)) / 1e9
        rows.append(
            {"batch": B, "steps_per_s": B / per_call, **percentiles_ms(samples)}  # type: ignore[dict-item]
        )
    return rows


def run(
    *,
    threads: int,
    seconds: float,
    duration: float,
    warmup: float,
    lead: float,
    model_path: Path = MODEL_DIR / "model.onnx",
) -> dict[str, Any]:
    if not model_path.is_file():
        raise SectionSkipped(f"no bundled sequence model at {model_path.relative_to(ROOT)}")
    from contract.model import validate

    # One session, with the server's options, for the held-out error and the in-process steps.
    sess = inprocess.ort_session(str(model_path), threads)
    spec = validate(sess, kind="sequence")
    out: dict[str, Any] = {
        "model": str(model_path.relative_to(ROOT)),
        "num_features": spec.num_features,
        "num_outputs": spec.num_outputs,
        "heldout": heldout(sess, spec),
    }
    base = {r["batch"]: r for r in inprocess_steps(sess, spec, STREAMS, seconds)}
    out["inprocess"] = list(base.values())
    served = []
    repo = str(model_path.parents[1].parent)
    with sb.running_server("", extra=["--model-repository", repo]) as srv:
        for c in STREAMS:
            spec_load = sb.LoadSpec(
                "stream-features",
                c,
                duration,
                warmup,
                lead=lead,
                model=model_path.parents[1].name,
                features=spec.num_features,
            )
            row = sb.drive(srv, spec_load, vocab=0)  # a sequence model has none
            row["vs_inprocess"] = ratio(row["steps_per_s"], base[c]["steps_per_s"])
            served.append(row)
    out["stream"] = served
    for row in served:
        out[f"stream{row['concurrency']}_vs_inprocess"] = row["vs_inprocess"]
    return out
