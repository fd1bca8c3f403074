"""State pool and batch assembly: gather/scatter against a per-session dict reference."""

from __future__ import annotations

import numpy as np
import pytest

from server.batch import Batch, StatePool


@pytest.mark.parametrize(("L", "H", "cap"), [(1, 8, 5), (2, 16, 64), (3, 4, 1)])
def test_gather_scatter_round_trip_matches_reference(L, H, cap):
    seed = np.random.SeedSequence().entropy  # in every message: a failing plan can be replayed
    rng = np.random.default_rng(seed)
    pool = StatePool(L, H, 7, cap)
    slots = [pool.alloc() for _ in range(cap)]
    ref = {s: (np.zeros((L, H), np.float32), np.zeros((L, H), np.float32)) for s in slots}
    for _ in range(20):
        chosen = rng.permutation(slots)[: rng.integers(1, cap + 1)]
        h, c = pool.gather(np.asarray(chosen))
        assert h.shape == (L, len(chosen), H) and h.flags.c_contiguous, f"seed {seed}"
        for i, s in enumerate(chosen):
            np.testing.assert_array_equal(h[:, i], ref[s][0], err_msg=f"seed {seed}")
            np.testing.assert_array_equal(c[:, i], ref[s][1], err_msg=f"seed {seed}")
        hn = rng.standard_normal(h.shape).astype(np.float32)
        cn = rng.standard_normal(c.shape).astype(np.float32)
        pool.scatter(np.asarray(chosen), hn, cn)
        for i, s in enumerate(chosen):
            ref[s] = (hn[:, i].copy(), cn[:, i].copy())


def test_alloc_reuses_lowest_freed_slot_and_zeroes_it():
    pool = StatePool(1, 4, 3, 4)
    a, b, c = pool.alloc(), pool.alloc(), pool.alloc()
    assert (a, b, c) == (0, 1, 2) and pool.in_use == 3
    pool.h[:, b] = 5.0
    pool.has_logits[b] = True
    pool.free(c)
    pool.free(b)
    assert pool.alloc() == 1
    assert not pool.h[:, 1].any() and not pool.has_logits[1]
    assert pool.alloc() == 2
    assert pool.alloc() == 3
    with pytest.raises(MemoryError):
        pool.alloc()


def test_snapshot_restore_and_reset():
    pool = StatePool(2, 3, 5, 2)
    s = pool.alloc()
    pool.h[:, s] = 1.0
    pool.c[:, s] = 2.0
    pool.set_logits(np.array([s]), np.arange(5, dtype=np.float32)[None])
    snap = pool.snapshot(s)
    pool.h[:, s] = 9.0
    pool.reset(s)
    assert not pool.has_logits[s]
    pool.restore(s, snap)
    assert (pool.h[:, s] == 1.0).all() and (pool.c[:, s] == 2.0).all()
    assert pool.has_logits[s] and pool.logits[s].tolist() == [0, 1, 2, 3, 4]


def test_batch_assemble_and_write_back_with_keep_mask():
    rng = np.random.default_rng()
    pool = StatePool(2, 6, 4, 8)
    slots = np.array([pool.alloc() for _ in range(5)])[[4, 0, 2]]
    tokens = np.array([[1, 2, 3], [3, 2, 1]])
    batch = Batch.assemble(pool, slots, tokens)
    assert batch.tokens.dtype == np.int64 and batch.h.shape == (2, 3, 6)
    hn = rng.standard_normal((2, 3, 6)).astype(np.float32)
    cn = rng.standard_normal((2, 3, 6)).astype(np.float32)
    batch.write_back(pool, hn, cn, keep=np.array([True, False, True]))
    np.testing.assert_array_equal(pool.h[:, 4], hn[:, 0])
    np.testing.assert_array_equal(pool.c[:, 2], cn[:, 2])
    assert not pool.h[:, 0].any()  # the dropped row was not written
    with pytest.raises(ValueError):
        Batch.assemble(pool, slots, tokens[:, :2])


def test_untouched_capacity_is_not_resident():
    # np.zeros for a big pool maps fresh zero pages: only written slots cost memory.
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pool = StatePool(2, 256, 28, 100_000)  # 400 MB of address space
    for _ in range(100):
        pool.alloc()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert (after - before) * 1024 < 50 * 2**20
