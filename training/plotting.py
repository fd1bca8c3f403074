"""The perplexity curves a run leaves beside its checkpoint (``perplexity.png``).

matplotlib is imported inside the function, with the Agg backend, so importing the training
package costs nothing and a run on a machine without a display still writes its plot.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from contract.files import atomic_path


def plot_perplexity(metrics: dict[str, Any], path: Path, title: str = "") -> None:
    """Train and held-out perplexity per epoch, log scale, as a small PNG written atomically.

    ``metrics`` holds equal-length lists under ``"epoch"``, ``"train_ppl"`` and ``"val_ppl"``
    (a :class:`training.metrics_log.MetricsLog`'s columns); ``None`` or non-finite held-out
    entries are epochs without an evaluation and leave gaps. The held-out curve is drawn only
    when at least one epoch has a figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = metrics["epoch"]
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=90)
    ax.plot(epochs, metrics["train_ppl"], label="train")
    val = [v if v is not None and math.isfinite(v) else math.nan for v in metrics["val_ppl"]]
    if any(math.isfinite(v) for v in val):
        ax.plot(epochs, val, label="held-out")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)


def plot_forecast(
    *,
    times: Any,
    truth: Any,
    predictions: dict[str, Any],
    losses: dict[str, Any],
    heldout: dict[str, Any],
    path: Path,
    title: str = "",
    labels: dict[str, str] | None = None,
) -> None:
    """Held-out one-step forecasts against the truth (left) and the MSE curves (right).

    ``predictions`` maps a label to values aligned with ``times``; ``heldout`` maps the same
    models (lower-case keys: ``lstm``, ``last_value``, ...) to ``{"mae", "rmse"}`` for the legend;
    ``labels`` renames keys in the legend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(
        1, 2, figsize=(10, 3.6), dpi=90, gridspec_kw={"width_ratios": [2.2, 1]}
    )
    ax.plot(times, truth, color="black", lw=2, label="truth")
    styles = {"LSTM": {"lw": 1.8, "color": "tab:red"}}
    for label, values in predictions.items():
        key = "lstm" if label == "LSTM" else label
        err = heldout.get(key) or {}
        figs = f" (MAE {err['mae']:.1f})" if err.get("mae") is not None else ""
        style = styles.get(label, {"lw": 1.0, "ls": "--", "alpha": 0.8})
        name = (labels or {}).get(label, label.replace("_", " "))
        ax.plot(times, values, label=f"{name}{figs}", **style)  # type: ignore[arg-type]
    ax.set_xlabel("time")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    bx.plot(losses["epoch"], losses["train_mse"], label="train (windows)")
    val = [v if v is not None and math.isfinite(v) else math.nan for v in losses["val_mse"]]
    if any(math.isfinite(v) for v in val):
        bx.plot(losses["epoch"], val, label="validation")
    bx.set_yscale("log")
    bx.set_xlabel("epoch")
    bx.set_ylabel("MSE (standardised)")
    bx.grid(True, which="both", alpha=0.3)
    bx.legend(fontsize=7)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
