"""A sequence model's steps through the planner and the pool, and the plane's input checks.

The fake model is a linear recurrence with independent rows (like the LSTM): ``h`` accumulates
the feature rows, the outputs read ``h``. The reference runs each session alone, row by row, in
float64; every session's outputs, state and last-output row must match it however the planner
cut and batched the steps (prefill chunks, the decode call).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from server.batch import Batch, StatePool
from server.dataplane import step_digest
from server.engine import Planner, StepWork
from server.errors import InvalidArgument
from server.sequence import feature_rows

L, H, F, O = 2, 3, 4, 2  # noqa: E741 (the contract's letters)
ATOL = 1e-5
RNG = np.random.default_rng(0)
W = RNG.normal(size=(F, H))
U = RNG.normal(size=(H, O))


def cell(x: np.ndarray, h: np.ndarray, c: np.ndarray):
    """One row per session: ``x [B, F]``, ``h``/``c`` ``[L, B, H]``."""
    h = 0.5 * h + np.tanh(x @ W)[None]
    c = c + h
    return np.tanh(h[-1] @ U), h, c


def run(tokens: np.ndarray, h: np.ndarray, c: np.ndarray):
    assert tokens.dtype == np.float32 and tokens.ndim == 3
    h, c = h.astype(np.float64), c.astype(np.float64)
    out = []
    for t in range(tokens.shape[0]):
        y, h, c = cell(tokens[t].astype(np.float64), h, c)
        out.append(y)
    return np.stack(out).astype(np.float32), h.astype(np.float32), c.astype(np.float32)


@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def test_feature_steps_are_batched_and_exact(loop):
    pool = StatePool(L, H, O, capacity=8)
    planner = Planner(pool, max_batch_size=8, prefill_chunk_tokens=3, sequence=True)
    slots = [pool.alloc() for _ in range(5)]
    ref = {s: (np.zeros((L, 1, H)), np.zeros((L, 1, H))) for s in slots}
    rng = np.random.default_rng(1)
    for _ in range(4):
        works, wants = [], []
        for s in slots:
            x = rng.normal(size=(int(rng.integers(1, 8)), F)).astype(np.float32)
            works.append(StepWork(s, x, True, loop.create_future()))
            h, c = ref[s]
            rows = []
            for row in x:
                y, h, c = cell(row[None].astype(np.float64), h, c)
                rows.append(y[0])
            ref[s] = (h, c)
            wants.append(np.stack(rows))
            planner.add_step(works[-1])
        results = {}
        while (plan := planner.schedule()) is not None:
            d = planner.update(plan, [(*run(b.tokens, b.h, b.c), 0.0) for b in plan.batches()])
            results.update({id(w): r for w, r in d.results})
        for w, want in zip(works, wants, strict=True):
            np.testing.assert_allclose(results[id(w)], want, atol=ATOL)
            np.testing.assert_allclose(pool.logits[w.slot], want[-1], atol=ATOL)
            np.testing.assert_allclose(pool.h[:, w.slot], ref[w.slot][0][:, 0], atol=ATOL)
            np.testing.assert_allclose(pool.c[:, w.slot], ref[w.slot][1][:, 0], atol=ATOL)


def test_batch_assembles_feature_rows_as_float32():
    pool = StatePool(L, H, O, capacity=4)
    slots = np.array([pool.alloc(), pool.alloc()], np.intp)
    b = Batch.assemble(pool, slots, np.ones((3, 2, F), np.float64))
    assert b.tokens.dtype == np.float32 and b.tokens.shape == (3, 2, F)
    assert Batch.assemble(pool, slots, np.ones((3, 2), np.int32)).tokens.dtype == np.int64
    with pytest.raises(ValueError, match=r"\[T, 2\] or \[T, 2, F\]"):
        Batch.assemble(pool, slots, np.ones((3, 3, F), np.float32))


def test_feature_rows_and_digests():
    x = feature_rows([2, 3], [1, 2, 3, 4, 5, 6])
    assert x.dtype == np.float32 and x.tolist() == [[1, 2, 3], [4, 5, 6]]
    raw = np.arange(6, dtype="<f4").tobytes()
    assert feature_rows((3, 2), raw).tolist() == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(InvalidArgument, match=r"5 values; its shape \[2, 3\] needs 6"):
        feature_rows([2, 3], [1.0] * 5)
    with pytest.raises(InvalidArgument, match="not whole float32s"):
        feature_rows([1, 1], b"abc")
    with pytest.raises(InvalidArgument, match="negative"):
        feature_rows([-1, 3], [])
    # A retry's digest: the rows' bytes, so rows that differ in a fraction differ.
    a = step_digest(np.array([[1.0, 2.0]], np.float32), "last", 0)
    b = step_digest(np.array([[1.0, 2.5]], np.float32), "last", 0)
    assert a != b and a == step_digest(np.array([[1.0, 2.0]], np.float32), "last", 0)
    assert step_digest(np.array([1, 2], np.int64), "last", 0) != a
