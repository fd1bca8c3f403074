"""The int8 variant: ONNX Runtime dynamic quantisation for CPU, and the figures that judge it.

``onnxruntime.quantization.quantize_dynamic`` rewrites an ``LSTM`` node into the contrib op
``DynamicQuantizeLSTM`` only when ``W`` and ``R`` are plain initializers; behind any other node
(a ``Constant``, a cast, a reshape) it silently leaves the LSTM in float32. Our graph builder
already stores them as initializers, but we still quantise an ORT *basic-optimised* copy (which
folds such nodes into initializers) so that a future change to the graph cannot quietly turn
the int8 file into a float one, and we verify afterwards that ``DynamicQuantizeLSTM`` is there.

Weights are signed int8 with one scale per tensor (the quantiser's default); activations are
quantised on the fly by the runtime. Per-output-channel scales (``per_channel=True``) were
measured on the bundled model and a pilot and were not better: held-out perplexity +0.21% and
+0.23% vs float32, against -0.02% and +0.03% per tensor, at the same speed. The variant is
CPU-only: the contrib ops have no CUDA kernels.

Judged by (see :func:`compare_perplexity` and :func:`measure_speed`): the held-out perplexity
relative to float32 (within :data:`DEFAULT_PPL_TOLERANCE`), file size, and speed-up of
in-process ORT calls at several batch sizes.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from contract.model import (
    INPUT_C0,
    INPUT_FEATURES,
    INPUT_H0,
    INPUT_TOKENS,
    META_CONFIG,
    OUTPUT_LOGITS,
    OUTPUT_OUTPUTS,
)

from .common import ExportError, one_line
from .evaluate import Perplexity

QUANTIZED_LSTM_OP = "DynamicQuantizeLSTM"
DEFAULT_PPL_TOLERANCE = 0.02  # int8 held-out perplexity within ±2% of float32
SPEED_BATCHES = (1, 32, 128)


def quantize_int8(fp32_model: bytes, *, per_channel: bool = False) -> bytes:
    """Return the dynamically quantised int8 model for ``fp32_model`` (serialized bytes).

    The ``lstm_serve.config`` metadata gains ``"variant": "int8"`` and the quantisation
    settings; the vocabulary is carried over unchanged. Raises :class:`ExportError` when the
    quantiser fails or leaves any LSTM unquantised.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="lstm-export-int8-") as tmp:
        src = Path(tmp, "fp32.onnx")
        basic = Path(tmp, "basic.onnx")
        dst = Path(tmp, "int8.onnx")
        src.write_bytes(fp32_model)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(basic)
        opts.log_severity_level = 3
        ort.InferenceSession(str(src), sess_options=opts, providers=["CPUExecutionProvider"])
        # The quantiser logs advice ("consider pre-processing") on the root logger; it is not
        # actionable here and would break one-line CLI output.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_dynamic(basic, dst, weight_type=QuantType.QInt8, per_channel=per_channel)
        except Exception as e:
            raise ExportError(f"int8 quantisation failed: {one_line(e)}") from None
        finally:
            root.setLevel(level)
        model = onnx.load(str(dst))

    ops = [n.op_type for n in model.graph.node]
    if "LSTM" in ops or QUANTIZED_LSTM_OP not in ops:
        raise ExportError(
            f"int8 quantisation left the LSTM in float32 (ops: {sorted(set(ops))}); "
            f"expected {QUANTIZED_LSTM_OP}"
        )
    meta = {p.key: p.value for p in model.metadata_props}
    config = json.loads(meta[META_CONFIG])
    config["variant"] = "int8"
    config["quantization"] = {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "weight_type": "QInt8",
        "per_channel": per_channel,
        "ops": sorted({o for o in ops if "Integer" in o or "Quantize" in o}),
    }
    meta[META_CONFIG] = json.dumps(config)
    meta.pop("onnx.infer", None)  # the quantiser's own marker; not part of our metadata
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta)
    model.producer_name = "lstm-serve"
    onnx.checker.check_model(model)
    return model.SerializeToString()


