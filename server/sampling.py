"""Next-token choice for a whole batch at once: greedy, temperature, top-k, top-p.

One call handles every row; rows differ in their parameters. Randomness comes from one uniform
number per sampled row, drawn by the caller from that request's own seeded generator, so a
request's tokens do not depend on which other requests share its batches.
"""

from __future__ import annotations

import numpy as np


def sample(
    logits: np.ndarray,
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
    uniforms: np.ndarray,
) -> np.ndarray:
    """Choose one token per row of ``logits[B, V]``; returns int64 ``[B]``.

    Row ``i``: ``temperature[i] == 0`` is greedy (exactly ``argmax``, lowest id on ties; the
    other parameters and ``uniforms[i]`` are ignored). Otherwise the softmax of
    ``logits / temperature`` (in float64) is restricted to the ``top_k[i]`` most probable tokens
    (0 = all), then to the smallest most-probable-first prefix whose mass reaches ``top_p[i]``
    (0 or >= 1 = all), renormalised, and inverted at ``uniforms[i]`` in ``[0, 1)`` along the
    most-probable-first order (ties by lower id).
    """
    V = logits.shape[1]
    out = np.argmax(logits, axis=1)
    sampled = np.flatnonzero(temperature > 0)
    if sampled.size == 0:
        return out
    x = logits[sampled].astype(np.float64) / temperature[sampled, None].astype(np.float64)
    order = np.argsort(-x, axis=1, kind="stable")
    xs = np.take_along_axis(x, order, axis=1)
    xs -= xs[:, :1]
    p = np.exp(xs)
    ranks = np.arange(V)
    k = top_k[sampled].astype(np.int64)
    k = np.where((k <= 0) | (k > V), V, k)
    p[ranks[None, :] >= k[:, None]] = 0.0
    p /= p.sum(axis=1, keepdims=True)
    tp = top_p[sampled].astype(np.float64)
    tp = np.where((tp <= 0) | (tp >= 1), 1.0, tp)
    before = np.cumsum(p, axis=1) - p  # mass of the more probable tokens
    # The first token is always kept; a token is kept while the mass before it is short of top_p.
    drop = before >= tp[:, None]
    drop[:, 0] = False
    p[drop] = 0.0
    cdf = np.cumsum(p, axis=1)
    u = uniforms[sampled].astype(np.float64) * cdf[:, -1]
    idx = np.minimum((cdf <= u[:, None]).sum(axis=1), V - 1)
    # A zero-probability tail after the cut can never be chosen: step back onto the last kept.
    idx = np.minimum(idx, (p > 0).sum(axis=1) - 1)
    out[sampled] = order[np.arange(sampled.size), idx]
    return out.astype(np.int64, copy=False)
