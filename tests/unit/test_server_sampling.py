"""Vectorised sampling against a per-row float64 reference written independently."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server.sampling import sample


def reference_row(logits: np.ndarray, temp: float, k: int, p: float, u: float) -> int:
    """The contract of :func:`sample`, one row, in plain Python floats."""
    if temp == 0:
        return int(np.argmax(logits))
    x = [float(v) / temp for v in logits]
    m = max(x)
    w = [math.exp(v - m) for v in x]
    total = sum(w)
    q = [v / total for v in w]
    order = sorted(range(len(x)), key=lambda i: (-q[i], i))
    kept = order[:k] if 0 < k < len(x) else order
    if 0 < p < 1:
        mass_k = sum(q[i] for i in kept)
        chosen, mass = [], 0.0
        for i in kept:
            if mass >= p:
                break
            chosen.append(i)
            mass += q[i] / mass_k
        kept = chosen
    kept_set = set(kept)
    probs = [q[i] if i in kept_set else 0.0 for i in range(len(x))]
    target = u * sum(probs)
    acc = 0.0
    for i, v in enumerate(probs):
        acc += v
        if acc > target:
            return i
    return max(kept)


@pytest.mark.parametrize(("B", "V"), [(1, 5), (17, 28), (64, 97)])
def test_matches_reference(B, V):
    seed = np.random.SeedSequence().entropy  # in every message: a failing draw can be replayed
    rng = np.random.default_rng(seed)
    for _ in range(20):
        logits = (rng.standard_normal((B, V)) * rng.uniform(0.1, 5)).astype(np.float32)
        temp = rng.choice([0.0, 0.5, 1.0, 2.0], B)
        k = rng.choice([0, 1, 3, V, V + 5], B)
        p = rng.choice([0.0, 0.3, 0.9, 1.0], B)
        u = rng.random(B)
        got = sample(logits, temp, k, p, u)
        want = [reference_row(logits[i], temp[i], k[i], p[i], u[i]) for i in range(B)]
        assert got.tolist() == want, f"seed {seed}"


def test_greedy_is_exact_argmax_with_lowest_id_on_ties():
    logits = np.array([[0.0, 3.0, 3.0, 1.0], [5.0, 5.0, 5.0, 5.0]], np.float32)
    out = sample(logits, np.zeros(2), np.zeros(2, np.int64), np.zeros(2), np.full(2, 0.99))
    assert out.tolist() == [1, 0]


def test_frequencies_follow_the_distribution():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    n = 20000
    u = rng.random(n)
    out = sample(np.repeat(logits, n, 0), np.ones(n), np.zeros(n, np.int64), np.zeros(n), u)
    freq = np.bincount(out, minlength=4) / n
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    # top_p=0.7 keeps {0, 1} (0.5 < 0.7, 0.8 >= 0.7); top_k=1 is greedy.
    out = sample(np.repeat(logits, n, 0), np.ones(n), np.zeros(n, np.int64), np.full(n, 0.7), u)
    np.testing.assert_allclose(np.bincount(out, minlength=4) / n, [0.625, 0.375, 0, 0], atol=0.015)
    out = sample(np.repeat(logits, n, 0), np.ones(n), np.ones(n, np.int64), np.zeros(n), u)
    assert (out == 0).all()
