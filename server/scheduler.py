"""Continuous batching: every session's pending work shares one model call per iteration.

Contract (what callers may rely on):

* An *iteration* is at most one **decode** call and at most one **prefill** call.
  The decode call feeds exactly one token to each of up to ``max_batch_size`` sessions: every
  running generation and every step request with one token left to feed. The prefill call feeds
  one group of prompts cut to the same chunk length (``min(remaining, prefill_chunk_tokens)``),
  so a long prompt advances a chunk per iteration and never stalls running generations for more
  than one chunk.
* Generations join the running set when their prompt is done and leave it when they finish or
  are cancelled; membership may change at every iteration (state lives in the pool, not in the
  batch: see :mod:`server.batch`).
* The state pool is read and written only on the event loop thread; only the ONNX Runtime call
  itself may run in the model thread (ORT releases the GIL, so gRPC I/O goes on meanwhile).
  Calls of at most ``inline_max_rows`` rows run inline: a thread hop costs more than they do.
* Pipelining: up to two plans are queued on the model thread. With at least
  ``2 * pipeline_min_rows`` generations running, they are split into two halves that alternate,
  so the Python work of completing one half (sampling, scatter, waking streams) overlaps the
  model call of the other; a session is never in two plans at once.
* Work marked ``cancelled`` is dropped at the next iteration, and if it was in flight its
  outputs are not written back: the caller may restore or free the slot at once.
* The decode loop never waits for a consumer: a generation's tokens accumulate in its list and
  its ``event`` is set on the first token, when it finishes, and otherwise every
  ``stream_chunk_tokens`` tokens; the consumer then takes everything new. Python gRPC costs tens
  of microseconds of event-loop time per message, so a message per token would starve the decode
  loop. Generations are given different phases so that each iteration wakes only about
  ``1/stream_chunk_tokens`` of them, and their writes overlap the next model call instead of
  piling up in one iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .batch import Batch, StatePool
from .errors import ResourceExhausted
from .metrics import SchedulerStats
from .runtime import ModelRuntime
from .sampling import sample

log = logging.getLogger(__name__)


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
        self._ubuf: list[float] = []
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

    @property
    def rows(self) -> int:
        n = 0 if self.decode is None else len(self.decode.slots)
        if self.prefill is not None:
            n += self.prefill_len * len(self.prefill.slots)
        return n


class Scheduler:
    """Continuous-batching scheduler over one :class:`ModelRuntime` and one :class:`StatePool`.

    Use from one event loop: :meth:`start`, then :meth:`submit` / :meth:`add_generation`;
    :meth:`stop` ends the loop.
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
        inline_max_rows: int = 4,
        stream_chunk_tokens: int = 16,
        pipeline_min_rows: int = 16,
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
        self._phase = 0
        self.stats = stats if stats is not None else SchedulerStats()
        self._decode: deque[StepWork] = deque()
        self._prefill: list[StepWork] = []
        self._gens: list[Generation] = []
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lstm-model")
        self._task: asyncio.Task[None] | None = None
        self._last_rows = 0
        self._active = False  # the loop holds plans (queued or running on the model thread)

    # --- public API ------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="lstm-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    @property
    def queued(self) -> int:
        return len(self._decode) + len(self._prefill)

    @property
    def running_generations(self) -> int:
        return len(self._gens)

    def submit(self, slot: int, tokens: np.ndarray, *, want_all: bool = False) -> StepWork:
        """Queue ``tokens`` (int64, non-empty, ids already checked) for the session at ``slot``.

        Await ``work.future`` for the logits. Raises :class:`ResourceExhausted` when the queue
        is full. The slot's state is advanced and its next-token logits recorded on completion.
        """
        if self.queued >= self.max_queue_size:
            raise ResourceExhausted(
                f"request queue is full (max_queue_size={self.max_queue_size}); retry later"
            )
        work = StepWork(slot, tokens, want_all, asyncio.get_running_loop().create_future())
        if len(tokens) == 1:
            self._decode.append(work)
        else:
            self._prefill.append(work)
        self.stats.queue_depth = self.queued
        self._wake.set()
        return work

    def run_now(
        self, slot: int, tokens: np.ndarray, *, want_all: bool = False
    ) -> np.ndarray | None:
        """Run a tiny request at once, on this thread, when nothing else is queued or running.

        Same effect and result as :meth:`submit` + awaiting the future; None when the scheduler
        is busy or the request has more than ``inline_max_rows`` tokens (then submit it).
        """
        if self._active or self._has_work() or len(tokens) > self.inline_max_rows:
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
        return logits[:, 0].copy() if want_all else logits[-1:, 0].copy()

    def add_generation(self, gen: Generation, logits: np.ndarray) -> None:
        """Sample ``gen``'s first token from ``logits[V]`` and add it to the running set."""
        token = self._sample([gen], logits[None, :])
        gen.accept(int(token[0]))
        gen.event.set()
        self._phase += 1
        gen.phase = self._phase % self.stream_chunk_tokens
        self._gens.append(gen)
        self._wake.set()

    def wake(self) -> None:
        """Make the loop look at cancellations now rather than at the next iteration."""
        self._wake.set()

    # --- the loop ----------------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        inflight: deque[tuple[_Plan, asyncio.Future[_Outputs]]] = deque()
        while True:
            if not inflight and not self._has_work():
                self._wake.clear()
                await self._wake.wait()
            if (
                not inflight
                and self.max_queue_delay_s > 0
                and not self._gens
                and not self._prefill
                and 0 < len(self._decode) < min(self._last_rows, self.max_batch_size)
            ):
                # Fewer steps arrived than ran last time: the rest are probably on their way.
                await asyncio.sleep(self.max_queue_delay_s)
            ran_inline = False
            self._active = True
            # Keep up to two plans queued on the model thread: while one runs (GIL released),
            # this thread completes the previous one and serves gRPC.
            while len(inflight) < 2:
                plan = self._plan(split=not inflight)
                if plan is None:
                    break
                if not inflight and plan.rows <= self.inline_max_rows:
                    self._execute_inline(plan)
                    ran_inline = True
                    break
                inflight.append((plan, loop.run_in_executor(self._executor, self._run, plan)))
            if inflight:
                plan, fut = inflight.popleft()
                try:
                    outputs = await fut
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # a model failure fails that plan's requests only
                    log.exception("model call failed")
                    self._fail(plan, e)
                else:
                    self._complete(plan, outputs)
            elif ran_inline:
                # Let gRPC I/O and new submissions in between back-to-back inline iterations.
                await asyncio.sleep(0)
            self._active = bool(inflight)

    def _execute_inline(self, plan: _Plan) -> None:
        try:
            outputs = self._run(plan)
        except Exception as e:
            log.exception("model call failed")
            self._fail(plan, e)
        else:
            self._complete(plan, outputs)

    def _has_work(self) -> bool:
        return bool(self._decode or self._prefill or self._gens)

    def _plan(self, split: bool = False) -> _Plan | None:
        """Take ready work for one iteration; ``split`` = leave half the generations for a
        second plan when there are enough of them to keep the model busy in two halves."""
        now = time.perf_counter()
        self._gens = [g for g in self._gens if g.finish is None and not g.cancelled]
        budget = self.max_batch_size
        steps: list[StepWork] = []
        while self._decode and len(steps) < budget:
            w = self._decode.popleft()
            if not w.cancelled:
                steps.append(w)
        ready = [g for g in self._gens if not g.inflight]
        take = budget - len(steps)
        if split and self.pipeline_min_rows and len(ready) >= 2 * self.pipeline_min_rows:
            take = min(take, (len(ready) + 1) // 2)
        gens = ready
        if len(ready) > take:
            gens = ready[:take]
            if take == budget - len(steps):
                # Over the batch limit (not a split): round robin, the ones left out go first
                # next time.
                chosen = {id(g) for g in gens}
                self._gens = [g for g in self._gens if id(g) not in chosen] + gens
        for g in gens:
            g.inflight = True
        waits = [now - w.enqueued for w in steps if w.enqueued > 0]
        decode = None
        if steps or gens:
            n = len(gens) + len(steps)
            slots = np.fromiter([g.slot for g in gens] + [w.slot for w in steps], np.intp, n)
            tokens = np.fromiter(
                [g.next_token for g in gens] + [int(w.tokens[w.pos]) for w in steps],
                np.int64,
                n,
            ).reshape(1, -1)
            decode = Batch.assemble(self.pool, slots, tokens)
        prefill = None
        group: list[StepWork] = []
        chunk = 0
        self._prefill = [w for w in self._prefill if not w.cancelled]
        waiting = [w for w in self._prefill if not w.inflight]
        if waiting:
            chunk = min(waiting[0].remaining, self.prefill_chunk_tokens)
            group = [w for w in waiting if min(w.remaining, self.prefill_chunk_tokens) == chunk][
                : self.max_batch_size
            ]
            waits += [now - w.enqueued for w in group if w.enqueued > 0]
            slots = np.fromiter((w.slot for w in group), np.intp, len(group))
            tokens = np.stack([w.tokens[w.pos : w.pos + chunk] for w in group], axis=1)
            prefill = Batch.assemble(self.pool, slots, tokens)
            for w in group:
                w.inflight = True
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
        return _Plan(decode, gens, steps, prefill, group, chunk)

    def _run(self, plan: _Plan) -> _Outputs:
        # May run in the model thread: touches nothing but the plan's own arrays and ORT.
        out = []
        for batch in (plan.decode, plan.prefill):
            if batch is None:
                continue
            t0 = time.perf_counter()
            logits, hn, cn = self.runtime.run(batch.tokens, batch.h, batch.c)
            out.append((logits, hn, cn, time.perf_counter() - t0))
        return out

    def _fail(self, plan: _Plan, error: Exception) -> None:
        err = RuntimeError(f"model call failed: {type(error).__name__}")
        for w in [*plan.steps, *plan.prefill_work]:
            w.inflight = False
            if not w.future.done():
                w.future.set_exception(err)
            if w in self._prefill:
                self._prefill.remove(w)
        for g in plan.gens:
            g.inflight = False
            g.error = err
            g.finish = "error"
            g.event.set()

    def _complete(self, plan: _Plan, outputs: _Outputs) -> None:
        stats = self.stats
        stats.iterations += 1
        it = iter(outputs)
        if plan.decode is not None:
            logits, hn, cn, dt = next(it)
            rows = len(plan.decode.slots)
            stats.model_call.observe(dt)
            stats.batch_size.observe(rows)
            stats.tokens["decode"] += rows
            self._last_rows = rows
            self._finish_decode(plan, logits[0], hn, cn)
        if plan.prefill is not None:
            logits, hn, cn, dt = next(it)
            stats.model_call.observe(dt)
            stats.batch_size.observe(len(plan.prefill.slots))
            stats.tokens["prefill"] += plan.prefill_len * len(plan.prefill.slots)
            self._finish_prefill(plan, logits, hn, cn)
        stats.queue_depth = self.queued

    def _finish_decode(
        self, plan: _Plan, logits: np.ndarray, hn: np.ndarray, cn: np.ndarray
    ) -> None:
        assert plan.decode is not None
        gens, steps = plan.gens, plan.steps
        ng = len(gens)
        live = [not g.cancelled for g in gens] + [not w.cancelled for w in steps]
        if all(live):
            plan.decode.write_back(self.pool, hn, cn)
            self.pool.set_logits(plan.decode.slots, logits)
        else:
            keep = np.asarray(live)
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
                    g.event.set()
                else:
                    to_sample.append(g)
                    rows.append(i)
            if to_sample:
                tokens = self._sample(to_sample, logits[rows] if len(rows) < ng else logits[:ng])
                chunk = self.stream_chunk_tokens
                for g, t in zip(to_sample, tokens.tolist(), strict=True):
                    g.accept(t)
                    if (len(g.tokens) + g.phase) % chunk == 0 or g.done_after_feed:
                        g.event.set()
        for j, w in enumerate(steps):
            if w.cancelled:
                continue
            row = logits[ng + j]
            w.pos += 1
            if w.want_all:
                w.chunks.append(row[None, :].copy())
                result = np.concatenate(w.chunks) if len(w.chunks) > 1 else w.chunks[0]
            else:
                result = row[None, :].copy()
            if not w.future.done():
                w.future.set_result(result)

    def _finish_prefill(
        self, plan: _Plan, logits: np.ndarray, hn: np.ndarray, cn: np.ndarray
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
                if not w.future.done():
                    w.future.set_result(result)
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
        u = np.fromiter((g.rng.random() if g.temperature > 0 else 0.0 for g in gens), np.float64, n)
        return sample(logits, temps, top_k, top_p, u)
