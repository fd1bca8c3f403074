"""Training settings and their checks: torch-free, so the CLI can refuse bad input fast."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from contract.text import DEFAULT_PREPROCESS

if TYPE_CHECKING:
    from .model import ModelConfig

SAMPLERS = ("sequential", "random")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
DEVICES = ("cpu", "cuda", "auto")


class TrainError(ValueError):
    """A run cannot start or cannot go on (bad settings, divergence); one-line message."""


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run; stored in the checkpoint as ``train_config`` (JSON-able)."""

    corpus: str | None = None  # None: $LSTM_SERVE_CORPUS, else the cached/downloaded book
    out_dir: str = "runs/default"
    cell: str = "scratch"
    hidden_size: int = 256
    num_layers: int = 1
    input_mode: str = "onehot"
    embedding_dim: int = 32
    dropout: float = 0.0  # training-time only; see training.model.ModelConfig
    epochs: int = 500
    batch_size: int = 32
    num_steps: int = 35
    lr: float = 1.0
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    schedule: str = "constant"
    min_lr_ratio: float = 0.05  # cosine schedule ends at lr * min_lr_ratio
    clip: float = 1.0  # gradient-norm clipping theta; 0 disables
    sampler: str = "sequential"
    max_tokens: int | None = None  # first N training tokens only (the book uses 10,000)
    val_fraction: float = 0.1
    preprocess: str = DEFAULT_PREPROCESS
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    eval_every: int = 1  # epochs between held-out evaluations (and best-checkpoint checks)
    sample_every: int = 10  # epochs between samples (the book prints every 10)
    sample_prefix: str = "time traveller"
    sample_chars: int = 50
    save_every: int = 1  # epochs between writes of last.pt
    max_minutes: float | None = None  # stop after the epoch that crosses this wall time
    progress: bool | None = None  # None: a bar only on an interactive terminal outside CI
    notes: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raise :class:`TrainError` for settings that make no sense."""
        positive = {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "embedding_dim": self.embedding_dim,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "num_steps": self.num_steps,
            "eval_every": self.eval_every,
            "sample_every": self.sample_every,
            "save_every": self.save_every,
        }
        for name, v in positive.items():
            if v < 1:
                raise TrainError(f"{name} must be >= 1, got {v}")
        if self.threads is not None and self.threads < 1:
            raise TrainError(f"threads must be >= 1, got {self.threads}")
        if self.sample_chars < 0:
            raise TrainError(f"sample_chars must be >= 0, got {self.sample_chars}")
        numbers = (("lr", self.lr), ("clip", self.clip), ("weight_decay", self.weight_decay))
        for name, x in numbers:
            if not math.isfinite(x) or x < 0 or (name == "lr" and x == 0):
                bound = "> 0" if name == "lr" else ">= 0"
                raise TrainError(f"{name} must be a finite number {bound}, got {x}")
        if not 0.0 <= self.dropout < 1.0:
            raise TrainError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise TrainError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise TrainError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise TrainError(f"max_tokens must be >= 2, got {self.max_tokens}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise TrainError(f"max_minutes must be > 0, got {self.max_minutes}")
        choices = (
            ("cell", self.cell, ("scratch", "torch")),
            ("input_mode", self.input_mode, ("onehot", "embedding")),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("schedule", self.schedule, SCHEDULES),
            ("sampler", self.sampler, SAMPLERS),
            ("device", self.device, DEVICES),
        )
        for name, choice, allowed in choices:
            if choice not in allowed:
                raise TrainError(f"{name} must be one of {list(allowed)}, got {choice!r}")

    def model_config(self, vocab_size: int) -> ModelConfig:
        from .model import ModelConfig

        return ModelConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            cell=self.cell,  # type: ignore[arg-type]
            input_mode=self.input_mode,  # type: ignore[arg-type]
            embedding_dim=self.embedding_dim,
            dropout=self.dropout,
        )


@dataclass(frozen=True)
class ForecastConfig:
    """Every setting of a forecaster run (``lstm-train forecast``); stored in its checkpoint.

    The defaults are the bundled sunspots model's recipe (training/README.md).
    """

    dataset: str = "sunspots"
    out_dir: str = "runs/sunspots"
    cell: str = "scratch"
    hidden_size: int = 32
    num_layers: int = 1
    dropout: float = 0.2  # training-time only, before the head (chosen on validation MSE)
    epochs: int = 60
    batch_size: int = 16
    num_steps: int = 48  # window length of a training example; evaluation reads the whole series
    lr: float = 0.01
    weight_decay: float = 0.0
    clip: float = 1.0  # gradient-norm clipping; 0 disables
    test_fraction: float = 0.2  # held-out tail, only reported
    val_fraction: float = 0.1  # tail of the rest, picks the best epoch
    seed: int = 0
    threads: int | None = None
    eval_every: int = 1
    progress: bool | None = None  # None: a bar only on an interactive terminal outside CI

    def check(self) -> None:
        """Raise :class:`TrainError` for settings that make no sense."""
        for name in ("hidden_size", "num_layers", "epochs", "batch_size", "num_steps"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 1:
            raise TrainError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.threads is not None and self.threads < 1:
            raise TrainError(f"threads must be >= 1, got {self.threads}")
        for name, x in (("lr", self.lr), ("clip", self.clip), ("weight_decay", self.weight_decay)):
            if not math.isfinite(x) or x < 0 or (name == "lr" and x == 0):
                bound = "> 0" if name == "lr" else ">= 0"
                raise TrainError(f"{name} must be a finite number {bound}, got {x}")
        if not 0.0 <= self.dropout < 1.0:
            raise TrainError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.test_fraction < 1.0:
            raise TrainError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise TrainError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.cell not in ("scratch", "torch"):
            raise TrainError(f"cell must be one of ['scratch', 'torch'], got {self.cell!r}")