def compare_perplexity(
    fp32: Perplexity, int8: Perplexity, tolerance: float = DEFAULT_PPL_TOLERANCE
) -> dict[str, Any]:
    """The int8-vs-float32 figure; raises :class:`ExportError` when outside ``tolerance``.

    ``relative_change`` is ``int8 / fp32 - 1`` and must satisfy ``|relative_change| <=
    tolerance``: two-sided, because a large change either way means int8 computes a different
    model, even when it happens to score better.
    """
    rel = int8.perplexity / fp32.perplexity - 1.0
    result = {
        "fp32": round(fp32.perplexity, 6),
        "int8": round(int8.perplexity, 6),
        "relative_change": round(rel, 6),
        "tolerance": tolerance,
        "within_tolerance": bool(np.isfinite(rel) and abs(rel) <= tolerance),
    }
    if not result["within_tolerance"]:
        raise ExportError(
            f"int8 held-out perplexity {int8.perplexity:.4f} is {rel:+.2%} vs float32 "
            f"{fp32.perplexity:.4f} (tolerance ±{tolerance:.0%})"
        )
    return result


def _paired_medians(
    first: Any,
    second: Any,
    feeds: Mapping[str, np.ndarray],
    *,
    min_seconds: float,
    max_reps: int,
    output: str = OUTPUT_LOGITS,
) -> tuple[float, float]:
    """Median call time of two sessions on the same feeds, timed alternately.

    Alternating makes the ratio robust to load that changes during the measurement (this
    machine is shared): both sessions see the same conditions.
    """
    for sess in (first, second):
        sess.run([output], feeds)  # warm-up: first call allocates
    a: list[float] = []
    b: list[float] = []
    total = 0.0
    while len(a) < 5 or (total < min_seconds and len(a) < max_reps):
        for sess, out in ((first, a), (second, b)):
            t0 = time.perf_counter()
            sess.run([output], feeds)
            dt = time.perf_counter() - t0
            out.append(dt)
            total += dt
    return float(np.median(a)), float(np.median(b))


def measure_speed(
    fp32_session: Any,
    int8_session: Any,
    *,
    num_layers: int,
    hidden_size: int,
    vocab_size: int,
    batches: Iterable[int] = SPEED_BATCHES,
    steps: Iterable[int] = (1, 35),
    min_seconds: float = 0.5,
    max_reps: int = 200,
    threads: int = 1,
    num_features: int | None = None,
) -> dict[str, Any]:
    """Median in-process ORT call time, float32 vs int8, per (T, B); informational only.

    ``T=1`` is the server's decode step, ``T=35`` a prefill. Sessions should use the same
    thread count (``threads`` is recorded, not applied). ``num_features``: a ``sequence``
    model, fed standard normal features (``vocab_size`` unused).
    """
    rng = np.random.default_rng()
    rows = []
    for T in steps:
        for B in batches:
            feeds: dict[str, np.ndarray] = {
                INPUT_H0: rng.standard_normal((num_layers, B, hidden_size), dtype=np.float32),
                INPUT_C0: rng.standard_normal((num_layers, B, hidden_size), dtype=np.float32),
            }
            if num_features is None:
                feeds[INPUT_TOKENS] = rng.integers(0, vocab_size, (T, B), dtype=np.int64)
            else:
                feeds[INPUT_FEATURES] = rng.standard_normal((T, B, num_features), np.float32)
            f, q = _paired_medians(
                fp32_session,
                int8_session,
                feeds,
                min_seconds=min_seconds,
                max_reps=max_reps,
                output=OUTPUT_LOGITS if num_features is None else OUTPUT_OUTPUTS,
            )
            rows.append(
                {
                    "T": T,
                    "B": B,
                    "fp32_ms": round(f * 1e3, 4),
                    "int8_ms": round(q * 1e3, 4),
                    "speedup": round(f / q, 3),
                }
            )
    return {"threads": threads, "statistic": "median call time, alternating", "rows": rows}
