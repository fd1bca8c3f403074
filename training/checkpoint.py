"""Self-describing checkpoints (after nanoGPT): everything needed to rebuild, resume and export.

Layout of the dict saved with ``torch.save``::

    format          "lstm-serve-checkpoint"
    format_version  1
    model_config    dict(ModelConfig)
    train_config    dict of the training run's settings (free-form, JSON-able)
    vocab           list[str], index = token id
    unk_id          int
    preprocess      name of the text rule in contract.text.PREPROCESS_RULES
    state_dict      the model's state dict
    optimizer       the optimizer's state dict (or None)
    epoch           epochs completed
    best_val_ppl    best held-out perplexity so far (float, inf if none)
    metrics         dict of per-epoch lists (train_ppl, val_ppl, tokens_per_s, ...)
    corpus_sha256   SHA-256 of the raw corpus bytes
    kind            "token_lm" (a checkpoint without it is one)

A ``sequence`` checkpoint (:class:`SequenceCheckpoint`, ``kind`` "sequence": a forecaster) has
the same frame (``format``, ``format_version``, ``model_config`` (a ``SequenceConfig``),
``train_config``, ``state_dict``, ``optimizer``, ``epoch``, ``metrics``) and, instead of the
vocabulary and corpus keys::

    series          the data, self-contained: dataset name and source, SHA-256 of the source
                    file, times and raw values, feature and output names, horizon, period,
                    the split, and the scaling fitted on the training part
    best_val_loss   best validation MSE (standardised units) so far

Loading uses ``weights_only=True``: a checkpoint is data, never code. :func:`load` reads token
checkpoints (and refuses a sequence one by name); :func:`load_any` reads either.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from contract.files import open_atomic
from contract.model import KIND_SEQUENCE, KIND_TOKEN_LM

from .model import CharLSTM, ModelConfig, SequenceConfig, SequenceLSTM

FORMAT = "lstm-serve-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """Unreadable, truncated, foreign or incompatible checkpoint; the message says which."""


@dataclass
class Checkpoint:
    model_config: ModelConfig
    vocab: list[str]
    unk_id: int
    preprocess: str
    state_dict: dict[str, torch.Tensor]
    train_config: dict[str, Any]
    optimizer: dict[str, Any] | None = None
    epoch: int = 0
    best_val_ppl: float = float("inf")
    metrics: dict[str, Any] | None = None
    corpus_sha256: str = ""

    def build_model(self) -> CharLSTM:
        model = CharLSTM(self.model_config)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as e:
            raise CheckpointError(f"state_dict does not fit the model config: {e}") from None
        return model

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_config": asdict(self.model_config),
            "train_config": self.train_config,
            "vocab": list(self.vocab),
            "unk_id": self.unk_id,
            "preprocess": self.preprocess,
            "state_dict": self.state_dict,
            "optimizer": self.optimizer,
            "epoch": self.epoch,
            "best_val_ppl": self.best_val_ppl,
            "metrics": self.metrics or {},
            "corpus_sha256": self.corpus_sha256,
            "kind": KIND_TOKEN_LM,
        }

    @property
    def kind(self) -> str:
        return KIND_TOKEN_LM


@dataclass
class SequenceCheckpoint:
    """A sequence model's checkpoint (``kind`` "sequence"); see the module docstring."""

    model_config: SequenceConfig
    series: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    train_config: dict[str, Any]
    optimizer: dict[str, Any] | None = None
    epoch: int = 0
    best_val_loss: float = float("inf")
    metrics: dict[str, Any] | None = None

    @property
    def kind(self) -> str:
        return KIND_SEQUENCE

    def build_model(self) -> SequenceLSTM:
        model = SequenceLSTM(self.model_config)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as e:
            raise CheckpointError(f"state_dict does not fit the model config: {e}") from None
        return model

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": KIND_SEQUENCE,
            "model_config": asdict(self.model_config),
            "train_config": self.train_config,
            "series": self.series,
            "state_dict": self.state_dict,
            "optimizer": self.optimizer,
            "epoch": self.epoch,
            "best_val_loss": self.best_val_loss,
            "metrics": self.metrics or {},
        }


def save(ckpt: Checkpoint | SequenceCheckpoint, path: str | Path) -> None:
    """Write atomically: a crash mid-write never leaves a truncated file at ``path``."""
    with open_atomic(path) as f:
        torch.save(ckpt.to_dict(), f)


def load(path: str | Path) -> Checkpoint:
    """Read and check a token checkpoint. Raises :class:`CheckpointError` with a one-line
    reason (a sequence checkpoint is refused by name: use :func:`load_any`)."""
    ckpt = load_any(path)
    if not isinstance(ckpt, Checkpoint):
        raise CheckpointError(
            f"{path}: a {ckpt.kind!r} checkpoint (a forecaster), not a character language model"
        )
    return ckpt


def load_any(path: str | Path) -> Checkpoint | SequenceCheckpoint:
    """Read and check a checkpoint of either kind. Raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or foreign files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an lstm-serve checkpoint (no format={FORMAT!r})")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {version!r} is not supported "
            f"(this build reads {FORMAT_VERSION})"
        )
    kind = raw.get("kind", KIND_TOKEN_LM)
    if kind == KIND_SEQUENCE:
        return _sequence(path, raw)
    if kind != KIND_TOKEN_LM:
        raise CheckpointError(
            f"{path}: checkpoint kind {kind!r} is not known (known: "
            f"{[KIND_TOKEN_LM, KIND_SEQUENCE]})"
        )
    try:
        config = ModelConfig(**raw["model_config"])
        ckpt = Checkpoint(
            model_config=config,
            vocab=list(raw["vocab"]),
            unk_id=int(raw["unk_id"]),
            preprocess=str(raw["preprocess"]),
            state_dict=raw["state_dict"],
            train_config=dict(raw.get("train_config") or {}),
            optimizer=raw.get("optimizer"),
            epoch=int(raw.get("epoch", 0)),
            best_val_ppl=float(raw.get("best_val_ppl", float("inf"))),
            metrics=raw.get("metrics") or {},
            corpus_sha256=str(raw.get("corpus_sha256", "")),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed checkpoint ({type(e).__name__}: {e})") from None
    if len(ckpt.vocab) != config.vocab_size:
        raise CheckpointError(
            f"{path}: vocab has {len(ckpt.vocab)} tokens but model_config.vocab_size="
            f"{config.vocab_size}"
        )
    return ckpt


def _sequence(path: Path, raw: dict[str, Any]) -> SequenceCheckpoint:
    try:
        ckpt = SequenceCheckpoint(
            model_config=SequenceConfig(**raw["model_config"]),
            series=dict(raw["series"]),
            state_dict=raw["state_dict"],
            train_config=dict(raw.get("train_config") or {}),
            optimizer=raw.get("optimizer"),
            epoch=int(raw.get("epoch", 0)),
            best_val_loss=float(raw.get("best_val_loss", float("inf"))),
            metrics=raw.get("metrics") or {},
        )
        names = (list(ckpt.series["feature_names"]), list(ckpt.series["output_names"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed checkpoint ({type(e).__name__}: {e})") from None
    mc = ckpt.model_config
    if (len(names[0]), len(names[1])) != (mc.num_features, mc.num_outputs):
        raise CheckpointError(
            f"{path}: series names {len(names[0])} features and {len(names[1])} outputs but "
            f"model_config has {mc.num_features} and {mc.num_outputs}"
        )
    return ckpt
