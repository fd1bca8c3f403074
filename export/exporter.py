"""Checkpoint -> ONNX model that follows the contract, proven by parity, written atomically.

Steps (:func:`build_artifacts`; nothing touches the output paths until all of them pass):

1. load the checkpoint (``training.checkpoint.load``: a one-line :class:`CheckpointError` for
   corrupt, truncated, foreign or wrong-version files) and hash its bytes;
2. rebuild the ``CharLSTM`` and take its weights in ``nn.LSTM`` layout with
   ``training.model.lstm_layer_weights`` (either cell), plus the input table (identity for
   one-hot input, the embedding matrix otherwise) and the output projection;
3. build the graph with :func:`export.graph.build_model` (``onnx.checker`` full check inside),
   with the metadata the contract asks for plus provenance (checkpoint SHA-256, training
   metrics, library versions, creation time);
4. check the bytes against the contract (:func:`contract.model.validate`);
5. parity: ORT vs the PyTorch model at every T in {1, 7, 35, 100} x B in {1, 3, 32, 512}, plus
   chaining (:mod:`export.parity`); a failure raises :class:`ExportError`;
6. optionally the int8 variant (:mod:`export.quantize`) and, given a corpus, held-out perplexity
   of both (:mod:`export.evaluate`); int8 outside its tolerance raises :class:`ExportError`.

A ``sequence`` checkpoint (a forecaster, ``training.checkpoint.SequenceCheckpoint``) takes the
same steps with its own graph (``features, h0, c0 -> outputs, hn, cn``) and metadata (kind,
sizes, feature and output names, scaling); its held-out figures need no corpus: the checkpoint
carries its series, and the one-step-ahead MAE/RMSE on the held-out part is measured with ORT
through the contract (:func:`export.evaluate.forecast_errors`), fp32 and int8, the int8 change
in MAE judged by ``int8_tolerance``.

:func:`export_checkpoint` then writes each file with temp file + ``os.replace``.
"""

from __future__ import annotations

import copy
import json
import math
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from contract.files import sha256_bytes, sha256_file, write_atomic
from contract.model import (
    KIND_SEQUENCE,
    KIND_TOKEN_LM,
    META_CONFIG,
    ContractError,
    ModelSpec,
    SequenceSpec,
    validate,
)
from contract.text import (
    DEFAULT_VAL_FRACTION,
    PREPROCESS_RULES,
    CorpusError,
    read_corpus,
    validation_text,
)

from .common import ExportError, library_versions, utc_now
from .evaluate import forecast_errors, perplexity
from .graph import NumpyLayer, NumpyWeights, SequenceWeights, build_model, build_sequence_model
from .parity import DEFAULT_TOLERANCE, check_parity, cpu_session, session_forward, torch_forward
from .quantize import DEFAULT_PPL_TOLERANCE, compare_perplexity, measure_speed, quantize_int8


@dataclass(frozen=True)
class ExportOptions:
    """How to export; the defaults are what ``lstm-export`` uses."""

    int8: bool = False
    corpus: Path | None = None  # for held-out perplexity figures (fp32, and int8 if made)
    val_fraction: float | None = None  # None: the checkpoint's train_config, else 10%
    tolerance: float = DEFAULT_TOLERANCE  # parity, max abs diff
    int8_tolerance: float = DEFAULT_PPL_TOLERANCE  # relative perplexity increase
    threads: int = 1  # torch and ORT threads for parity and figures
    measure_speed: bool = True  # int8 speed-up table (takes a few seconds)
    per_channel: bool = False  # int8 weight scales per output channel (default: per tensor)

    def key(self) -> dict[str, Any]:
        """The options that change what is written (the batch pipeline's idempotence key)."""
        return {
            "int8": self.int8,
            "perplexity": self.corpus is not None,
            "val_fraction": self.val_fraction,
            "int8_tolerance": self.int8_tolerance if self.int8 else None,
            "per_channel": self.per_channel if self.int8 else None,
        }

    def worker_args(self) -> list[str]:
        """The ``lstm-export`` flags that give back exactly these options.

        The batch pipeline's worker processes are single ``lstm-export`` runs started with
        these. Floats are written with ``repr`` so they parse back to the same value; a test
        parses the result with the real parser, so a field left out here fails it.
        """
        args = [
            "--tolerance",
            repr(self.tolerance),
            "--int8-tolerance",
            repr(self.int8_tolerance),
            "--threads",
            str(self.threads),
        ]
        if self.int8:
            args.append("--int8")
        if self.per_channel:
            args.append("--int8-per-channel")
        if not self.measure_speed:
            args.append("--no-speed")
        if self.corpus is not None:
            args += ["--corpus", str(self.corpus)]
        if self.val_fraction is not None:
            args += ["--val-fraction", repr(self.val_fraction)]
        return args


