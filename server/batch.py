"""The one home of stacking sessions' recurrent state into a batch and splitting it back.

Every session owns a *slot* in one preallocated pool: ``h`` and ``c`` arrays ``[L, capacity, H]``
plus the last next-token logits ``[capacity, V]`` (for a ``sequence`` model: the last row of
outputs, ``[capacity, O]``; the pool cares only about the width). A model call's batch is a list
of slots: :meth:`StatePool.gather` stacks their rows into contiguous ``[L, B, H]`` inputs (with
``np.take``: one copy, no per-session Python), :meth:`StatePool.scatter` writes the outputs back.
This is text-generation-inference's ``concatenate``/``filter`` for a recurrent model: membership
of the batch may change at every step because nothing lives in the batch between steps.

Memory: the pool is allocated once for ``max_sessions`` slots with ``np.zeros``, which the C
library satisfies with fresh zero pages (calloc/mmap); pages become resident only when a slot is
first written, so idle capacity costs address space, not memory. Freed slots are reused lowest
first, which keeps the touched region compact.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from contract.model import state_bytes


@dataclass(frozen=True)
class SlotSnapshot:
    """A copy of one slot, to put a session back as it was when a request fails."""

    h: np.ndarray
    c: np.ndarray
    logits: np.ndarray
    has_logits: bool


class StatePool:
    """Fixed-capacity pool of per-session state rows, addressed by integer slot."""

    def __init__(self, num_layers: int, hidden_size: int, vocab_size: int, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.capacity = capacity
        self.h = np.zeros((num_layers, capacity, hidden_size), np.float32)
        self.c = np.zeros((num_layers, capacity, hidden_size), np.float32)
        # The distribution after the last fed token, so Generate can continue a session without
        # a prompt. has_logits is False until the session is fed (or after a reset).
        self.logits = np.zeros((capacity, vocab_size), np.float32)
        self.has_logits = np.zeros(capacity, np.bool_)
        self._next = 0  # slots >= _next were never handed out
        self._free: list[int] = []  # freed slots below _next, min-heap
        self.in_use = 0

    @property
    def state_bytes_per_slot(self) -> int:
        return state_bytes(self.num_layers, self.hidden_size)

    def alloc(self) -> int:
        """A zeroed slot. Raises :class:`MemoryError` when every slot is taken."""
        if self._free:
            slot = heapq.heappop(self._free)
        elif self._next < self.capacity:
            slot = self._next
            self._next += 1
        else:
            raise MemoryError("state pool is full")
        self.reset(slot)
        self.in_use += 1
        return slot

    def free(self, slot: int) -> None:
        heapq.heappush(self._free, slot)
        self.in_use -= 1

    def reset(self, slot: int) -> None:
        self.h[:, slot] = 0.0
        self.c[:, slot] = 0.0
        self.has_logits[slot] = False

    def gather(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stack the slots' rows: ``(h, c)``, each a new C-contiguous ``[L, len(slots), H]``."""
        # np.take along axis 1 yields C-contiguous output (``h[:, slots]`` does not for L > 1,
        # and ONNX Runtime would copy it again).
        return np.take(self.h, slots, axis=1), np.take(self.c, slots, axis=1)

    def scatter(self, slots: np.ndarray, h: np.ndarray, c: np.ndarray) -> None:
        """Write ``h[:, i]``/``c[:, i]`` back to ``slots[i]``. Slots must be distinct."""
        self.h[:, slots] = h
        self.c[:, slots] = c

    def set_logits(self, slots: np.ndarray, logits: np.ndarray) -> None:
        """Record each slot's next-token logits (``logits[i]`` for ``slots[i]``)."""
        self.logits[slots] = logits
        self.has_logits[slots] = True

    def snapshot(self, slot: int) -> SlotSnapshot:
        return SlotSnapshot(
            self.h[:, slot].copy(),
            self.c[:, slot].copy(),
            self.logits[slot].copy(),
            bool(self.has_logits[slot]),
        )

    def restore(self, slot: int, snap: SlotSnapshot) -> None:
        self.h[:, slot] = snap.h
        self.c[:, slot] = snap.c
        self.logits[slot] = snap.logits
        self.has_logits[slot] = snap.has_logits


