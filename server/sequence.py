"""The data plane of a ``sequence`` model: feature rows in, output rows out, the same sessions.

A ``sequence`` model (``contract.model``: ``features [T, B, F] -> outputs [T, B, O]``, the same
``h0/c0 -> hn/cn`` state) needs nothing new from the engine: a step's input is ``[T, F]``
float32 rows instead of ``T`` token ids, and its result ``[T, O]`` outputs instead of logits, so
the pool, the planner's batches, durable records, Fork/Export/Import and request ids carry over
(the pool's last-output row, where a token model keeps its next-token logits, holds the last
outputs row, O wide). :class:`SequencePlane` differs from the token plane only where the kind
shows: what a step may carry (checked here, in one place: shape, limit, finite values), the
model's description, and Generate and text, which it refuses by name.

Transports turn their tensors into an array with :func:`feature_rows` (shape and values must
agree) and pass it as ``features=``; this plane checks the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from contract.model import KIND_SEQUENCE, SequenceSpec

from .dataplane import (
    OUTPUT_ALL,
    OUTPUT_LAST,
    OUTPUT_TOP_K,
    DataPlane,
    GenerateParams,
    ModelInfo,
)
from .errors import InvalidArgument


def feature_rows(shape: Sequence[int], values: Any) -> np.ndarray:
    """A tensor as a transport received it (its shape, and its values flat, row-major: a list,
    a protobuf repeated field, little-endian float32 bytes or an array) as a float32 array of
    that shape. Raises :class:`InvalidArgument` when they disagree; what the shape must be is
    the plane's check (:meth:`SequencePlane.check_features`)."""
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise InvalidArgument(f"features shape {dims[:8]} has a negative dimension")
    if isinstance(values, bytes | bytearray | memoryview):
        if len(values) % 4:
            raise InvalidArgument(f"features data is {len(values)} bytes, not whole float32s")
        flat = np.frombuffer(values, "<f4").astype(np.float32, copy=False)
    elif isinstance(values, np.ndarray):
        flat = values.astype(np.float32, copy=False).ravel()
    else:
        flat = np.fromiter(values, np.float32, len(values))
    need = int(np.prod(dims)) if dims else 1
    if flat.size != need:
        raise InvalidArgument(f"features has {flat.size} values; its shape {dims[:8]} needs {need}")
    return flat.reshape(dims)


class SequencePlane(DataPlane):
    """:class:`DataPlane` for a ``sequence`` model (chosen once, when the version is built)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        spec = self.runtime.spec
        assert isinstance(spec, SequenceSpec), "a SequencePlane needs a sequence model"
        self.sequence: SequenceSpec = spec

    def input_hint(self) -> str:
        s = self.sequence
        return f"send features [T, {s.num_features}] (feature_names {list(s.feature_names)})"

    def check_step(
        self,
        text: str,
        token_ids: Sequence[int],
        output: str,
        top_k: int,
        features: np.ndarray | None = None,
    ) -> np.ndarray:
        """A step's feature rows, checked (:meth:`check_features`). Text, token ids or top-k
        output on this model: :class:`FailedPrecondition` naming the model and its kind."""
        if text or len(token_ids):
            raise self.wrong_kind("it takes no text or token_ids (a 'token_lm' model's input)")
        if output not in (OUTPUT_LAST, OUTPUT_ALL):
            if output == OUTPUT_TOP_K:
                raise self.wrong_kind("it has no top-k output (next-token probabilities)")
            raise InvalidArgument(f"unknown output {output!r}")
        return self.check_features(features)

    def check_features(self, features: np.ndarray | None) -> np.ndarray:
        """``features`` as the engine takes them: float32 ``[T, F]``, C-contiguous, with
        ``1 <= T <= max_prompt_tokens``, F the model's and every value finite. Raises
        :class:`InvalidArgument` naming the problem (the first bad value by row and column)."""
        s = self.sequence
        f = s.num_features
        if features is None:
            raise InvalidArgument(f"input is empty: {self.input_hint()}")
        shape = list(features.shape)
        if features.ndim != 2 or shape[1] != f:
            raise InvalidArgument(
                f"features has shape {shape[:8]}; model {self.runtime.name!r} takes [T, {f}] "
                f"(T time steps of the {f} features {list(s.feature_names)})"
            )
        if shape[0] < 1:
            raise InvalidArgument("features has no rows (T = 0); send at least one")
        limit = self.limits.max_prompt_tokens
        if shape[0] > limit:
            raise InvalidArgument(
                f"features has {shape[0]} rows, over max_prompt_tokens={limit} (the most time "
                "steps one request may feed)"
            )
        rows = np.ascontiguousarray(features, np.float32)
        finite = np.isfinite(rows)
        if not finite.all():
            r, c = (int(i) for i in np.argwhere(~finite)[0])
            raise InvalidArgument(
                f"features[{r}, {c}] is {float(rows[r, c])} (row {r}, feature "
                f"{s.feature_names[c]!r}); every value must be finite"
            )
        return rows

    def check_generate(self, prompt: str, params: GenerateParams) -> np.ndarray | None:
        raise self.wrong_kind("Generate samples tokens, which only a 'token_lm' model has")

    def _describe(self) -> ModelInfo:
        s = self.sequence
        base = super()._describe_common()
        return ModelInfo(
            **base,
            vocab=(),
            preprocess="",
            unk_id=0,
            kind=KIND_SEQUENCE,
            feature_names=s.feature_names,
            output_names=s.output_names,
            scaling=s.scaling,
        )
