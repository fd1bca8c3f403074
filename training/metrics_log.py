"""A run's per-epoch record: what ``metrics.json`` holds and what each checkpoint carries.

The record is columns, one list per figure, where entry ``i`` belongs to the run's ``i``-th
epoch (a resumed run continues the checkpoint's lists, so they cover the whole history), plus
the generated samples and the best epoch so far. ``metrics.json`` is rewritten atomically after
every epoch, so a run that is killed still leaves a complete, readable file. Torch-free.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.files import write_atomic

# The per-epoch columns, in the order metrics.json lists them for each epoch.
EPOCH_KEYS = ("epoch", "train_ppl", "val_ppl", "tokens_per_s", "epoch_s", "wall_s", "lr")


def _empty_columns() -> dict[str, list[Any]]:
    return {k: [] for k in (*EPOCH_KEYS, "samples")}


@dataclass
class MetricsLog:
    """The columns of one run, its samples and its best epoch.

    ``run`` describes what is being trained (settings, model, corpus, machine); it is fixed for
    the run and heads every ``metrics.json``. ``best_val`` is the best score so far (held-out
    perplexity, or training perplexity when there is no held-out text) and ``best_epoch`` the
    1-based epoch that reached it; the caller decides what counts as better.
    """

    run: dict[str, Any]
    columns: dict[str, list[Any]] = field(default_factory=_empty_columns)
    best_val: float = math.inf
    best_epoch: int = 0

    @classmethod
    def resumed(
        cls, run: dict[str, Any], metrics: dict[str, Any] | None, *, epoch: int, best_val: float
    ) -> MetricsLog:
        """Continue a checkpoint's record (its ``metrics``, ``epoch`` and best score).

        Columns that are missing or not lists start empty; a record without ``best_epoch``
        (older checkpoints) takes the checkpoint's epoch.
        """
        log = cls(run, best_val=best_val)
        old = metrics or {}
        for k in log.columns:
            if isinstance(old.get(k), list):
                log.columns[k] = list(old[k])
        log.best_epoch = int(old.get("best_epoch", epoch))
        return log

    def __len__(self) -> int:
        """The number of epochs recorded (resumed ones included)."""
        return len(self.columns["epoch"])

    def last(self, key: str, default: Any) -> Any:
        """The latest epoch's ``key``, or ``default`` when no epoch is recorded."""
        col = self.columns[key]
        return col[-1] if col else default

    def append(
        self,
        *,
        epoch: int,
        train_ppl: float,
        val_ppl: float,
        tokens_per_s: float,
        epoch_s: float,
        wall_s: float,
        lr: float,
    ) -> None:
        """Record one epoch; a non-finite ``val_ppl`` (not evaluated) is stored as ``None``."""
        row = {
            "epoch": epoch,
            "train_ppl": train_ppl,
            "val_ppl": finite_or_none(val_ppl),
            "tokens_per_s": tokens_per_s,
            "epoch_s": epoch_s,
            "wall_s": wall_s,
            "lr": lr,
        }
        for k in EPOCH_KEYS:
            self.columns[k].append(row[k])

    def add_sample(self, epoch: int, text: str) -> None:
        self.columns["samples"].append({"epoch": epoch, "text": text})

    def median_tokens_per_s(self) -> float:
        """Median training tokens/s over the recorded epochs (the upper middle for an even
        count); 0.0 when there are none."""
        s = sorted(self.columns["tokens_per_s"])
        return s[len(s) // 2] if s else 0.0

    def for_checkpoint(self) -> dict[str, Any]:
        """The record as a checkpoint stores it: the columns plus ``best_epoch``."""
        return {**self.columns, "best_epoch": self.best_epoch}

    def summary(self, stopped: str) -> dict[str, Any]:
        """What ``metrics.json`` holds: ``run``, the best epoch, why the run stopped
        (``"running"`` while it goes on), one object per epoch, and the samples."""
        return {
            **self.run,
            "best": {"epoch": self.best_epoch, "val_ppl": finite_or_none(self.best_val)},
            "stopped": stopped,
            "epochs": [{k: self.columns[k][i] for k in EPOCH_KEYS} for i in range(len(self))],
            "samples": self.columns["samples"],
        }

    def write(self, path: Path, stopped: str) -> dict[str, Any]:
        """Replace ``path`` atomically with :meth:`summary`; returns what was written."""
        summary = self.summary(stopped)
        write_atomic(path, json.dumps(summary, indent=1) + "\n")
        return summary


def finite_or_none(x: float) -> float | None:
    """``x``, or ``None`` for inf/nan: JSON has no non-finite numbers."""
    return x if math.isfinite(x) else None


def jsonable(obj: Any) -> Any:
    """Replace non-finite floats (JSON has none) so the config stays portable."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
