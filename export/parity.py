"""Parity: the exported graph must compute what the PyTorch model computes.

Run on every export. ONNX Runtime (CPU) is compared with a reference (the checkpoint's own
``CharLSTM`` in PyTorch, float32) on fresh random tokens and fresh random states at every
``T`` in :data:`PARITY_T` and ``B`` in :data:`PARITY_B`; the largest absolute difference on
``logits``, ``hn`` and ``cn`` must be at most the tolerance (default :data:`DEFAULT_TOLERANCE`).

The float32 noise floor: at T=100 a well-trained model carries rounding through 100 steps of
recurrence (ORT's CPU LSTM also uses approximate sigmoid/tanh), so both float32 results drift
from the exact one by up to ~1e-4 on ``cn`` and ``logits``, which is the size of the tolerance.
A wrong gate mapping or layout is off by O(1). So when a shape fails and a float64 reference is
given, both are measured against float64 on that input, and the message says whether ONNX is
only as far off as PyTorch float32 itself ("--tolerance decides") or not.

Chaining: ``T`` tokens fed one call at a time, carrying ``(hn, cn)`` into the next call's
``(h0, c0)``, and the same tokens fed in a few uneven chunks, must both equal one call with all
``T`` tokens. That is exactly how the server uses the model (prefill, then one step per token),
so a graph that only works at one length, or loses state between calls, fails here.

Non-finite outputs fail parity: a NaN difference is never "within tolerance".

A ``sequence`` model is checked the same way (``num_features`` given): standard normal
``features [T, B, F]`` instead of tokens, ``outputs`` instead of ``logits``.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
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
    SEQUENCE_OUTPUT_NAMES,
)

PARITY_T = (1, 7, 35, 100)
PARITY_B = (1, 3, 32, 512)
# (T, B) for the chaining check; chunks split T unevenly so a prefill of any length is covered.
CHAIN_CASES = ((35, 3), (100, 32))
DEFAULT_TOLERANCE = 1e-4

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]
Forward = Callable[[np.ndarray, np.ndarray, np.ndarray], Arrays]
OUTPUTS = (OUTPUT_LOGITS, OUTPUT_HN, OUTPUT_CN)


def cpu_session(model: bytes | str, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session with a small, fixed thread count (parity and figures)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def session_forward(session: Any, *, sequence: bool = False) -> Forward:
    """Wrap a contract-following ORT session as ``(tokens, h0, c0) -> (logits, hn, cn)``, or
    with ``sequence`` as ``(features, h0, c0) -> (outputs, hn, cn)``."""
    first = INPUT_FEATURES if sequence else INPUT_TOKENS
    names = [OUTPUT_OUTPUTS if sequence else OUTPUT_LOGITS, OUTPUT_HN, OUTPUT_CN]

    def run(tokens: np.ndarray, h0: np.ndarray, c0: np.ndarray) -> Arrays:
        logits, hn, cn = session.run(names, {first: tokens, INPUT_H0: h0, INPUT_C0: c0})
        return logits, hn, cn

    return run


def torch_forward(model: Any, threads: int = 1) -> Forward:
    """Wrap a ``training.model.CharLSTM`` or ``SequenceLSTM`` as a parity reference (eval mode,
    the model's dtype: float32 for the check, a float64 copy for the diagnosis). Outputs keep
    the model's dtype; differences are taken in float64."""
    import torch

    model.eval()
    dtype = next(model.parameters()).dtype

    def run(tokens: np.ndarray, h0: np.ndarray, c0: np.ndarray) -> Arrays:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                state = (torch.from_numpy(h0).to(dtype), torch.from_numpy(c0).to(dtype))
                logits, (hn, cn) = model(torch.from_numpy(tokens), state)
        finally:
            torch.set_num_threads(before)
        return logits.numpy(), hn.numpy(), cn.numpy()

    return run


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def _within(diff: float, tol: float) -> bool:
    return bool(np.isfinite(diff)) and diff <= tol  # NaN and inf are failures


@dataclass(frozen=True)
class CaseResult:
    """Largest absolute differences for one input shape."""

    kind: str  # "shape" (ORT vs reference) or "chain-steps" / "chain-chunks" (ORT vs itself)
    T: int
    B: int
    diffs: dict[str, float]
    # Only for a failed shape, when a float64 reference was given: per output, how far the
    # candidate and the (float32) reference each are from float64 on the same input.
    vs_float64: dict[str, dict[str, float]] | None = None

    def worst(self) -> float:
        vals = list(self.diffs.values())
        return float("nan") if any(np.isnan(v) for v in vals) else max(vals)


@dataclass
class ParityReport:
    tolerance: float
    seed: int
    cases: list[CaseResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(_within(v, self.tolerance) for c in self.cases for v in c.diffs.values())

    def max_abs(self, kind: str = "shape") -> dict[str, float]:
        out: dict[str, float] = {}
        for c in self.cases:
            if c.kind != kind:
                continue
            for name, v in c.diffs.items():
                prev = out.get(name, 0.0)
                out[name] = v if np.isnan(v) or np.isnan(prev) else max(prev, v)
        return out

    def failures(self) -> list[str]:
        return [
            f"{c.kind} T={c.T} B={c.B} {name} max|diff|={v:.3g}"
            for c in self.cases
            for name, v in c.diffs.items()
            if not _within(v, self.tolerance)
        ]

    def summary(self) -> str:
        if self.passed:
            worst = max((c.worst() for c in self.cases), default=0.0)
            return (
                f"parity ok: {len(self.cases)} checks, max|diff| {worst:.2e} <= {self.tolerance:g}"
            )
        fails = self.failures()
        more = f" (and {len(fails) - 1} more)" if len(fails) > 1 else ""
        return f"parity FAILED (tolerance {self.tolerance:g}): {fails[0]}{more}{self._diagnosis()}"

    def _diagnosis(self) -> str:
        """One clause saying whether a failure looks like float32 rounding or a real error."""
        for c in self.cases:
            if c.vs_float64 is None:
                continue
            for name, v in c.diffs.items():
                if _within(v, self.tolerance) or name not in c.vs_float64:
                    continue
                cand = c.vs_float64[name]["candidate"]
                ref = c.vs_float64[name]["reference"]
                text = f"; vs float64 there: ONNX {cand:.2g}, PyTorch float32 {ref:.2g}"
                if _within(cand, 3 * ref) and _within(cand, 10 * self.tolerance):
                    text += (
                        " (float32 rounding grown through the recurrence, not a mapping error; "
                        "--tolerance decides)"
                    )
                return text
        return ""

    def to_dict(self) -> dict[str, Any]:
        def clean(v: float) -> float | None:
            # JSON has no NaN/inf; None marks a non-finite (failed) difference.
            return float(v) if np.isfinite(v) else None

        chain = {
            k: {n: clean(v) for n, v in self.max_abs(k).items()}
            for k in ("chain-steps", "chain-chunks")
        }
        return {
            "passed": self.passed,
            "tolerance": self.tolerance,
            "seed": self.seed,
            "seconds": round(self.seconds, 3),
            "T": sorted({c.T for c in self.cases if c.kind == "shape"}),
            "B": sorted({c.B for c in self.cases if c.kind == "shape"}),
            "max_abs_diff": {n: clean(v) for n, v in self.max_abs("shape").items()},
            "chaining": {
                "cases": [[c.T, c.B] for c in self.cases if c.kind == "chain-steps"],
                "max_abs_diff": chain,
            },
            "failures": self.failures()[:10],
            "vs_float64_on_failures": [
                {"T": c.T, "B": c.B, "outputs": c.vs_float64} for c in self.cases if c.vs_float64
            ],
        }


def _random_inputs(
    rng: np.random.Generator, T: int, B: int, L: int, H: int, V: int, F: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tokens: np.ndarray
    if F is None:
        tokens = rng.integers(0, V, size=(T, B), dtype=np.int64)
    else:
        tokens = rng.standard_normal((T, B, F), dtype=np.float32)
    h0 = rng.standard_normal((L, B, H), dtype=np.float32)
    c0 = rng.standard_normal((L, B, H), dtype=np.float32)
    return tokens, h0, c0


def _chunks(T: int) -> list[int]:
    """Uneven split points covering a single step, a short and a long chunk."""
    cuts = sorted({c for c in (1, max(2, T // 5), max(3, T // 2)) if 0 < c < T})
    return [0, *cuts, T]


def _run_chained(
    fwd: Forward, tokens: np.ndarray, h0: np.ndarray, c0: np.ndarray, bounds: Sequence[int]
) -> Arrays:
    h, c = h0, c0
    logits = []
    for a, b in itertools.pairwise(bounds):
        lg, h, c = fwd(np.ascontiguousarray(tokens[a:b]), h, c)
        logits.append(lg)
    return np.concatenate(logits, axis=0), h, c


def check_parity(
    candidate: Forward,
    reference: Forward,
    *,
    num_layers: int,
    hidden_size: int,
    vocab_size: int,
    T_values: Iterable[int] = PARITY_T,
    B_values: Iterable[int] = PARITY_B,
    chain_cases: Iterable[tuple[int, int]] = CHAIN_CASES,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int | None = None,
    reference64: Forward | None = None,
    num_features: int | None = None,
) -> ParityReport:
    """Compare ``candidate`` (the ONNX model) with ``reference`` on fresh random inputs.

    Never raises for a mismatch: the returned report says whether it passed and where not. The
    seed (fresh unless given) is in the report so a failure can be replayed. With
    ``reference64`` (the reference model in float64), each failed shape also records how far
    the candidate and the reference each are from float64, so the report can tell float32
    rounding from a wrong graph. It never changes pass/fail. ``num_features`` makes it a
    ``sequence`` check (random features ``[T, B, F]``; ``vocab_size`` is then unused).
    """
    outputs = OUTPUTS if num_features is None else SEQUENCE_OUTPUT_NAMES
    seed = secrets.randbits(32) if seed is None else seed
    rng = np.random.default_rng(seed)
    report = ParityReport(tolerance=tolerance, seed=seed)
    L, H, V = num_layers, hidden_size, vocab_size
    start = time.perf_counter()
    for T in T_values:
        for B in B_values:
            tokens, h0, c0 = _random_inputs(rng, T, B, L, H, V, num_features)
            got = candidate(tokens, h0, c0)
            want = reference(tokens, h0, c0)
            diffs = {n: _max_abs(g, w) for n, g, w in zip(outputs, got, want, strict=True)}
            vs64 = None
            failed = not all(_within(v, tolerance) for v in diffs.values())
            if reference64 is not None and failed:
                exact = reference64(tokens, h0, c0)
                vs64 = {
                    n: {"candidate": _max_abs(g, x), "reference": _max_abs(w, x)}
                    for n, g, w, x in zip(outputs, got, want, exact, strict=True)
                }
            report.cases.append(CaseResult("shape", T, B, diffs, vs64))
    for T, B in chain_cases:
        tokens, h0, c0 = _random_inputs(rng, T, B, L, H, V, num_features)
        whole = candidate(tokens, h0, c0)
        for kind, bounds in (("chain-steps", list(range(T + 1))), ("chain-chunks", _chunks(T))):
            chained = _run_chained(candidate, tokens, h0, c0, bounds)
            diffs = {n: _max_abs(g, w) for n, g, w in zip(outputs, chained, whole, strict=True)}
            report.cases.append(CaseResult(kind, T, B, diffs))
    report.seconds = time.perf_counter() - start
    return report
