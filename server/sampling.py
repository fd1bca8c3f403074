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
    other parameters and ``uniforms[i]`` are ignored). Otherwise, with ``q`` the softmax of
    ``logits / temperature`` computed in float64:

    * top-k (``0 < top_k[i] < V``) keeps the ``top_k[i]`` most probable tokens (ties: lower id
      first);
    * top-p (``0 < top_p[i] < 1``) then keeps, most probable first, every token while the mass
      of the ones kept before it is below ``top_p[i]`` (so at least one);
    * the kept probabilities, renormalised, are inverted at ``uniforms[i]`` in ``[0, 1)`` in
      token-id order: the chosen id is the first whose cumulative mass exceeds ``u * total``.
    """
    V = logits.shape[1]
    # Few numpy calls on the common paths: at small batch sizes each call's fixed cost is what
    # matters, not the arithmetic.
    if temperature.all():
        out = None
        s: slice | np.ndarray = slice(None)
    else:
        out = np.argmax(logits, axis=1)
        s = np.flatnonzero(temperature > 0)
        if s.size == 0:
            return out
    x = logits[s].astype(np.float64)
    x /= temperature[s, None]
    x -= x.max(axis=1, keepdims=True)
    p = np.exp(x)
    k = top_k[s]
    tp = top_p[s]
    if k.any() or tp.any():
        use_k = (k > 0) & (k < V)
        use_p = (tp > 0) & (tp < 1)
        filt = use_k | use_p
    else:
        filt = None
    if filt is not None and filt.any():
        # Only rows that filter pay for the sort.
        rows = np.flatnonzero(filt)
        pr = p[rows]
        order = np.argsort(-pr, axis=1, kind="stable")
        ps = np.take_along_axis(pr, order, axis=1)
        kk = np.where(use_k[rows], k[rows], V)
        keep = np.arange(V)[None, :] < kk[:, None]
        ps = np.where(keep, ps, 0.0)
        ps /= ps.sum(axis=1, keepdims=True)
        t = np.where(use_p[rows], tp[rows], 2.0)
        keep &= (np.cumsum(ps, axis=1) - ps) < t[:, None]
        mask = np.empty_like(keep)
        np.put_along_axis(mask, order, keep, axis=1)
        pr[~mask] = 0.0
        p[rows] = pr
    cdf = np.cumsum(p, axis=1)
    idx = (cdf <= (uniforms[s] * cdf[:, -1])[:, None]).sum(axis=1)
    # u * total can round up to total: never step past the last token that may be chosen.
    last = V - 1 - np.argmax(p[:, ::-1] > 0, axis=1)
    chosen = np.minimum(idx, last)
    if out is None:
        return chosen.astype(np.int64, copy=False)
    out[s] = chosen
    return out.astype(np.int64, copy=False)
