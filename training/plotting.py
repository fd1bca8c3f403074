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
