"""Held-out perplexity of an exported model, computed with ONNX Runtime through the contract.

The text goes through exactly what the server does: the model's own metadata
(:class:`contract.model.ModelSpec`) normalises and encodes it, and the model runs with
explicit state. Torch-free, so the same figure can be computed wherever ORT runs.

The held-out text and the geometry are the contract's (:mod:`contract.text`), the same as
training's evaluation, so the two perplexities are comparable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from contract.model import (
    INPUT_C0,
    INPUT_FEATURES,
    INPUT_H0,
    INPUT_TOKENS,
    OUTPUT_CN,
    OUTPUT_HN,
    OUTPUT_LOGITS,
    OUTPUT_OUTPUTS,
    ModelSpec,
    SequenceSpec,
)
from contract.text import EVAL_BATCH, EVAL_STEPS, CorpusError, eval_rows

from .common import ExportError


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    tokens: int  # predicted tokens the figure averages over
    batch_size: int
    num_steps: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "perplexity": round(self.perplexity, 6),
            "tokens": self.tokens,
            "batch_size": self.batch_size,
            "num_steps": self.num_steps,
            "seconds": round(self.seconds, 3),
        }


def perplexity(
    session: Any,
    spec: ModelSpec,
    text: str,
    *,
    batch_size: int = EVAL_BATCH,
    num_steps: int = EVAL_STEPS,
    normalize: bool = False,
) -> Perplexity:
    """exp(mean next-token cross-entropy) of ``text`` under the model in ``session``.

    The token stream is cut into ``batch_size`` contiguous rows (:func:`contract.text.eval_rows`,
    the book's sequential partitioning) and read ``num_steps`` at a time with the state carried
    across windows, so every prediction has the full history of its row. Raises
    :class:`ExportError` when the text is too short for one token per row.
    """
    ids = np.asarray(spec.encode(text, normalize=normalize), dtype=np.int64)
    try:
        rows, per_row = eval_rows(len(ids), batch_size)
    except CorpusError as e:
        raise ExportError(f"validation {e}") from None
    X = ids[: rows * per_row].reshape(rows, per_row).T.copy()  # [time, rows]
    Y = ids[1 : rows * per_row + 1].reshape(rows, per_row).T
    L, H = spec.num_layers, spec.hidden_size
    h = np.zeros((L, rows, H), np.float32)
    c = np.zeros((L, rows, H), np.float32)
    nll = 0.0
    start = time.perf_counter()
    for t in range(0, per_row, num_steps):
        x = np.ascontiguousarray(X[t : t + num_steps])
        logits, h, c = session.run(
            [OUTPUT_LOGITS, OUTPUT_HN, OUTPUT_CN], {INPUT_TOKENS: x, INPUT_H0: h, INPUT_C0: c}
        )
        z = logits.astype(np.float64)
        z -= z.max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        y = Y[t : t + num_steps]
        nll -= float(np.take_along_axis(logp, y[..., None], axis=-1).sum())
    n = rows * per_row
    return Perplexity(
        perplexity=float(np.exp(nll / n)),
        tokens=n,
        batch_size=rows,
        num_steps=num_steps,
        seconds=time.perf_counter() - start,
    )


def forecast_errors(session: Any, spec: SequenceSpec, data: Any) -> dict[str, Any]:
    """One-step-ahead MAE and RMSE of a ``sequence`` model, in the data's units, per part.

    ``data`` is a ``training.series.SeriesData`` (duck-typed: this module stays torch-free).
    The raw series goes through the contract as a client would send it: scaled with the
    model's own metadata (:meth:`SequenceSpec.scale_features`), read in one call from a zero
    state, and the outputs unscaled with the metadata too. Returns ``{"val": {...}, "test":
    {...}, "predictions_scaled": [...]}`` (the last for drift figures; callers drop it).
    """
    raw = np.asarray(data.series.values[:-1], dtype=np.float64)
    x = spec.scale_features(raw)[:, None, :]
    L, H = spec.num_layers, spec.hidden_size
    zero = np.zeros((L, 1, H), np.float32)
    start = time.perf_counter()
    (out,) = session.run([OUTPUT_OUTPUTS], {INPUT_FEATURES: x, INPUT_H0: zero, INPUT_C0: zero})
    seconds = time.perf_counter() - start
    pred = spec.unscale_outputs(out[:, 0, :])
    truth = data.raw_targets()
    result: dict[str, Any] = {"method": "ORT, contract scaling, one call from a zero state"}
    for part in ("val", "test"):
        sl = data.part(part)
        d = pred[sl] - truth[sl]
        result[part] = {
            "mae": float(np.mean(np.abs(d))) if d.size else None,
            "rmse": float(np.sqrt(np.mean(d * d))) if d.size else None,
            "points": len(d),
        }
    result["seconds"] = round(seconds, 4)
    result["predictions_scaled"] = out[:, 0, :]
    return result