@dataclass
class Artifacts:
    """What an export produces before anything is written: model bytes and the report."""

    fp32: bytes
    int8: bytes | None
    report: dict[str, Any] = field(default_factory=dict)


def int8_path_for(path: str | Path) -> Path:
    """``model.onnx`` -> ``model.int8.onnx`` (the int8 variant sits beside the float one)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.int8{path.suffix or '.onnx'}")


def checkpoint_weights(model: Any) -> NumpyWeights:
    """A ``CharLSTM``'s weights as the graph builder's numpy layout (either cell, either input)."""
    import torch

    from training.model import lstm_layer_weights

    def np32(t: torch.Tensor) -> np.ndarray:
        return t.detach().to(torch.float32).cpu().numpy().copy()

    cfg = model.config
    if model.embedding is not None:
        table = np32(model.embedding.weight)
    else:
        table = np.eye(cfg.vocab_size, dtype=np.float32)
    layers = [
        NumpyLayer(np32(lw.w_ih), np32(lw.w_hh), np32(lw.b_ih), np32(lw.b_hh))
        for lw in lstm_layer_weights(model)
    ]
    return NumpyWeights(
        input_table=table,
        layers=layers,
        out_w=np32(model.output.weight),
        out_b=np32(model.output.bias),
    )


def _finite_or_none(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _training_summary(ckpt: Any) -> dict[str, Any]:
    metrics = ckpt.metrics or {}

    def last(key: str) -> float | None:
        seq = metrics.get(key)
        return _finite_or_none(seq[-1]) if isinstance(seq, list) and seq else None

    return {
        "epoch": ckpt.epoch,
        "best_val_ppl": _finite_or_none(ckpt.best_val_ppl),
        "last_train_ppl": last("train_ppl"),
        "last_val_ppl": last("val_ppl"),
        "corpus_sha256": ckpt.corpus_sha256 or None,
    }


def model_config(ckpt: Any, checkpoint_sha256: str, *, created_at: str) -> dict[str, Any]:
    """The ``lstm_serve.config`` metadata for a checkpoint (contract keys plus provenance)."""
    mc = ckpt.model_config
    if ckpt.preprocess not in PREPROCESS_RULES:
        raise ExportError(
            f"checkpoint uses preprocess rule {ckpt.preprocess!r}, which this build does not "
            f"know (known: {sorted(PREPROCESS_RULES)})"
        )
    config: dict[str, Any] = {
        "kind": KIND_TOKEN_LM,
        "num_layers": mc.num_layers,
        "hidden_size": mc.hidden_size,
        "vocab_size": mc.vocab_size,
        "cell": mc.cell,
        "preprocess": ckpt.preprocess,
        "unk_id": ckpt.unk_id,
        "input_mode": mc.input_mode,
    }
    if mc.input_mode == "embedding":
        config["embedding_dim"] = mc.embedding_dim
    config.update(
        {
            "variant": "fp32",
            "training": _training_summary(ckpt),
            "checkpoint_sha256": checkpoint_sha256,
            "versions": library_versions(),
            "created_at": created_at,
        }
    )
    return config


def _check_spec(spec: ModelSpec, ckpt: Any) -> None:
    mc = ckpt.model_config
    got = (spec.num_layers, spec.hidden_size, spec.vocab_size, list(spec.vocab), spec.unk_id)
    want = (mc.num_layers, mc.hidden_size, mc.vocab_size, list(ckpt.vocab), ckpt.unk_id)
    if got != want:
        raise ExportError("exported metadata does not describe the checkpoint (exporter bug)")


def _validate_bytes(data: bytes, what: str) -> ModelSpec:
    try:
        return validate(data)
    except ContractError as e:
        raise ExportError(f"{what} model breaks the contract: {e}") from None


def build_artifacts(checkpoint: str | Path, options: ExportOptions | None = None) -> Artifacts:
    """Run every export step in memory; raise :class:`ExportError`/``CheckpointError`` on failure.

    Returns the model bytes (float32, and int8 when asked) and a JSON-able report with the
    parity, perplexity and int8 figures. Writes nothing.
    """
    options = options or ExportOptions()
    start = time.perf_counter()
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ExportError(f"checkpoint not found: {checkpoint}")
    if not zipfile.is_zipfile(checkpoint):
        # torch.save writes a zip archive; without this, torch's error for a text file advises
        # retrying with weights_only=False, which is exactly wrong for an untrusted file.
        raise ExportError(
            f"{checkpoint}: not a PyTorch checkpoint (no zip archive: truncated, corrupt or "
            "a different kind of file)"
        )
    corpus = _read_corpus(options.corpus) if options.corpus is not None else None  # fail early
    from training.checkpoint import SequenceCheckpoint, load_any  # torch: only once needed

    any_ckpt = load_any(checkpoint)  # raises CheckpointError with a one-line reason
    raw_sha = sha256_file(checkpoint)
    if isinstance(any_ckpt, SequenceCheckpoint):
        # The series travels in the checkpoint: a corpus has nothing to add to this model.
        return _sequence_artifacts(checkpoint, any_ckpt, raw_sha, options, start)
    ckpt = any_ckpt
    created_at = utc_now()
    torch_model = ckpt.build_model().float().eval()
    config = model_config(ckpt, raw_sha, created_at=created_at)
    weights = checkpoint_weights(torch_model)
    try:
        proto = build_model(weights, ckpt.vocab, config)
    except ContractError as e:
        raise ExportError(f"cannot describe this checkpoint in the contract: {e}") from None
    fp32 = proto.SerializeToString()
    spec = _validate_bytes(fp32, "float32")
    _check_spec(spec, ckpt)

    mc = ckpt.model_config
    L, H, V = mc.num_layers, mc.hidden_size, mc.vocab_size
    fp32_sess = cpu_session(fp32, options.threads)
    parity = check_parity(
        session_forward(fp32_sess),
        torch_forward(torch_model, options.threads),
        reference64=torch_forward(copy.deepcopy(torch_model).double(), options.threads),
        num_layers=L,
        hidden_size=H,
        vocab_size=V,
        tolerance=options.tolerance,
    )
    if not parity.passed:
        raise ExportError(parity.summary())

    report: dict[str, Any] = {
        "checkpoint": {
            "path": str(checkpoint),
            "sha256": raw_sha,
            "size_bytes": checkpoint.stat().st_size,
        },
        "model": {
            k: config[k]
            for k in (
                "cell",
                "num_layers",
                "hidden_size",
                "vocab_size",
                "input_mode",
                "preprocess",
                "unk_id",
            )
        }
        | {"parameters": int(sum(p.numel() for p in torch_model.parameters()))},
        "training": dict(config["training"]),
        "train_config": ckpt.train_config,  # the run's settings, for the record (not metadata)
        "parity": {"reference": "PyTorch CharLSTM, float32"} | parity.to_dict(),
        "fp32": {"sha256": sha256_bytes(fp32), "size_bytes": len(fp32)},
        "int8": None,
        "perplexity": None,
        "versions": config["versions"],
        "created_at": created_at,
    }

    int8: bytes | None = None
    int8_sess = None
    if options.int8:
        int8 = quantize_int8(fp32, per_channel=options.per_channel)
        _validate_bytes(int8, "int8")
        int8_sess = cpu_session(int8, options.threads)
        drift = _int8_drift(fp32_sess, int8_sess, num_layers=L, hidden_size=H, vocab_size=V)
        report["int8"] = {
            "sha256": sha256_bytes(int8),
            "size_bytes": len(int8),
            "size_ratio": round(len(int8) / len(fp32), 4),
            "ops": json.loads(_config_json(int8))["quantization"]["ops"],
            "drift_vs_fp32": drift,
            "speed": None,
        }
        if options.measure_speed:
            report["int8"]["speed"] = measure_speed(
                fp32_sess,
                int8_sess,
                num_layers=L,
                hidden_size=H,
                vocab_size=V,
                threads=options.threads,
            )

    if corpus is not None:
        report["perplexity"] = _perplexity_report(
            ckpt, spec, fp32_sess, int8_sess, options, corpus
        )  # raises if int8 is outside its tolerance

    report["seconds"] = round(time.perf_counter() - start, 3)
    return Artifacts(fp32=fp32, int8=int8, report=report)


def sequence_weights(model: Any) -> SequenceWeights:
    """A ``SequenceLSTM``'s weights in the graph builder's numpy layout (either cell)."""
    import torch

    from training.model import lstm_layer_weights

    def np32(t: torch.Tensor) -> np.ndarray:
        return t.detach().to(torch.float32).cpu().numpy().copy()

    layers = [
        NumpyLayer(np32(lw.w_ih), np32(lw.w_hh), np32(lw.b_ih), np32(lw.b_hh))
        for lw in lstm_layer_weights(model)
    ]
    return SequenceWeights(layers, np32(model.output.weight), np32(model.output.bias))


def sequence_config(ckpt: Any, checkpoint_sha256: str, *, created_at: str) -> dict[str, Any]:
    """The ``lstm_serve.config`` metadata of a sequence checkpoint (contract keys, then what a
    client and a reader of the file want to know: the data, the training, provenance)."""
    mc, series = ckpt.model_config, ckpt.series
    metrics = ckpt.metrics or {}
    return {
        "kind": KIND_SEQUENCE,
        "num_layers": mc.num_layers,
        "hidden_size": mc.hidden_size,
        "cell": mc.cell,
        "num_features": mc.num_features,
        "num_outputs": mc.num_outputs,
        "feature_names": list(series["feature_names"]),
        "output_names": list(series["output_names"]),
        "scaling": series["scaling"],
        "horizon": series.get("horizon", 1),
        "data": {k: series.get(k) for k in ("dataset", "source", "sha256", "unit", "period")},
        "variant": "fp32",
        "training": {
            "epoch": ckpt.epoch,
            "best_val_mse": _finite_or_none(ckpt.best_val_loss),
            "best_epoch": metrics.get("best_epoch"),
        },
        "checkpoint_sha256": checkpoint_sha256,
        "versions": library_versions(),
        "created_at": created_at,
    }


def _sequence_artifacts(
    checkpoint: Path, ckpt: Any, raw_sha: str, options: ExportOptions, start: float
) -> Artifacts:
    """:func:`build_artifacts` for a sequence checkpoint (same steps, same report sections,
    plus ``heldout``; ``perplexity`` is None)."""
    from training.series import SeriesData, SeriesError

    created_at = utc_now()
    torch_model = ckpt.build_model().float().eval()
    config = sequence_config(ckpt, raw_sha, created_at=created_at)
    try:
        data = SeriesData.from_record(ckpt.series)
        proto = build_sequence_model(sequence_weights(torch_model), config)
    except (ContractError, SeriesError) as e:
        raise ExportError(f"cannot describe this checkpoint in the contract: {e}") from None
    fp32 = proto.SerializeToString()
    spec = _validate_sequence_bytes(fp32, "float32")
    mc = ckpt.model_config
    if (spec.num_layers, spec.hidden_size, spec.num_features, spec.num_outputs) != (
        mc.num_layers,
        mc.hidden_size,
        mc.num_features,
        mc.num_outputs,
    ):
        raise ExportError("exported metadata does not describe the checkpoint (exporter bug)")
    L, H, F = mc.num_layers, mc.hidden_size, mc.num_features
    fp32_sess = cpu_session(fp32, options.threads)
    parity = check_parity(
        session_forward(fp32_sess, sequence=True),
        torch_forward(torch_model, options.threads),
        reference64=torch_forward(copy.deepcopy(torch_model).double(), options.threads),
        num_layers=L,
        hidden_size=H,
        vocab_size=0,
        num_features=F,
        tolerance=options.tolerance,
    )
    if not parity.passed:
        raise ExportError(parity.summary())
    fp_err = forecast_errors(fp32_sess, spec, data)
    report: dict[str, Any] = {
        "kind": KIND_SEQUENCE,
        "checkpoint": {
            "path": str(checkpoint),
            "sha256": raw_sha,
            "size_bytes": checkpoint.stat().st_size,
        },
        "model": {
            k: config[k]
            for k in (
                "kind",
                "cell",
                "num_layers",
                "hidden_size",
                "num_features",
                "num_outputs",
                "feature_names",
                "output_names",
            )
        }
        | {"parameters": int(sum(p.numel() for p in torch_model.parameters()))},
        "training": dict(config["training"]) | {"data": config["data"]},
        "train_config": ckpt.train_config,
        "parity": {"reference": "PyTorch SequenceLSTM, float32"} | parity.to_dict(),
        "fp32": {"sha256": sha256_bytes(fp32), "size_bytes": len(fp32)},
        "int8": None,
        "perplexity": None,
        "heldout": {"fp32": fp_err, "int8": None, "int8_vs_fp32": None},
        "versions": config["versions"],
        "created_at": created_at,
    }
    int8: bytes | None = None
    if options.int8:
        int8 = quantize_int8(fp32, per_channel=options.per_channel)
        _validate_sequence_bytes(int8, "int8")
        int8_sess = cpu_session(int8, options.threads)
        q_err = forecast_errors(int8_sess, spec, data)
        report["heldout"]["int8"] = q_err
        report["heldout"]["int8_vs_fp32"] = _compare_mae(fp_err, q_err, options.int8_tolerance)
        f = fp_err["predictions_scaled"]
        q = q_err["predictions_scaled"]
        report["int8"] = {
            "sha256": sha256_bytes(int8),
            "size_bytes": len(int8),
            "size_ratio": round(len(int8) / len(fp32), 4),
            "ops": json.loads(_config_json(int8))["quantization"]["ops"],
            "drift_vs_fp32": {
                "input": "the whole series, B=1",
                "max_abs_outputs_diff": round(float(np.max(np.abs(np.subtract(f, q)))), 6),
            },
            "speed": None,
        }
        if options.measure_speed:
            report["int8"]["speed"] = measure_speed(
                fp32_sess,
                int8_sess,
                num_layers=L,
                hidden_size=H,
                vocab_size=0,
                threads=options.threads,
                num_features=F,
            )
    for part in ("fp32", "int8"):
        if report["heldout"][part] is not None:
            report["heldout"][part].pop("predictions_scaled")
    report["seconds"] = round(time.perf_counter() - start, 3)
    return Artifacts(fp32=fp32, int8=int8, report=report)


def _compare_mae(fp: dict[str, Any], q: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """The int8-vs-float32 figure of a sequence model: relative change of the held-out MAE,
    two-sided like the perplexity check; raises :class:`ExportError` outside ``tolerance``."""
    a, b = fp["test"]["mae"], q["test"]["mae"]
    rel = b / a - 1.0 if a > 0 else (0.0 if b == a else math.inf)
    result = {
        "metric": "held-out MAE",
        "fp32": round(a, 6),
        "int8": round(b, 6),
        "relative_change": round(rel, 6),
        "tolerance": tolerance,
        "within_tolerance": bool(math.isfinite(rel) and abs(rel) <= tolerance),
    }
    if not result["within_tolerance"]:
        raise ExportError(
            f"int8 held-out MAE {b:.4g} is {rel:+.2%} vs float32 {a:.4g} "
            f"(tolerance ±{tolerance:.0%})"
        )
    return result


def _validate_sequence_bytes(data: bytes, what: str) -> SequenceSpec:
    try:
        return validate(data, kind=KIND_SEQUENCE)
    except ContractError as e:
        raise ExportError(f"{what} model breaks the contract: {e}") from None


def _config_json(model: bytes) -> str:
    """The raw ``lstm_serve.config`` JSON of serialized model bytes (no ORT session needed)."""
    proto = onnx.load_from_string(model)
    return next(p.value for p in proto.metadata_props if p.key == META_CONFIG)


def _int8_drift(
    fp32_sess: Any, int8_sess: Any, *, num_layers: int, hidden_size: int, vocab_size: int
) -> dict[str, Any]:
    """How far int8 logits move on random input: informational, but must be finite."""
    rng = np.random.default_rng()
    T, B = 35, 32
    tokens = rng.integers(0, vocab_size, (T, B), dtype=np.int64)
    h0 = np.zeros((num_layers, B, hidden_size), np.float32)
    f = session_forward(fp32_sess)(tokens, h0, h0)[0]
    q = session_forward(int8_sess)(tokens, h0, h0)[0]
    if not np.isfinite(q).all():
        raise ExportError("int8 model produces non-finite logits")
    return {
        "T": T,
        "B": B,
        "max_abs_logits_diff": round(float(np.max(np.abs(f - q))), 6),
        "top1_agreement": round(float(np.mean(f.argmax(-1) == q.argmax(-1))), 4),
    }


def _perplexity_report(
    ckpt: Any,
    spec: ModelSpec,
    fp32_sess: Any,
    int8_sess: Any,
    options: ExportOptions,
    corpus: tuple[str, str],
) -> dict[str, Any]:
    assert options.corpus is not None
    text, corpus_sha = corpus
    frac = options.val_fraction
    if frac is None:
        frac = _finite_or_none((ckpt.train_config or {}).get("val_fraction"))
    frac = frac or DEFAULT_VAL_FRACTION
    try:
        val = validation_text(text, spec.preprocess, frac)
    except CorpusError as e:
        raise ExportError(str(e)) from None
    fp = perplexity(fp32_sess, spec, val)
    out: dict[str, Any] = {
        "corpus": str(options.corpus),
        "corpus_sha256": corpus_sha,
        "corpus_matches_checkpoint": (
            corpus_sha == ckpt.corpus_sha256 if ckpt.corpus_sha256 else None
        ),
        "split": f"last {frac:g} of the normalised text",
        "val_fraction": frac,
        "val_chars": len(val),
        "method": "ORT, contract encode, 32 rows x 35 steps, state carried",
        "fp32": fp.to_dict(),
        "int8": None,
        "int8_vs_fp32": None,
    }
    if int8_sess is not None:
        q = perplexity(int8_sess, spec, val)
        out["int8"] = q.to_dict()
        out["int8_vs_fp32"] = compare_perplexity(fp, q, options.int8_tolerance)
    return out


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    options: ExportOptions | None = None,
    *,
    report_out: str | Path | None = None,
) -> dict[str, Any]:
    """Export ``checkpoint`` to ``out`` (and ``int8_path_for(out)`` with ``options.int8``).

    Every check runs before any file is written; each file is then written atomically, so a
    failure leaves existing files as they were and no partial file behind. Returns the report
    (also written as JSON to ``report_out`` when given).
    """
    out = Path(out)
    art = build_artifacts(checkpoint, options)
    report = art.report
    report["fp32"]["path"] = str(out)
    targets: list[tuple[Path, bytes]] = [(out, art.fp32)]
    if art.int8 is not None:
        int8_out = int8_path_for(out)
        report["int8"]["path"] = str(int8_out)
        targets.append((int8_out, art.int8))
    for path, data in targets:
        write_atomic(path, data)
    if report_out is not None:
        write_atomic(report_out, (json.dumps(report, indent=2) + "\n").encode())
    return report


def _read_corpus(path: str | Path) -> tuple[str, str]:
    try:
        return read_corpus(path)
    except CorpusError as e:
        raise ExportError(str(e)) from None
