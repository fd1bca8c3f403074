"""The oracle: in-process ONNX Runtime, one session at a time, state carried by hand.

One class for the integration tests, the soak benchmark and the scale test. It never goes through
the server's code (no pool, no batching, no engine), so agreeing with it means the server carried
each session's state exactly.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract.model import INPUT_C0, INPUT_FEATURES, INPUT_H0, INPUT_TOKENS

State = tuple[np.ndarray, np.ndarray]


class _Oracle:
    """One ORT session on a model file of either kind; the state is the caller's."""

    def __init__(self, path: str | Path) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        h0 = self.sess.get_inputs()[1].shape
        self.L, self.H = int(h0[0]), int(h0[2])
        # Load generators call it from several threads; one ORT session run at a time keeps the
        # oracle's own timing out of the picture.
        self._lock = threading.Lock()

    def zeros(self) -> State:
        z = np.zeros((self.L, 1, self.H), np.float32)
        return z, z.copy()

    def _run(self, name: str, x: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """The first output ``[T, W]`` (one session's row) and the new state after ``x``."""
        with self._lock:
            out, h, c = self.sess.run(None, {name: x, INPUT_H0: state[0], INPUT_C0: state[1]})
        return out[:, 0], (h, c)


class Reference(_Oracle):
    """A ``token_lm`` model: token ids in, logits out."""

    def feed(self, tokens: list[int], state: State) -> tuple[np.ndarray, State]:
        """Logits ``[T, V]`` and the new state after feeding ``tokens`` to one session."""
        return self._run(INPUT_TOKENS, np.asarray(tokens, np.int64).reshape(-1, 1), state)

    def greedy_with_state(
        self, prompt: list[int], n: int, state: State | None = None
    ) -> tuple[list[int], State]:
        """``n`` greedy tokens after ``prompt``, and the state once the last one is fed (the
        server's state after a Generate holds prompt + every generated token)."""
        logits, state = self.feed(prompt, state if state is not None else self.zeros())
        out: list[int] = []
        for _ in range(n):
            out.append(int(np.argmax(logits[-1])))
            logits, state = self.feed([out[-1]], state)
        return out, state

    def greedy(self, prompt: list[int], n: int, state: State | None = None) -> list[int]:
        return self.greedy_with_state(prompt, n, state)[0]


class SequenceReference(_Oracle):
    """A ``sequence`` model: feature rows in, outputs out."""

    def feed(self, x: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """Outputs ``[T, O]`` and the new state after feeding rows ``x [T, F]``."""
        return self._run(INPUT_FEATURES, np.asarray(x, np.float32)[:, None, :], state)
