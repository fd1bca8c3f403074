"""Held-out perplexity of an exported model, computed with ONNX Runtime through the contract.

The text goes through exactly what the server does: the model's own metadata
(:class:`export.contract.ModelSpec`) normalises and encodes it, and the model runs with
explicit state. Torch-free, so the same figure can be computed wherever ORT runs.

Validation split (the training issue's rule): normalise the whole corpus with the model's
``preprocess`` rule, then the last ``val_fraction`` of its characters (default 10%) is the
validation text: ``text[int(len(text) * (1 - val_fraction)):]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import ExportError, one_line, sha256_bytes
from .contract import (
    INPUT_C0,
    INPUT_H0,
    INPUT_TOKENS,
    OUTPUT_CN,
    OUTPUT_HN,
    OUTPUT_LOGITS,
    ModelSpec,
    preprocess,
)

DEFAULT_VAL_FRACTION = 0.1


def read_corpus(path: str | Path) -> tuple[str, str]:
    """Return ``(text, sha256 of the raw bytes)``; raises :class:`ExportError` if unusable."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ExportError(f"cannot read corpus {path}: {e.strerror or one_line(e)}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ExportError(f"corpus {path} is not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise ExportError(f"corpus {path} is empty")
    return text, sha256_bytes(raw)


def validation_text(text: str, rule: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> str:
    """The held-out tail of the normalised corpus (see the module docstring for the rule)."""
    if not 0.0 < val_fraction < 1.0:
        raise ExportError(f"val_fraction must be in (0, 1), got {val_fraction}")
    norm = preprocess(text, rule)
    return norm[int(len(norm) * (1.0 - val_fraction)) :]


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
    batch_size: int = 32,
    num_steps: int = 35,
    normalize: bool = False,
) -> Perplexity:
    """exp(mean next-token cross-entropy) of ``text`` under the model in ``session``.

    The token stream is cut into ``batch_size`` contiguous rows (the book's sequential
    partitioning) and read ``num_steps`` at a time with the state carried across windows, so
    every prediction after the first window has the full history of its row. Raises
    :class:`ExportError` when the text is too short for one token per row.
    """
    ids = np.asarray(spec.encode(text, normalize=normalize), dtype=np.int64)
    if len(ids) < 2:
        raise ExportError(f"validation text too short for perplexity ({len(ids)} tokens)")
    rows = min(batch_size, len(ids) - 1)
    per_row = (len(ids) - 1) // rows
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
