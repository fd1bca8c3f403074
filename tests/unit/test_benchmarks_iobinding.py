"""The benchmark's IOBinding decode loop (the path it takes on CUDA) computes what plain runs do.

Section 1 with ``--provider cuda`` keeps the state on the device and swaps two buffers per step;
on CPU the same code runs with CPU buffers, so this checks the binding logic here: after several
steps its state equals the state from chaining ``InferenceSession.run`` calls (1e-6, float32 on the
same kernels), for a few batch sizes and layer counts, on a fresh random model.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.inprocess import bound_stepper, ort_session
from export.graph import random_model


@pytest.mark.parametrize(("layers", "batch"), [(1, 1), (2, 3), (2, 17)])
def test_bound_steps_match_plain_runs(tmp_path, layers: int, batch: int) -> None:
    rng = np.random.default_rng()
    H = 12
    path = tmp_path / "m.onnx"
    model = random_model(hidden_size=H, num_layers=layers, seed=int(rng.integers(1 << 30)))
    path.write_bytes(model.SerializeToString())
    sess = ort_session(str(path), 1)
    tokens = rng.integers(0, 28, size=(1, batch), dtype=np.int64)
    step, state = bound_stepper(sess, tokens, layers, H, "cpu")
    h = np.zeros((layers, batch, H), np.float32)
    c = np.zeros_like(h)
    for _ in range(5):
        step()
        _, h, c = sess.run(None, {"tokens": tokens, "h0": h, "c0": c})
        hb, cb = state()
        np.testing.assert_allclose(hb, h, atol=1e-6, rtol=0)
        np.testing.assert_allclose(cb, c, atol=1e-6, rtol=0)
    assert np.abs(h).max() > 0  # the state really moved
