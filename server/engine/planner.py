"""The planner: which sessions' tokens go into the next model call, and what its outputs mean.

Pure scheduling logic over a :class:`~server.batch.StatePool`: no threads, no event loop, no
model. The engine loop (:mod:`server.engine.loop`) drives it; unit tests drive it with a fake
model. Its interface follows vLLM v1's scheduler: :meth:`Planner.schedule` then
:meth:`Planner.update` with the model's outputs.

Contract:

* An *iteration* is one :class:`Plan`: at most one **decode** call and at most one **prefill**
  call. The decode call feeds exactly one token to each of up to ``max_batch_size`` rows: every
  queued one-token step first (in arrival order), then running generations. The prefill call
  feeds one group of prompts cut to the same chunk length (``min(remaining,
  prefill_chunk_tokens)``, the first waiting prompt's), so a long prompt advances a chunk per
  iteration and never stalls running generations for more than one chunk; a prompt with one
  token left joins the decode queue.
* Fairness: when more generations run than the decode call has room for, the ones left out go
  first next time (round robin), so none waits more than ``ceil(n / room)`` iterations.
* One plan at a time: :meth:`schedule` must not be called again before :meth:`update` (or
  :meth:`fail`) of the plan it returned. Between the two the caller may run the model without
  holding any lock; the plan's arrays are its own copies.
* Cancellation: an item marked ``cancelled`` (:meth:`abandon`) while its plan is out is
  skipped by :meth:`update`: its rows of the outputs are not written to the pool and it gets no
  result. :meth:`abandon` can also put the item's slot back to a snapshot.
* Generations join the running set with :meth:`start_generation` and leave it when they finish
  or are cancelled. A generation's tokens accumulate in its list; it is woken (listed in
  :attr:`Delivery.wake`) on its first token, when it finishes, and otherwise every
  ``max(stream_chunk_tokens, running generations)`` tokens (at most ``MAX_STREAM_CHUNK``):
  about one message per iteration in all, because every message costs the event loop tens of
  microseconds whatever its size. Generations get different phases so their messages spread.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..batch import Batch, RunningBatch, SlotSnapshot, StatePool
from ..metrics import SchedulerStats
from ..sampling import sample
from .work import Generation, StepWork

MAX_STREAM_CHUNK = 64  # tokens; bounds the gap between a generation's messages


@dataclass
class Plan:
    """One iteration's model calls and the items whose rows they hold.

    Decode rows are ``steps`` then ``gens``, in that order; prefill rows are ``prefill_work``,
    each fed ``prefill_len`` tokens.
    """

    decode: Batch | None
    steps: list[StepWork]
    gens: list[Generation]
    prefill: Batch | None
    prefill_work: list[StepWork]
    prefill_len: int
    running: bool = False  # the decode call is the running batch's (state stays stacked)

    def batches(self) -> list[Batch]:
        return [b for b in (self.decode, self.prefill) if b is not None]


# One (logits, hn, cn, seconds) per batch of Plan.batches(), in that order.
Outputs = Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, float]]


@dataclass
class Delivery:
    """What one iteration hands back to the event loop: results, failures, generations to wake."""

    results: list[tuple[StepWork, np.ndarray]] = field(default_factory=list)
    errors: list[tuple[StepWork, BaseException]] = field(default_factory=list)
    wake: list[Generation] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.results or self.errors or self.wake)


class Planner:
    """Continuous batching over one :class:`StatePool`: queues, plans, outputs to results.

    Not thread-safe: the engine calls every method holding its lock.
    """

    def __init__(
        self,
        pool: StatePool,
        *,
        max_batch_size: int = 256,
        prefill_chunk_tokens: int = 128,
        stream_chunk_tokens: int = 16,
        stats: SchedulerStats | None = None,
        sequence: bool = False,
    ) -> None:
        self.pool = pool
        # A sequence model's steps carry feature rows ([T, F] float32) instead of token ids,
        # and it has no generations; decided once here, so a token model's iteration pays
        # nothing for it but one test per decode call.
        self.sequence = sequence
        self.max_batch_size = max_batch_size
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.stream_chunk_tokens = max(1, stream_chunk_tokens)
        self.stats = stats if stats is not None else SchedulerStats()
        self._decode: deque[StepWork] = deque()
        self._prefill: list[StepWork] = []
        self._gens: list[Generation] = []
        self._running = RunningBatch(pool.num_layers, pool.hidden_size, pool.vocab_size)
        self._phase = 0
        self.last_rows = 0  # rows of the last decode call

    # --- queues --------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Steps waiting (prompt chunks included), not counting running generations."""
        return len(self._decode) + len(self._prefill)

    @property
    def running_generations(self) -> int:
        """Generations still to be fed (cancelled ones no longer count)."""
        return sum(1 for g in self._gens if g.finish is None and not g.cancelled)

    def has_work(self) -> bool:
        return bool(self._decode or self._prefill or self._gens)

    def underfilled(self) -> bool:
        """Only one-token steps wait, fewer than the last decode call had: more may be coming."""
        return (
            not self._gens
            and not self._prefill
            and 0 < len(self._decode) < min(self.last_rows, self.max_batch_size)
        )

    def add_step(self, work: StepWork) -> None:
        """Queue a step (int64 tokens or, for a sequence model, float32 feature rows
        ``[T, F]``; non-empty, already checked)."""
        if len(work.tokens) - work.pos == 1:
            self._decode.append(work)
        else:
            self._prefill.append(work)
        self.stats.queue_depth = self.queued

    def start_generation(self, gen: Generation, logits: np.ndarray) -> None:
        """Sample ``gen``'s first token from ``logits[V]`` and add it to the running set.

        The caller wakes ``gen`` (its first token is ready to drain).
        """
        gen.accept(int(self._sample([gen], logits[None, :])[0]))
        self._phase += 1
        gen.phase = self._phase
        self._gens.append(gen)

    def abandon(
        self,
        item: StepWork | Generation | None,
        slot: int = -1,
        snapshot: SlotSnapshot | None = None,
    ) -> None:
        """Cancel ``item`` (if any) and, when given, put ``slot`` back to ``snapshot``.

        Afterwards the planner never writes the item's outputs to the pool, even those of a plan
        that is out now.
        """
        if item is not None:
            item.cancelled = True
        if snapshot is not None and slot >= 0:
            self.pool.restore(slot, snapshot)

    # --- one iteration ---------------------------------------------------------------------------

    def schedule(self) -> Plan | None:
        """Take the work for one iteration and gather its state; None when there is none.

        When the decode call holds nothing but every running generation, it is the running
        batch's call (state stays stacked between iterations, see :class:`RunningBatch`);
        otherwise the running batch is written back to the pool first and rows are gathered.
        """
        now = time.perf_counter()
        self._gens = [g for g in self._gens if g.finish is None and not g.cancelled]
        budget = self.max_batch_size
        steps: list[StepWork] = []
        while self._decode and len(steps) < budget:
            w = self._decode.popleft()
            if not w.cancelled:
                steps.append(w)
        room = budget - len(steps)
        gens = self._gens[:room]
        running = not steps and len(gens) == len(self._gens) and bool(gens)
        if len(self._gens) > room:
            # Round robin: the ones left out go first next time.
            self._gens = self._gens[room:] + gens
        waits = [now - w.enqueued for w in steps if w.enqueued > 0]
        decode = None
        rb = self._running
        if running:
            rb.sync(gens, [g.slot for g in gens], self.pool)  # type: ignore[arg-type]
            rb.tokens[0] = [g.next_token for g in gens]
            decode = rb.batch()
        elif len(rb):
            # Members still live (not cancelled, not finished) go back to the pool.
            rb.flush([not (g.cancelled or g.finish) for g in rb.members], self.pool)  # type: ignore[attr-defined]
        if decode is None and (steps or gens):
            n = len(steps) + len(gens)
            slots = np.fromiter([w.slot for w in steps] + [g.slot for g in gens], np.intp, n)
            if self.sequence:
                # One feature row per session: [1, B, F] (a sequence model has no generations).
                tokens = np.stack([w.tokens[w.pos] for w in steps])[None]
            else:
                tokens = np.fromiter(
                    [int(w.tokens[w.pos]) for w in steps] + [g.next_token for g in gens],
                    np.int64,
                    n,
                ).reshape(1, -1)
            decode = Batch.assemble(self.pool, slots, tokens)
        prefill = None
        group: list[StepWork] = []
        chunk = 0
        if self._prefill:
            self._prefill = [w for w in self._prefill if not w.cancelled]
        if self._prefill:
            chunk = min(self._prefill[0].remaining, self.prefill_chunk_tokens)
            group = [
                w for w in self._prefill if min(w.remaining, self.prefill_chunk_tokens) == chunk
            ][: self.max_batch_size]
            waits += [now - w.enqueued for w in group if w.enqueued > 0]
            slots = np.fromiter((w.slot for w in group), np.intp, len(group))
            tokens = np.stack([w.tokens[w.pos : w.pos + chunk] for w in group], axis=1)
            prefill = Batch.assemble(self.pool, slots, tokens)
        for w in steps:
            w.enqueued = -1.0
        for w in group:
            w.enqueued = -1.0
        if len(waits) > 8:
            self.stats.queue_wait.observe_many(np.asarray(waits))
        else:
            for wait in waits:
                self.stats.queue_wait.observe(wait)
        self.stats.queue_depth = self.queued
        if decode is None and prefill is None:
            return None
        return Plan(decode, steps, gens, prefill, group, chunk, running)

    def update(self, plan: Plan, outputs: Outputs) -> Delivery:
        """Apply a plan's model outputs: state and next-token logits to the pool, results to the
        steps that are complete, a sampled token to each generation, finished ones marked.

        Cancelled items are skipped (see the module contract).
        """
        d = Delivery()
        stats = self.stats
        it = iter(outputs)
        if plan.decode is not None:
            logits, hn, cn, dt = next(it)
            rows = len(plan.decode.slots)
            stats.model_call.observe(dt)
            stats.batch_size.observe(rows)
            stats.tokens["decode"] += rows
            self.last_rows = rows
            self._update_decode(plan, logits[0], hn, cn, d)
        if plan.prefill is not None:
            logits, hn, cn, dt = next(it)
            stats.model_call.observe(dt)
            stats.batch_size.observe(len(plan.prefill.slots))
            stats.tokens["prefill"] += plan.prefill_len * len(plan.prefill.slots)
            self._update_prefill(plan, logits, hn, cn, d)
        stats.queue_depth = self.queued
        return d

    def fail(self, plan: Plan, error: BaseException) -> Delivery:
        """The plan's model call failed: its steps get ``error``, its generations end with it.

        No state is written: every session in the plan keeps the state it had before.
        """
        d = Delivery()
        for w in [*plan.steps, *plan.prefill_work]:
            d.errors.append((w, error))
            if w in self._prefill:
                self._prefill.remove(w)
        for g in plan.gens:
            g.error = error
            g.finish = "error"
            d.wake.append(g)
        return d

    def _update_decode(
        self, plan: Plan, logits: np.ndarray, hn: np.ndarray, cn: np.ndarray, d: Delivery
    ) -> None:
        assert plan.decode is not None
        steps, gens = plan.steps, plan.gens
        ns = len(steps)
        if plan.running:
            # The outputs were written into the running batch: they become its state. Its
            # members' state reaches the pool when they leave (below) or at a flush.
            self._running.swap()
        elif any(w.cancelled for w in steps) or any(g.cancelled for g in gens):
            keep = np.asarray([not w.cancelled for w in steps] + [not g.cancelled for g in gens])
            plan.decode.write_back(self.pool, hn, cn, keep)
            self.pool.set_logits(plan.decode.slots[keep], logits[keep])
        else:
            plan.decode.write_back(self.pool, hn, cn)
            self.pool.set_logits(plan.decode.slots, logits)
        for i, w in enumerate(steps):
            if w.cancelled:
                continue
            row = logits[i]
            w.pos += 1
            if w.want_all:
                w.chunks.append(row[None, :].copy())
                result = np.concatenate(w.chunks) if len(w.chunks) > 1 else w.chunks[0]
            else:
                result = row[None, :].copy()
            d.results.append((w, result))
        if not gens:
            return
        to_sample: list[Generation] = []
        rows: list[int] = []
        finished: list[int] = []
        for i, g in enumerate(gens, start=ns):
            if g.cancelled:
                continue
            g.fed += 1
            if g.done_after_feed:
                g.finish = "stop" if g.stop.cut >= 0 else "length"
                d.wake.append(g)
                finished.append(i)
            else:
                to_sample.append(g)
                rows.append(i)
        if plan.running:
            # Before the wake-up: the session's next request must find its state in the pool.
            self._running.write_back(finished, self.pool)
        if to_sample:
            tokens = self._sample(to_sample, logits[rows])
            chunk = min(MAX_STREAM_CHUNK, max(self.stream_chunk_tokens, len(gens)))
            wake = d.wake
            for g, t in zip(to_sample, tokens.tolist(), strict=True):
                g.accept(t)
                if (len(g.tokens) + g.phase) % chunk == 0 or g.done_after_feed:
                    wake.append(g)

    def _update_prefill(
        self, plan: Plan, logits: np.ndarray, hn: np.ndarray, cn: np.ndarray, d: Delivery
    ) -> None:
        assert plan.prefill is not None
        group = plan.prefill_work
        live = [not w.cancelled for w in group]
        plan.prefill.write_back(self.pool, hn, cn, None if all(live) else np.asarray(live))
        for i, w in enumerate(group):
            if w.cancelled:
                continue
            w.pos += plan.prefill_len
            if w.want_all:
                w.chunks.append(logits[:, i].copy())
            if w.remaining == 0:
                self._prefill.remove(w)
                self.pool.set_logits(np.array([w.slot]), logits[-1, i][None, :])
                result = np.concatenate(w.chunks) if w.want_all else logits[-1, i][None, :].copy()
                d.results.append((w, result))
            elif w.remaining == 1:
                # The last token goes with the decode batch.
                self._prefill.remove(w)
                self._decode.append(w)

    def _sample(self, gens: Sequence[Generation], logits: np.ndarray) -> np.ndarray:
        n = len(gens)
        temps = np.fromiter((g.temperature for g in gens), np.float64, n)
        if not temps.any():
            return np.argmax(logits, axis=1)
        top_k = np.fromiter((g.top_k for g in gens), np.int64, n)
        top_p = np.fromiter((g.top_p for g in gens), np.float64, n)
        # One draw per sampled row from the request's own generator: reproducible whatever the
        # batch around it.
        u = np.fromiter((g.uniform() if g.temperature > 0 else 0.0 for g in gens), np.float64, n)
        return sample(logits, temps, top_k, top_p, u)
