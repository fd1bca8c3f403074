"""Continuous batching: every session's pending work shares one model call per iteration.

Contract (what callers may rely on):

* An *iteration* is at most one **decode** call and at most one **prefill** call.
  The decode call feeds exactly one token to each of up to ``max_batch_size`` sessions: every
  running generation and every step request with one token left to feed. The prefill call feeds
  one group of prompts cut to the same chunk length (``min(remaining, prefill_chunk_tokens)``),
  so a long prompt advances a chunk per iteration and never stalls running generations for more
  than one chunk.
* Folding: with at least ``prefill_fold_min_rows`` generations running, prompts skip the prefill
  call and advance one token per iteration as extra rows of the decode call. A prompt token then
  costs one more row of a large batch (about 20 µs for the bundled model on this CPU) instead of a
  step of a batch-of-one sequence (about 55 µs), and the decode batch never waits behind a long
  prefill call; the price is time to first token, about one iteration per prompt token. 0 (the
  default) never folds: in closed-loop load it measured no faster (server/README.md).
* Generations join the running set when their prompt is done and leave it when they finish or
  are cancelled; membership may change at every iteration (state lives in the pool, not in the
  batch: see :mod:`server.batch`).
* Iterations run on one dedicated *engine thread*: planning (gather), the ONNX Runtime call (which
  releases the GIL), and completion (scatter, vectorised sampling). The event loop thread only
  does I/O: it submits work and receives results through one ``call_soon_threadsafe`` per
  iteration, so gRPC reads and writes overlap the whole iteration and the decode loop never
  waits for a consumer. ``lock`` guards the queues, the work items' flags and the pool between
  the two threads.
* Pipelining: the ONNX Runtime calls run on a second thread with up to two plans queued. With at
  least ``2 * pipeline_min_rows`` generations running they are split into two halves that
  alternate, so the engine completes one half (Python, holding the GIL) while the other half's
  model call runs; a work item is never in two plans at once.
* When the engine is idle (no generation, no queued work), client-driven steps never leave the
  event loop thread: one-token steps arriving in the same loop tick run as one batch at the end
  of the tick (:meth:`Scheduler.submit_inline`, up to ``inline_max_rows`` rows), and a short
  multi-token step runs at once (:meth:`Scheduler.run_now`). Two thread hand-offs per step cost
  more than the model call at these sizes.
* Work cancelled with :meth:`Scheduler.abandon` is dropped at the next iteration, and if its model
  call was in flight its outputs are not written back; ``abandon`` also puts the slot back as the
  caller's snapshot says, under the lock, so no later write can overwrite it.
* A generation's tokens accumulate in its list; its ``event`` is set on the first token, when it
  finishes, and otherwise every ``max(stream_chunk_tokens, running generations)`` tokens (at most
  ``MAX_STREAM_CHUNK``): about one message per iteration in all. The consumer then takes
  everything new. Python gRPC costs tens of microseconds per message, so a message per token
  would dominate; generations get different phases so their messages spread over iterations.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .batch import Batch, SlotSnapshot, StatePool
from .errors import ResourceExhausted
from .metrics import SchedulerStats
from .runtime import ModelRuntime
from .sampling import sample

log = logging.getLogger(__name__)

MAX_STREAM_CHUNK = 64  # tokens; bounds the gap between a generation's messages


class StepWork:
    """Tokens to feed to one session; its future gets ``(logits[positions, V])``.

    With ``want_all`` every fed position's logits are returned, else only the last one's.
    """

    __slots__ = (
        "cancelled",
        "chunks",
        "enqueued",
        "future",
        "inflight",
        "pos",
        "slot",
        "tokens",
        "want_all",
    )

    def __init__(
        self, slot: int, tokens: np.ndarray, want_all: bool, future: asyncio.Future[np.ndarray]
    ) -> None:
        self.slot = slot
        self.tokens = tokens
        self.pos = 0
        self.want_all = want_all
        self.chunks: list[np.ndarray] = []
        self.future = future
        self.enqueued = time.perf_counter()
        self.cancelled = False
        self.inflight = False

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.pos


class Generation:
    """A running generation: the scheduler feeds ``next_token``, samples the next one, repeats.

    Finishes (``finish`` set to ``"length"`` or ``"stop"``) once its last token has been fed, so
    the session's state then holds every generated token and the pool holds the distribution
    after it. ``stop_cut`` is the length of the returned text when a stop string ended it.
    """

    __slots__ = (
        "_ubuf",
        "cancelled",
        "done_after_feed",
        "error",
        "event",
        "fed",
        "finish",
        "inflight",
        "max_tokens",
        "next_token",
        "phase",
        "rng",
        "slot",
        "stop_cut",
        "stops",
        "table",
        "temperature",
        "text",
        "tokens",
        "top_k",
        "top_p",
    )

    def __init__(
        self,
        slot: int,
        *,
        max_tokens: int,
        temperature: float,
        top_k: int,
        top_p: float,
        seed: int,
        stops: Sequence[str] = (),
        table: Sequence[str] = (),
    ) -> None:
        self.slot = slot
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.rng = np.random.default_rng(seed)
        self._ubuf: list[float] = []
        self.stops = tuple(stops)
        self.table = table  # token id -> text, to watch for stop strings
        self.text = ""
        self.tokens: list[int] = []
        self.next_token = -1
        self.phase = 0
        self.done_after_feed = False
        self.fed = 0
        self.finish: str | None = None
        self.stop_cut = -1
        self.cancelled = False
        self.inflight = False
        self.error: BaseException | None = None
        self.event = asyncio.Event()

    def uniform(self) -> float:
        """The next number of this request's own random sequence."""
        if not self._ubuf:
            # Drawn in blocks (one numpy call per 64 tokens), consumed in order.
            self._ubuf = self.rng.random(64).tolist()[::-1]
        return self._ubuf.pop()

    def accept(self, token: int) -> None:
        """Record a sampled token (to be fed next iteration) and check the end conditions."""
        self.tokens.append(token)
        self.next_token = token
        if self.stops:
            self.text += self.table[token]
            for s in self.stops:
                if self.text.endswith(s):
                    self.stop_cut = len(self.text) - len(s)
                    self.done_after_feed = True
                    break
        if len(self.tokens) >= self.max_tokens:
            self.done_after_feed = True


