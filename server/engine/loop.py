"""The engine: runs the planner against the model, on its own thread or inline.

* Iterations run on one dedicated *engine thread*: :meth:`Planner.schedule` (gather), the ONNX
  Runtime call (which releases the GIL, so the event loop keeps doing gRPC I/O meanwhile), and
  :meth:`Planner.update` (scatter, vectorised sampling). The event loop thread submits work and
  receives each iteration's results through one ``call_soon_threadsafe``.
* :meth:`Engine.submit_step` is the one entry point for a step, and the engine alone decides
  where it runs. While the engine is idle (no generation, nothing queued), a step never leaves
  the event loop thread, because two thread hand-offs cost more than the model call at these
  sizes: a step alone (no other request open, or a prompt of at most ``inline_max_rows``
  tokens) runs at once; one-token steps arriving in the same loop tick while other requests are
  open run as one batch at the end of the tick (up to ``inline_max_rows`` rows). Everything else
  goes to the engine thread.
* ``lock`` guards the planner (its queues and the state pool) between the two threads; it is
  not held during a model call on the engine thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from contract.model import KIND_SEQUENCE, KIND_TOKEN_LM

from ..batch import SlotSnapshot, StatePool
from ..errors import ResourceExhausted
from ..metrics import SchedulerStats
from ..runtime import ModelRuntime
from .planner import Delivery, Outputs, Plan, Planner
from .work import Generation, StepWork

log = logging.getLogger(__name__)

# A step from another session this recently (seconds) means company (Engine._company): about
# two client round trips at these sizes; longer gaps are a lone client's think time.
COMPANY_S = 0.002


class Engine:
    """The model loop over one :class:`ModelRuntime` and one :class:`StatePool`.

    :meth:`start` from the event loop, then the other methods from that loop's thread;
    :meth:`stop` ends it. ``open_requests`` tells how many requests the front end has open
    (this one included): with none other, a step runs at once rather than waiting for the end
    of the loop tick for company.
    """

    def __init__(
        self,
        runtime: ModelRuntime,
        pool: StatePool,
        *,
        max_batch_size: int = 256,
        max_queue_delay_s: float = 0.0002,
        max_queue_size: int = 4096,
        prefill_chunk_tokens: int = 128,
        inline_max_rows: int = 16,
        stream_chunk_tokens: int = 16,
        stats: SchedulerStats | None = None,
        open_requests: Callable[[], int] = lambda: 1,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.runtime = runtime
        self.pool = pool
        self.planner = Planner(
            pool,
            max_batch_size=max_batch_size,
            prefill_chunk_tokens=prefill_chunk_tokens,
            stream_chunk_tokens=stream_chunk_tokens,
            stats=stats,
            sequence=getattr(runtime, "kind", KIND_TOKEN_LM) == KIND_SEQUENCE,
        )
        self.stats = self.planner.stats
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.inline_max_rows = inline_max_rows
        self.open_requests = open_requests
        self.lock = threading.Lock()
        self._cond = threading.Condition(self.lock)
        self._running = False  # the engine thread holds a plan
        self._tick: list[StepWork] = []  # one-token steps batched on the event loop this tick
        self._clock = clock  # only for _company: when the last step arrived
        self._last_submit = (-1, -COMPANY_S)  # (slot, clock) of the last submit_step
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._engine, name="lstm-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None

    # --- work (event loop thread) ----------------------------------------------------------------

    @property
    def queued(self) -> int:
        return self.planner.queued

    @property
    def running_generations(self) -> int:
        return self.planner.running_generations

    def submit_step(self, slot: int, tokens: np.ndarray, *, want_all: bool = False) -> StepWork:
        """Feed ``tokens`` (int64, non-empty, ids already checked) to the session at ``slot``.

        Await ``work.future`` for the logits ``[positions, V]`` (it may already be done). The
        slot's state is advanced and its next-token logits recorded when the work completes.
        Raises :class:`ResourceExhausted` when the engine's queue is full.
        """
        assert self._loop is not None, "start() first"
        work = StepWork(slot, tokens, want_all, self._loop.create_future())
        n = len(tokens)
        company = self._company(slot)
        if self.inline_max_rows and not self._busy():
            if (n > 1 and n <= self.inline_max_rows) or (
                n == 1 and not self._tick and not company and self.open_requests() <= 1
            ):
                if self._run_inline([work]):
                    return work
            elif n == 1 and len(self._tick) < self.inline_max_rows:
                self._tick.append(work)
                if len(self._tick) == 1:
                    self._loop.call_soon(self._flush_tick)
                return work
        with self._cond:
            if self.planner.queued >= self.max_queue_size:
                raise ResourceExhausted(
                    f"request queue is full (max_queue_size={self.max_queue_size}); retry later"
                )
            self.planner.add_step(work)
            self._cond.notify()
        return work

    def _company(self, slot: int) -> bool:
        """Whether another session submitted a step within :data:`COMPANY_S`: then more
        steps are probably arriving, so this one waits for the end of the loop tick for them.
        ``open_requests`` alone cannot tell: a KServe sequence or a unary Step on a named
        session is no open request between its calls (unlike a StepStream), so with only
        that test every such step ran alone (a mean batch of 1.00 under perf_analyzer)."""
        now = self._clock()
        last_slot, last_t = self._last_submit
        self._last_submit = (slot, now)
        return last_slot != slot and now - last_t < COMPANY_S

    def start_generation(self, gen: Generation, logits: np.ndarray) -> None:
        """Sample ``gen``'s first token from ``logits[V]`` and add it to the running set."""
        with self._cond:
            self.planner.start_generation(gen, logits)
            self._cond.notify()
        gen.event.set()

    def abandon(
        self,
        item: StepWork | Generation | None,
        slot: int = -1,
        snapshot: SlotSnapshot | None = None,
    ) -> None:
        """Cancel ``item`` and, when given, put ``slot`` back to ``snapshot``, in one step under
        the lock, so that no iteration in flight can write over the restored state."""
        with self._cond:
            self.planner.abandon(item, slot, snapshot)
            self._cond.notify()

    # --- a session's state (event loop thread; the caller holds the session) -------------------

    @property
    def state_bytes_per_slot(self) -> int:
        return self.pool.state_bytes_per_slot

    def snapshot(self, slot: int) -> SlotSnapshot:
        return self.pool.snapshot(slot)

    def reset(self, slot: int) -> None:
        self.pool.reset(slot)

    def state(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the slot's ``h`` and ``c`` ``[L, H]``."""
        return self.pool.h[:, slot].copy(), self.pool.c[:, slot].copy()

    def load(self, slot: int, h: np.ndarray, c: np.ndarray, logits: np.ndarray | None) -> None:
        """Set the slot's state (a session loaded from a durable store or imported)."""
        self.pool.h[:, slot] = h
        self.pool.c[:, slot] = c
        if logits is None:
            self.pool.has_logits[slot] = False
        else:
            self.pool.set_logits(np.array([slot]), logits[None, :])

    def has_next(self, slot: int) -> bool:
        """Whether the slot holds a next-token distribution (it has been fed since reset)."""
        return bool(self.pool.has_logits[slot])

    def next_logits(self, slot: int) -> np.ndarray | None:
        """A copy of the slot's next-token logits, None when it has none."""
        return self.pool.logits[slot].copy() if self.pool.has_logits[slot] else None

    # --- running plans ---------------------------------------------------------------------------

    def _busy(self) -> bool:
        return self._running or self.planner.has_work()

    def _run_inline(self, works: list[StepWork]) -> bool:
        """Run ``works`` to completion on this thread if the engine is idle; False if it is not.

        Holds the lock throughout, so the engine thread cannot take these steps meanwhile.
        """
        if not self.lock.acquire(blocking=False):
            return False
        try:
            if self._busy():
                return False
            for w in works:
                self.planner.add_step(w)
            while (plan := self.planner.schedule()) is not None:
                self._deliver(self._complete(plan, self._run(plan)))
        finally:
            self.lock.release()
        return True

    def _flush_tick(self) -> None:
        steps = [w for w in self._tick if not w.cancelled]
        self._tick = []
        if not steps or self._run_inline(steps):
            return
        with self._cond:
            # The engine got work meanwhile: it takes these too (same batch semantics).
            for w in steps:
                self.planner.add_step(w)
            self._cond.notify()

    def _run(self, plan: Plan) -> Outputs | BaseException:
        # Without the lock: touches nothing but the plan's own arrays and ORT.
        try:
            out = []
            for batch in plan.batches():
                t0 = time.perf_counter()
                if batch.out is not None:
                    self.runtime.run_into(batch.tokens, batch.h, batch.c, *batch.out)
                    logits, hn, cn = batch.out
                else:
                    logits, hn, cn = self.runtime.run(batch.tokens, batch.h, batch.c)
                out.append((logits, hn, cn, time.perf_counter() - t0))
            return out
        except Exception as e:  # a model failure fails this iteration's requests only
            log.exception("model call failed")
            return e

    def _complete(self, plan: Plan, outputs: Outputs | BaseException) -> Delivery:
        # The caller holds the lock.
        if isinstance(outputs, BaseException):
            return self.planner.fail(
                plan, RuntimeError(f"model call failed: {type(outputs).__name__}")
            )
        try:
            return self.planner.update(plan, outputs)
        except Exception as e:  # a bug here must not stop the engine for everyone
            log.exception("completing an iteration failed")
            return self.planner.fail(plan, RuntimeError(f"model call failed: {type(e).__name__}"))

    def _engine(self) -> None:
        planner = self.planner
        while True:
            with self._cond:
                while not self._stopping and not planner.has_work():
                    self._cond.wait()
                if self._stopping:
                    return
                if self.max_queue_delay_s > 0 and planner.underfilled():
                    # Fewer steps arrived than ran last time: the rest are probably on their way.
                    self._cond.wait(self.max_queue_delay_s)
                plan = planner.schedule()
                if plan is None:
                    continue
                self._running = True
            outputs = self._run(plan)
            with self._cond:
                try:
                    delivery = self._complete(plan, outputs)
                finally:
                    self._running = False
            if not delivery:
                continue  # nothing for the event loop: do not wake it
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._deliver, delivery)
            except RuntimeError:  # the loop is closed: shutting down
                return

    @staticmethod
    def _deliver(d: Delivery) -> None:
        # Event loop thread: futures and events belong to it.
        for w, result in d.results:
            if not w.future.done():
                w.future.set_result(result)
        for w, exc in d.errors:
            if not w.future.done():
                w.future.set_exception(exc)
        for g in d.wake:
            g.event.set()