@dataclass
class Batch:
    """One model call's input, assembled from slots: ``tokens[T, B]`` int64 (a ``sequence``
    model's features: float32 ``[T, B, F]``), ``h``/``c`` ``[L, B, H]``.

    Row ``i`` belongs to ``slots[i]``; :meth:`write_back` is the inverse of :meth:`assemble`.
    ``out``: preallocated ``(logits, hn, cn)`` the model writes into (a :class:`RunningBatch`'s
    call); None to let the model allocate its outputs.
    """

    slots: np.ndarray
    tokens: np.ndarray
    h: np.ndarray
    c: np.ndarray
    out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @classmethod
    def assemble(cls, pool: StatePool, slots: np.ndarray, tokens: np.ndarray) -> Batch:
        ndim = tokens.ndim
        if ndim not in (2, 3) or tokens.shape[1] != len(slots):
            raise ValueError(
                f"tokens must be [T, {len(slots)}] or [T, {len(slots)}, F], got {tokens.shape}"
            )
        h, c = pool.gather(slots)
        dtype = np.int64 if ndim == 2 else np.float32
        return cls(slots, np.ascontiguousarray(tokens, dtype=dtype), h, c)

    def write_back(
        self,
        pool: StatePool,
        hn: np.ndarray,
        cn: np.ndarray,
        keep: np.ndarray | None = None,
    ) -> None:
        """Scatter the outputs' rows to their slots; ``keep`` (bool ``[B]``) skips rows."""
        if keep is None:
            pool.scatter(self.slots, hn, cn)
        else:
            pool.scatter(self.slots[keep], hn[:, keep], cn[:, keep])


class RunningBatch:
    """The running generations' state, kept stacked between iterations.

    While only generations run, each iteration's decode call reads ``h``/``c`` ``[L, n, H]``
    and writes ``out_h``/``out_c`` and ``logits`` ``[1, n, V]`` in place (bound outputs), then
    the two state buffers swap: no gather, no scatter, no allocation. Rows move only when
    generations join or leave (:meth:`sync`). While a generation is a member, its state lives
    here, not in the pool: :meth:`write_back` puts it back when it leaves, :meth:`flush` puts
    every member back (before an iteration that mixes in other work).
    """

    def __init__(self, num_layers: int, hidden_size: int, vocab_size: int) -> None:
        self.L, self.H, self.V = num_layers, hidden_size, vocab_size
        self.members: list[object] = []
        self.slots = np.zeros(0, np.intp)
        self._alloc(0)

    def _alloc(self, n: int) -> None:
        shape = (self.L, n, self.H)
        self.h = np.empty(shape, np.float32)
        self.c = np.empty(shape, np.float32)
        self.out_h = np.empty(shape, np.float32)
        self.out_c = np.empty(shape, np.float32)
        self.logits = np.empty((1, n, self.V), np.float32)
        self.tokens = np.empty((1, n), np.int64)

    def __len__(self) -> int:
        return len(self.members)

    def sync(self, members: list[object], slots: list[int], pool: StatePool) -> None:
        """Make ``members`` (with their pool ``slots``) the rows, in this order.

        Rows of members that stay are copied from here; new members' rows from the pool. Rows
        of members that left are dropped (written back already, or not wanted: cancelled).
        """
        if len(members) == len(self.members) and all(
            a is b for a, b in zip(members, self.members, strict=True)
        ):
            return
        where = {id(m): i for i, m in enumerate(self.members)}
        old_h, old_c = self.h, self.c
        self._alloc(len(members))
        keep_new = [i for i, m in enumerate(members) if id(m) in where]
        keep_old = [where[id(members[i])] for i in keep_new]
        fresh = [i for i, m in enumerate(members) if id(m) not in where]
        if keep_new:
            self.h[:, keep_new] = old_h[:, keep_old]
            self.c[:, keep_new] = old_c[:, keep_old]
        if fresh:
            from_pool = np.asarray([slots[i] for i in fresh], np.intp)
            self.h[:, fresh] = pool.h[:, from_pool]
            self.c[:, fresh] = pool.c[:, from_pool]
        self.members = list(members)
        self.slots = np.asarray(slots, np.intp)

    def batch(self) -> Batch:
        """This iteration's call: the caller fills ``tokens`` first."""
        return Batch(self.slots, self.tokens, self.h, self.c, (self.logits, self.out_h, self.out_c))

    def swap(self) -> None:
        """After a call: its outputs become the state."""
        self.h, self.out_h = self.out_h, self.h
        self.c, self.out_c = self.out_c, self.c

    def write_back(self, rows: list[int], pool: StatePool) -> None:
        """Put ``rows``' state and last logits back into their pool slots."""
        if not rows:
            return
        slots = self.slots[rows]
        pool.scatter(slots, self.h[:, rows], self.c[:, rows])
        pool.set_logits(slots, self.logits[0, rows])

    def flush(self, keep: list[bool], pool: StatePool) -> None:
        """Write back the rows marked in ``keep`` and empty the batch."""
        self.write_back([i for i, k in enumerate(keep) if k], pool)
        self.members = []
        self.slots = np.zeros(0, np.intp)
        self._alloc(0)