_Outputs = list[tuple[np.ndarray, np.ndarray, np.ndarray, float]]


@dataclass
class _Plan:
    decode: Batch | None
    gens: list[Generation]
    steps: list[StepWork]
    prefill: Batch | None
    prefill_work: list[StepWork]
    prefill_len: int
    split: bool = False
    folded: list[StepWork] = field(default_factory=list)  # prompts riding the decode call


@dataclass
class _Delivery:
    """What one iteration hands back to the event loop thread."""

    results: list[tuple[asyncio.Future[np.ndarray], np.ndarray]] = field(default_factory=list)
    errors: list[tuple[asyncio.Future[np.ndarray], BaseException]] = field(default_factory=list)
    wake: list[Generation] = field(default_factory=list)


class Scheduler:
    """Continuous-batching scheduler over one :class:`ModelRuntime` and one :class:`StatePool`.

    :meth:`start` from the event loop, then :meth:`submit` / :meth:`run_now` /
    :meth:`add_generation` / :meth:`abandon` from that loop's thread; :meth:`stop` ends it.
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
        pipeline_min_rows: int = 0,
        prefill_fold_min_rows: int = 0,
        stats: SchedulerStats | None = None,
    ) -> None:
        self.runtime = runtime
        self.pool = pool
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.inline_max_rows = inline_max_rows
        self.stream_chunk_tokens = max(1, stream_chunk_tokens)
        self.pipeline_min_rows = pipeline_min_rows
        self.prefill_fold_min_rows = prefill_fold_min_rows
        self.stats = stats if stats is not None else SchedulerStats()
        self.lock = threading.Lock()
        self._cond = threading.Condition(self.lock)
        self._decode: deque[StepWork] = deque()
        self._prefill: list[StepWork] = []
        self._gens: list[Generation] = []
        self._phase = 0
        self._last_rows = 0
        self._running = False  # the engine holds a plan
        self._tick: list[StepWork] = []  # steps batched on the event loop this tick
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # ORT calls run here so the engine thread can complete one plan while the next runs.
        self._runner = ThreadPoolExecutor(1, thread_name_prefix="lstm-ort")

    # --- public API (event loop thread) ------------------------------------------------------

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
        self._runner.shutdown(wait=False)

    @property
    def queued(self) -> int:
        return len(self._decode) + len(self._prefill)

    @property
    def running_generations(self) -> int:
        """Generations still to be fed (cancelled ones no longer count)."""
        return sum(1 for g in list(self._gens) if g.finish is None and not g.cancelled)

    def submit(self, slot: int, tokens: np.ndarray, *, want_all: bool = False) -> StepWork:
        """Queue ``tokens`` (int64, non-empty, ids already checked) for the session at ``slot``.

        Await ``work.future`` for the logits ``[positions, V]``. Raises
        :class:`ResourceExhausted` when the queue is full. The slot's state is advanced and its
        next-token logits recorded when the work completes.
        """
        assert self._loop is not None, "start() first"
        work = StepWork(slot, tokens, want_all, self._loop.create_future())
        with self._cond:
            if self.queued >= self.max_queue_size:
                raise ResourceExhausted(
                    f"request queue is full (max_queue_size={self.max_queue_size}); retry later"
                )
            if len(tokens) == 1:
                self._decode.append(work)
            else:
                self._prefill.append(work)
            self.stats.queue_depth = self.queued
            self._cond.notify()
        return work

    def run_now(
        self, slot: int, tokens: np.ndarray, *, want_all: bool = False
    ) -> np.ndarray | None:
        """Run a tiny request at once, on this thread, when the engine is idle.

        Same effect and result as :meth:`submit` + awaiting the future; None when the engine is
        busy or the request has more than ``inline_max_rows`` tokens (then submit it).
        """
        if len(tokens) > self.inline_max_rows or not self.lock.acquire(blocking=False):
            return None
        try:
            if self._running or self._has_work():
                return None
            slots = np.array([slot], np.intp)
            batch = Batch.assemble(self.pool, slots, tokens.reshape(-1, 1))
            t0 = time.perf_counter()
            logits, hn, cn = self.runtime.run(batch.tokens, batch.h, batch.c)
            dt = time.perf_counter() - t0
            batch.write_back(self.pool, hn, cn)
            self.pool.set_logits(slots, logits[-1])
            stats = self.stats
            stats.iterations += 1
            stats.model_call.observe(dt)
            stats.batch_size.observe(1)
            stats.queue_wait.observe(0.0)
            stats.tokens["decode" if len(tokens) == 1 else "prefill"] += len(tokens)
        finally:
            self.lock.release()
        return logits[:, 0].copy() if want_all else logits[-1:, 0].copy()

    def submit_inline(
        self, slot: int, tokens: np.ndarray, *, want_all: bool = False
    ) -> StepWork | None:
        """Queue a one-token step to run on this (event loop) thread at the end of the current
        loop tick, in one batch with every other step that arrives in the same tick.

        For client-driven steps with no generation running: batching them this way costs no
        thread hand-off. Await ``work.future`` as with :meth:`submit`. None when the engine is
        busy or the tick's batch is full (``inline_max_rows``): then :meth:`submit`.
        """
        if (
            len(tokens) != 1
            or len(self._tick) >= self.inline_max_rows
            or self._running
            or self._has_work()
        ):
            return None
        assert self._loop is not None, "start() first"
        work = StepWork(slot, tokens, want_all, self._loop.create_future())
        self._tick.append(work)
        if len(self._tick) == 1:
            self._loop.call_soon(self._flush_tick)
        return work

    def _flush_tick(self) -> None:
        steps = [w for w in self._tick if not w.cancelled]
        self._tick = []
        if not steps:
            return
        with self._cond:
            if self._running or self._has_work():
                # The engine got work meanwhile: it takes these too (same batch semantics).
                self._decode.extend(steps)
                self._cond.notify()
                return
            now = time.perf_counter()
            for w in steps:
                self.stats.queue_wait.observe(now - w.enqueued)
                w.enqueued = -1.0
            n = len(steps)
            slots = np.fromiter((w.slot for w in steps), np.intp, n)
            tokens = np.fromiter((int(w.tokens[0]) for w in steps), np.int64, n).reshape(1, -1)
            plan = _Plan(Batch.assemble(self.pool, slots, tokens), [], steps, None, [], 0)
            try:
                delivery = self._complete(plan, self._run(plan))
            except Exception as e:
                log.exception("model call failed")
                delivery = self._fail(plan, e)
        self._deliver(delivery)

    def add_generation(self, gen: Generation, logits: np.ndarray) -> None:
        """Sample ``gen``'s first token from ``logits[V]`` and add it to the running set."""
        token = self._sample([gen], logits[None, :])
        gen.accept(int(token[0]))
        gen.event.set()
        with self._cond:
            self._phase += 1
            gen.phase = self._phase
            self._gens.append(gen)
            self._cond.notify()

    def abandon(
        self,
        item: StepWork | Generation | None,
        slot: int = -1,
        snapshot: SlotSnapshot | None = None,
    ) -> None:
        """Cancel ``item`` (if any) and, when given, put ``slot`` back to ``snapshot``.

        After this returns the engine never writes the item's outputs to the pool.
        """
        with self._cond:
            if item is not None:
                item.cancelled = True
            if snapshot is not None and slot >= 0:
                self.pool.restore(slot, snapshot)
            self._cond.notify()

    def locked(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` holding the pool lock (for pool reads/writes outside the engine)."""
        with self.lock:
            return fn()

    # --- the engine thread -------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._decode or self._prefill or self._gens)

    def _engine(self) -> None:
        inflight: deque[tuple[_Plan, Future[_Outputs]]] = deque()
        while True:
            with self._cond:
                while not self._stopping and not inflight and not self._has_work():
                    self._cond.wait()
                if self._stopping:
                    return
                if (
                    not inflight
                    and self.max_queue_delay_s > 0
                    and not self._gens
                    and not self._prefill
                    and 0 < len(self._decode) < min(self._last_rows, self.max_batch_size)
                ):
                    # Fewer steps arrived than ran last time: the rest are probably on their way.
                    self._cond.wait(self.max_queue_delay_s)
                direct: _Plan | None = None
                if not inflight:
                    first = self._plan(split=True)
                    if first is None:
                        continue
                    if first.split:
                        # Two halves queued on the runner thread: while one runs (GIL
                        # released), this thread completes the other.
                        inflight.append((first, self._runner.submit(self._run, first)))
                    else:
                        direct = first  # no hop to the runner when there is nothing to overlap
                if inflight and len(inflight) < 2:
                    nxt = self._plan()
                    if nxt is not None:
                        inflight.append((nxt, self._runner.submit(self._run, nxt)))
                self._running = True
            error: Exception | None = None
            outputs: _Outputs = []
            if direct is not None:
                plan, fut = direct, None
            else:
                plan, fut = inflight.popleft()
            try:
                outputs = self._run(plan) if fut is None else fut.result()
            except Exception as e:  # a model failure fails this iteration's requests only
                log.exception("model call failed")
                error = e
            with self._cond:
                try:
                    delivery = self._fail(plan, error) if error else self._complete(plan, outputs)
                except Exception as e:  # a bug here must not stop the engine for everyone
                    log.exception("completing an iteration failed")
                    delivery = self._fail(plan, e)
                finally:
                    self._running = bool(inflight)
            assert self._loop is not None
            if not (delivery.results or delivery.errors or delivery.wake):
                continue  # nothing for the event loop: do not wake it
            try:
                self._loop.call_soon_threadsafe(self._deliver, delivery)
            except RuntimeError:  # the loop is closed: shutting down
                return

    @staticmethod
    def _deliver(d: _Delivery) -> None:
        # Event loop thread: futures and events belong to it.
        for fut, result in d.results:
            if not fut.done():
                fut.set_result(result)
        for fut, exc in d.errors:
            if not fut.done():
                fut.set_exception(exc)
        for g in d.wake:
            g.event.set()

    def _plan(self, split: bool = False) -> _Plan | None:
        """Take ready work for one iteration (work in a plan still in flight is not ready).

        ``split``: with at least ``2 * pipeline_min_rows`` generations ready, take half of
        them, so that the rest form a second plan that runs while this one is completed.
        """
        now = time.perf_counter()
        self._gens = [g for g in self._gens if g.finish is None and not g.cancelled]
        budget = self.max_batch_size
        steps: list[StepWork] = []
        while self._decode and len(steps) < budget:
            w = self._decode.popleft()
            if not w.cancelled:
                steps.append(w)
        # A new list: generations may join while this plan runs.
        gens = [g for g in self._gens if not g.inflight]
        take = budget - len(steps)
        halved = split and self.pipeline_min_rows > 0 and 2 * self.pipeline_min_rows <= len(gens)
        if halved:
            gens = gens[: min(take, (len(gens) + 1) // 2)]
            self.stats.split_plans += 1
        elif len(gens) > take:
            # Over the batch limit: round robin, the ones left out go first next time.
            chosen = {id(g) for g in gens[:take]}
            gens = gens[:take]
            self._gens = [g for g in self._gens if id(g) not in chosen] + gens
        for g in gens:
            g.inflight = True
        if self._prefill:
            self._prefill = [w for w in self._prefill if not w.cancelled]
        waiting = [w for w in self._prefill if not w.inflight]
        folded: list[StepWork] = []
        if (
            waiting
            and self.prefill_fold_min_rows > 0
            and len(self._gens) >= self.prefill_fold_min_rows
        ):
            folded = waiting[: max(0, budget - len(steps) - len(gens))]
            waiting = waiting[len(folded) :]
            for w in folded:
                w.inflight = True
        waits = [now - w.enqueued for w in steps if w.enqueued > 0]
        waits += [now - w.enqueued for w in folded if w.enqueued > 0]
        decode = None
        if steps or gens or folded:
            rows = [*steps, *folded]
            n = len(gens) + len(rows)
            slots = np.fromiter([g.slot for g in gens] + [w.slot for w in rows], np.intp, n)
            tokens = np.fromiter(
                [g.next_token for g in gens] + [int(w.tokens[w.pos]) for w in rows],
                np.int64,
                n,
            ).reshape(1, -1)
            decode = Batch.assemble(self.pool, slots, tokens)
        prefill = None
        group: list[StepWork] = []
        chunk = 0
        if waiting:
            chunk = min(waiting[0].remaining, self.prefill_chunk_tokens)
            group = [w for w in waiting if min(w.remaining, self.prefill_chunk_tokens) == chunk][
                : self.max_batch_size
            ]
            for w in group:
                w.inflight = True
            waits += [now - w.enqueued for w in group if w.enqueued > 0]
            slots = np.fromiter((w.slot for w in group), np.intp, len(group))
            tokens = np.stack([w.tokens[w.pos : w.pos + chunk] for w in group], axis=1)
            prefill = Batch.assemble(self.pool, slots, tokens)
        for w in [*steps, *folded, *group]:
            w.enqueued = -1.0
        if len(waits) > 8:
            self.stats.queue_wait.observe_many(np.asarray(waits))
        else:
            for wait in waits:
                self.stats.queue_wait.observe(wait)
        self.stats.queue_depth = self.queued
        if decode is None and prefill is None:
            return None
        return _Plan(decode, gens, steps, prefill, group, chunk, halved, folded)

    def _run(self, plan: _Plan) -> _Outputs:
        # Without the lock: touches nothing but the plan's own arrays and ORT.
        out = []
        for batch in (plan.decode, plan.prefill):
            if batch is None:
                continue
            t0 = time.perf_counter()
            logits, hn, cn = self.runtime.run(batch.tokens, batch.h, batch.c)
            out.append((logits, hn, cn, time.perf_counter() - t0))
        return out

    def _fail(self, plan: _Plan, error: Exception) -> _Delivery:
        d = _Delivery()
        err = RuntimeError(f"model call failed: {type(error).__name__}")
        for w in [*plan.steps, *plan.prefill_work, *plan.folded]:
            w.inflight = False
            d.errors.append((w.future, err))
            if w in self._prefill:
                self._prefill.remove(w)
        for g in plan.gens:
            g.inflight = False
            g.error = err
            g.finish = "error"
            d.wake.append(g)
        return d

    def _complete(self, plan: _Plan, outputs: _Outputs) -> _Delivery:
        d = _Delivery()
        stats = self.stats
        stats.iterations += 1
        it = iter(outputs)
        if plan.decode is not None:
            logits, hn, cn, dt = next(it)
            rows = len(plan.decode.slots)
            stats.model_call.observe(dt)
            stats.batch_size.observe(rows)
            stats.tokens["decode"] += rows - len(plan.folded)
            stats.tokens["prefill"] += len(plan.folded)
            stats.folded_rows += len(plan.folded)
            self._last_rows = rows
            self._finish_decode(plan, logits[0], hn, cn, d)
        if plan.prefill is not None:
            logits, hn, cn, dt = next(it)
            stats.model_call.observe(dt)
            stats.batch_size.observe(len(plan.prefill.slots))
            stats.tokens["prefill"] += plan.prefill_len * len(plan.prefill.slots)
            self._finish_prefill(plan, logits, hn, cn, d)
        stats.queue_depth = self.queued
        return d

    def _finish_decode(
        self, plan: _Plan, logits: np.ndarray, hn: np.ndarray, cn: np.ndarray, d: _Delivery
    ) -> None:
        assert plan.decode is not None
        gens, steps, folded = plan.gens, plan.steps, plan.folded
        ng = len(gens)
        cancelled = (
            any(g.cancelled for g in gens)
            or any(w.cancelled for w in steps)
            or any(w.cancelled for w in folded)
        )
        if not cancelled:
            plan.decode.write_back(self.pool, hn, cn)
            self.pool.set_logits(plan.decode.slots, logits)
        else:
            keep = np.asarray(
                [not g.cancelled for g in gens] + [not w.cancelled for w in [*steps, *folded]]
            )
            plan.decode.write_back(self.pool, hn, cn, keep)
            self.pool.set_logits(plan.decode.slots[keep], logits[keep])
        if ng:
            to_sample: list[Generation] = []
            rows: list[int] = []
            for i, g in enumerate(gens):
                g.inflight = False
                if g.cancelled:
                    continue
                g.fed += 1
                if g.done_after_feed:
                    g.finish = "stop" if g.stop_cut >= 0 else "length"
                    d.wake.append(g)
                else:
                    to_sample.append(g)
                    rows.append(i)
            if to_sample:
                tokens = self._sample(to_sample, logits[rows] if len(rows) < ng else logits[:ng])
                # About one message per iteration in all: with many generations running each
                # one's chunk grows (up to MAX_STREAM_CHUNK), since every message costs the
                # event loop tens of microseconds whatever its size.
                chunk = min(MAX_STREAM_CHUNK, max(self.stream_chunk_tokens, ng))
                wake = d.wake
                for g, t in zip(to_sample, tokens.tolist(), strict=True):
                    g.accept(t)
                    if (len(g.tokens) + g.phase) % chunk == 0 or g.done_after_feed:
                        wake.append(g)
        # Steps have one token left; a folded prompt may have more, and then waits for the next
        # decode call.
        folded_from = ng + len(steps)
        for i, w in enumerate([*steps, *folded], start=ng):
            w.inflight = False
            if w.cancelled:
                continue
            row = logits[i]
            w.pos += 1
            if w.want_all:
                w.chunks.append(row[None, :].copy())
            if w.remaining:
                continue
            if i >= folded_from:
                self._prefill.remove(w)
            if w.want_all:
                result = np.concatenate(w.chunks) if len(w.chunks) > 1 else w.chunks[0]
            else:
                result = row[None, :].copy()
            d.results.append((w.future, result))

    def _finish_prefill(
        self, plan: _Plan, logits: np.ndarray, hn: np.ndarray, cn: np.ndarray, d: _Delivery
    ) -> None:
        assert plan.prefill is not None
        group = plan.prefill_work
        live = [not w.cancelled for w in group]
        keep = None if all(live) else np.asarray(live)
        plan.prefill.write_back(self.pool, hn, cn, keep)
        for i, w in enumerate(group):
            w.inflight = False
            if w.cancelled:
                continue
            w.pos += plan.prefill_len
            if w.want_all:
                w.chunks.append(logits[:, i].copy())
            if w.remaining == 0:
                self._prefill.remove(w)
                self.pool.set_logits(np.array([w.slot]), logits[-1, i][None, :])
                result = np.concatenate(w.chunks) if w.want_all else logits[-1, i][None, :].copy()
                d.results.append((w.future, result))
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
